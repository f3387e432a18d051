"""The import runs as few podman commands as it can: every one costs a podman start-up and
the store's locks, on the path a user waits for.

A podman 4 staging ``pull oci:DIR`` names the image ``localhost/<layout path>:latest``; that
name is a staging name already, so it is kept (no ``tag``/``untag`` pair), and the staging
image is removed by ID while the user's tag is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from podman_delta.storage.importer import (
    LayerTar,
    _Podman,
    _remove_staging,
    import_image,
    is_staging_name,
    staging_images,
)
from podman_delta.storage.store import Store
from tests.support.podman import AppImages, Podman, pull_layout_leftover
from tests.test_import_layout import _assert_exact

pytestmark = pytest.mark.usefixtures("runc_podman_env")

#: podman subcommands the importer may run.
COMMANDS = {"pull", "tag", "untag", "rmi", "load", "images", "inspect"}


def _logging_podman(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "podman.log"
    script = tmp_path / "podman-wrapper"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec podman "$@"\n')
    script.chmod(0o755)
    return script, log


def _commands(log: Path) -> list[list[str]]:
    """Each logged command from its subcommand on (the store options before it dropped)."""
    out = []
    for line in log.read_text().splitlines():
        words = line.split()
        if words == ["--version"]:  # blobcache.detect asks which podman this is
            continue
        start = next(i for i, w in enumerate(words) if w in COMMANDS)
        out.append(words[start:])
    return out


def _import(pm: Podman, imgs: AppImages, work: Path, podman: Path):  # type: ignore[no-untyped-def]
    work.mkdir(parents=True, exist_ok=True)
    new_tar = work / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    v2 = imgs.v2
    layers = [
        LayerTar(v2.diff_ids[0], v2.compressed_digests[0], "gzip", None),
        LayerTar(v2.diff_ids[1], v2.compressed_digests[1], "gzip", str(new_tar)),
    ]
    return import_image(
        Store(pm.options),
        v2.reference,
        v2.manifest_digest,
        v2.config,
        layers,
        podman=str(podman),
        tls_verify=False,
        tmpdir=work,
        manifest=v2.manifest,
    )


# "work" gives podman 4 an absolute layout path as the image name, "Work_" a relative one.
@pytest.mark.parametrize("workdir", ["work", "Work_"])
def test_import_runs_four_podman_commands(tmp_path, registry, images, workdir, caplog):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    podman, log = _logging_podman(tmp_path)
    with caplog.at_level(logging.INFO, logger="podman_delta.storage.importer"):
        result = _import(pm, images, tmp_path / workdir, podman)
    v2 = images.v2
    commands = _commands(log)
    assert [c[0] for c in commands[:2]] == ["pull", "pull"], commands
    assert commands[0][-1].startswith("oci:")
    assert commands[1][-1] == f"{v2.repo}@{v2.manifest_digest}"
    # The tag and the staging image's removal run side by side, in either order.
    last = sorted(commands[2:])
    assert [c[0] for c in last] == ["rmi", "tag"], commands
    assert last[1][-2:] == [result.image_id, v2.reference]
    assert last[0][-1] != result.image_id
    # The image is exactly what a plain pull makes, and no staging image is left.
    _assert_exact(pm, images, result)
    # bench/bench_pull.py reads these timings.
    assert any("timing: staging pull" in r.getMessage() for r in caplog.records)


def _pulled_leftover(pm: Podman, imgs: AppImages, tmp_path: Path) -> str:
    """A staging-like image under podman 4's path name, as a killed run leaves it; its ID."""
    leftover = pull_layout_leftover(pm, imgs, tmp_path)
    store = Store(pm.options)
    ((image_id, names),) = staging_images(store)
    assert list(names) == [leftover] and is_staging_name(names[0])
    return image_id


def test_remove_staging_keeps_an_image_someone_else_named(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    image_id = _pulled_leftover(pm, images, tmp_path)
    pm.run("tag", image_id, "localhost/mine:1")
    store = Store(pm.options)
    _remove_staging(_Podman("podman", store), store, image_id)
    store.refresh()
    img = store.image(image_id)
    assert img is not None and list(img.names) == ["localhost/mine:1"]
    assert staging_images(store) == []


def test_remove_staging_removes_an_image_only_staging_names_name(tmp_path, registry, images):  # type: ignore[no-untyped-def]
    pm = Podman(tmp_path / "p")
    pm.pull(images.v1.reference)
    image_id = _pulled_leftover(pm, images, tmp_path)
    store = Store(pm.options)
    _remove_staging(_Podman("podman", store), store, image_id)
    store.refresh()
    assert store.image(image_id) is None
    assert pm.image_ids() == [images.v1.config_digest.removeprefix("sha256:")]
    # The old image's layers stay; the removed image's own top layer went with it.
    stored = {la.diff_digest for la in store.layers()}
    assert set(images.v1.diff_ids) <= stored
    assert images.v2.diff_ids[1] not in stored
