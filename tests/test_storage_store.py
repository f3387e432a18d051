"""Reading containers-storage: config discovery, records under locks, layer files as sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podman_delta.errors import DigestMismatchError, StorageError
from podman_delta.storage.config import find_storage_conf, load_options
from podman_delta.storage.store import Store
from podman_delta.tardiff.sources import SourceNotFoundError
from tests.support.podman import (
    Podman,
    push_image,
    shell_rootfs_tar,
    tar_bytes,
)

# ------------------------------------------------------------------------------------- config


def test_storage_conf_lookup_order(tmp_path: Path) -> None:
    user = tmp_path / "xdg" / "containers" / "storage.conf"
    user.parent.mkdir(parents=True)
    user.write_text("[storage]\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    assert find_storage_conf({**env, "CONTAINERS_STORAGE_CONF": "/x/s.conf"}) == Path("/x/s.conf")
    assert find_storage_conf(env, rootless=True) == user
    # Root never reads the user file.
    assert find_storage_conf(env, rootless=False) != user


def test_load_options_from_conf_and_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "storage.conf"
    conf.write_text(
        '[storage]\ndriver = "overlay"\ngraphroot = "/g"\nrunroot = "/r"\n'
        '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"\n'
    )
    env = {"CONTAINERS_STORAGE_CONF": str(conf), "HOME": str(tmp_path)}
    opts = load_options(env=env)
    assert (opts.graph_root, opts.run_root, opts.driver) == (Path("/g"), Path("/r"), "overlay")
    assert opts.mount_program == "/usr/bin/fuse-overlayfs"
    assert opts.podman_args()[:6] == [
        "--root",
        "/g",
        "--runroot",
        "/r",
        "--storage-driver",
        "overlay",
    ]
    assert "--storage-opt" not in opts.podman_args()  # podman reads the file itself
    opt = "overlay.mount_program=/bin/x"
    assert load_options(storage_opts=[opt], env=env).podman_args()[-2:] == ["--storage-opt", opt]
    opts = load_options(root=tmp_path / "s", runroot="/rr", driver="vfs", env=env)
    assert (opts.graph_root, opts.run_root, opts.driver) == (tmp_path / "s", Path("/rr"), "vfs")
    with pytest.raises(StorageError, match="btrfs"):
        load_options(driver="btrfs", env=env)


def test_rootless_defaults(tmp_path: Path) -> None:
    (tmp_path / "empty.conf").write_text("[storage]\n")
    env = {
        "_CONTAINERS_ROOTLESS_UID": "1000",
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CONTAINERS_STORAGE_CONF": str(tmp_path / "empty.conf"),
    }
    opts = load_options(env=env)
    assert opts.rootless
    assert opts.graph_root == tmp_path / ".local/share/containers/storage"
    assert opts.run_root == Path("/run/user/1000/containers")


def test_records_keep_unknown_fields_and_volatile_layers(tmp_path: Path) -> None:
    opts = load_options(root=tmp_path / "g", runroot=tmp_path / "r", driver="vfs", env={})
    (tmp_path / "g/vfs-layers").mkdir(parents=True)
    (tmp_path / "r/vfs-layers").mkdir(parents=True)
    (tmp_path / "g/vfs-layers/layers.json").write_text(
        json.dumps([{"id": "a" * 64, "diff-digest": "sha256:" + "1" * 64, "future-field": [1]}])
    )
    (tmp_path / "r/vfs-layers/volatile-layers.json").write_text(
        json.dumps(
            [
                {
                    "id": "b" * 64,
                    "parent": "a" * 64,
                    "diff-digest": "sha256:" + "2" * 64,
                    "flags": {"incomplete": True},
                }
            ]
        )
    )
    store = Store(opts)
    layers = store.layers()
    assert [la.id[0] for la in layers] == ["a", "b"]
    assert layers[0].raw["future-field"] == [1]
    assert store.layer_by_diff_id("sha256:" + "1" * 64) is layers[0]
    assert store.layer_by_diff_id("sha256:" + "2" * 64) is None  # incomplete layers are ignored


def test_reads_wait_for_a_writers_lock(tmp_path: Path) -> None:
    """A podman holding layers.lock exclusively keeps us from reading a half-written file."""
    opts = load_options(root=tmp_path / "g", runroot=tmp_path / "r", driver="vfs", env={})
    d = tmp_path / "g/vfs-layers"
    d.mkdir(parents=True)
    (d / "layers.json").write_text("[]")
    (d / "layers.lock").touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time,json\n"
            f"fd=os.open({str(d / 'layers.lock')!r},os.O_RDWR)\n"
            "fcntl.lockf(fd,fcntl.LOCK_EX)\n"
            "print('locked',flush=True)\n"
            "time.sleep(1.0)\n"
            f"open({str(d / 'layers.json')!r},'w').write(json.dumps([{{'id':'c'*64}}]))\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    layers = Store(opts).layers()
    assert time.monotonic() - start > 0.5
    assert [la.id for la in layers] == ["c" * 64]  # saw the completed write, not the old file
    holder.wait(10)


# ------------------------------------------------------------------------- real podman stores


DRIVERS = {
    "vfs": ("vfs", ()),
    "overlay": ("overlay", ()),
    "fuse-overlayfs": ("overlay", ("overlay.mount_program=/usr/bin/fuse-overlayfs",)),
}


@pytest.mark.parametrize("name", list(DRIVERS))
def test_layers_and_merged_view(tmp_path, registry, blob_cache, name):  # type: ignore[no-untyped-def]
    driver, opts = DRIVERS[name]
    base = shell_rootfs_tar()
    base2 = tar_bytes({"data/x": b"x", "data/y": b"y", "etc/motd": b"hello\n"})
    top = tar_bytes(
        {
            "etc/.wh.hostname": b"",  # whiteout of a base file
            "data/.wh..wh..opq": b"",  # opaque directory
            "data/z": b"z",
            "app/file": b"top\n",
        }
    )
    img = push_image(registry.host, "t/layers", "v1", [base, base2, top])
    pm = Podman(tmp_path / "p", driver=driver, storage_opts=opts)
    pm.pull(img.reference)
    store = Store(pm.options)

    image = store.image(img.reference)
    assert image is not None and image.id == img.config_digest.removeprefix("sha256:")
    assert store.image_diff_ids(image) == img.diff_ids
    layers = store.image_layers(image)
    assert layers[0].id == img.diff_ids[0].removeprefix("sha256:")  # bottom layer ID = DiffID
    for layer, digest in zip(layers, img.compressed_digests, strict=True):
        assert store.layer_by_compressed_digest(digest) == layer

    with store.image_source(image) as src:
        for path, want in ((b"app/file", b"top\n"), (b"data/z", b"z"), (b"etc/motd", b"hello\n")):
            f = src.open(path)
            assert f.pread(0, 100) == want
            f.close()
        assert src.open(b"bin/sh").size > 1000
        for gone in (b"etc/hostname", b"data/x", b"data/y"):
            with pytest.raises(SourceNotFoundError):
                src.open(gone)
    # A single layer's own files.
    with store.layer_source(img.diff_ids[0]) as src:
        assert src.open(b"etc/hostname").pread(0, 10) == b"base\n"
    with store.layer_source(img.diff_ids[2]) as src:
        assert src.open(b"app/file").size == 4
        with pytest.raises(SourceNotFoundError):
            src.open(b"bin/sh")  # a lower layer's file (vfs: narrowed by the tar-split)

    # --verify-sources: every stored layer regenerates its exact tar.
    for layer, original in zip(layers, [base, base2, top], strict=True):
        store.verify_layer(layer)
        out = tmp_path / "regen.tar"
        with open(out, "wb") as f:
            store.regenerate_tar(layer, f)
        assert out.read_bytes() == original
    # A hand-modified layer fails verification and is skipped.
    target = store.layer_dir(layers[1]) / "etc/motd"
    target.write_bytes(b"HELLO\n")
    with pytest.raises(DigestMismatchError):
        store.verify_layer(layers[1])
    assert store.verified_layers(img.diff_ids) == [img.diff_ids[0], img.diff_ids[2]]
    with pytest.raises(DigestMismatchError):
        store.image_source(image, verify=True)


def test_missing_image_and_layer_errors(tmp_path: Path) -> None:
    store = Store(load_options(root=tmp_path / "g", runroot=tmp_path / "r", driver="vfs", env={}))
    assert store.images() == [] and store.layers() == []
    with pytest.raises(StorageError, match="pull it first"):
        store.image_source("nothing:here")
    with pytest.raises(StorageError, match="no layer with DiffID"):
        store.layer_source("sha256:" + "0" * 64)
    assert not os.path.exists(tmp_path / "g")  # reading never creates the store


def test_image_lookup_by_id_prefix_and_names(tmp_path: Path) -> None:
    opts = load_options(root=tmp_path / "g", runroot=tmp_path / "r", driver="vfs", env={})
    (tmp_path / "g/vfs-images").mkdir(parents=True)
    (tmp_path / "g/vfs-images/images.json").write_text(
        json.dumps(
            [
                {"id": "ab" + "1" * 62, "names": ["docker.io/library/alpine:latest"]},
                {"id": "ac" + "2" * 62, "names": ["localhost/mine:v1", "127.0.0.1:5000/x/y:2"]},
            ]
        )
    )
    store = Store(opts)
    first, second = store.images()
    assert store.image("alpine") is first
    assert store.image("docker.io/library/alpine") is first
    assert store.image("mine:v1") is second
    assert store.image("127.0.0.1:5000/x/y:2") is second
    assert store.image("sha256:ac" + "2" * 62) is second
    assert store.image("ac2") is second
    assert store.image("a") is None  # too short / ambiguous
    assert store.image("mine") is None  # :latest is not :v1
