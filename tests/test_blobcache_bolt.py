"""The BoltDB blob-info-cache writer: format unit tests and proof against real podman 4.3.1."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from podman_delta.storage import blobcache, blobcache_bolt
from podman_delta.storage.blobcache_bolt import Bucket
from podman_delta.storage.importer import LayerTar, import_image
from podman_delta.storage.store import Store
from tests.support.podman import (
    Podman,
    clear_blob_cache,
    push_app_images,
    push_image,
    shell_rootfs_tar,
    tar_bytes,
)


def _fake(i: int) -> str:
    return f"sha256:{i:064x}"


def _sample() -> Bucket:
    root = Bucket()
    blobcache_bolt.record_pairs(
        root,
        [(_fake(i), _fake(i + 100_000)) for i in range(600)],  # many pages, branch pages
        {_fake(i): "gzip" for i in range(600)},
    )
    big = root.bucket(b"big", create=True)
    assert big is not None
    big.items[b"huge"] = os.urandom(3 * 4096 + 17)  # an overflow page
    big.sequence = 7
    deep = root.bucket(b"knownLocations", create=True)
    assert deep is not None
    d = deep.bucket(b"docker", create=True).bucket(b"scope", create=True)  # type: ignore[union-attr]
    d.bucket(_fake(1).encode(), create=True).items[b"loc"] = b"\x01time"  # type: ignore[union-attr]
    root.bucket(b"empty", create=True)
    return root


def _same(a: Bucket, b: Bucket) -> bool:
    if a.sequence != b.sequence or set(a.items) != set(b.items):
        return False
    for key, value in a.items.items():
        other = b.items[key]
        if isinstance(value, Bucket):
            if not isinstance(other, Bucket) or not _same(value, other):
                return False
        elif value != other:
            return False
    return True


def test_fnv64a_known_vectors() -> None:
    assert blobcache_bolt.fnv64a(b"") == 0xCBF29CE484222325
    assert blobcache_bolt.fnv64a(b"a") == 0xAF63DC4C8601EC8C
    assert blobcache_bolt.fnv64a(b"foobar") == 0x85944171F73967E8


def test_round_trip_with_branches_overflow_and_nesting() -> None:
    root = _sample()
    data = blobcache_bolt.serialize(root, txid=40)
    assert len(data) % 4096 == 0
    meta, back = blobcache_bolt.parse(data)
    assert meta.txid == 42 and meta.freelist == 2 and meta.pgid * 4096 == len(data)
    assert _same(root, back)
    # The big bucket needed branch pages: its root page is a branch.
    flags = []
    for pgid in range(meta.pgid):
        pid, pflags, _, _ = struct.unpack_from("<QHHI", data, pgid * 4096)
        if pid == pgid:
            flags.append(pflags)
    assert blobcache_bolt.BRANCH_PAGE in flags
    assert blobcache_bolt.lookup_uncompressed(back, _fake(5)) == _fake(100_005)
    assert blobcache_bolt.lookup_uncompressed(back, _fake(100_005)) == _fake(100_005)
    assert blobcache_bolt.lookup_uncompressed(back, _fake(99_999)) is None


def test_meta_checksums_and_fallback_to_other_meta() -> None:
    data = bytearray(blobcache_bolt.serialize(_sample(), txid=0))
    for page in (0, 1):
        body = data[page * 4096 + 16 : page * 4096 + 16 + 56]
        (checksum,) = struct.unpack_from("<Q", data, page * 4096 + 16 + 56)
        assert checksum == blobcache_bolt.fnv64a(bytes(body))
    # Corrupt the newer meta (txid 2 lives in page 0): the older one is used, as bbolt does.
    data[16 + 8] ^= 0xFF
    meta = blobcache_bolt.read_meta(bytes(data))
    assert meta.txid == 1
    data[4096 + 16 + 8] ^= 0xFF
    with pytest.raises(blobcache_bolt.BoltFormatError):
        blobcache_bolt.read_meta(bytes(data))


def test_update_file_creates_replaces_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.boltdb"
    blobcache_bolt.update_file(
        path, lambda r: blobcache_bolt.record_pairs(r, [("sha256:a", "sha256:b")])
    )
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    inode = path.stat().st_ino
    blobcache_bolt.update_file(
        path, lambda r: blobcache_bolt.record_pairs(r, [("sha256:c", "sha256:d")])
    )
    root = blobcache_bolt.read_file(path)
    assert blobcache_bolt.lookup_uncompressed(root, "sha256:a") == "sha256:b"
    assert blobcache_bolt.lookup_uncompressed(root, "sha256:c") == "sha256:d"
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["c.boltdb"]  # no temporary left

    def boom(r: Bucket) -> None:
        raise RuntimeError("fail mid-update")

    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        blobcache_bolt.update_file(path, boom)
    assert path.read_bytes() == before


def test_real_podman_keeps_working_after_our_writes(tmp_path, registry, blob_cache, monkeypatch):  # type: ignore[no-untyped-def]
    """Podman 4.3.1 reads our file, skips a layer through our row, and rewrites it, repeatedly."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    imgs = push_app_images(registry.host)
    base = shell_rootfs_tar()
    others = [
        push_image(
            registry.host, f"t/other{i}", "v1", [base, tar_bytes({f"o/{i}": os.urandom(5000)})]
        )
        for i in range(3)
    ]
    clear_blob_cache(blob_cache)
    cache_file = blob_cache / blobcache.BOLT_NAME
    pm = Podman(tmp_path / "p")
    pm.pull(imgs.v1.reference)  # podman creates the file
    # Our write: a realistic import (staging load + our row + pull), plus 600 bulk rows.
    blobcache_bolt.update_file(
        cache_file,
        lambda r: blobcache_bolt.record_pairs(r, [(_fake(i), _fake(i + 1)) for i in range(600)]),
    )
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    v2 = imgs.v2
    registry.clear_log()
    import_image(
        Store(pm.options),
        v2.reference,
        v2.manifest_digest,
        v2.config,
        [
            LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
            LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
        ],
        tls_verify=False,
        manifest=v2.manifest,
    )
    assert not {a.path.rsplit("/", 1)[-1] for a in registry.blob_gets()} & set(
        v2.compressed_digests
    )
    # Several real pulls, each of which writes the file again with bbolt.
    txids = []
    for img in others:
        pm.pull(img.reference)
        meta, root = blobcache_bolt.parse(cache_file.read_bytes())
        txids.append(meta.txid)
        assert blobcache_bolt.lookup_uncompressed(root, _fake(300)) == _fake(301)
        assert (
            blobcache_bolt.lookup_uncompressed(root, img.compressed_digests[1]) == img.diff_ids[1]
        )
    assert txids == sorted(txids) and len(set(txids)) == 3
    # Our writer again over podman's output, then podman again: still no panic, layer skipped.
    blobcache_bolt.update_file(cache_file, lambda r: None)
    pm.run("rmi", v2.reference)
    pm.run("load", "-q", "-i", str(_archive_of(tmp_path, imgs)))
    registry.clear_log()
    pm.pull(v2.reference)
    assert not {a.path.rsplit("/", 1)[-1] for a in registry.blob_gets()} & set(
        v2.compressed_digests
    )


def _archive_of(tmp_path: Path, imgs) -> Path:  # type: ignore[no-untyped-def]
    """An archive restoring v2's top layer (removed with the image) under another config."""
    import json

    from podman_delta.storage.importer import write_oci_archive

    config = json.loads(imgs.v2.config)
    config["config"]["Labels"]["reload"] = "1"
    path = tmp_path / "reload.tar"
    new_tar = tmp_path / "new.tar"
    write_oci_archive(
        path,
        json.dumps(config).encode(),
        [(imgs.v2.diff_ids[0], None, 0), (imgs.v2.diff_ids[1], str(new_tar), 0)],
        "localhost/reload:1",
    )
    return path
