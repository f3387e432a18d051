"""``podman-delta pull IMAGE``: pull an image, downloading deltas instead of changed layers."""

from __future__ import annotations

import argparse
import json
import os
import sys

from podman_delta.cli import EXIT_CODES_HELP
from podman_delta.cli.publish import add_registry_options, platform_of
from podman_delta.errors import DeltaError
from podman_delta.progress import make_progress
from podman_delta.pull import PullOptions, PullPlan, PullResult, pull
from podman_delta.storage.config import StoreOptions, add_storage_arguments, options_from_args
from podman_delta.storage.importer import _terminate_as_interrupt as terminate_as_interrupt
from podman_delta.storage.store import Store, needs_userns, reexec_in_userns

PULL_HELP = """\
The image ends up exactly as `podman pull IMAGE` leaves it (same image ID, RepoDigests and
layers); a later `podman pull IMAGE` downloads no layer. Layers already in the store are reused;
a missing layer comes from a published delta when its source layers are local and the delta is
smaller, else in full. A layer whose delta fails is fetched in full in the same run; when
anything else fails, a plain `podman pull` runs and the reason is printed on one line.

Prints one summary line (stdout): bytes fetched, bytes a plain pull would fetch, the saving and
the time; --json prints it as a JSON object. Runs on the same store wait for each other.

environment:
  PODMAN_DELTA_REAL_PODMAN  the podman to run (the pre-pull wrapper sets it)

""" + EXIT_CODES_HELP.replace(
    "  0  success\n",
    "  0  success (also when a plain podman pull did the work after a failed delta pull)\n",
)


def real_podman() -> str:
    """The real podman: never the pre-pull wrapper (which sets this variable for us)."""
    return os.environ.get("PODMAN_DELTA_REAL_PODMAN") or "podman"


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``pull`` and ``prefetch``."""
    add_registry_options(parser)
    add_storage_arguments(parser)
    parser.add_argument("--jobs", type=int, default=3, metavar="N", help="parallel downloads (3)")
    parser.add_argument("--workdir", metavar="DIR", help="scratch directory (default: $TMPDIR)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, fetch nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "--limit-rate",
        type=parse_rate,
        metavar="RATE",
        help="cap downloads at RATE bytes/s (suffixes k, M, G: 500k, 2M)",
    )


def parse_rate(text: str) -> int:
    """``500k``, ``2M``, ``1.5G`` or plain bytes per second (k = 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("/s").removesuffix("b")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: use e.g. 500k or 2M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: must be positive")
    return int(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="pull an image, fetching deltas instead of whole layers",
        description="Pull IMAGE into containers-storage like `podman pull`, downloading only "
        "deltas for layers that changed since a version already in the store.",
        epilog=PULL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pull_arguments(parser)
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail instead of running a plain podman pull when the delta pull fails",
    )
    parser.add_argument("image", metavar="IMAGE", help="image reference, as for podman pull")
    parser.set_defaults(func=run)


def pull_options(args: argparse.Namespace, store_opts: StoreOptions) -> PullOptions:
    if args.jobs < 1:
        raise DeltaError("--jobs must be at least 1")
    plain_args = []
    if args.platform:
        plain_args.append(f"--platform={args.platform}")
    if args.arch:
        plain_args.append(f"--arch={args.arch}")
    return PullOptions(
        tls_verify=args.tls_verify,
        creds=args.creds,
        authfile=args.authfile,
        cert_dir=args.cert_dir,
        platform=platform_of(args),
        podman=real_podman(),
        jobs=args.jobs,
        limit_rate=getattr(args, "limit_rate", None),
        workdir=args.workdir,
        plain_args=plain_args,
    )


def open_store(args: argparse.Namespace) -> Store:
    """The store podman would use; rootless stores are read inside ``podman unshare``."""
    store_opts = options_from_args(args)
    if needs_userns(store_opts):
        reexec_in_userns(podman=real_podman())
    return Store(store_opts)


def notifier(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    def notify(msg: str) -> None:
        if not args.quiet:
            print(f"podman-delta: {msg}", file=sys.stderr, flush=True)

    return notify


def run(args: argparse.Namespace) -> int:
    # Any podman we start must not go through the pre-pull wrapper again.
    os.environ["PODMAN_DELTA_DISABLE"] = "1"
    store = open_store(args)
    options = pull_options(args, store.options)
    progress = make_progress(quiet=args.quiet or args.json)
    # SIGTERM/SIGHUP (systemd stopping the unit) must clean up like Ctrl-C: without this the
    # default handler kills us mid-download and leaves the scratch directory behind.
    with terminate_as_interrupt():
        out = pull(
            args.image,
            store,
            options,
            progress=progress,
            dry_run=args.dry_run,
            quiet=args.quiet or args.json,
            notify=notifier(args),
            fallback=not args.no_fallback,
        )
    progress.close()
    print_result(out, args)
    return 0


def print_result(out: PullResult | PullPlan, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(out.to_json(), sort_keys=True))
    elif args.quiet:
        return
    elif isinstance(out, PullPlan):
        print(out.table())
    else:
        print(out.summary())
