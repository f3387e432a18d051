"""The staging image comes from ``podman pull oci:DIR`` of hard-linked tars, not ``podman load``.

podman 4.3.1 names an ``oci:`` pull after the directory (``localhost/<path>:latest``), which
must be a valid image name; the importer renames it, pulls by a relative path where the absolute
one is not a valid name, and falls back to ``podman load`` when the pull fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podman_delta.storage.importer import (
    LAYOUT_DIR,
    STAGING_REPO,
    LayerTar,
    import_image,
    is_staging_name,
    staging_images,
    write_oci_layout,
)
from podman_delta.storage.store import Store
from tests.support.podman import (
    AppImages,
    Podman,
    pull_layout_leftover,
)
from tests.test_import_interrupt import CHILD

REPO_ROOT = Path(__file__).resolve().parents[1]


#: podman started by the importer uses runc and no host storage.conf.
pytestmark = pytest.mark.usefixtures("runc_podman_env")


def _wrapper(tmp_path: Path, on_oci_pull: str = "") -> tuple[Path, Path]:
    """A podman that logs its arguments, and for a staging ``pull oci:DIR`` also how many of
    DIR's blobs are hard links, then runs ``on_oci_pull`` (default: the real podman)."""
    log = tmp_path / "podman.log"
    script = tmp_path / "podman-wrapper"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "ARGS $*" >> {log}\n'
        'for a; do case $a in oci:*) d=${a#oci:}; d=${d%%:*}; echo "LINKED '
        f'$(find "$d/blobs" -type f -links +1 | wc -l)" >> {log};; esac; done\n'
        f'case " $* " in *" oci:"*) {on_oci_pull or ":"};; esac\n'
        'exec podman "$@"\n'
    )
    script.chmod(0o755)
    return script, log


def _layers(imgs: AppImages, new_tar: Path) -> list[LayerTar]:
    v2 = imgs.v2
    return [
        LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
        LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
    ]


def _import(pm: Podman, imgs: AppImages, work: Path, podman: Path):  # type: ignore[no-untyped-def]
    work.mkdir(parents=True, exist_ok=True)
    new_tar = work / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    v2 = imgs.v2
    return import_image(
        Store(pm.options),
        v2.reference,
        v2.manifest_digest,
        v2.config,
        _layers(imgs, new_tar),
        podman=str(podman),
        tls_verify=False,
        tmpdir=work,
        manifest=v2.manifest,
    )


def _assert_exact(pm: Podman, imgs: AppImages, result) -> None:  # type: ignore[no-untyped-def]
    v2 = imgs.v2
    assert result.cache_written
    info = pm.inspect(v2.reference)
    assert info["Id"] == result.image_id == v2.config_digest.removeprefix("sha256:")
    assert info["RepoTags"] == [v2.reference]
    assert info["RepoDigests"] == [f"{v2.repo}@{v2.manifest_digest}"]
    assert info["RootFS"]["Layers"] == v2.diff_ids
    assert staging_images(Store(pm.options)) == []
    ids = [d.removeprefix("sha256:") for d in (imgs.v1.config_digest, v2.config_digest)]
    assert pm.image_ids() == sorted(ids)
    names = pm.run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert sorted(names) == sorted([imgs.v1.reference, v2.reference])


# Upper case and a trailing "_" make the absolute path no valid image name for podman 4.
@pytest.mark.parametrize("workdir", ["work", "Work_"])
def test_staging_is_pulled_from_a_layout_of_hard_links(tmp_path, registry, images, workdir):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    podman, log = _wrapper(tmp_path)
    result = _import(pm, images, tmp_path / workdir, podman)
    _assert_exact(pm, images, result)
    lines = log.read_text().splitlines()
    oci = [ln for ln in lines if " oci:" in ln]
    assert len(oci) == 1, lines
    assert not [ln for ln in lines if ln.split()[:1] == ["ARGS"] and " load " in ln]
    ref = oci[0].split(" oci:", 1)[1].split()[0]
    if workdir == "work":
        assert ref.startswith(f"{tmp_path}/work/podman-delta-import-")
    else:
        assert ref.startswith(f"{LAYOUT_DIR}:")  # relative to the layout's parent
    assert ref.endswith(f":{STAGING_REPO}:{images.v2.manifest_digest[7:23]}")
    assert "LINKED 1" in lines  # the rebuilt tar; the stored layer is not in the layout
    assert not [p for p in (tmp_path / workdir).iterdir() if p.name.startswith("podman-delta-")]


