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
