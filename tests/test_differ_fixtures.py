"""The differ on the Go tar-diff fixtures: exact round trips, and smaller than Go's deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from podman_delta.tardiff.differ import DiffOptions, diff_file
from podman_delta.tardiff.format import DeltaReader, Op
from tests.conftest import FIXTURES
from tests.test_differ_roundtrip import rebuilt

GO = FIXTURES / "go-tardiff"


@pytest.mark.parametrize("pair", ["features", "os-libs"])
@pytest.mark.parametrize("fmt", ["auto", "tardf1"])
def test_smaller_than_go_and_exact(tmp_path: Path, pair: str, fmt: str) -> None:
    old, new = GO / pair / "old.tar", GO / pair / "new.tar"
    delta = tmp_path / "delta"
    stats = diff_file([old], new, delta, DiffOptions(format=fmt))
    go_best = min(
        (GO / pair / n).stat().st_size for n in ("go-default.tardiff", "go-level19.tardiff")
    )
    assert stats.delta_size < go_best
    assert rebuilt(delta, [old]) == new.read_bytes()
    with open(delta, "rb") as f:
        reader = DeltaReader(f)
        ops = {r.op for r in reader}
    if fmt == "tardf1" or stats.version == 1:
        assert reader.version == 1
        assert Op.ZSTD_DICT not in ops
    else:
        assert Op.ZSTD_DICT in ops
