"""Interrupted imports leave nothing half-done: SIGTERM cleans up, kill -9 is healed next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from podman_delta.storage.importer import LayerTar, import_image, staging_images
from podman_delta.storage.store import Store
from tests.support.podman import (
    AppImages,
    Podman,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A child process that imports one image (the tests interrupt it); also used by test_import_layout.
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from podman_delta.storage.config import StoreOptions
from podman_delta.storage.importer import LayerTar, import_image
from podman_delta.storage.store import Store
a = json.load(open({args!r}))
from pathlib import Path
opts = StoreOptions(graph_root=Path(a["root"]), run_root=Path(a["runroot"]), driver="vfs")
import_image(Store(opts), a["ref"], a["digest"], a["config"].encode(),
             [LayerTar(*la) for la in a["layers"]], podman=a["podman"], tls_verify=False)
"""


def _start_child(tmp_path: Path, pm: Podman, imgs: AppImages) -> tuple[subprocess.Popen, Path]:
    """Run an import whose final `podman pull` hangs (a slow registry), in a child process."""
    marker = tmp_path / "pulling"
    slow = tmp_path / "podman-slow"
    # Only the registry pull (by digest) hangs; the staging `pull oci:DIR` runs normally.
    slow.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" pull "*@sha256:*) echo $$ > {marker}.tmp; mv {marker}.tmp {marker}; '
        "exec sleep 120;; esac\n"
        'exec podman "$@"\n'
    )
    slow.chmod(0o755)
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    v2 = imgs.v2
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            {
                "root": str(pm.root),
                "runroot": str(pm.runroot),
                "ref": v2.reference,
                "digest": v2.manifest_digest,
                "config": v2.config.decode(),
                "layers": [
                    [v2.diff_ids[0], v2.compressed_digests[0], "gzip", None],
                    [v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)],
                ],
                "podman": str(slow),
            }
        )
    )
    env = {**pm.environ(), "TMPDIR": str(tmp_path)}
    code = CHILD.format(root=str(REPO_ROOT), args=str(args))
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, "the import never reached its final pull"
        time.sleep(0.1)
    return child, new_tar


def _v1_only(pm: Podman, imgs: AppImages) -> bool:
    return pm.image_ids() == [imgs.v1.config_digest.removeprefix("sha256:")]


def test_sigterm_during_final_pull_cleans_up(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    child, _ = _start_child(tmp_path, pm, images)
    # The staging image exists while the pull runs ...
    assert len(staging_images(Store(pm.options))) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err
    # ... and is gone afterwards, with its temporary files.
    assert staging_images(Store(pm.options)) == []
    assert _v1_only(pm, images)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("podman-delta-import-")]


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    child, new_tar = _start_child(tmp_path, pm, images)
    child.kill()
    child.wait(30)
    os.kill(int((tmp_path / "pulling").read_text()), signal.SIGKILL)  # its orphaned "podman"
    store = Store(pm.options)
    assert len(staging_images(store)) == 1  # what a killed run leaves
    v2 = images.v2
    result = import_image(
        store,
        v2.reference,
        v2.manifest_digest,
        v2.config,
        [
            LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
            LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
        ],
        tls_verify=False,
    )
    assert result.cache_written
    assert staging_images(store) == []
    assert sorted(pm.image_ids()) == sorted(
        d.removeprefix("sha256:") for d in (images.v1.config_digest, v2.config_digest)
    )
