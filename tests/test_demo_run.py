"""The README's first command, demo/run.sh, end to end (it installs, builds, pushes, pulls)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_shows_the_saving() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "demo/run.sh")], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    m = re.search(r"podman-delta fetched ([0-9.]+)% of the plain pull's bytes", out)
    assert m and float(m.group(1)) < 5, out
    assert re.search(r"layer blobs downloaded\s+2\s+0\n", out), out
    assert "same image as the plain pull" in out
    assert "a following podman pull of v2 downloaded 0 layer blob(s)" in out
    assert "demo app 2.0 on demo-base 1.1" in out
    assert not list(Path("/tmp").glob("podman-delta-demo.*"))  # cleaned up
