"""Stacked sources (image layers, upper first) and hardlinks in tar sources."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from podman_delta.errors import SourceError
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import (
    DirSource,
    SourceNotFoundError,
    StackedSource,
    TarSource,
    open_source,
)
from tests.test_patcher_helpers import COPY, DATA, OPEN, SEEK, make_tar, raw_delta, write_tree

LOWER = {
    "a/x": b"lower a/x",
    "a/y": b"lower a/y",
    "b/z": b"lower b/z",
    "c/w": b"lower c/w",
    "d/q": b"lower d/q",
    "e/deep/f": b"lower e/deep/f",
    "g": b"lower g",
    "only-lower": b"lower only",
}


def _read(source: object, name: bytes) -> bytes:
    f = source.open(name)  # type: ignore[attr-defined]
    try:
        return f.pread(0, 1000)
    finally:
        f.close()


def _expect(source: object) -> None:
    """The merged view every upper-layer flavour below must produce."""
    assert _read(source, b"a/y") == b"lower a/y"
    assert _read(source, b"d/q") == b"upper d/q"
    assert _read(source, b"only-lower") == b"lower only"
    assert _read(source, b"new") == b"upper new"
    for hidden in (b"a/x", b"b/z", b"c/w", b"e/deep/f"):
        with pytest.raises(SourceNotFoundError, match="whited out"):
            source.open(hidden)  # type: ignore[attr-defined]
    with pytest.raises(SourceError, match="symlink"):
        source.open(b"g")  # type: ignore[attr-defined]
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        source.open(b"nowhere")  # type: ignore[attr-defined]


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "lower", LOWER)


def _overlay_upper(root: Path, opaque_xattr: str) -> Path:
    """An overlay diff dir: 0:0 char-device whiteouts and an opaque xattr."""
    write_tree(root, {"d/q": b"upper d/q", "c": b"upper c is a file", "new": b"upper new"})
    (root / "a").mkdir()
    os.mknod(root / "a" / "x", 0o020000, os.makedev(0, 0))
    os.mknod(root / "e", 0o020000, os.makedev(0, 0))  # whiteout of a whole directory
    (root / "b").mkdir()
    os.setxattr(root / "b", opaque_xattr, b"y")
    os.symlink("/etc/passwd", root / "g")
    return root


def _vfs_upper(root: Path) -> Path:
    """A tree with AUFS/OCI-style whiteout files."""
    write_tree(
        root,
        {
            "d/q": b"upper d/q",
            "c": b"upper c is a file",
            "new": b"upper new",
            "a/.wh.x": b"",
            ".wh.e": b"",
            "b/.wh..wh..opq": b"",
        },
    )
    os.symlink("/etc/passwd", root / "g")
    return root


def _tar_upper(path: Path) -> Path:
    return make_tar(
        path,
        [
            ("d/q", "file", b"upper d/q"),
            ("c", "file", b"upper c is a file"),
            ("new", "file", b"upper new"),
            ("a/.wh.x", "file", b""),
            (".wh.e", "file", b""),
            ("b/", "dir"),
            ("b/.wh..wh..opq", "file", b""),
            ("g", "symlink", "/etc/passwd"),
        ],
    )


@pytest.mark.parametrize("xattr", ["trusted.overlay.opaque", "user.overlay.opaque"])
def test_overlay_diff_dirs(tmp_path: Path, lower: Path, xattr: str) -> None:
    upper = _overlay_upper(tmp_path / "upper", xattr)
    with StackedSource([DirSource(upper), DirSource(lower)]) as source:
        _expect(source)


def test_vfs_style_whiteout_files(tmp_path: Path, lower: Path) -> None:
    with StackedSource([DirSource(_vfs_upper(tmp_path / "upper")), DirSource(lower)]) as source:
        _expect(source)


def test_tar_layers(tmp_path: Path) -> None:
    lower_tar = make_tar(tmp_path / "lower.tar", [(k, "file", v) for k, v in LOWER.items()])
    upper_tar = _tar_upper(tmp_path / "upper.tar")
    source = open_source([lower_tar, upper_tar])  # lowest first
    try:
        assert isinstance(source, StackedSource)
        _expect(source)
    finally:
        source.close()


def test_mixed_dir_and_tar_layers(tmp_path: Path, lower: Path) -> None:
    upper_tar = _tar_upper(tmp_path / "upper.tar")
    top = write_tree(tmp_path / "top", {"a/y": b"top a/y"})
    source = open_source([lower, upper_tar, top])
    try:
        assert _read(source, b"a/y") == b"top a/y"
        assert _read(source, b"d/q") == b"upper d/q"
        with pytest.raises(SourceNotFoundError):
            source.open(b"b/z")
    finally:
        source.close()


def test_opaque_dir_keeps_its_own_files(tmp_path: Path, lower: Path) -> None:
    upper = write_tree(tmp_path / "upper", {"b/.wh..wh..opq": b"", "b/z2": b"upper b/z2"})
    with StackedSource([DirSource(upper), DirSource(lower)]) as source:
        assert _read(source, b"b/z2") == b"upper b/z2"
        with pytest.raises(SourceNotFoundError):
            source.open(b"b/z")


def test_single_layer_ignores_whiteout_files(tmp_path: Path) -> None:
    # On its own a tree is not a layer of a stack: a stray ".wh." file hides nothing.
    root = write_tree(tmp_path / "t", {"a/x": b"x", "a/.wh.x": b""})
    with DirSource(root) as source:
        assert _read(source, b"a/x") == b"x"


def test_delta_across_layers(tmp_path: Path, lower: Path) -> None:
    upper = _vfs_upper(tmp_path / "upper")
    delta = raw_delta(
        [OPEN(b"d/q"), COPY(5), OPEN(b"a/y"), SEEK(6), COPY(3), OPEN(b"only-lower"), COPY(5)]
    )
    out = io.BytesIO()
    source = open_source([lower, upper])
    try:
        apply(io.BytesIO(delta), source, out)
    finally:
        source.close()
    assert out.getvalue() == b"upper" + b"a/y" + b"lower"
    with pytest.raises(SourceNotFoundError):
        apply(io.BytesIO(raw_delta([OPEN(b"a/x")])), open_source([lower, upper]), io.BytesIO())


def test_empty_stack() -> None:
    with pytest.raises(SourceError):
        StackedSource([])
    with pytest.raises(SourceError):
        open_source([])


# --------------------------------------------------------------------------- hardlinks


def test_tar_hardlinks_resolve_to_their_target(tmp_path: Path) -> None:
    tar = make_tar(
        tmp_path / "old.tar",
        [
            ("data/numbers.txt", "file", b"0123456789"),
            ("data/link", "hardlink", "./data/numbers.txt"),
            ("data/numbers.txt", "file", b"replaced later"),  # the link keeps the old inode
            ("other/link2", "hardlink", "data/link"),
        ],
    )
    delta = raw_delta(
        [OPEN(b"data/link"), SEEK(2), COPY(3), DATA(b"|"), OPEN(b"other/link2"), COPY(10),
         OPEN(b"data/numbers.txt"), COPY(8)]
    )  # fmt: skip
    out = io.BytesIO()
    with TarSource(tar) as source:
        assert source.open(b"data/link").size == 10
        apply(io.BytesIO(delta), source, out)
    assert out.getvalue() == b"234|0123456789replaced"


def test_go_fixture_hardlink_name_opens_from_tar() -> None:
    from tests.conftest import FIXTURES

    old = FIXTURES / "go-tardiff" / "features" / "old.tar"
    with TarSource(old) as source:
        via_link = _read(source, b"data/numbers.txt")
        assert via_link == _read(source, b"data/numbers-hardlink.txt")
        assert len(via_link) == 1000
