"""``podman-delta publish``: make deltas between image versions in a registry and push them.

Also holds the registry options shared with ``create`` and ``apply`` (podman's spelling:
``--tls-verify``, ``--creds``, ``--authfile``, ``--cert-dir``, ``--platform``, ``--arch``).
"""

from __future__ import annotations

import argparse
import sys

from podman_delta.errors import DeltaError
from podman_delta.registry.auth import parse_creds
from podman_delta.registry.client import ClientOptions, parse_platform
from podman_delta.registry.image import ClientPool
from podman_delta.registry.publish import PublishOptions, Workspace, previous_tags, publish


def _bool(text: str) -> bool:
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """The registry flags podman users know."""
    parser.add_argument(
        "--tls-verify",
        type=_bool,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="require HTTPS and verify certificates (default: true unless registries.conf "
        "marks the registry insecure)",
    )
    parser.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    parser.add_argument("--authfile", metavar="FILE", help="auth file (default: podman's)")
    parser.add_argument("--cert-dir", metavar="DIR", help="directory with *.crt/*.cert/*.key")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="image platform")
    parser.add_argument("--arch", help="override the architecture of the platform")


def client_pool(args: argparse.Namespace) -> ClientPool:
    opts = ClientOptions(
        tls_verify=args.tls_verify,
        creds=parse_creds(args.creds) if args.creds else None,
        authfile=args.authfile,
        certs_dir=args.cert_dir,
    )
    return ClientPool(opts)


def platform_of(args: argparse.Namespace):
    return parse_platform(args.platform, args.arch)


def add_delta_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=2, metavar="N", help="layers diffed at once")
    parser.add_argument("--dry-run", action="store_true", help="print the sizes, push nothing")
    parser.add_argument("--workdir", metavar="DIR", help="scratch directory (default: $TMPDIR)")
    parser.add_argument(
        "--no-self-test", action="store_true", help="skip applying each delta before use"
    )
    parser.add_argument("--level", type=int, default=19, help="zstd level of deltas (19)")


def publish_options(args: argparse.Namespace, quiet: bool = False) -> PublishOptions:
    def report(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    if args.jobs < 1:
        raise DeltaError("--jobs must be at least 1")
    return PublishOptions(
        jobs=args.jobs,
        dry_run=args.dry_run,
        workdir=args.workdir,
        self_test=not args.no_self_test,
        level=args.level,
        report=report,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="make deltas between two images in a registry and push them",
        description="Make the deltas from OLD_REF to NEW_REF and push them to NEW_REF's "
        "repository as a containers/oci-delta artifact (found by clients through the "
        "referrers API or the sha256-<digest> tag). With --previous N, publish deltas "
        "from the N most recent other tags to REF.",
    )
    add_registry_options(parser)
    add_delta_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    parser.add_argument(
        "--previous", type=int, metavar="N", help="deltas from the N most recent other tags"
    )
    parser.add_argument("refs", nargs="+", metavar="REF", help="OLD_REF NEW_REF, or REF")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = publish_options(args, args.quiet)
    platform = platform_of(args)
    pool = client_pool(args)
    if args.previous is not None:
        if len(args.refs) != 1 or args.previous < 1:
            raise DeltaError("use: podman-delta publish --previous N REF (N >= 1)")
        target = args.refs[0]
        pairs = [(old, target) for old in previous_tags(target, args.previous, pool, platform)]
        if not pairs:
            print(f"no other tags to publish deltas from for {target}")
            return 0
    elif len(args.refs) == 2:
        pairs = [(args.refs[0], args.refs[1])]
    else:
        raise DeltaError("use: podman-delta publish OLD_REF NEW_REF")
    ws = Workspace(args.workdir)
    try:
        for old, new in pairs:
            res = publish(old, new, pool, opts, ws, platform)
            if args.dry_run and res.deltas is not None:
                print(f"{res.old} -> {res.new}")
                print(res.deltas.table())
            elif res.existing:
                print(f"{res.old} -> {res.new}: already published ({res.artifact_digest})")
            elif res.pushed:
                print(f"{res.old} -> {res.new}: {res.artifact_digest} ({res.bytes_pushed} bytes)")
            else:
                print(f"{res.old} -> {res.new}: nothing to do")
    finally:
        ws.cleanup()
        pool.close()
    return 0
