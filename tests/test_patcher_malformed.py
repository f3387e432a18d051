"""Malformed and hostile deltas end in one clear DeltaFormatError, never a crash or a hang."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from podman_delta.errors import DeltaFormatError
from podman_delta.tardiff.format import MAGIC_V1, encode_varint
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import TarSource
from tests.conftest import FIXTURES
from tests.test_patcher_helpers import ADD, COPY, DATA, OPEN, raw_delta, rec, write_tree

FEATURES = FIXTURES / "go-tardiff" / "features"


@pytest.fixture(scope="module")
def old_tar() -> TarSource:
    with TarSource(FEATURES / "old.tar") as source:
        yield source


def run(delta: bytes, source: object) -> bytes:
    out = io.BytesIO()
    apply(io.BytesIO(delta), source, out)  # type: ignore[arg-type]
    return out.getvalue()


def _cut_points(n: int) -> list[int]:
    points = set(range(0, 8)) | set(range(9, 64)) | {n - k for k in range(1, 40)}
    points |= set(range(64, n, max(1, n // 60)))
    return sorted(p for p in points if 0 <= p < n and p != 8)


def test_truncated_go_delta_at_many_points(old_tar: TarSource) -> None:
    full = (FEATURES / "go-default.tardiff").read_bytes()
    assert run(full, old_tar) == (FEATURES / "new.tar").read_bytes()
    for cut in _cut_points(len(full)):
        with pytest.raises(DeltaFormatError, match=r"truncated|corrupt|not a tar-diff") as info:
            run(full[:cut], old_tar)
        assert "\n" not in str(info.value), cut


@pytest.mark.parametrize(
    "body",
    [
        OPEN(b"bin/cp")[:-2],  # inside a name
        DATA(b"hello")[:-1],  # inside a payload
        bytes((0,)),  # op byte with no size
        bytes((0, 0x80)),  # inside a varint
        OPEN(b"bin/cp") + ADD(b"\x00" * 10)[:-3],  # inside an ADD payload
    ],
)
def test_op_stream_ends_inside_a_record(old_tar: TarSource, body: bytes) -> None:
    with pytest.raises(DeltaFormatError, match="truncated"):
        run(raw_delta([body]), old_tar)


@pytest.mark.parametrize(
    "head", [b"", b"tardf", b"tardf3\n\x00", b"TARDF1\n\x00", b"tardf1\n\x01", b"\x28\xb5\x2f\xfd"]
)
def test_bad_magic(old_tar: TarSource, head: bytes) -> None:
    with pytest.raises(DeltaFormatError, match="bad magic"):
        run(head + b"\x00" * 16, old_tar)


def test_body_not_zstd(old_tar: TarSource) -> None:
    with pytest.raises(DeltaFormatError):
        run(MAGIC_V1 + b"this is not zstd at all", old_tar)


@pytest.mark.parametrize("code", [6, 7, 0x80, 0xFF])
def test_unknown_op(old_tar: TarSource, code: int) -> None:
    with pytest.raises(DeltaFormatError, match=f"unknown op {code}"):
        run(raw_delta([DATA(b"ok"), rec(code, 0)]), old_tar)


@pytest.mark.parametrize("code", [0, 3, 5])
def test_oversized_payload_op(old_tar: TarSource, code: int) -> None:
    # A 2^63-byte DATA/ADD must be refused from its size alone, before any allocation.
    records = [OPEN(b"bin/cp"), rec(code, 2**63) + b"xx"]
    with pytest.raises(DeltaFormatError, match="bytes"):
        run(raw_delta(records, version=2), old_tar)


def test_payload_just_over_limit(old_tar: TarSource) -> None:
    with pytest.raises(DeltaFormatError, match="max 67108864"):
        run(raw_delta([rec(0, (64 << 20) + 1)]), old_tar)


def test_oversized_open_name(old_tar: TarSource) -> None:
    with pytest.raises(DeltaFormatError, match="OPEN name"):
        run(raw_delta([rec(1, 4097, b"a" * 4097)]), old_tar)


@pytest.mark.parametrize(
    "varint",
    [
        b"\xff" * 10 + b"\x01",  # 11 bytes
        b"\xff" * 9 + b"\x02",  # 10th byte overflows 64 bits
        b"\x80" * 10,  # never ends within 10 bytes
    ],
)
def test_varint_overflow(old_tar: TarSource, varint: bytes) -> None:
    with pytest.raises(DeltaFormatError, match="varint"):
        run(raw_delta([bytes((4,)) + varint]), old_tar)


def test_max_varint_is_accepted_for_seek(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"f": b"abc"})
    from podman_delta.tardiff.sources import DirSource

    with DirSource(root) as source:
        body = OPEN(b"f") + bytes((4,)) + encode_varint(2**64 - 1) + bytes((4, 1)) + COPY(2)
        assert run(raw_delta([body]), source) == b"bc"


def test_corrupted_zstd_checksum(old_tar: TarSource) -> None:
    delta = bytearray(raw_delta([DATA(b"x" * 1000)]))
    delta[-1] ^= 0xFF
    with pytest.raises(DeltaFormatError):
        run(bytes(delta), old_tar)


def test_trailing_garbage_after_frame(old_tar: TarSource) -> None:
    with pytest.raises(DeltaFormatError):
        run(raw_delta([DATA(b"x")]) + b"garbage!", old_tar)
