"""``podman-delta create OLD NEW FILE``: the delta artifact as an oci-archive file."""

from __future__ import annotations

import argparse
from pathlib import Path

from podman_delta.cli.publish import (
    add_delta_options,
    add_registry_options,
    client_pool,
    platform_of,
    publish_options,
)
from podman_delta.registry.image import open_image_source
from podman_delta.registry.offline import create


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "create",
        help="write the deltas between two images to a file (for air-gapped hosts)",
        description="Write the containers/oci-delta artifact from OLD to NEW as an "
        "oci-archive FILE. OLD and NEW are registry references (docker://… or plain) or "
        "oci-archive:PATH[:NAME] / oci:DIR[:NAME].",
    )
    add_registry_options(parser)
    add_delta_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("old", metavar="OLD")
    parser.add_argument("new", metavar="NEW")
    parser.add_argument("file", metavar="FILE", type=Path)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = publish_options(args, args.quiet)
    pool = client_pool(args)
    platform = platform_of(args)
    old = open_image_source(args.old, pool, platform)
    new = open_image_source(args.new, pool, platform)
    try:
        deltas, digest = create(old, new, args.file, opts)
    finally:
        old.close()
        new.close()
        pool.close()
    if args.dry_run:
        print(deltas.table())
    else:
        print(f"{args.file}: delta artifact {digest}")
    return 0
