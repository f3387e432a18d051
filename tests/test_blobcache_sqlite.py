"""The SQLite blob-info-cache (c/image ≥ 5.28) and the choice between the two formats.

The end-to-end proof against podman 5.4.2 is in test_import_podman5.py.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from podman_delta.errors import StorageError
from podman_delta.storage import blobcache, blobcache_sqlite

X = "sha256:" + "a" * 64
Y = "sha256:" + "b" * 64


def test_creates_schema_and_records(tmp_path: Path) -> None:
    path = tmp_path / "cache" / blobcache.SQLITE_NAME
    blobcache_sqlite.record_pairs(path, [(X, Y)], {X: "gzip"})
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"DigestUncompressedPairs", "DigestCompressors"} <= tables
        assert "DigestUncompressedPairs_index_uncompressedDigest" in tables
        assert conn.execute("SELECT compressor FROM DigestCompressors").fetchall() == [("gzip",)]
    assert blobcache_sqlite.lookup_uncompressed(path, X) == Y
    assert blobcache_sqlite.lookup_uncompressed(path, Y) == Y  # known as uncompressed
    assert blobcache_sqlite.lookup_uncompressed(path, "sha256:" + "c" * 64) is None
    # INSERT OR REPLACE: a later pair for the same digest wins, nothing is duplicated.
    blobcache_sqlite.record_pairs(path, [(X, "sha256:" + "d" * 64)])
    assert blobcache_sqlite.all_pairs(path) == {X: "sha256:" + "d" * 64}


def test_keeps_other_tables_of_an_existing_cache(tmp_path: Path) -> None:
    path = tmp_path / blobcache.SQLITE_NAME
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE KnownLocations(transport TEXT NOT NULL, scope TEXT NOT NULL, "
            "digest TEXT NOT NULL, location TEXT NOT NULL, time TIMESTAMP NOT NULL, "
            "PRIMARY KEY (transport, scope, digest, location))"
        )
        conn.execute("INSERT INTO KnownLocations VALUES ('docker','s',?,'l',0)", (X,))
    blobcache_sqlite.record_pairs(path, [(X, Y)])
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM KnownLocations").fetchone() == (1,)


def test_waits_for_a_concurrent_exclusive_writer(tmp_path: Path) -> None:
    path = tmp_path / blobcache.SQLITE_NAME
    blobcache_sqlite.record_pairs(path, [])
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.6, lambda: holder.execute("COMMIT")).start()
    start = time.monotonic()
    blobcache_sqlite.record_pairs(path, [(X, Y)])
    assert time.monotonic() - start >= 0.5
    assert blobcache_sqlite.all_pairs(path) == {X: Y}
    holder.close()


def test_unwritable_cache_raises_storage_error(tmp_path: Path) -> None:
    path = tmp_path / blobcache.SQLITE_NAME
    path.write_bytes(b"not a database at all, definitely not sqlite" * 100)
    with pytest.raises(StorageError):
        blobcache_sqlite.record_pairs(path, [(X, Y)])


def test_format_follows_podman_version(tmp_path: Path) -> None:
    assert blobcache.kind_for_version((4, 3, 1)) == "boltdb"
    assert blobcache.kind_for_version((4, 6, 2)) == "boltdb"
    assert blobcache.kind_for_version((4, 7, 0)) == "sqlite"
    assert blobcache.kind_for_version((5, 4, 2)) == "sqlite"
    # The installed podman (4.3.1 on Debian 12) uses BoltDB, whatever files exist.
    (tmp_path / blobcache.SQLITE_NAME).touch()
    cache = blobcache.detect(cache_dir=tmp_path)
    assert (cache.kind, cache.path.name) == ("boltdb", blobcache.BOLT_NAME)
    assert blobcache.writable_reason(cache) is None
    assert "unknown" in (blobcache.writable_reason(blobcache.BlobInfoCache("x", cache.path)) or "")


def test_both_formats_through_the_common_interface(tmp_path: Path) -> None:
    for kind, name in (("sqlite", blobcache.SQLITE_NAME), ("boltdb", blobcache.BOLT_NAME)):
        cache = blobcache.BlobInfoCache(kind, tmp_path / kind / name)
        assert cache.lookup(X) is None
        cache.record([(X, Y)], {X: "zstd"})
        assert cache.lookup(X) == Y
