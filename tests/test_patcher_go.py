"""Deltas made by Go tar-diff v0.1.2 must rebuild ``new.tar`` byte for byte.

Each fixture delta is applied against ``old.tar`` extracted into a directory (as tar-patch is
used) and against ``old.tar`` served in place by :class:`TarSource`, and through the CLI.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from podman_delta.tardiff.patcher import apply, patch_file
from podman_delta.tardiff.sources import DirSource, TarSource, open_source
from tests.conftest import FIXTURES
from tests.test_patcher_helpers import extract

GO = FIXTURES / "go-tardiff"
CASES = sorted(GO.glob("*/*.tardiff"))
SETS = sorted({c.parent for c in CASES})


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    return {d: extract(d / "old.tar", tmp_path_factory.mktemp(d.name)) for d in SETS}


def test_fixtures_present() -> None:
    assert len(CASES) >= 6, f"Go tar-diff fixtures missing under {GO}"


@pytest.mark.parametrize("delta", CASES, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_go_delta_against_extracted_dir(delta: Path, extracted: dict[Path, Path]) -> None:
    out = io.BytesIO()
    with DirSource(extracted[delta.parent]) as source, delta.open("rb") as f:
        result = apply(f, source, out, expected_digest=_sha(delta.parent / "new.tar"))
    assert out.getvalue() == (delta.parent / "new.tar").read_bytes()
    assert result.size == len(out.getvalue())


@pytest.mark.parametrize("delta", CASES, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_go_delta_against_tar_in_place(delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "new.tar"
    with TarSource(delta.parent / "old.tar") as source:
        result = patch_file(delta, source, out)
    assert out.read_bytes() == (delta.parent / "new.tar").read_bytes()
    assert result.digest == _sha(delta.parent / "new.tar")


def test_go_delta_against_compressed_tar(tmp_path: Path) -> None:
    d = GO / "features"
    gz = tmp_path / "old.tar.zst"
    subprocess.run(["zstd", "-q", "-3", str(d / "old.tar"), "-o", str(gz)], check=True)
    out = io.BytesIO()
    source = open_source([gz])
    try:
        with (d / "go-default.tardiff").open("rb") as f:
            apply(f, source, out)
    finally:
        source.close()
    assert out.getvalue() == (d / "new.tar").read_bytes()


def test_go_delta_cli_to_stdout(extracted: dict[Path, Path]) -> None:
    d = GO / "os-libs"
    proc = subprocess.run(
        [sys.executable, "-m", "podman_delta", "patch", "--digest", _sha(d / "new.tar"),
         str(d / "go-level19.tardiff"), str(extracted[d]), "-"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (d / "new.tar").read_bytes()
