"""Replay the fuzz seed corpus (fuzz/corpus/) through the fuzz oracle (fuzz/harness.py), plus a
short hypothesis run of the same oracle: only DeltaError subclasses, one-line messages, no old
file opened outside the sandbox, no secret bytes in the output, no descriptor leak.
The long campaign is run separately (fuzz/README.md, RELIABILITY.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.harness import Sandbox, run_one

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"
SEEDS = sorted(CORPUS.iterdir())


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


def test_corpus_is_there() -> None:
    assert len(SEEDS) >= 10


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name[:12] for p in SEEDS])
def test_seed(sandbox: Sandbox, seed: Path) -> None:
    run_one(sandbox, seed.read_bytes())


def test_seeds_cover_success_and_refusals(sandbox: Sandbox) -> None:
    outcomes = {run_one(sandbox, p.read_bytes()) for p in SEEDS}
    assert {"ok", "SourceError", "DeltaFormatError"} <= outcomes


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 4096),
)
def test_mutated_seeds(sandbox: Sandbox, seed: Path, edits: list, cut: int) -> None:
    data = _mutate(seed.read_bytes(), edits)
    run_one(sandbox, data[: max(1, len(data) - cut % 8)])