def test_failing_oci_pull_falls_back_to_podman_load(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    podman, log = _wrapper(tmp_path, "echo 'Error: oci refused' >&2; exit 125")
    result = _import(pm, images, tmp_path / "work", podman)
    _assert_exact(pm, images, result)
    args = [ln for ln in log.read_text().splitlines() if ln.startswith("ARGS")]
    assert [ln for ln in args if " oci:" in ln]
    assert [ln for ln in args if " load " in ln]


def test_leftover_named_after_the_layout_path_is_removed(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    """A run killed between podman 4's ``pull oci:DIR`` and the renaming leaves this name."""
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    leftover = pull_layout_leftover(pm, images, tmp_path)
    assert pm.run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split().count(leftover)
    assert len(staging_images(Store(pm.options))) == 1
    podman, _ = _wrapper(tmp_path)
    result = _import(pm, images, tmp_path / "work", podman)
    _assert_exact(pm, images, result)


def test_sigterm_after_staging_pull_removes_its_image(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    """The staging ``pull oci:`` created its image but was stopped before it returned."""
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    marker = tmp_path / "pulled"
    podman, _ = _wrapper(tmp_path, f'podman "$@"; touch {marker}; exec sleep 120')
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(images.new_tar)
    v2 = images.v2
    args = tmp_path / "args.json"
    layers = [[d, c, "gzip", None] for d, c in zip(v2.diff_ids, v2.compressed_digests, strict=True)]
    layers[1][3] = str(new_tar)
    args.write_text(
        json.dumps(
            {
                "root": str(pm.root),
                "runroot": str(pm.runroot),
                "ref": v2.reference,
                "digest": v2.manifest_digest,
                "config": v2.config.decode(),
                "layers": layers,
                "podman": str(podman),
            }
        )
    )
    env = {**pm.environ(), "TMPDIR": str(tmp_path)}
    code = CHILD.format(root=str(REPO_ROOT), args=str(args))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, "the staging pull never finished"
        time.sleep(0.1)
    # The staging image (under podman 4's path name) exists now ...
    assert len(staging_images(Store(pm.options))) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0
    assert b"KeyboardInterrupt" in err
    # ... and is gone, with the layout directory.
    assert staging_images(Store(pm.options)) == []
    assert pm.image_ids() == [images.v1.config_digest.removeprefix("sha256:")]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("podman-delta-import-")]


def test_layout_links_tars_and_copies_across_filesystems(tmp_path):  # type: ignore[no-untyped-def]
    same = tmp_path / "a.tar"
    same.write_bytes(b"a" * 1024)
    other_fs = Path("/dev/shm") / f"pd-layout-test-{os.getpid()}.tar"
    other_fs.write_bytes(b"b" * 1024)
    try:
        assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
        rows = [
            ("sha256:" + "1" * 64, str(same), 1024),
            ("sha256:" + "2" * 64, str(other_fs), 1024),
        ]
        rows.append(("sha256:" + "3" * 64, None, 7))  # stored: listed, not included
        layout = tmp_path / "layout"
        write_oci_layout(layout, b'{"rootfs":{}}', rows, "localhost/x:y")
        blobs = layout / "blobs" / "sha256"
        assert os.stat(blobs / ("1" * 64)).st_ino == same.stat().st_ino
        copied = blobs / ("2" * 64)
        assert copied.read_bytes() == b"b" * 1024
        assert copied.stat().st_ino != other_fs.stat().st_ino
        assert not (blobs / ("3" * 64)).exists()
        index = json.loads((layout / "index.json").read_text())
        (entry,) = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == "localhost/x:y"
        manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
        assert [la["digest"] for la in manifest["layers"]] == [r[0] for r in rows]
        assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    finally:
        other_fs.unlink()


def test_staging_names() -> None:
    assert is_staging_name(f"{STAGING_REPO}:0123456789abcdef")
    assert is_staging_name(f"{STAGING_REPO}:latest")
    assert is_staging_name(f"localhost/tmp/podman-delta-import-0123456789ab/{LAYOUT_DIR}:latest")
    assert is_staging_name(f"localhost/podman-delta-import-0123456789ab/{LAYOUT_DIR}:latest")
    assert not is_staging_name(f"localhost/podman-delta-import-0123456789ab/{LAYOUT_DIR}:1")
    assert not is_staging_name(f"localhost/tmp/{LAYOUT_DIR}:latest")  # a user's, maybe
    assert not is_staging_name(f"docker.io/library/{LAYOUT_DIR}:latest")
    assert not is_staging_name("localhost/app:1")
    assert not is_staging_name(f"localhost/{LAYOUT_DIR}x:latest")
