"""``podman-delta patch DELTA OLD OUT``: apply a tar-diff delta (Go tar-patch's argument order)."""

from __future__ import annotations

import argparse

from podman_delta.cli import HelpFormatter
from podman_delta.tardiff.patcher import patch_file
from podman_delta.tardiff.sources import open_source

DESCRIPTION = """\
Rebuild the new layer tar from a tar-diff delta (tardf1 or tardf2) and the old files.

OLD is the old tree: a directory (an extracted layer, an overlay diff dir, a vfs layer dir) or a
layer tar (uncompressed or compressed), read in place. Extra --source trees are stacked ON TOP of
OLD in the order given (lowest first, like image layers); whiteouts and opaque directories of the
upper ones hide files of the lower ones.

Every name the delta opens is resolved inside the old tree without following symlinks; only
regular files are read. A file OUT appears only when the whole delta applied (and, with
--digest, matched): nothing is left behind on error. OUT may be '-' for stdout; the bytes are then
already written when the digest is checked, so rely on the exit code.
"""


def _size(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "patch",
        help="apply a tar-diff delta to an old tree, producing the new layer tar",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("delta", metavar="DELTA", help="delta file (tardf1/tardf2)")
    parser.add_argument("old", metavar="OLD", help="old tree: directory or layer tar")
    parser.add_argument("out", metavar="OUT", help="new layer tar to write ('-' for stdout)")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="PATH",
        help="another old layer (directory or tar) stacked above OLD; repeatable, lowest first",
    )
    parser.add_argument(
        "--digest",
        metavar="sha256:HEX",
        help="expected digest of the output (the layer DiffID); on mismatch exit 5, no output",
    )
    parser.add_argument(
        "--max-size",
        type=_size,
        metavar="BYTES",
        help="refuse to write more than BYTES of output (guards against hostile deltas)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = open_source([args.old, *args.source])
    try:
        result = patch_file(
            args.delta,
            source,
            args.out,
            expected_digest=args.digest,
            max_output=args.max_size,
        )
    finally:
        source.close()
    if getattr(args, "log_level", "warning") in ("info", "debug"):
        import logging  # only then: logging is not imported at all on the default path

        logging.getLogger(__name__).info("wrote %d bytes, %s", result.size, result.digest)
    return 0
