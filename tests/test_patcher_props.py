"""Property test: random valid op programs give the same bytes as a tiny reference applier.

The reference is a direct transcription of the op table (tardiff-format.md §4.1, §5) in plain
Python; the patcher must agree with it on a directory source and on a tar served in place.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import DirSource, TarSource
from tests.test_patcher_helpers import (
    ADD,
    COPY,
    DATA,
    OPEN,
    SEEK,
    ZSTD_DICT,
    dict_frame,
    make_tar,
    raw_delta,
    write_tree,
)

NAMES = ["a", "dir/b", "dir/sub/c"]


@st.composite
def programs(draw: st.DrawFn) -> tuple[dict[str, bytes], list[bytes], bytes]:
    """Old files, a valid op program for them, and the output it must produce."""
    files = {n: draw(st.binary(min_size=0, max_size=3000)) for n in NAMES}
    records: list[bytes] = []
    out = bytearray()
    current: str | None = None
    pos = 0
    for _ in range(draw(st.integers(0, 25))):
        choice = draw(st.sampled_from(["data", "open", "copy", "add", "seek", "zstd"]))
        if choice == "data" or (current is None and choice != "open"):
            payload = draw(st.binary(max_size=600))
            records.append(DATA(payload))
            out += payload
        elif choice == "open":
            current, pos = draw(st.sampled_from(NAMES)), 0
            records.append(OPEN(current.encode()))
        elif choice == "seek":
            pos = draw(st.integers(0, len(files[current])))
            records.append(SEEK(pos))
        elif choice in ("copy", "add"):
            src = files[current]
            n = draw(st.integers(0, len(src) - pos))
            if choice == "copy":
                records.append(COPY(n))
                out += src[pos : pos + n]
            else:
                diff = draw(st.binary(min_size=n, max_size=n))
                records.append(ADD(diff))
                out += bytes((a + b) & 0xFF for a, b in zip(src[pos : pos + n], diff, strict=True))
            pos += n
        else:  # op 5: the whole file is the dictionary; the position ends at EOF
            new = draw(st.binary(max_size=400)) + files[current][: draw(st.integers(0, 500))]
            records.append(ZSTD_DICT(dict_frame(files[current], new)))
            out += new
            pos = len(files[current])
    return files, records, bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_patcher_matches_reference(program: tuple[dict[str, bytes], list[bytes], bytes]) -> None:
    files, records, expected = program
    delta = raw_delta(records, version=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tree(Path(tmp) / "tree", files)
        tar = make_tar(Path(tmp) / "old.tar", [(n, "file", d) for n, d in files.items()])
        for source in (DirSource(root), TarSource(tar)):
            out = io.BytesIO()
            with source:
                result = apply(io.BytesIO(delta), source, out)
            assert out.getvalue() == expected
            assert result.size == len(expected)
