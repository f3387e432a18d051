"""Which blob-info-cache the installed podman uses, behind one small interface.

containers/image switched from BoltDB to SQLite in 5.28 (podman ≈ 4.7) without migrating the old
file, so the choice follows the podman version, not which files exist. The directory follows the
effective UID: ``/var/lib/containers/cache`` for root, ``$XDG_DATA_HOME/containers/cache`` for a
user (podman has no option to move it).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from podman_delta.errors import StorageError
from podman_delta.storage import blobcache_bolt, blobcache_sqlite

log = logging.getLogger(__name__)

BOLT_NAME = "blob-info-cache-v1.boltdb"
SQLITE_NAME = "blob-info-cache-v1.sqlite"
#: First podman release vendoring containers/image ≥ 5.28 (the SQLite cache).
SQLITE_SINCE = (4, 7)


@dataclass(frozen=True)
class BlobInfoCache:
    """A blob-info-cache file of a known format."""

    kind: str  # "sqlite" | "boltdb"
    path: Path

    def record(
        self, pairs: list[tuple[str, str]], compressors: dict[str, str] | None = None
    ) -> None:
        """Record (compressed digest → DiffID) pairs, under the owning library's locking."""
        if self.kind == "sqlite":
            blobcache_sqlite.record_pairs(self.path, pairs, compressors)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blobcache_bolt.update_file(
            self.path, lambda root: blobcache_bolt.record_pairs(root, pairs, compressors)
        )

    def lookup(self, digest: str) -> str | None:
        """The DiffID recorded for a compressed digest, or None."""
        if not self.path.exists():
            return None
        if self.kind == "sqlite":
            return blobcache_sqlite.lookup_uncompressed(self.path, digest)
        return blobcache_bolt.lookup_uncompressed(blobcache_bolt.read_file(self.path), digest)


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """The cache directory of the user who will pull (by effective UID, as c/image)."""
    env = dict(os.environ) if env is None else env
    if os.geteuid() == 0 and not env.get("_CONTAINERS_ROOTLESS_UID"):
        return Path("/var/lib/containers/cache")
    data = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME", "~"), ".local", "share")
    return Path(os.path.expanduser(data)) / "containers" / "cache"


def podman_version(podman: str = "podman") -> tuple[int, ...]:
    """The installed podman's version as a tuple, e.g. (4, 3, 1)."""
    try:
        out = subprocess.run(
            [podman, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"cannot run `{podman} --version`: {exc}; is podman installed?") from exc
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise StorageError(f"cannot parse the podman version from {out.strip()!r}")
    return tuple(int(x) for x in m.groups(default="0"))


def kind_for_version(version: tuple[int, ...]) -> str:
    return "sqlite" if version[:2] >= SQLITE_SINCE else "boltdb"


def detect(
    podman: str = "podman",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    version: tuple[int, ...] | None = None,
) -> BlobInfoCache:
    """The cache the installed podman reads, whether or not the file exists yet."""
    kind = kind_for_version(version or podman_version(podman))
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return BlobInfoCache(kind, directory / (SQLITE_NAME if kind == "sqlite" else BOLT_NAME))


def writable_reason(cache: BlobInfoCache) -> str | None:
    """Why ``cache`` cannot be written (None when it can)."""
    if cache.kind not in ("sqlite", "boltdb"):
        return f"its format {cache.kind!r} is unknown to podman-delta"
    target = cache.path if cache.path.exists() else cache.path.parent
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return f"{probe} is not writable"
    if cache.path.exists() and not os.access(cache.path.parent, os.W_OK):
        return f"{cache.path.parent} is not writable (the file is replaced atomically)"
    return None
