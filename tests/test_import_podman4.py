"""Exact import with the real podman 4.3.1 (BoltDB blob-info-cache), on vfs and overlay."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from podman_delta.errors import DeltaError
from podman_delta.storage import blobcache, blobcache_bolt
from podman_delta.storage.importer import (
    STAGING_REPO,
    LayerTar,
    import_image,
    staging_images,
    write_oci_archive,
)
from podman_delta.storage.store import Store
from tests.support.podman import (
    AppImages,
    Podman,
    clear_blob_cache,
)

DRIVERS = ["vfs", "overlay"]


#: podman started by the importer uses runc and no host storage.conf.
pytestmark = pytest.mark.usefixtures("runc_podman_env")


def _layers(imgs: AppImages, new_tar: Path) -> list[LayerTar]:
    v2 = imgs.v2
    return [
        LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
        LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
    ]


def _layer_gets(registry, imgs: AppImages) -> list[str]:  # type: ignore[no-untyped-def]
    layer_digests = set(imgs.v2.compressed_digests)
    return [a.path for a in registry.blob_gets() if a.path.rsplit("/", 1)[-1] in layer_digests]


@pytest.mark.parametrize("driver", DRIVERS)
def test_import_equals_plain_pull(tmp_path, registry, images, blob_cache, driver):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p", driver=driver)
    pm.pull(images.v1.reference)
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(images.new_tar)
    store = Store(pm.options)

    registry.clear_log()
    result = import_image(
        store,
        images.v2.reference,
        images.v2.manifest_digest,
        images.v2.config,
        _layers(images, new_tar),
        tls_verify=False,
    )
    # The final pull inside the import fetched the config only, no layer blob.
    assert _layer_gets(registry, images) == []
    assert [a.path.rsplit("/", 1)[-1] for a in registry.blob_gets()] == [images.v2.config_digest]
    assert result.cache_written
    assert result.image_id == images.v2.config_digest.removeprefix("sha256:")
    cache_file = blob_cache / blobcache.BOLT_NAME
    root = blobcache_bolt.read_file(cache_file)
    assert (
        blobcache_bolt.lookup_uncompressed(root, images.v2.compressed_digests[1])
        == images.v2.diff_ids[1]
    )

    # Same image as a plain pull into a fresh store.
    fresh = Podman(tmp_path / "fresh", driver=driver)
    fresh.pull(images.v2.reference)
    mine, theirs = pm.inspect(images.v2.reference), fresh.inspect(images.v2.reference)
    assert mine["Id"] == theirs["Id"] == result.image_id
    assert mine["RepoDigests"] == theirs["RepoDigests"]
    assert mine["RepoTags"] == theirs["RepoTags"] == [images.v2.reference]
    assert mine["Digest"] == images.v2.manifest_digest
    assert mine["RootFS"]["Layers"] == images.v2.diff_ids
    # Stored manifest is the registry's bytes.
    store.refresh()
    img = store.image(result.image_id)
    assert img is not None
    fresh_store = Store(fresh.options)
    fresh_img = fresh_store.image(result.image_id)
    assert fresh_img is not None
    assert [la.id for la in store.image_layers(img)] == [
        la.id for la in fresh_store.image_layers(fresh_img)
    ]
    # No staging image left; only v1 and v2.
    assert staging_images(store) == []
    assert len(pm.image_ids()) == 2

    # A later plain pull downloads no layer blob.
    registry.clear_log()
    pm.pull(images.v2.reference)
    assert _layer_gets(registry, images) == []

    out = pm.run("run", "--rm", images.v2.reference, "sh", "-c", "read v < /app/version; echo $v")
    assert out.stdout.strip() == "2"


def test_stale_staging_image_is_removed(tmp_path, registry, images, blob_cache):  # type: ignore[no-untyped-def]
    """A staging image left by a killed run disappears on the next import."""
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(images.new_tar)
    # What a run killed after `podman load` leaves behind.
    stale = tmp_path / "stale.tar"
    config = json.loads(images.v2.config)
    config["config"]["Labels"]["stale"] = "yes"
    write_oci_archive(
        stale,
        json.dumps(config).encode(),
        [(images.v2.diff_ids[0], None, 0), (images.v2.diff_ids[1], str(new_tar), 0)],
        f"{STAGING_REPO}:deadbeef",
    )
    pm.run("load", "-q", "-i", str(stale))
    store = Store(pm.options)
    assert len(staging_images(store)) == 1
    clear_blob_cache(blob_cache)  # our writer must create the BoltDB file from scratch
    registry.clear_log()

    import_image(
        store,
        images.v2.reference,
        images.v2.manifest_digest,
        images.v2.config,
        _layers(images, new_tar),
        tls_verify=False,
    )
    assert staging_images(store) == []
    assert sorted(pm.image_ids()) == sorted(
        d.removeprefix("sha256:") for d in (images.v1.config_digest, images.v2.config_digest)
    )
    assert _layer_gets(registry, images) == []
    # podman 4.3.1 reads and rewrites the file we created; the row still makes it skip the layer.
    pm.run("rmi", images.v2.reference)
    pm.run("load", "-q", "-i", str(stale))
    registry.clear_log()
    pm.pull(images.v2.reference)
    assert _layer_gets(registry, images) == []


def test_wrong_config_leaves_store_unchanged(tmp_path, registry, images, blob_cache):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    before = pm.image_ids()
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(images.new_tar)
    config = json.loads(images.v2.config)
    config["config"]["Labels"]["forged"] = "1"  # not the config of that manifest
    with pytest.raises(DeltaError):
        import_image(
            Store(pm.options),
            images.v2.reference,
            images.v2.manifest_digest,
            json.dumps(config).encode(),
            _layers(images, new_tar),
            tls_verify=False,
        )
    assert pm.image_ids() == before
    assert staging_images(Store(pm.options)) == []


def test_without_cache_loads_under_users_tag(tmp_path, registry, images, blob_cache):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(images.new_tar)
    store = Store(pm.options)
    registry.clear_log()
    result = import_image(
        store,
        images.v2.reference,
        images.v2.manifest_digest,
        images.v2.config,
        _layers(images, new_tar),
        tls_verify=False,
        cache=blobcache.BlobInfoCache("unknown", blob_cache / "x"),
    )
    assert not result.cache_written
    assert "will download" in result.message
    assert registry.blob_gets() == []  # nothing was fetched at all
    info = pm.inspect(images.v2.reference)
    assert info["Id"] == result.image_id == images.v2.config_digest.removeprefix("sha256:")
    assert info["RootFS"]["Layers"] == images.v2.diff_ids
    assert staging_images(store) == []
    assert not os.listdir(blob_cache) or not (blob_cache / "x").exists()
