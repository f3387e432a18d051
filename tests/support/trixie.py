"""A Debian trixie chroot with podman 5.4.2, for testing the SQLite blob-info-cache path.

Trixie's podman needs glibc 2.38, which the bookworm host lacks, but it runs unchanged in a
chroot that shares the host's network (so it reaches a test registry on 127.0.0.1). Building the
chroot takes one to two minutes and needs the Debian mirror, so it is cached as a ``tar.zst``
under ``/var/cache/podman-delta/``; restoring it takes about ten seconds.

Command line (CI prepares the cache once with it)::

    python3 -m tests.support.trixie ensure      # build the cache unless it exists
    python3 -m tests.support.trixie build       # rebuild it

Usage from tests: :class:`TrixieChroot` restores the tar into a directory, and inside the test's
private mount namespace mounts what podman needs (the chroot must be a mount point, plus proc,
sys, dev, a tmpfs on /run) and bind-mounts shared host directories at the same paths, so that
paths given to the chroot's podman mean the same files on both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PODMAN_DELTA_CACHE", "/var/cache/podman-delta"))
CACHE_TAR = CACHE_DIR / "trixie-podman.tar.zst"
MIRROR = os.environ.get("PODMAN_DELTA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("podman", "runc", "conmon", "ca-certificates")

_STORAGE_CONF = """\
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
"""

_CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

_BUILD_SCRIPT = r"""
set -euo pipefail
R="$1"; MIRROR="$2"; shift 2
debootstrap --variant=minbase trixie "$R" "$MIRROR" > "$R.debootstrap.log" 2>&1 || {
  tail -n 30 "$R.debootstrap.log" >&2; exit 1; }
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod 755 "$R/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
  > "$R.apt.log" 2>&1 || { tail -n 40 "$R.apt.log" >&2; exit 1; }
chroot "$R" apt-get clean
rm -rf "$R/var/lib/apt/lists/"*
"""


def build(dest: Path = CACHE_TAR, mirror: str = MIRROR) -> Path:
    """Debootstrap trixie, install podman, and write the chroot as ``dest`` (tar.zst)."""
    if os.geteuid() != 0:
        raise SystemExit("building the trixie chroot needs root (debootstrap, chroot, mount)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trixie-build-", dir="/var/tmp"))
    root = work / "root"
    try:
        # A private mount namespace: every mount made while building vanishes with it.
        subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "bash",
                "-c",
                _BUILD_SCRIPT,
                "build",
                str(root),
                mirror,
                *PACKAGES,
            ],
            check=True,
        )
        (root / "etc/containers").mkdir(parents=True, exist_ok=True)
        (root / "etc/containers/storage.conf").write_text(_STORAGE_CONF)
        (root / "etc/containers/containers.conf").write_text(_CONTAINERS_CONF)
        (root / "var/lib/containers/cache").mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        with open(tmp, "wb") as out:
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", "-", "."],
                stdout=subprocess.PIPE,
            )
            subprocess.run(["zstd", "-q", "-T0", "-6"], stdin=tar.stdout, stdout=out, check=True)
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the trixie chroot failed")
        os.replace(tmp, dest)
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure(dest: Path = CACHE_TAR) -> Path:
    """Return the cached chroot tar, building it first when it is missing."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    return build(dest)


def restore(target: Path, tar: Path = CACHE_TAR) -> Path:
    """Unpack the cached chroot into ``target`` (about ten seconds)."""
    target.mkdir(parents=True, exist_ok=True)
    zstd = subprocess.Popen(["zstd", "-q", "-d", "-c", str(tar)], stdout=subprocess.PIPE)
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(target), "-xf", "-"],
        stdin=zstd.stdout,
        check=True,
    )
    assert zstd.stdout is not None
    zstd.stdout.close()
    if zstd.wait() != 0:
        raise RuntimeError(f"cannot decompress {tar}")
    return target


class TrixieChroot:
    """A restored trixie chroot, mounted for podman inside the current mount namespace.

    The caller must already be in a private mount namespace (tests.support.podman does that),
    so that all these mounts disappear with the test process even if it is killed.
    """

    def __init__(self, root: Path, shared: list[Path]) -> None:
        self.root = Path(root)
        self.shared = [Path(p) for p in shared]
        self._mounts: list[Path] = []

    def _mount(self, args: list[str], where: Path) -> None:
        subprocess.run(["mount", *args, str(where)], check=True)
        self._mounts.append(where)

    def __enter__(self) -> TrixieChroot:
        r = self.root
        self._mount(["--bind", str(r)], r)
        self._mount(["-t", "proc", "proc"], r / "proc")
        self._mount(["--rbind", "/sys"], r / "sys")  # with the cgroup mounts runc needs
        self._mount(["--rbind", "/dev"], r / "dev")
        self._mount(["-t", "tmpfs", "tmpfs"], r / "run")
        self._mount(["-t", "tmpfs", "tmpfs"], r / "var/tmp")
        for path in self.shared:
            inside = r / str(path).lstrip("/")
            inside.mkdir(parents=True, exist_ok=True)
            self._mount(["--bind", str(path)], inside)
        return self

    def __exit__(self, *exc: object) -> None:
        for where in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(where)], check=False)
        self._mounts.clear()

    def wrapper(self, path: Path) -> Path:
        """Write an executable that runs the chroot's podman with the given arguments."""
        path.write_text(
            "#!/bin/sh\n"
            f"exec chroot {self.root} /usr/bin/env PODMAN_IGNORE_CGROUPSV1_WARNING=1 "
            f'TMPDIR=/var/tmp podman "$@"\n'
        )
        path.chmod(0o755)
        return path

    @property
    def cache_dir(self) -> Path:
        """The chroot's blob-info-cache directory, seen from the host."""
        return self.root / "var/lib/containers/cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.support.trixie")
    parser.add_argument("action", choices=["ensure", "build"])
    parser.add_argument("--dest", type=Path, default=CACHE_TAR)
    args = parser.parse_args(argv)
    path = build(args.dest) if args.action == "build" else ensure(args.dest)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
