"""``podman-delta changes``: list added, removed and modified paths between two layer trees."""

from __future__ import annotations

import argparse
import json
import sys

from podman_delta.tardiff.changes import ChangeList, changes, changes_from_delta

DESCRIPTION = """\
List what changed between two layer trees, like a git change list: A added, D removed,
M modified, with sizes. Mode, owner, xattr and symlink-target changes count as modifications and
are noted; modification times are ignored.

  podman-delta changes OLD NEW              each a directory, a tar or a compressed tar
  podman-delta changes --delta DELTA OLD    what applying DELTA to OLD would change

--source stacks more layers above OLD (lowest first), as for 'patch'.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "changes",
        help="list added, removed and modified paths between two layers (or a delta's effect)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="OLD [NEW]", help="old tree, then new tree")
    parser.add_argument("--delta", metavar="DELTA", help="compare OLD with DELTA applied to it")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="PATH",
        help="another old layer stacked above OLD; repeatable, lowest first",
    )
    parser.add_argument("--digest", metavar="sha256:HEX", help="with --delta: verify the result")
    parser.add_argument("--tmpdir", help="with --delta: where the rebuilt tar is kept meanwhile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    want = 1 if args.delta else 2
    if len(args.paths) != want:
        usage = "changes --delta DELTA OLD" if args.delta else "changes OLD NEW"
        args.parser.error(f"expected {want} path(s): {usage}")
    old = [args.paths[0], *args.source]
    extra: dict[str, object] = {}
    if args.delta:
        result, patched = changes_from_delta(
            args.delta, old, expected_digest=args.digest, tmpdir=args.tmpdir
        )
        extra = {"new_digest": patched.digest, "new_size": patched.size}
    else:
        result = changes(old, [args.paths[1]])
    _print(result, args.json, extra)
    return 0


def _print(result: ChangeList, as_json: bool, extra: dict[str, object]) -> None:
    out = sys.stdout
    if as_json:
        json.dump({**result.to_dict(), **extra}, out, indent=2)
        out.write("\n")
        return
    for line in result.lines():
        out.write(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n")
    if extra:
        out.write(f"new layer: {extra['new_digest']} ({extra['new_size']} bytes)\n")
