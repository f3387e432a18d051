"""``podman-delta patch`` as users run it: exit codes, one-line errors, no output left behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_patcher_helpers import COPY, DATA, OPEN, make_tar, write_delta, write_tree

REPO = Path(__file__).resolve().parents[1]


def patch(*args: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "podman_delta", "patch", *map(str, args)],
        capture_output=True,
        cwd=REPO,
        check=False,
    )


@pytest.fixture
def old(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(b"secret")
    root = write_tree(tmp_path / "old", {"usr/bin/a": b"0123456789"})
    os.symlink(tmp_path / "secret", root / "escape")
    return root


def _assert_failed(proc: subprocess.CompletedProcess[bytes], code: int, out_dir: Path) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.startswith("podman-delta: error: "), err
    assert err.count("\n") == 1, err
    assert not [p.name for p in out_dir.iterdir()], "output left behind"
    return err


def test_success_with_digest(tmp_path: Path, old: Path) -> None:
    delta = write_delta(tmp_path / "d", [DATA(b"hdr"), OPEN(b"usr/bin/a"), COPY(10)])
    out = tmp_path / "out.tar"
    digest = "sha256:" + hashlib.sha256(b"hdr0123456789").hexdigest()
    proc = patch("--digest", digest, delta, old, out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == b"hdr0123456789"
    assert proc.stdout == b""


def test_wrong_digest_exit_5_and_no_output(tmp_path: Path, old: Path) -> None:
    delta = write_delta(tmp_path / "d", [DATA(b"hdr")])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    err = _assert_failed(
        patch("--digest", "sha256:" + "a" * 64, delta, old, out_dir / "n.tar"), 5, out_dir
    )
    assert "expected sha256:aaaa" in err


@pytest.mark.parametrize(
    ("records", "code", "words"),
    [
        ([OPEN(b"../secret"), COPY(6)], 4, "'..'"),
        ([OPEN(b"/etc/passwd"), COPY(6)], 4, "absolute"),
        ([OPEN(b"escape"), COPY(6)], 4, "symlink"),
        ([OPEN(b"usr"), COPY(6)], 4, "directory"),
        ([OPEN(b"usr/bin/missing"), COPY(1)], 4, "does not exist"),
        ([OPEN(b"usr/bin/a"), COPY(11)], 4, "too short"),
        ([bytes((9, 0))], 3, "unknown op 9"),
    ],
)
def test_errors(tmp_path: Path, old: Path, records: list[bytes], code: int, words: str) -> None:
    delta = write_delta(tmp_path / "d", [DATA(b"x" * 100_000), *records])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert words in _assert_failed(patch(delta, old, out_dir / "new.tar"), code, out_dir)


def test_truncated_delta(tmp_path: Path, old: Path) -> None:
    full = write_delta(tmp_path / "d", [DATA(os.urandom(50_000)), OPEN(b"usr/bin/a"), COPY(10)])
    cut = tmp_path / "cut"
    cut.write_bytes(full.read_bytes()[:-100])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert "truncated" in _assert_failed(patch(cut, old, out_dir / "new.tar"), 3, out_dir)


def test_bad_magic_and_missing_delta(tmp_path: Path, old: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04 not a delta")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert "bad magic" in _assert_failed(patch(bad, old, out_dir / "n"), 3, out_dir)
    assert "cannot open delta" in _assert_failed(
        patch(tmp_path / "nope", old, out_dir / "n"), 1, out_dir
    )


def test_max_size(tmp_path: Path, old: Path) -> None:
    delta = write_delta(tmp_path / "d", [DATA(b"x" * 1000)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_failed(patch("--max-size", "999", delta, old, out_dir / "n"), 3, out_dir)
    assert patch("--max-size", "1000", delta, old, out_dir / "n").returncode == 0


def test_stacked_sources_and_tar_old(tmp_path: Path, old: Path) -> None:
    upper = make_tar(tmp_path / "upper.tar", [("usr/bin/a", "file", b"UPPER")])
    top = write_tree(tmp_path / "top", {"usr/bin/.wh.a": b""})
    delta = write_delta(tmp_path / "d", [OPEN(b"usr/bin/a"), COPY(5)])
    out = tmp_path / "n.tar"
    assert patch(delta, old, out, "--source", upper).returncode == 0
    assert out.read_bytes() == b"UPPER"
    proc = patch(delta, old, out, "--source", upper, "--source", top)
    assert proc.returncode == 4 and b"whited out" in proc.stderr
    assert out.read_bytes() == b"UPPER"  # the previous output is untouched
    assert patch(delta, upper, out).returncode == 0  # OLD itself may be a tar
