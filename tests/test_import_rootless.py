"""Rootless: an unprivileged user with subuids reads its store inside `podman unshare` and imports.

The user, its subordinate IDs and a usable Python exist only inside per-command private mount
namespaces (tests.support.podman.RootlessUser); the host's /etc is never modified.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.podman import (
    RootlessUser,
    enter_private_mount_namespace,
    push_image,
    shell_rootfs_tar,
    tar_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
from podman_delta.storage import blobcache
from podman_delta.storage.config import load_options
from podman_delta.storage.importer import LayerTar, import_image, staging_images
from podman_delta.storage.store import Store, needs_userns, reexec_in_userns

a = json.load(open(sys.argv[1]))
phase = sys.argv[2]
opts = load_options(driver="vfs")
res = {{"phase": phase, "euid": os.geteuid(), "graph_root": str(opts.graph_root),
        "rootless": opts.rootless}}
store = Store(opts)
if phase == "outside":
    try:
        with store.image_source(a["v1"]) as src:
            src.open(b"app/secret").pread(0, 10)
        res["read"] = "ok"
    except Exception as exc:
        res["read"] = type(exc).__name__
    print(json.dumps(res), flush=True)
    if needs_userns(opts):
        reexec_in_userns(command=[sys.executable, sys.argv[0], sys.argv[1], "inside"])
    sys.exit(3)
with store.image_source(a["v1"]) as src:
    f = src.open(b"app/secret")
    res["secret"] = f.pread(0, 100).decode()
    f.close()
store.verify_layer(store.layer_by_diff_id(a["v1_top"]))
res["cache"] = str(blobcache.detect().path)
r = import_image(store, a["ref"], a["digest"], a["config"].encode(),
                 [LayerTar(*la) for la in a["layers"]], tls_verify=False,
                 manifest=a["manifest"].encode())
res["image_id"] = r.image_id
res["cache_written"] = r.cache_written
res["staging_left"] = len(staging_images(store))
print(json.dumps(res), flush=True)
"""


@pytest.fixture
def user() -> Iterator[RootlessUser]:
    enter_private_mount_namespace()
    u = RootlessUser()
    try:
        yield u
    finally:
        u.close()


@pytest.mark.slow
def test_rootless_read_and_import(user, registry):  # type: ignore[no-untyped-def]
    base = shell_rootfs_tar()
    top1 = tar_bytes({"app/secret": (b"s3cret\n", 0o000), "app/v": b"1\n"})
    top2 = tar_bytes({"app/secret": (b"s3cret\n", 0o000), "app/v": b"2\n"})
    v1 = push_image(registry.host, "t/rl", "v1", [base, top1])
    v2 = push_image(registry.host, "t/rl", "v2", [base, top2])

    def podman(*args: str) -> str:
        proc = user.run(["podman", "--storage-driver", "vfs", *args])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    podman("pull", "-q", "--tls-verify=false", v1.reference)
    new_tar = user.work / "new.tar"
    new_tar.write_bytes(top2)
    new_tar.chmod(0o644)
    script = user.work / "child.py"
    script.write_text(CHILD.format(root=str(REPO_ROOT)))
    args = user.work / "args.json"
    args.write_text(
        json.dumps(
            {
                "v1": v1.reference,
                "v1_top": v1.diff_ids[1],
                "ref": v2.reference,
                "digest": v2.manifest_digest,
                "config": v2.config.decode(),
                "manifest": v2.manifest.decode(),
                "layers": [
                    [v2.diff_ids[0], v2.compressed_digests[0], "gzip", None],
                    [v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)],
                ],
            }
        )
    )
    registry.clear_log()
    proc = user.run([sys.executable, str(script), str(args), "outside"])
    assert proc.returncode == 0, proc.stderr
    # The staging `podman pull oci:DIR` worked rootless too (its fallback would warn here).
    assert "podman load" not in proc.stderr, proc.stderr
    outside, inside = (json.loads(line) for line in proc.stdout.splitlines())
    # Outside the user namespace the mode-000 file cannot be read ...
    assert outside["euid"] == user.uid and outside["rootless"]
    assert outside["read"] == "SourceError"
    # ... inside (re-run transparently under `podman unshare`) it can, and the import works.
    assert inside["euid"] == 0 and inside["rootless"]
    assert inside["graph_root"] == str(user.home / ".local/share/containers/storage")
    assert inside["secret"] == "s3cret\n"
    assert inside["cache"] == str(
        user.home / ".local/share/containers/cache/blob-info-cache-v1.boltdb"
    )
    assert inside["cache_written"] and inside["staging_left"] == 0
    assert inside["image_id"] == v2.config_digest.removeprefix("sha256:")
    layer_blobs = set(v2.compressed_digests)
    assert not [a for a in registry.blob_gets() if a.path.rsplit("/", 1)[-1] in layer_blobs]
    info = json.loads(podman("image", "inspect", v2.reference))[0]
    assert info["RepoDigests"] == [f"{v2.repo}@{v2.manifest_digest}"]
    # A later plain rootless pull downloads no layer blob either.
    registry.clear_log()
    podman("pull", "-q", "--tls-verify=false", v2.reference)
    assert not [a for a in registry.blob_gets() if a.path.rsplit("/", 1)[-1] in layer_blobs]
