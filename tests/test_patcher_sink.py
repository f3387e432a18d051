"""The patcher's output path: reusable buffers, COPY read straight into them, one-call op 5.

These pin what the faster paths must keep: every byte reaches a stream that writes less than it
is given, a COPY that is both too long for its source and over the output limit fails the way
reading it piece by piece would, a source that shrinks after it was opened is an error, and op-5
payloads decode the same whether the one-call path or the stream reader takes them.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import zstandard

from podman_delta.errors import DeltaFormatError, SourceError
from podman_delta.tardiff.format import CHUNK
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import DirSource, SourceFile
from tests.test_patcher_helpers import COPY, DATA, OPEN, ZSTD_DICT, raw_delta, write_tree

MIB = 1 << 20


class _Trickle(io.RawIOBase):
    """A raw stream that takes at most 1000 bytes per write, as a pipe or socket may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        n = min(len(b), 1000)
        self.data += bytes(b[:n])
        return n


def test_short_writes_lose_nothing(tmp_path: Path) -> None:
    old = os.urandom(3 * MIB + 123)
    body = [DATA(b"head"), OPEN(b"f"), COPY(len(old)), DATA(b"tail")]
    out = _Trickle()
    with DirSource(write_tree(tmp_path / "old", {"f": old})) as source:
        result = apply(io.BytesIO(raw_delta(body)), source, out)  # type: ignore[arg-type]
    expected = b"head" + old + b"tail"
    assert bytes(out.data) == expected
    assert result.digest == "sha256:" + hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize(
    ("limit", "error", "message"),
    [
        # 1 MiB pieces: the second one crosses the limit before the third comes up short
        (MIB + MIB // 2, DeltaFormatError, "exceeds the allowed"),
        # the third piece is read (short) before it would cross the limit
        (2 * MIB + MIB // 2 + 10, SourceError, rf"reads {CHUNK} bytes at offset {2 * CHUNK}"),
    ],
)
def test_copy_too_long_and_over_the_limit(
    tmp_path: Path, limit: int, error: type, message: str
) -> None:
    old = bytes(2 * MIB + MIB // 2)
    delta = raw_delta([OPEN(b"f"), COPY(3 * MIB)])
    with (
        DirSource(write_tree(tmp_path / "old", {"f": old})) as source,
        pytest.raises(error, match=message),
    ):
        apply(io.BytesIO(delta), source, io.BytesIO(), max_output=limit)  # type: ignore[arg-type]


class _Shrinking:
    """A source whose files lose their second half right after they are opened."""

    def __init__(self, inner: DirSource, path: Path) -> None:
        self.inner = inner
        self.path = path

    def open(self, name: bytes) -> SourceFile:
        opened = self.inner.open(name)
        os.truncate(self.path / os.fsdecode(name), opened.size // 2)
        return opened

    def close(self) -> None:
        self.inner.close()


def test_source_shrinking_after_open_is_an_error(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "old", {"f": os.urandom(2 * MIB)})
    delta = raw_delta([OPEN(b"f"), COPY(2 * MIB)])
    with (
        DirSource(root) as inner,
        pytest.raises(SourceError, match="'f' is too short"),
    ):
        apply(io.BytesIO(delta), _Shrinking(inner, root), io.BytesIO())  # type: ignore[arg-type]


def _frames(old: bytes, new: bytes, content_size: bool) -> bytes:
    zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    cctx = zstandard.ZstdCompressor(dict_data=zdict, write_content_size=content_size)
    return cctx.compress(new)


@pytest.mark.parametrize(
    "shape", ["content-size", "no-content-size", "two-frames", "skippable-first", "big"]
)
def test_zstd_dict_one_call_and_stream_paths_agree(tmp_path: Path, shape: str) -> None:
    old = os.urandom(50_000)
    new = old[:20_000] + b"changed" + old[20_000:]
    if shape == "content-size":
        frame = _frames(old, new, True)
    elif shape == "no-content-size":
        frame = _frames(old, new, False)
    elif shape == "two-frames":
        frame = _frames(old, new, True) + _frames(old, new[::-1], True)
        new = new + new[::-1]
    elif shape == "skippable-first":
        frame = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + _frames(old, new, True)
    else:  # over the one-call bound: the stream reader takes it
        new = new * 100
        frame = _frames(old, new, True)
    delta = raw_delta([OPEN(b"f"), ZSTD_DICT(frame), DATA(b"!")], version=2)
    out = io.BytesIO()
    with DirSource(write_tree(tmp_path / "old", {"f": old})) as source:
        apply(io.BytesIO(delta), source, out)  # type: ignore[arg-type]
    assert out.getvalue() == new + b"!"


def _with_content_size(frame: bytes, size: int) -> bytes:
    """``frame`` with its header's content-size field rewritten to ``size``."""
    fhd = frame[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    at = 5 + (1 - single) + (0, 1, 2, 4)[dict_flag]
    width = (single, 2, 4, 8)[fcs_flag]
    assert width, "the frame declares no content size"
    value = size - 256 if width == 2 else size
    return frame[:at] + value.to_bytes(width, "little") + frame[at + width :]


@pytest.mark.parametrize("delta_size", [-1, +1])
def test_zstd_dict_content_size_lie_is_refused(tmp_path: Path, delta_size: int) -> None:
    """A header that declares other content than the frame holds: an error, never short or
    padded output (the one-call path sizes its result by the header)."""
    old = os.urandom(10_000)
    new = old + b"extra"
    frame = _frames(old, new, True)
    assert zstandard.get_frame_parameters(frame).content_size == len(new)
    lying = _with_content_size(frame, len(new) + delta_size)
    assert zstandard.get_frame_parameters(lying).content_size == len(new) + delta_size
    delta = raw_delta([OPEN(b"f"), ZSTD_DICT(lying)], version=2)
    with (
        DirSource(write_tree(tmp_path / "old", {"f": old})) as source,
        pytest.raises(DeltaFormatError, match="ZSTD_DICT frame"),
    ):
        apply(io.BytesIO(delta), source, io.BytesIO())  # type: ignore[arg-type]
