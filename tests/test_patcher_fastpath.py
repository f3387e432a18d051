"""The patcher's fast path: runs of tiny ADD/COPY/DATA/SEEK ops applied by one bsdiff4 call.

Real deltas (a distribution upgrade) hold a million bsdiff-style triples of a few bytes each;
the patcher parses them straight from the reader's buffer and batches them. These tests pin the
batching to the plain op-by-op meaning: byte-exact output across buffer ends, backward seeks and
multi-byte varints, and the same errors at the same op (source too short, output limit, bad
varint, unknown op, idle-op bomb, window reads bounded by the output).
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest

from podman_delta.errors import DeltaFormatError, SourceError
from podman_delta.tardiff.format import CHUNK, DeltaReader
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import DirSource
from tests.test_patcher_helpers import ADD, COPY, DATA, OPEN, SEEK, raw_delta, rec, write_tree


def run(delta: bytes, source: DirSource, **kw: object) -> bytes:
    out = io.BytesIO()
    apply(io.BytesIO(delta), source, out, **kw)  # type: ignore[arg-type]
    return out.getvalue()


def reference(records: list[bytes], files: dict[str, bytes]) -> bytes:
    """Apply ``records`` the obvious way, one op at a time (no batching, no bsdiff4)."""
    reader = DeltaReader(io.BytesIO(raw_delta(records)))
    out = bytearray()
    src, pos = b"", 0
    for record in reader:
        if record.op == 0:
            out += reader.read_payload()
        elif record.op == 1:
            src, pos = files[record.name.decode()], 0
        elif record.op == 2:
            assert pos + record.size <= len(src)
            out += src[pos : pos + record.size]
            pos += record.size
        elif record.op == 3:
            diff = reader.read_payload()
            assert pos + len(diff) <= len(src)
            old = src[pos : pos + len(diff)]
            out += bytes((a + b) & 0xFF for a, b in zip(old, diff, strict=True))
            pos += len(diff)
        else:
            pos = record.size
    return bytes(out)


def bsdiff_like(rng: random.Random, files: dict[str, bytes], triples: int) -> list[bytes]:
    """Ops shaped like a bsdiff-made delta: ADD/COPY x, DATA y, SEEK anywhere, OPEN now and then."""
    names = list(files)
    name = rng.choice(names)
    records = [OPEN(name.encode())]
    pos = 0
    for _ in range(triples):
        if rng.random() < 0.002:
            name = rng.choice(names)
            records.append(OPEN(name.encode()))
            pos = 0
        size = len(files[name])
        n = rng.choice(
            (0, 1, 2, 3, 5, 8, 20, 200, 3000, 70_000) if rng.random() < 0.01 else (1, 2, 3, 5, 8)
        )
        n = min(n, size - pos)
        kind = rng.random()
        if kind < 0.45:
            records.append(ADD(rng.randbytes(n)))  # 70_000: over SMALL_PAYLOAD, streamed
            pos += n
        elif kind < 0.9:
            records.append(COPY(n))
            pos += n
        if rng.random() < 0.8:
            big = rng.random() < 0.002  # over SMALL_PAYLOAD: streamed, ends the run
            records.append(DATA(rng.randbytes(100_000 if big else rng.choice((0, 1, 4, 30)))))
        if rng.random() < 0.9:
            pos = rng.randrange(size + 1)
            records.append(SEEK(pos))
    return records


@pytest.fixture
def files() -> dict[str, bytes]:
    rng = random.Random(7)
    return {
        "big": rng.randbytes(3 << 20),  # multi-byte varint offsets, windows over 1 MiB
        "dir/small": rng.randbytes(5000),
        "empty": b"",
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_small_ops_match_the_plain_meaning(
    tmp_path: Path, files: dict[str, bytes], seed: int
) -> None:
    records = bsdiff_like(random.Random(seed), files, 100_000)
    assert len(b"".join(records)) > 2 * CHUNK  # runs meet several reader buffer ends
    with DirSource(write_tree(tmp_path / "old", files)) as source:
        assert run(raw_delta(records), source) == reference(records, files)


def test_backward_seeks_inside_one_run(tmp_path: Path) -> None:
    old = bytes(range(256)) * 64
    body = [OPEN(b"f")]
    for i in range(2000):
        body += [SEEK((i * 7919) % (len(old) - 4)), ADD(b"\x01\x02\x03"), DATA(b"x"), COPY(1)]
    with DirSource(write_tree(tmp_path / "old", {"f": old})) as source:
        assert run(raw_delta(body), source) == reference(body, {"f": old})


def test_add_past_the_end_inside_a_run_is_a_source_error(tmp_path: Path) -> None:
    body = [OPEN(b"f")] + [ADD(b"\x01"), SEEK(0), DATA(b"z")] * 1000 + [SEEK(9), ADD(b"\x01\x01")]
    with (
        DirSource(write_tree(tmp_path / "old", {"f": b"0123456789"})) as source,
        pytest.raises(
            SourceError, match=r"too short \(10 bytes; the delta reads 2 bytes at offset 9"
        ),
    ):
        run(raw_delta(body), source)


def test_copy_past_the_end_inside_a_run_is_a_source_error(tmp_path: Path) -> None:
    body = [OPEN(b"f"), COPY(4), DATA(b"a"), SEEK(8), COPY(3)]
    with (
        DirSource(write_tree(tmp_path / "old", {"f": b"0123456789"})) as source,
        pytest.raises(SourceError, match="too short"),
    ):
        run(raw_delta(body), source)


def test_output_limit_inside_a_run(tmp_path: Path) -> None:
    body = [OPEN(b"f")] + [SEEK(0), ADD(b"\x00\x01"), DATA(b"abc")] * 1000
    delta = raw_delta(body)
    with DirSource(write_tree(tmp_path / "old", {"f": b"0123456789"})) as source:
        assert len(run(delta, source, max_output=5000)) == 5000
        with pytest.raises(DeltaFormatError, match="exceeds the allowed 4999 bytes"):
            run(delta, source, max_output=4999)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (bytes((4,)) + b"\xff" * 9 + b"\x02", "varint overflows 64 bits"),
        (bytes((9, 1)), "unknown op 9"),
        (bytes((5, 1, 0)), "ZSTD_DICT op in a tardf1 delta"),
        (rec(1, 5000, b"n" * 5000), "OPEN name of 5000 bytes"),
    ],
)
def test_bad_record_after_many_good_ones(tmp_path: Path, bad: bytes, message: str) -> None:
    body = [OPEN(b"f")] + [SEEK(300), COPY(1), DATA(b"d")] * 5000 + [bad] + [DATA(b"x" * 50)]
    with (
        DirSource(write_tree(tmp_path / "old", {"f": bytes(1000)})) as source,
        pytest.raises(DeltaFormatError, match=message),
    ):
        run(raw_delta(body), source)


def test_truncated_after_many_small_ops(tmp_path: Path) -> None:
    body = [OPEN(b"f")] + [SEEK(300), COPY(1), DATA(b"d")] * 5000 + [rec(0, 10, b"abc")]
    with (
        DirSource(write_tree(tmp_path / "old", {"f": bytes(1000)})) as source,
        pytest.raises(DeltaFormatError, match="truncated"),
    ):
        run(raw_delta(body), source)


def test_seek_before_open_in_the_fast_path(tmp_path: Path) -> None:
    body = [DATA(b"a")] * 100 + [SEEK(0)]
    with (
        DirSource(write_tree(tmp_path / "old", {"f": b"x"})) as source,
        pytest.raises(DeltaFormatError, match="SEEK before any OPEN"),
    ):
        run(raw_delta(body), source)


def test_far_apart_adds_do_not_read_whole_windows_per_byte(tmp_path: Path) -> None:
    """Two 1-byte ADDs 15 MiB apart, then OPEN (a flush), over and over: batching must not
    read the 15 MiB between them every time (that was 3 ms per 2 output bytes)."""
    old = bytes(16 << 20)
    group = [ADD(b"\x01"), SEEK((15 << 20) - 1), ADD(b"\x02"), OPEN(b"f")]
    body = [OPEN(b"f")] + group * 20_000
    with DirSource(write_tree(tmp_path / "old", {"f": old})) as source:
        start = time.process_time()
        out = run(raw_delta(body), source)
        elapsed = time.process_time() - start
    assert out == b"\x01\x02" * 20_000
    assert elapsed < 10  # reading every window whole: 20_000 x 15 MiB, minutes
