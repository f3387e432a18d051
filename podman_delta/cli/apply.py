"""``podman-delta apply FILE OUT --source OLD``: rebuild the new image from a delta file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from podman_delta.cli.publish import add_registry_options, client_pool, platform_of
from podman_delta.errors import DeltaError
from podman_delta.registry.image import open_image_source
from podman_delta.registry.offline import apply_archive


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="rebuild the new image from a delta file and the old image",
        description="Apply the delta FILE (made by 'create') to the old image given with "
        "--source and write the new image to OUT as an oci-archive (load it with "
        "'podman load -i OUT'). Every layer is checked against the new image's DiffIDs.",
    )
    add_registry_options(parser)
    parser.add_argument(
        "--source",
        required=True,
        metavar="IMAGE",
        help="the old image: oci-archive:PATH, oci:DIR or docker://REF",
    )
    parser.add_argument("--name", help="image name recorded in OUT's index.json")
    parser.add_argument("--workdir", metavar="DIR", help="scratch directory (default: $TMPDIR)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("file", metavar="FILE", type=Path)
    parser.add_argument("out", metavar="OUT", type=Path)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise DeltaError(f"delta file {args.file} does not exist")
    pool = client_pool(args)
    source = open_image_source(args.source, pool, platform_of(args))

    def report(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    try:
        digest = apply_archive(
            args.file, source, args.out, workdir=args.workdir, name=args.name, report=report
        )
    finally:
        source.close()
        pool.close()
    print(f"{args.out}: image manifest {digest}")
    return 0
