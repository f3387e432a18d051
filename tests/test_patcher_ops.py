"""Every op of the tar-diff format, applied by the patcher, on hand-built deltas (§4-§5)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from podman_delta.errors import DeltaFormatError, DigestMismatchError, SourceError
from podman_delta.tardiff.format import DeltaWriter, WriterOptions
from podman_delta.tardiff.patcher import PatchResult, add_bytes, apply, patch_file
from podman_delta.tardiff.sources import DirSource
from tests.test_patcher_helpers import (
    ADD,
    COPY,
    DATA,
    OPEN,
    SEEK,
    ZSTD_DICT,
    dict_frame,
    raw_delta,
    sub_bytes,
    write_tree,
)

OLD_A = bytes(range(256)) * 40  # 10240 bytes
OLD_B = os.urandom(5000)


@pytest.fixture
def tree(tmp_path: Path) -> DirSource:
    root = write_tree(tmp_path / "old", {"usr/bin/a": OLD_A, "lib/b": OLD_B, "empty": b""})
    with DirSource(root) as source:
        yield source


def run(delta: bytes, source: DirSource, **kw: object) -> bytes:
    out = io.BytesIO()
    result = apply(io.BytesIO(delta), source, out, **kw)
    assert result.size == len(out.getvalue())
    assert result.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    return out.getvalue()


def test_data_only(tree: DirSource) -> None:
    assert run(raw_delta([DATA(b"hello "), DATA(b"world"), DATA(b"")]), tree) == b"hello world"


def test_empty_op_stream_gives_empty_output(tree: DirSource) -> None:
    assert run(raw_delta([]), tree) == b""
    assert run(b"tardf1\n\x00", tree) == b""  # header only, as Go tar-patch accepts


def test_reference_example(tree: DirSource) -> None:
    # §4.2: OPEN usr/bin/a, COPY the whole file, DATA "x".
    delta = raw_delta([OPEN(b"usr/bin/a"), COPY(len(OLD_A)), DATA(b"x")])
    assert run(delta, tree) == OLD_A + b"x"


def test_copy_seek_absolute_and_backwards(tree: DirSource) -> None:
    delta = raw_delta(
        [OPEN(b"usr/bin/a"), SEEK(100), COPY(10), SEEK(5), COPY(3), SEEK(100), SEEK(100), COPY(2)]
    )
    assert run(delta, tree) == OLD_A[100:110] + OLD_A[5:8] + OLD_A[100:102]


def test_copy_advances_position_and_open_resets_it(tree: DirSource) -> None:
    delta = raw_delta(
        [OPEN(b"lib/b"), COPY(7), COPY(3), OPEN(b"usr/bin/a"), COPY(4), OPEN(b"lib/b"), COPY(2)]
    )
    assert run(delta, tree) == OLD_B[:10] + OLD_A[:4] + OLD_B[:2]


def test_add_wraps_mod_256(tree: DirSource) -> None:
    new = bytes((b * 7 + 3) & 0xFF for b in OLD_A[:3000])
    diff = sub_bytes(new, OLD_A[:3000])
    delta = raw_delta([OPEN(b"usr/bin/a"), ADD(diff), ADD(b""), ADD(b"\x01\xff"), DATA(b"!")])
    expected = new + bytes(((OLD_A[3000] + 1) & 0xFF, (OLD_A[3001] + 0xFF) & 0xFF)) + b"!"
    assert run(delta, tree) == expected


def test_add_bytes_is_bytewise_mod_256() -> None:
    src, diff = os.urandom(100_000), os.urandom(100_000)
    assert add_bytes(src, diff) == bytes((a + b) & 0xFF for a, b in zip(src, diff, strict=True))
    assert add_bytes(src, bytes(len(src))) == src
    assert add_bytes(b"", b"") == b""


def test_bsdiff_style_triples_with_mostly_zero_diff(tree: DirSource) -> None:
    # Go writes ADD x, DATA y, SEEK after every triple, even ADD 0 and no-op SEEKs (§8).
    diff = bytearray(2000)
    diff[10] = 5
    new = add_bytes(OLD_B[1000:3000], bytes(diff))
    delta = raw_delta(
        [OPEN(b"lib/b"), SEEK(1000), ADD(bytes(diff)), DATA(b"extra"), SEEK(3000), ADD(b""),
         SEEK(3000), ADD(bytes(16)), SEEK(0)]
    )  # fmt: skip
    assert run(delta, tree) == new + b"extra" + OLD_B[3000:3016]


def test_large_ops_stream_in_chunks(tmp_path: Path) -> None:
    big = os.urandom(3 << 20)
    root = write_tree(tmp_path / "old", {"big": big})
    diff = bytearray(len(big))
    diff[::4096] = b"\x01" * len(diff[::4096])
    delta = raw_delta(
        [OPEN(b"big"), ADD(bytes(diff)), SEEK(0), COPY(len(big)), DATA(big[: 1 << 20] * 2)]
    )
    with DirSource(root) as source:
        out = run(delta, source)
    assert out == add_bytes(big, bytes(diff)) + big + big[: 1 << 20] * 2


def test_writer_made_delta_round_trip(tree: DirSource) -> None:
    buf = io.BytesIO()
    w = DeltaWriter(buf, 1, WriterOptions(level=3))
    w.data(b"header")
    w.open(b"usr/bin/a")
    w.copy(100, at=50)
    w.add(bytes(10))
    w.open(b"lib/b")
    w.copy(5, at=4990)
    w.close()
    assert run(buf.getvalue(), tree) == b"header" + OLD_A[50:160] + OLD_B[4990:4995]


# --------------------------------------------------------------------------- op 5


def test_zstd_dict_uses_whole_file_and_moves_to_eof(tree: DirSource) -> None:
    new = OLD_B[:2000] + b"inserted" + OLD_B[2000:]
    frame = dict_frame(OLD_B, new)
    # No SEEK 0 before op 5 (Go main's writer): the dictionary is still the whole file.
    delta = raw_delta(
        [OPEN(b"lib/b"), SEEK(4000), ZSTD_DICT(frame), DATA(b"|"), SEEK(10), COPY(5)], version=2
    )
    assert run(delta, tree) == new + b"|" + OLD_B[10:15]


def test_zstd_dict_position_is_eof_afterwards(tree: DirSource) -> None:
    frame = dict_frame(OLD_B, b"abc")
    delta = raw_delta([OPEN(b"lib/b"), ZSTD_DICT(frame), COPY(1)], version=2)
    with pytest.raises(SourceError, match="too short"):
        run(delta, tree)


def test_zstd_dict_big_output_streams(tmp_path: Path) -> None:
    old = os.urandom(1 << 20)
    new = old * 3 + b"tail"
    root = write_tree(tmp_path / "old", {"f": old})
    with DirSource(root) as source:
        assert run(raw_delta([OPEN(b"f"), ZSTD_DICT(dict_frame(old, new))], 2), source) == new


def test_writer_zstd_dict_round_trip(tree: DirSource) -> None:
    buf = io.BytesIO()
    w = DeltaWriter(buf, 2, WriterOptions(level=3))
    w.open(b"usr/bin/a")
    w.zstd_dict(dict_frame(OLD_A, OLD_A[::-1]), len(OLD_A))
    w.copy(4, at=0)
    w.close()
    assert run(buf.getvalue(), tree) == OLD_A[::-1] + OLD_A[:4]


def test_zstd_dict_in_tardf1_is_refused(tree: DirSource) -> None:
    delta = raw_delta([OPEN(b"lib/b"), ZSTD_DICT(dict_frame(OLD_B, b"x"))], version=1)
    with pytest.raises(DeltaFormatError, match="tardf1"):
        run(delta, tree)


def test_zstd_dict_truncated_frame(tree: DirSource) -> None:
    frame = dict_frame(OLD_B, os.urandom(3000))
    delta = raw_delta([OPEN(b"lib/b"), ZSTD_DICT(frame[:-5])], version=2)
    with pytest.raises(DeltaFormatError, match="ZSTD_DICT"):
        run(delta, tree)


def test_zstd_dict_with_wrong_dictionary_fails(tree: DirSource) -> None:
    new = OLD_A[:5000] + b"z"
    frame = dict_frame(OLD_A, new)
    delta = raw_delta([OPEN(b"lib/b"), ZSTD_DICT(frame)], version=2)
    try:
        out = run(delta, tree)
    except DeltaFormatError:
        return  # the frame's checksum or offsets caught it
    assert out != new  # otherwise the output is wrong and only a digest check catches it


def test_zstd_dict_garbage_payload(tree: DirSource) -> None:
    delta = raw_delta([OPEN(b"lib/b"), ZSTD_DICT(b"not a zstd frame")], version=2)
    with pytest.raises(DeltaFormatError):
        run(delta, tree)


# --------------------------------------------------------------------------- state errors


@pytest.mark.parametrize("op", [COPY(1), SEEK(0), ADD(b"\x00")])
def test_op_without_source(tree: DirSource, op: bytes) -> None:
    with pytest.raises(DeltaFormatError, match="before any OPEN"):
        run(raw_delta([DATA(b"x"), op]), tree)


def test_copy_past_end_of_source(tree: DirSource) -> None:
    with pytest.raises(SourceError, match=r"'lib/b' is too short"):
        run(raw_delta([OPEN(b"lib/b"), SEEK(4990), COPY(11)]), tree)


def test_add_past_end_of_source(tree: DirSource) -> None:
    with pytest.raises(SourceError, match="too short"):
        run(raw_delta([OPEN(b"empty"), ADD(b"\x00")]), tree)


def test_huge_copy_fails_fast_without_allocating(tree: DirSource) -> None:
    with pytest.raises(SourceError, match="too short"):
        run(raw_delta([OPEN(b"lib/b"), COPY(2**64 - 1)]), tree)


def test_huge_seek_then_copy(tree: DirSource) -> None:
    with pytest.raises(SourceError, match="too short"):
        run(raw_delta([OPEN(b"lib/b"), SEEK(2**64 - 1), COPY(1)]), tree)


def test_missing_source(tree: DirSource) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        run(raw_delta([OPEN(b"usr/bin/nope"), COPY(1)]), tree)


def test_open_of_missing_source_is_an_error_even_unused(tree: DirSource) -> None:
    # Go main may leave an OPEN for a file it never reads (§12 #8); the file must still exist.
    with pytest.raises(SourceError):
        run(raw_delta([OPEN(b"gone"), DATA(b"x")]), tree)


def test_max_output(tree: DirSource) -> None:
    delta = raw_delta([OPEN(b"usr/bin/a"), COPY(100), DATA(b"abc")])
    assert len(run(delta, tree, max_output=103)) == 103
    with pytest.raises(DeltaFormatError, match="exceeds the allowed 102 bytes"):
        run(delta, tree, max_output=102)


# --------------------------------------------------------------------------- digests


def test_expected_digest_accepted(tree: DirSource) -> None:
    digest = "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert run(raw_delta([DATA(b"abc")]), tree, expected_digest=digest) == b"abc"
    assert run(raw_delta([DATA(b"abc")]), tree, expected_digest=digest.upper()[7:]) == b"abc"


def test_wrong_digest_raises(tree: DirSource) -> None:
    with pytest.raises(DigestMismatchError, match="expected sha256:0000"):
        run(raw_delta([DATA(b"abc")]), tree, expected_digest="sha256:" + "0" * 64)


def test_patch_file_removes_output_on_mismatch(tree: DirSource, tmp_path: Path) -> None:
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([DATA(b"abc")]))
    out = tmp_path / "out" / "new.tar"
    out.parent.mkdir()
    with pytest.raises(DigestMismatchError):
        patch_file(delta, tree, out, expected_digest="sha256:" + "1" * 64)
    assert list(out.parent.iterdir()) == []


def test_patch_file_keeps_previous_file_on_error(tree: DirSource, tmp_path: Path) -> None:
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([DATA(b"abc"), OPEN(b"missing")]))
    out = tmp_path / "new.tar"
    out.write_bytes(b"previous")
    with pytest.raises(SourceError):
        patch_file(delta, tree, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tardiff", "new.tar", "old"]


def test_patch_file_success(tree: DirSource, tmp_path: Path) -> None:
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([DATA(b"abc")]))
    out = tmp_path / "new.tar"
    result = patch_file(delta, tree, out, expected_digest=hashlib.sha256(b"abc").hexdigest())
    assert result == PatchResult("sha256:" + hashlib.sha256(b"abc").hexdigest(), 3)
    assert out.read_bytes() == b"abc"
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_invalid_digest_string(tree: DirSource, tmp_path: Path) -> None:
    delta = tmp_path / "d.tardiff"
    delta.write_bytes(raw_delta([DATA(b"abc")]))
    with pytest.raises(Exception, match="invalid digest"):
        patch_file(delta, tree, tmp_path / "o", expected_digest="md5:abc")
    assert not (tmp_path / "o").exists()


def test_zstd_dict_payload_of_two_frames(tree: DirSource) -> None:
    frames = dict_frame(OLD_B, b"first|") + dict_frame(OLD_B, OLD_B[100:200])
    assert run(raw_delta([OPEN(b"lib/b"), ZSTD_DICT(frames)], version=2), tree) == (
        b"first|" + OLD_B[100:200]
    )
