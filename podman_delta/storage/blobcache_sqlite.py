"""containers/image's SQLite blob-info-cache (c/image ≥ 5.28, podman ≥ 4.7 and 5.x).

Writes follow c/image: ``INSERT OR REPLACE`` inside ``BEGIN EXCLUSIVE`` with a busy timeout, so a
concurrent podman either waits for us or we wait for it. The tables are created ``IF NOT EXISTS``
with c/image's schema; c/image adds whatever else it needs on its next open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from podman_delta.errors import StorageError

BUSY_TIMEOUT_S = 5.0

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS DigestUncompressedPairs("
    "anyDigest TEXT PRIMARY KEY NOT NULL, uncompressedDigest TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS DigestUncompressedPairs_index_uncompressedDigest "
    "ON DigestUncompressedPairs(uncompressedDigest)",
    "CREATE TABLE IF NOT EXISTS DigestCompressors("
    "digest TEXT PRIMARY KEY NOT NULL, compressor TEXT NOT NULL)",
)


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open blob-info-cache {path}: {exc}") from exc
    try:
        conn.execute("PRAGMA synchronous=FULL")
        yield conn
    except sqlite3.Error as exc:  # e.g. "file is not a database": never touch it further
        raise StorageError(f"cannot use blob-info-cache {path}: {exc}") from exc
    finally:
        conn.close()


def record_pairs(
    path: str | os.PathLike[str],
    pairs: list[tuple[str, str]],
    compressors: dict[str, str] | None = None,
) -> None:
    """Record (compressed digest → DiffID) pairs and compressor names in one transaction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _connect(path) as conn:
        try:
            conn.execute("BEGIN EXCLUSIVE")
            for stmt in SCHEMA:
                conn.execute(stmt)
            conn.executemany(
                "INSERT OR REPLACE INTO DigestUncompressedPairs(anyDigest, uncompressedDigest) "
                "VALUES (?, ?)",
                pairs,
            )
            if compressors:
                conn.executemany(
                    "INSERT OR REPLACE INTO DigestCompressors(digest, compressor) VALUES (?, ?)",
                    list(compressors.items()),
                )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StorageError(f"cannot write blob-info-cache {path}: {exc}") from exc


def lookup_uncompressed(path: str | os.PathLike[str], digest: str) -> str | None:
    """The uncompressed digest recorded for ``digest``, as c/image's UncompressedDigest."""
    path = Path(path)
    if not path.exists():
        return None
    with _connect(path) as conn:
        try:
            row = conn.execute(
                "SELECT uncompressedDigest FROM DigestUncompressedPairs WHERE anyDigest = ?",
                (digest,),
            ).fetchone()
            if row:
                return str(row[0])
            row = conn.execute(
                "SELECT 1 FROM DigestUncompressedPairs WHERE uncompressedDigest = ? LIMIT 1",
                (digest,),
            ).fetchone()
        except sqlite3.OperationalError:  # no such table yet
            return None
    return digest if row else None


def all_pairs(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every recorded pair (for tests and diagnostics)."""
    with _connect(Path(path)) as conn:
        try:
            rows = conn.execute(
                "SELECT anyDigest, uncompressedDigest FROM DigestUncompressedPairs"
            ).fetchall()
        except sqlite3.OperationalError:
            return {}
    return {str(a): str(b) for a, b in rows}
