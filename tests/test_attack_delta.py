"""Hostile deltas beyond tests/test_patcher_malformed.py and tests/test_sources_sandbox.py:
symlinks to host secrets, decompression bombs (outer stream, op 5, idle ops), huge COPY/SEEK,
output bounds, and what a failed patch leaves on disk (nothing).

Every case ends in one DeltaError subclass with a one-line message, in bounded time and memory,
and no byte of a file outside the old tree reaches the output.
"""

from __future__ import annotations

import io
import os
import resource
import time
from pathlib import Path

import pytest
import zstandard

from podman_delta.errors import DeltaFormatError, DigestMismatchError, SourceError
from podman_delta.tardiff.format import MAGIC_V1, MAGIC_V2, encode_varint
from podman_delta.tardiff.patcher import MAX_IDLE_OPS, apply, patch_file
from podman_delta.tardiff.sources import DirSource, StackedSource, TarSource
from tests.test_patcher_helpers import (
    COPY,
    DATA,
    OPEN,
    SEEK,
    ZSTD_DICT,
    dict_frame,
    make_tar,
    raw_delta,
    rec,
    write_tree,
)

ENVIRON = b"PODMAN_DELTA_ATTACK_MARKER=s3cr3t-in-the-environment"


def run(delta: bytes, source: object, **kw: object) -> bytes:
    out = io.BytesIO()
    apply(io.BytesIO(delta), source, out, **kw)  # type: ignore[arg-type]
    return out.getvalue()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> None:
    assert str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- host secrets


@pytest.fixture
def trapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An old tree whose symlinks point at the host's secrets."""
    monkeypatch.setenv("PODMAN_DELTA_ATTACK", ENVIRON.decode())
    root = write_tree(tmp_path / "root", {"usr/bin/ok": b"fine"})
    os.symlink("/etc/shadow", root / "shadow")
    os.symlink("/proc/self/environ", root / "environ")
    os.symlink("../../../../../../../../etc/shadow", root / "usr" / "rel-shadow")
    os.symlink("/etc", root / "etc")  # a directory symlink: etc/shadow must not resolve
    os.symlink("/proc/self", root / "self")
    return root


@pytest.mark.parametrize(
    "name",
    [b"shadow", b"environ", b"usr/rel-shadow", b"etc/shadow", b"self/environ", b"etc/passwd"],
)
def test_symlinks_to_host_secrets(trapped: Path, name: bytes) -> None:
    delta = raw_delta([DATA(b"head"), OPEN(name), COPY(16)])
    with DirSource(trapped) as source, pytest.raises(SourceError, match="symlink") as info:
        run(delta, source)
    _one_line(info)


def test_stacked_layers_do_not_follow_a_lower_symlink(trapped: Path, tmp_path: Path) -> None:
    upper = write_tree(tmp_path / "upper", {"usr/bin/new": b"new"})
    with StackedSource([DirSource(upper), DirSource(trapped)]) as source:
        for name in (b"environ", b"etc/shadow"):
            with pytest.raises(SourceError, match="symlink"):
                run(raw_delta([OPEN(name), COPY(1)]), source)
        assert run(raw_delta([OPEN(b"usr/bin/ok"), COPY(4)]), source) == b"fine"


def test_tar_source_with_links_to_host_secrets(tmp_path: Path) -> None:
    tar = make_tar(
        tmp_path / "old.tar",
        [
            ("shadow", "symlink", "/etc/shadow"),
            ("environ", "symlink", "/proc/self/environ"),
            ("hard-shadow", "hardlink", "/etc/shadow"),  # not in the tar: a broken link
            ("etc", "symlink", "/etc"),
        ],
    )
    with TarSource(tar) as source:
        for name in (b"shadow", b"environ", b"hard-shadow", b"etc/shadow"):
            out = io.BytesIO()
            with pytest.raises(SourceError):
                apply(io.BytesIO(raw_delta([OPEN(name), COPY(8)])), source, out)
            assert out.getvalue() == b""


