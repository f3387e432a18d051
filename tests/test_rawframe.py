"""Op-5 frames with raw literals and no content size: what the differ now writes (rawframe)."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
import zstandard

from podman_delta.tardiff import rawframe
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import DirSource
from tests.test_patcher_helpers import OPEN, ZSTD_DICT, raw_delta, write_tree

OLD = b"".join(b"line %d of the old module, unchanged\n" % i for i in range(400))
# New text: most lines come from OLD, plus a sentence found nowhere in OLD (literals).
UNIQUE = bytes(random.Random(7).choices(b"qwxzjkvQWXZJKV", k=80)) + b"\n"
NEW = OLD[:5000] + UNIQUE * 3 + OLD[5000:]


def decode(frame: bytes, old: bytes) -> bytes:
    zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=zdict).decompressobj().decompress(frame)


def test_libzstd_is_found_here() -> None:
    # CI installs libzstd1 (a dependency of dpkg and apt): the raw-literal path must be live.
    assert rawframe.available()


def test_frame_round_trips_and_keeps_literals_readable() -> None:
    frame = rawframe.compress(NEW, OLD, 19, 16)
    assert frame is not None
    assert decode(frame, OLD) == NEW
    # The literal text is stored as is, where the op stream's compressor can match it...
    assert UNIQUE[:40] in frame
    # ...whereas a normal frame Huffman-codes it.
    zdict = zstandard.ZstdCompressionDict(OLD, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    normal = zstandard.ZstdCompressor(level=19, dict_data=zdict).compress(NEW)
    assert UNIQUE[:40] not in normal


def test_frame_declares_no_content_size() -> None:
    frame = rawframe.compress(NEW, OLD, 19, 16)
    assert frame is not None
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert 0 < params.window_size <= 1 << 16


@pytest.mark.parametrize("window_log", [10, 16, 23])
def test_patcher_applies_sizeless_frames(tmp_path: Path, window_log: int) -> None:
    """With no declared size the patcher decodes in one call when the content fits the window
    and falls back to the stream reader when it does not (window 1 KiB, 15 KB of content)."""
    frame = rawframe.compress(NEW, OLD, 19, window_log)
    assert frame is not None
    root = write_tree(tmp_path / "old", {"m.py": OLD})
    out = io.BytesIO()
    with DirSource(root) as source:
        apply(io.BytesIO(raw_delta([OPEN(b"m.py"), ZSTD_DICT(frame)], version=2)), source, out)
    assert out.getvalue() == NEW


def test_damaged_sizeless_frames_are_caught(tmp_path: Path) -> None:
    """No frame checksum (as in Go's writer): a cut frame is a format error, a flipped literal
    byte changes the output, which the layer digest then refuses."""
    from podman_delta.errors import DeltaFormatError, DigestMismatchError

    frame = rawframe.compress(NEW, OLD, 19, 16)
    assert frame is not None
    root = write_tree(tmp_path / "old", {"m.py": OLD})
    digest = "sha256:" + hashlib.sha256(NEW).hexdigest()
    flipped = bytearray(frame)
    flipped[frame.index(UNIQUE[:8])] ^= 0x20
    with DirSource(root) as source:
        with pytest.raises(DeltaFormatError, match="ZSTD_DICT"):
            delta = raw_delta([OPEN(b"m.py"), ZSTD_DICT(frame[:-7])], version=2)
            apply(io.BytesIO(delta), source, io.BytesIO(), expected_digest=digest)
        with pytest.raises(DigestMismatchError):
            delta = raw_delta([OPEN(b"m.py"), ZSTD_DICT(bytes(flipped))], version=2)
            apply(io.BytesIO(delta), source, io.BytesIO(), expected_digest=digest)


def test_unusable_parameter_gives_none() -> None:
    # A window log libzstd rejects: the caller gets None and makes a normal frame instead.
    assert rawframe.compress(NEW, OLD, 19, 99) is None
