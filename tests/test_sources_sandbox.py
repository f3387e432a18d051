"""The old-file sandbox: hostile OPEN names never reach outside the tree or non-regular files."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from podman_delta.errors import SourceError
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import (
    DirSource,
    SourceNotFoundError,
    TarSource,
    open_source,
    split_name,
)
from tests.test_patcher_helpers import COPY, OPEN, make_tar, raw_delta, write_tree

SECRET = b"outside the tree\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    root = write_tree(tmp_path / "root", {"usr/lib64/libc.so": b"libc", "etc/passwd": b"pw"})
    os.symlink(tmp_path / "secret", root / "escape")  # absolute, out of the tree
    os.symlink("../../secret", root / "usr" / "rel-escape")  # relative, out of the tree
    os.symlink("usr/lib64", root / "lib64")  # a symlinked directory (inside the tree)
    os.symlink(tmp_path, root / "up")  # a symlinked directory pointing out
    os.symlink("passwd", root / "etc" / "inside-link")  # a symlink to a file in the tree
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))  # /dev/null's char device
    os.mknod(root / "loop", 0o600 | 0o060000, os.makedev(7, 0))  # a block device
    os.mknod(root / "whiteout", 0o000 | 0o020000, os.makedev(0, 0))  # overlay whiteout
    return root


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (b"../secret", "'..'"),
        (b"usr/../../secret", "'..'"),
        (b"/etc/passwd", "absolute"),
        (b"", "empty"),
        (b"./", "empty"),
        (b"//", "absolute"),
        (b"etc/passwd\x00x", "NUL"),
        (b"a" * 4097, "4096"),
    ],
)
def test_bad_names_refused(tree: Path, name: bytes, why: str) -> None:
    with DirSource(tree) as source, pytest.raises(SourceError, match=why):
        source.open(name)


def test_harmless_dot_components_are_cleaned() -> None:
    assert split_name(b"./usr//lib/./x") == [b"usr", b"lib", b"x"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (b"escape", "symlink"),
        (b"usr/rel-escape", "symlink"),
        (b"lib64/libc.so", "symlink"),
        (b"up/secret", "symlink"),
        (b"etc/inside-link", "symlink"),
        (b"fifo", "FIFO"),
        (b"null", "device"),
        (b"loop", "device"),
        (b"usr", "directory"),
        (b"usr/lib64", "directory"),
    ],
)
def test_unsafe_files_refused(tree: Path, name: bytes, why: str) -> None:
    with DirSource(tree) as source, pytest.raises(SourceError, match=why) as info:
        source.open(name)
    assert "\n" not in str(info.value)


def test_regular_files_still_open(tree: Path) -> None:
    with DirSource(tree) as source:
        f = source.open(b"usr/lib64/libc.so")
        assert (f.size, f.pread(0, 100), f.pread(2, 1), f.pread(4, 1)) == (4, b"libc", b"b", b"")
        f.close()


def test_overlay_whiteout_is_missing(tree: Path) -> None:
    with DirSource(tree) as source, pytest.raises(SourceNotFoundError, match="whited out"):
        source.open(b"whiteout")


def test_missing_file_and_file_as_directory(tree: Path) -> None:
    with DirSource(tree) as source:
        with pytest.raises(SourceNotFoundError, match="does not exist"):
            source.open(b"usr/nope")
        with pytest.raises(SourceNotFoundError, match="non-directory"):
            source.open(b"etc/passwd/x")


def test_fifo_never_blocks_a_patch(tree: Path) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            apply(io.BytesIO(raw_delta([OPEN(b"fifo"), COPY(1)])), DirSource(tree), io.BytesIO())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert len(errors) == 1 and isinstance(errors[0], SourceError)
    assert "FIFO" in str(errors[0])


def test_symlink_escape_through_a_patch(tree: Path) -> None:
    out = io.BytesIO()
    with pytest.raises(SourceError, match="symlink"):
        apply(io.BytesIO(raw_delta([OPEN(b"escape"), COPY(len(SECRET))])), DirSource(tree), out)
    assert SECRET not in out.getvalue()


def test_missing_root() -> None:
    with pytest.raises(SourceError, match="cannot open old tree"):
        DirSource("/nonexistent/podman-delta-test")
    with pytest.raises(SourceError, match="not found"):
        open_source(["/nonexistent/podman-delta-test"])


def test_unreadable_directory_is_still_walked_as_root(tree: Path) -> None:
    (tree / "usr" / "lib64").chmod(0o111)
    try:
        with DirSource(tree) as source:
            assert source.open(b"usr/lib64/libc.so").pread(0, 4) == b"libc"
    finally:
        (tree / "usr" / "lib64").chmod(0o755)


# --------------------------------------------------------------------------- tars


@pytest.fixture
def hostile_tar(tmp_path: Path) -> Path:
    return make_tar(
        tmp_path / "old.tar",
        [
            ("usr/lib64/libc.so", "file", b"libc"),
            ("etc/passwd", "file", b"pw"),
            ("escape", "symlink", "/etc/passwd"),
            ("lib64", "symlink", "usr/lib64"),
            ("fifo", "fifo"),
            ("null", "chr", (1, 3)),
            ("link-to-symlink", "hardlink", "escape"),
            ("dangling", "hardlink", "not/there"),
            ("../../outside", "file", b"cleaned into the root"),
        ],
    )


@pytest.mark.parametrize(
    ("name", "error", "why"),
    [
        (b"escape", SourceError, "symlink"),
        (b"lib64/libc.so", SourceError, "symlink"),
        (b"fifo", SourceError, "device, FIFO"),
        (b"null", SourceError, "device, FIFO"),
        (b"usr", SourceError, "directory"),
        (b"usr/lib64", SourceError, "directory"),
        (b"link-to-symlink", SourceError, "symlink"),
        (b"dangling", SourceNotFoundError, "hardlink"),
        (b"../outside", SourceError, "'..'"),
        (b"/etc/passwd", SourceError, "absolute"),
        (b"etc/passwd/x", SourceNotFoundError, "non-directory"),
        (b"nope", SourceNotFoundError, "does not exist"),
    ],
)
def test_tar_source_refuses(hostile_tar: Path, name: bytes, error: type, why: str) -> None:
    with TarSource(hostile_tar) as source, pytest.raises(error, match=why):
        source.open(name)


def test_tar_source_serves_regular_files(hostile_tar: Path) -> None:
    with TarSource(hostile_tar) as source:
        assert source.open(b"./usr/lib64//libc.so").pread(0, 10) == b"libc"
        assert source.open(b"outside").pread(0, 100) == b"cleaned into the root"


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 2000)
    with pytest.raises(Exception, match="cannot read tar"):
        TarSource(bad)


def test_directory_cache_stays_bounded_and_correct(tmp_path: Path) -> None:
    files = {f"d{i:03d}/sub/f": f"file {i}".encode() for i in range(300)}
    root = write_tree(tmp_path / "many", files)
    before = len(os.listdir("/proc/self/fd"))
    with DirSource(root) as source:
        for _ in range(2):
            for name, data in files.items():
                f = source.open(name.encode())
                assert f.pread(0, 100) == data
                f.close()
        assert len(os.listdir("/proc/self/fd")) - before <= 2 * DirSource._CACHE_SIZE + 2
    assert len(os.listdir("/proc/self/fd")) == before


def test_very_deep_names_do_not_recurse(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", {"a/a/a/f": b"x"})
    with DirSource(root) as source:
        with pytest.raises(SourceNotFoundError):
            source.open(b"a/" * 2040 + b"f")
        assert source.open(b"a/a/a/f").pread(0, 1) == b"x"
