"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh docker-registry on 127.0.0.1 with storage under ``tmp_path``."""
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[Registry]:
    """A docker-registry requiring Basic auth for ``user``/``pass`` (bcrypt htpasswd)."""
    import subprocess

    entry = subprocess.run(
        ["htpasswd", "-Bbn", "user", "pass"], check=True, capture_output=True, text=True
    ).stdout
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(entry)
    with Registry(tmp_path / "registry-auth", htpasswd=htpasswd) as reg:
        yield reg


@pytest.fixture
def blob_cache() -> Iterator[Path]:
    """A private, empty blob-info-cache directory for this test (tmpfs in our mount namespace)."""
    from tests.support.podman import isolated_blob_cache

    with isolated_blob_cache() as path:
        yield path


@pytest.fixture
def images(registry: Registry, blob_cache: Path):  # type: ignore[no-untyped-def]
    """v1 and v2 of a small two-layer app image in ``registry``, with the push's cache rows gone."""
    from tests.support.podman import clear_blob_cache, push_app_images

    imgs = push_app_images(registry.host)
    clear_blob_cache(blob_cache)
    return imgs


@pytest.fixture
def runc_podman_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """podman started by the code under test uses runc, no network, and no host storage.conf."""
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\nnetns = "none"\n[engine]\nruntime = "runc"\n')
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
