"""Pieces of ``podman-delta pull`` that need no registry: display, rates, the lock, results."""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path

import pytest

from podman_delta.cli.pull import parse_rate
from podman_delta.errors import StorageError
from podman_delta.progress import BarProgress, LineProgress, NullProgress, human, make_progress
from podman_delta.pull import PullResult, compression_of, saving_pct, store_lock
from podman_delta.storage.config import StoreOptions
from podman_delta.storage.store import Store


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_kinds_and_output() -> None:
    assert isinstance(make_progress(quiet=True), NullProgress)
    assert type(make_progress(stream=io.StringIO())) is LineProgress
    assert type(make_progress(stream=_Tty())) is BarProgress

    lines = io.StringIO()
    prog = LineProgress(lines)
    prog.add("a", "layer 1/2 abc", 2_000_000)
    prog.update("a", 1_000_000)
    prog.finish("a", "done")
    assert lines.getvalue() == "layer 1/2 abc: fetching 2.0 MB\nlayer 1/2 abc: done\n"

    tty = _Tty()
    bars = BarProgress(tty)
    bars.add("a", "layer 1/2", 1000)
    bars.add("b", "layer 2/2", 1000)
    bars.update("a", 500)
    bars.finish("b", "rebuilt")
    bars.close()
    out = tty.getvalue()
    assert "\x1b[2F" in out  # redrawn in place
    last = out.rsplit("\x1b[J", 1)[1].splitlines()
    assert last[0].startswith("layer 1/2") and "500 B / 1.0 kB" in last[0]
    assert last[1].startswith("layer 2/2") and last[1].endswith("rebuilt")


def test_human_and_rates() -> None:
    assert human(999) == "999 B" and human(1500) == "1.5 kB" and human(48_569_938) == "48.6 MB"
    assert parse_rate("500k") == 512_000
    assert parse_rate("2M") == 2 << 20
    assert parse_rate("1.5m/s") == int(1.5 * (1 << 20))
    assert parse_rate("1000") == 1000
    for bad in ("fast", "0", "-1k"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rate(bad)


def test_compression_names() -> None:
    assert compression_of("application/vnd.oci.image.layer.v1.tar+gzip") == "gzip"
    assert compression_of("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    assert compression_of("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert compression_of("application/vnd.oci.image.layer.v1.tar") == "uncompressed"


def test_summary_line_and_json() -> None:
    res = PullResult(
        reference="r.example/app:v2",
        status="pulled",
        image_id="ab" * 32,
        fetched_bytes=50_000,
        plain_bytes=1_000_000,
        seconds=1.25,
        layers={"delta": 2, "full": 0, "reused": 1},
    )
    line = res.summary()
    assert line == (
        "r.example/app:v2 (abababababab): fetched 50.0 kB instead of 1.0 MB (95.0% saved) "
        "in 1.2 s; layers: 2 delta, 1 reused"
    )
    js = res.to_json()
    assert js["saving_percent"] == 95.0 and js["fetched_bytes"] == 50_000
    assert saving_pct(10, 0) == 0.0 and saving_pct(200, 100) == 0.0


def test_store_lock_serializes_and_names_the_holder(tmp_path: Path) -> None:
    store = Store(StoreOptions(tmp_path / "root", tmp_path / "run", "vfs"))
    events: list[str] = []
    waited: list[str] = []
    held = threading.Event()

    def first() -> None:
        with store_lock(store):
            events.append("first in")
            held.set()
            time.sleep(0.6)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with store_lock(store, on_wait=waited.append):
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]
    assert len(waited) == 1 and "pid " in waited[0] and "podman-delta.lock" in waited[0]

    with store_lock(store), pytest.raises(StorageError, match="holds"):  # noqa: SIM117
        with store_lock(store, timeout=0.3):
            pass
