"""``podman-delta prefetch``: fetch newer versions of local images as deltas, ahead of time."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from podman_delta.cli import EXIT_CODES_HELP
from podman_delta.cli.pull import add_pull_arguments, notifier, open_store, pull_options
from podman_delta.prefetch import (
    autoupdate_images,
    cache_dir,
    clean_workdir,
    images_from_file,
    lower_priority,
    prefetch,
    store_images,
)
from podman_delta.progress import make_progress

PREFETCH_HELP = """\
Which images: every tagged image in the store whose name points at a registry (default), the
images of containers labelled io.containers.autoupdate=registry (--autoupdate, those
`podman auto-update` updates), or the references listed in FILE (--images, one per line,
# comments). For each, the registry's manifest digest for the tag is compared with the local
one; a newer image is delta-pulled exactly as `podman-delta pull` does, ending with the real
`podman pull`, so that `podman pull` and `podman auto-update` later find everything local.

Runs at low CPU and I/O priority (nice 10, idle I/O class) unless --no-nice. Safe to
interrupt: complete downloads stay in $CACHE_DIRECTORY (systemd) or
$XDG_CACHE_HOME/podman-delta (default ~/.cache/podman-delta) and are reused by the next run.
Prints one line per image and a summary line; --json prints one JSON object.

""" + EXIT_CODES_HELP.replace(
    "  1  general error\n", "  1  general error (also: at least one image failed; see its line)\n"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prefetch",
        help="fetch newer versions of local images as deltas, ahead of time",
        description="Delta-pull newer versions of the images in the store before anyone asks.",
        epilog=PREFETCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pull_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--autoupdate",
        action="store_true",
        help="only images of containers labelled io.containers.autoupdate=registry",
    )
    which.add_argument("--images", metavar="FILE", help="only the references listed in FILE")
    parser.add_argument(
        "--no-nice", action="store_true", help="keep the normal CPU and I/O priority"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ["PODMAN_DELTA_DISABLE"] = "1"
    if not args.no_nice:
        lower_priority()
    store = open_store(args)
    options = pull_options(args, store.options)
    work = args.workdir or str(cache_dir() / "prefetch")
    options.workdir = work
    options.keep_downloads = True
    if args.images:
        names = images_from_file(args.images)
    elif args.autoupdate:
        names = autoupdate_images(options.podman, store)
    else:
        names = store_images(store)
    quiet = args.quiet or args.json
    report = prefetch(
        store,
        names,
        options,
        dry_run=args.dry_run,
        progress=make_progress(quiet=quiet),
        notify=notifier(argparse.Namespace(quiet=quiet)),
    )
    if not report.failed and not args.dry_run:
        clean_workdir(Path(work))
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    elif not args.quiet:
        print(report.summary())
    for item in report.failed:
        if quiet:
            print(f"podman-delta: error: {item.line()}", file=sys.stderr)
    return 1 if report.failed else 0
