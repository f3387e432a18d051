"""Exact import with the real podman 5.4.2 (SQLite blob-info-cache) in a Debian trixie chroot.

The chroot comes from ``python3 -m tests.support.trixie ensure`` (cached as a tar.zst under
/var/cache/podman-delta; built on first use). The test's directory is bind-mounted at the same
path inside the chroot, so store paths and the staging archive mean the same files on both sides.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from podman_delta.storage import blobcache, blobcache_sqlite
from podman_delta.storage.config import StoreOptions
from podman_delta.storage.importer import LayerTar, import_image, staging_images
from podman_delta.storage.store import Store
from tests.support import trixie
from tests.support.podman import enter_private_mount_namespace, push_app_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[trixie.TrixieChroot]:
    enter_private_mount_namespace()
    tar = trixie.ensure()
    root = trixie.restore(tmp_path_factory.mktemp("trixie") / "root", tar)
    shared = tmp_path_factory.mktemp("shared")
    # podman wants a runroot of at most 50 characters: a short directory, shared as well.
    runs = Path(tempfile.mkdtemp(prefix="pd5-", dir="/tmp"))
    try:
        with trixie.TrixieChroot(root, [shared, runs]) as ch:
            ch.shared_dir = shared  # type: ignore[attr-defined]
            ch.run_dir = runs  # type: ignore[attr-defined]
            yield ch
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def _run(wrapper: str, opts: StoreOptions, *args: str) -> str:
    cmd = [wrapper, *opts.podman_args(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_import_with_podman5_sqlite_cache(chroot, registry, driver, caplog):  # type: ignore[no-untyped-def]
    shared: Path = chroot.shared_dir
    imgs = push_app_images(registry.host)
    wrapper = str(chroot.wrapper(shared / f"podman5-{driver}"))
    assert blobcache.podman_version(wrapper)[0] == 5
    opts = StoreOptions(
        graph_root=shared / driver / "store", run_root=chroot.run_dir / driver / "a", driver=driver
    )

    def podman(*args: str) -> str:
        return _run(wrapper, opts, *args)

    podman("pull", "-q", "--tls-verify=false", imgs.v1.reference)
    cache = blobcache.detect(wrapper, cache_dir=chroot.cache_dir)
    assert cache.kind == "sqlite"
    new_tar = shared / driver / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    store = Store(opts)
    registry.clear_log()
    v2 = imgs.v2
    caplog.set_level(logging.INFO, logger="podman_delta.storage.importer")
    result = import_image(
        store,
        v2.reference,
        v2.manifest_digest,
        v2.config,
        [
            LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
            LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
        ],
        podman=wrapper,
        tls_verify=False,
        cache=cache,
        tmpdir=shared,
        manifest=v2.manifest,
    )
    assert result.cache_written
    # podman 5 pulled the staging layout as given: no fallback to `podman load`, no retry.
    retries = ("podman load", "including them")
    assert not [r for r in caplog.records if any(w in r.getMessage() for w in retries)]
    layer_blobs = set(v2.compressed_digests)
    assert [a for a in registry.blob_gets() if a.path.rsplit("/", 1)[-1] in layer_blobs] == []
    assert blobcache_sqlite.all_pairs(cache.path)[v2.compressed_digests[1]] == v2.diff_ids[1]

    info = json.loads(podman("image", "inspect", v2.reference))[0]
    assert info["Id"] == result.image_id == v2.config_digest.removeprefix("sha256:")
    assert info["RepoDigests"] == [f"{v2.repo}@{v2.manifest_digest}"]
    assert info["RootFS"]["Layers"] == v2.diff_ids
    assert staging_images(store) == []

    # A later plain pull (podman 5 reads the SQLite cache again) fetches no layer blob.
    registry.clear_log()
    podman("pull", "-q", "--tls-verify=false", v2.reference)
    assert [a for a in registry.blob_gets() if a.path.rsplit("/", 1)[-1] in layer_blobs] == []

    # A plain pull into a fresh store gives the same image.
    fresh = StoreOptions(
        graph_root=shared / driver / "fresh", run_root=chroot.run_dir / driver / "b", driver=driver
    )
    _run(wrapper, fresh, "pull", "-q", "--tls-verify=false", v2.reference)
    other = json.loads(_run(wrapper, fresh, "image", "inspect", v2.reference))
    assert other[0]["Id"] == info["Id"]
    assert other[0]["RepoDigests"] == info["RepoDigests"]

    out = podman("run", "--rm", v2.reference, "sh", "-c", "read v < /app/version; echo $v")
    assert out.strip() == "2"