def test_environ_never_reaches_output_even_via_proc_paths(trapped: Path) -> None:
    """Whatever OPEN names a delta tries, /proc/self/environ's bytes never come out."""
    names = [b"environ", b"self/environ", b"../proc/self/environ", b"/proc/self/environ"]
    with DirSource(trapped) as source:
        for name in names:
            out = io.BytesIO()
            with pytest.raises(SourceError):
                apply(io.BytesIO(raw_delta([OPEN(name), COPY(4096)])), source, out)
            assert ENVIRON not in out.getvalue()


# --------------------------------------------------------------------------- size bombs


@pytest.fixture
def tree(tmp_path: Path) -> DirSource:
    root = write_tree(tmp_path / "t", {"f": b"0123456789" * 100})
    with DirSource(root) as source:
        yield source


def _bomb(records_head: bytes, unit: bytes, total: int, version: int = 1) -> bytes:
    """A delta whose op stream is ``records_head`` then ``unit`` repeated to ``total`` bytes,
    compressed as it is generated (so the test never holds the expanded stream)."""
    out = io.BytesIO()
    out.write(MAGIC_V2 if version == 2 else MAGIC_V1)
    cctx = zstandard.ZstdCompressor(level=1)
    with cctx.stream_writer(out, closefd=False) as w:
        w.write(records_head)
        block = unit * max(1, (4 << 20) // len(unit))
        left = total
        while left > 0:
            w.write(block[:left])
            left -= len(block)
    return out.getvalue()


def test_outer_stream_expanding_to_gigabytes_of_data(tree: DirSource) -> None:
    # 1 GiB of DATA in 64 MiB ops compresses to a few hundred KB
    unit = rec(0, 64 << 20) + bytes(64 << 20)
    delta = _bomb(b"", unit, 16 * len(unit))
    assert len(delta) < 1 << 20
    rss, start = _rss_mb(), time.monotonic()
    with pytest.raises(DeltaFormatError, match="exceeds the allowed") as info:
        run(delta, tree, max_output=8 << 20)
    _one_line(info)
    assert time.monotonic() - start < 10
    assert _rss_mb() - rss < 200  # streamed: nothing sized by the 1 GiB


def test_idle_op_bomb_is_refused(tree: DirSource) -> None:
    """A 2 KB delta expanding to millions of SEEKs once ran for minutes (~5 µs per op):
    now refused after MAX_IDLE_OPS ops that write nothing."""
    delta = _bomb(OPEN(b"f"), SEEK(0), 40 << 20)  # 20 million SEEKs
    assert len(delta) < 8 << 10
    start = time.monotonic()
    with pytest.raises(DeltaFormatError, match="write nothing") as info:
        run(delta, tree, max_output=1 << 30)
    _one_line(info)
    assert time.monotonic() - start < 20


def test_idle_open_bomb_is_refused(tree: DirSource) -> None:
    delta = _bomb(b"", OPEN(b"f"), 30 << 20)
    with pytest.raises(DeltaFormatError, match="write nothing"):
        run(delta, tree)


def test_idle_ops_interleaved_with_output_are_allowed(tree: DirSource) -> None:
    """Two idle ops per written byte (the worst a bsdiff writer does) stay legal."""
    body = OPEN(b"f") + (SEEK(0) + SEEK(1) + COPY(1)) * (MAX_IDLE_OPS // 2 + 10_000)
    out = run(raw_delta([body]), tree)
    assert out == b"1" * (MAX_IDLE_OPS // 2 + 10_000)


def test_zstd_dict_frame_expanding_without_bound(tree: DirSource) -> None:
    """Op 5: a 64 MiB-payload-capped frame whose content is 1 GiB of zeros."""
    old = b"0123456789" * 100
    zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frames = io.BytesIO()
    with zstandard.ZstdCompressor(dict_data=zdict, level=1).stream_writer(
        frames, closefd=False
    ) as w:
        zeros = bytes(16 << 20)
        for _ in range(64):
            w.write(zeros)
    frame = frames.getvalue()
    assert len(frame) < 1 << 20
    delta = raw_delta([OPEN(b"f"), ZSTD_DICT(frame)], version=2)
    rss, start = _rss_mb(), time.monotonic()
    with pytest.raises(DeltaFormatError, match="exceeds the allowed"):
        run(delta, tree, max_output=4 << 20)
    assert time.monotonic() - start < 10 and _rss_mb() - rss < 200
    # and a well-formed op 5 still works
    good = raw_delta([OPEN(b"f"), ZSTD_DICT(dict_frame(old, old + b"!"))], version=2)
    assert run(good, tree) == old + b"!"


@pytest.mark.parametrize(
    ("body", "error", "why"),
    [
        (OPEN(b"f") + COPY(2**63), SourceError, "too short"),
        (OPEN(b"f") + rec(4, 2**64 - 1) + COPY(1), SourceError, "too short"),
        (OPEN(b"f") + rec(3, 2**63) + b"x", DeltaFormatError, "ADD op of"),
        (rec(0, 2**63) + b"x", DeltaFormatError, "DATA op of"),
        (OPEN(b"f") + bytes((4,)) + b"\xff" * 9 + b"\x7f", DeltaFormatError, "varint"),
        (rec(1, 2**63), DeltaFormatError, "OPEN name"),
    ],
    ids=["copy-2^63", "seek-2^64-1", "add-2^63", "data-2^63", "varint-overflow", "open-2^63"],
)
def test_huge_sizes_never_allocate(tree: DirSource, body: bytes, error: type, why: str) -> None:
    rss, start = _rss_mb(), time.monotonic()
    with pytest.raises(error, match=why) as info:
        run(raw_delta([body], version=2), tree)
    _one_line(info)
    assert time.monotonic() - start < 5 and _rss_mb() - rss < 100


def test_encode_varint_matches_the_max() -> None:
    assert encode_varint(2**64 - 1) == b"\xff" * 9 + b"\x01"


# --------------------------------------------------------------------------- what stays on disk


def test_output_bound_removes_the_partial_file(tmp_path: Path) -> None:
    """More output than the DiffID's layer could hold: error, and no file under any name."""
    root = write_tree(tmp_path / "old", {"f": b"x" * 1000})
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([OPEN(b"f")] + [COPY(1000), SEEK(0)] * 50))
    outdir = tmp_path / "out"
    outdir.mkdir()
    with DirSource(root) as source, pytest.raises(DeltaFormatError, match="exceeds"):
        patch_file(delta, source, outdir / "layer.tar", max_output=10_000)
    assert list(outdir.iterdir()) == []


def test_wrong_bytes_for_the_right_layer_are_removed(tmp_path: Path) -> None:
    """A delta that rebuilds other bytes than the DiffID: DigestMismatchError, nothing kept
    (not even a partial file), and an existing file under the final name is untouched."""
    root = write_tree(tmp_path / "old", {"f": b"old content"})
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([DATA(b"evil "), OPEN(b"f"), COPY(3)]))
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "layer.tar").write_bytes(b"previous")
    expected = "sha256:" + "ab" * 32
    with DirSource(root) as source, pytest.raises(DigestMismatchError, match="discarded") as info:
        patch_file(delta, source, outdir / "layer.tar", expected_digest=expected)
    _one_line(info)
    assert sorted(p.name for p in outdir.iterdir()) == ["layer.tar"]
    assert (outdir / "layer.tar").read_bytes() == b"previous"


def test_delta_claiming_a_missing_source(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "old", {"usr/bin/a": b"a"})
    with DirSource(root) as source, pytest.raises(SourceError, match="does not exist") as info:
        run(raw_delta([OPEN(b"usr/lib/libssl.so.3"), COPY(10)]), source)
    _one_line(info)
