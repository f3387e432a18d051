"""``podman-delta diff OLD [OLD...] NEW DELTA``: make a tar-diff delta (Go tar-diff's order)."""

from __future__ import annotations

import argparse
import logging
import sys

from podman_delta.tardiff.differ import DiffOptions, diff_file

log = logging.getLogger(__name__)

DESCRIPTION = """\
Make a delta that rebuilds the NEW layer tar from the contents of the OLD layer tars.

OLD tars are given lowest layer first (extraction order); whiteouts in later ones are honoured.
Inputs may be uncompressed, gzip, zstd, bzip2 or xz tars (sniffed, not guessed from the name).

Formats: 'tardf1' uses ops 0-4 only and applies with every tar-patch, including Go tar-patch
v0.1.2. 'tardf2' may also use op 5 (a zstd frame with an old file as dictionary), which only
newer appliers understand. 'auto' (default) uses op 5 only for files where it beats every other
encoding. With 'auto' or 'tardf2', a delta that ends up with no op 5 is written as tardf1, so
every applier accepts it.

Exit code 6 means the delta would not be smaller than the zstd-compressed NEW tar: ship the layer
instead (no delta file is written).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="make a tar-diff delta from old layer tar(s) to a new one",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("old", nargs="+", metavar="OLD", help="old layer tar(s), lowest first")
    parser.add_argument("new", metavar="NEW", help="new layer tar")
    parser.add_argument("delta", metavar="DELTA", help="delta file to write")
    parser.add_argument(
        "--format",
        choices=["auto", "tardf1", "tardf2"],
        default="auto",
        help="delta format (default: auto, see above)",
    )
    parser.add_argument(
        "--compression-level",
        type=int,
        default=DiffOptions.level,
        metavar="N",
        help=f"zstd level of the op stream (default: {DiffOptions.level})",
    )
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N", help="worker threads (default: all cores)"
    )
    parser.add_argument(
        "--max-bsdiff-size",
        type=int,
        default=DiffOptions.max_bsdiff_size >> 20,
        metavar="MiB",
        help="largest old file bsdiff'ed whole; larger ones are diffed in windows "
        f"(default: {DiffOptions.max_bsdiff_size >> 20}; bsdiff needs ~18x this in RAM)",
    )
    parser.add_argument("--tmpdir", help="directory for decompressed inputs (default: $TMPDIR)")
    parser.add_argument(
        "--no-size-check",
        action="store_true",
        help="write the delta even when it is not smaller than the compressed NEW tar",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.new == "-" or args.delta == "-" or "-" in args.old:
        parser_error = "diff needs seekable files: '-' is not supported"
        print(f"podman-delta: error: {parser_error}", file=sys.stderr)
        return 2
    options = DiffOptions(
        format=args.format,
        level=args.compression_level,
        threads=args.threads,
        max_bsdiff_size=max(1, args.max_bsdiff_size) << 20,
        tmpdir=args.tmpdir,
        check_size=not args.no_size_check,
    )
    stats = diff_file(args.old, args.new, args.delta, options)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.files.items()))
    summary = (
        f"{args.delta}: {stats.delta_size} bytes (tardf{stats.version}), new tar "
        f"{stats.new_tar_size} bytes, {stats.compressed_text()}; files: {counts}"
    )
    log.info("%s", summary)
    if sys.stderr.isatty():
        print(summary, file=sys.stderr)
    return 0
