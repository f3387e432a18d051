"""``podman-delta changes``: git-like change lists between trees, tars and delta results."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from podman_delta.errors import DigestMismatchError
from podman_delta.tardiff.changes import changes, changes_from_delta
from tests.conftest import FIXTURES
from tests.test_patcher_helpers import extract, make_tar, write_tree

FEATURES = FIXTURES / "go-tardiff" / "features"
REPO = Path(__file__).resolve().parents[1]

EXPECTED = {
    "bin/cp": "M",
    "bin/ls": "M",
    "data/added.bin": "A",
    "data/gone.txt": "D",
    "data/numbers-hardlink.txt": "M",
    "data/numbers.txt": "M",
    "data/random-copy.bin": "A",
    "etc/passwd": "M",
    "lib/libz.so.1.2.13": "D",
    "lib/libz.so.1.3.1": "A",
}


def _statuses(result: object) -> dict[str, str]:
    return {c.path: c.status for c in result.changes}  # type: ignore[attr-defined]


def test_fixture_tars() -> None:
    result = changes([FEATURES / "old.tar"], [FEATURES / "new.tar"])
    assert _statuses(result) == EXPECTED
    by_path = {c.path: c for c in result.changes}
    assert (by_path["bin/cp"].old_size, by_path["bin/cp"].new_size) == (151152, 142968)
    assert by_path["bin/ls"].what == ("content",)  # same size, different bytes
    assert by_path["etc/passwd"].what == ("content", "mode")
    assert "mode 0644 -> 0640" in by_path["etc/passwd"].note
    assert by_path["data/gone.txt"].old_size == 14
    assert result.bytes_added == 471280 and result.bytes_removed == 121294


def test_tar_against_its_own_extraction_and_compressed_copy(tmp_path: Path) -> None:
    tree = extract(FEATURES / "old.tar", tmp_path / "old")
    gz = tmp_path / "old.tgz"
    with open(FEATURES / "old.tar", "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    assert changes([FEATURES / "old.tar"], [tree]).changes == []
    assert changes([gz], [FEATURES / "old.tar"]).changes == []
    assert _statuses(changes([tree], [FEATURES / "new.tar"])) == EXPECTED


def test_metadata_only_changes(tmp_path: Path) -> None:
    old = write_tree(tmp_path / "old", {"a": b"same", "b": b"same", "c": b"x", "t": b"file"})
    new = write_tree(tmp_path / "new", {"a": b"same", "b": b"same", "c": b"x"})
    os.symlink("target1", old / "l")
    os.symlink("target2", new / "l")
    os.symlink("somewhere", new / "t")  # file -> symlink
    (new / "a").chmod(0o600)
    os.chown(new / "b", 123, 456)
    os.setxattr(new / "c", "user.note", b"v")
    (new / "d").mkdir()
    result = changes([old], [new])
    by_path = {c.path: c for c in result.changes}
    assert by_path["a"].what == ("mode",) and by_path["a"].to_dict()["metadata_only"]
    assert by_path["b"].what == ("owner",) and "owner 0:0 -> 123:456" in by_path["b"].note
    assert by_path["c"].what == ("xattrs",) and "+user.note" in by_path["c"].note
    assert by_path["l"].what == ("link",) and "link target1 -> target2" in by_path["l"].note
    assert by_path["t"].what[0] == "type" and not by_path["t"].to_dict()["metadata_only"]
    assert by_path["d"].status == "A" and by_path["d"].type == "dir"
    lines = list(result.lines())
    assert "A  d/" in lines
    assert "M  a  (4 bytes; mode 0644 -> 0600)" in lines
    assert lines[-1] == "1 added (+0 bytes), 0 removed (-0 bytes), 5 modified"


def test_stacked_old_side_applies_whiteouts(tmp_path: Path) -> None:
    lower = write_tree(tmp_path / "lower", {"a/x": b"1", "a/y": b"2", "b/z": b"3", "keep": b"k"})
    upper = make_tar(
        tmp_path / "upper.tar",
        [("a/.wh.x", "file", b""), ("b/", "dir"), ("b/.wh..wh..opq", "file", b""),
         ("new", "file", b"n")],
    )  # fmt: skip
    merged = write_tree(tmp_path / "merged", {"a/y": b"2", "keep": b"k", "new": b"n"})
    (merged / "b").mkdir()
    assert changes([lower, upper], [merged]).changes == []
    assert _statuses(changes([lower], [lower, upper])) == {"a/x": "D", "b/z": "D", "new": "A"}


def test_changes_from_delta() -> None:
    result, patched = changes_from_delta(FEATURES / "go-default.tardiff", [FEATURES / "old.tar"])
    assert _statuses(result) == EXPECTED
    assert patched.size == (FEATURES / "new.tar").stat().st_size
    with pytest.raises(DigestMismatchError):
        changes_from_delta(
            FEATURES / "go-default.tardiff", [FEATURES / "old.tar"], expected_digest="0" * 64
        )


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podman_delta", "changes", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_cli_json_with_delta(tmp_path: Path) -> None:
    old = extract(FEATURES / "old.tar", tmp_path / "old")
    proc = _cli("--json", "--delta", FEATURES / "go-rollsum.tardiff", old)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {c["path"]: c["status"] for c in doc["changes"]} == EXPECTED
    assert (doc["added"], doc["removed"], doc["modified"]) == (3, 2, 5)
    assert doc["new_size"] == (FEATURES / "new.tar").stat().st_size
    assert not list(tmp_path.glob("**/new.tar"))


def test_cli_text_and_usage_errors(tmp_path: Path) -> None:
    proc = _cli(FEATURES / "old.tar", FEATURES / "new.tar")
    assert proc.returncode == 0, proc.stderr
    assert "D  data/gone.txt  (14 bytes)" in proc.stdout.splitlines()
    assert proc.stdout.splitlines()[-1].startswith("3 added")
    assert _cli(FEATURES / "old.tar").returncode == 2
    bad = _cli(FEATURES / "old.tar", tmp_path / "missing")
    assert bad.returncode == 4 and bad.stderr.startswith("podman-delta: error:")
