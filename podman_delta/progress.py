"""One progress display for a pull: a bar per layer on a terminal, plain lines otherwise.

Downloads run in several threads, so every method takes a lock. On a terminal the bars are
redrawn in place (at most ten times a second, so a fast download does not spend its time
drawing); elsewhere (a log, the journal, a pipe) each item gets one line when it starts and one
when it ends, which stays readable in ``journalctl``. ``--quiet`` uses :class:`NullProgress`.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO


def human(size: int | float | None) -> str:
    """``1.2 MB`` style sizes (decimal units, as podman prints them)."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


class NullProgress:
    """Shows nothing (``--quiet``, ``--json``)."""

    def add(self, key: str, label: str, total: int | None) -> None:
        pass

    def update(self, key: str, done: int) -> None:
        pass

    def finish(self, key: str, note: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Item:
    label: str
    total: int | None
    done: int = 0
    note: str | None = None


class LineProgress(NullProgress):
    """One line per item start and end (not a terminal)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._items: dict[str, _Item] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def add(self, key: str, label: str, total: int | None) -> None:
        with self._lock:
            self._items[key] = _Item(label, total)
            self._print(f"{label}: fetching {human(total)}")

    def update(self, key: str, done: int) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item.done = done

    def finish(self, key: str, note: str) -> None:
        with self._lock:
            item = self._items.get(key)
            label = item.label if item else key
            self._print(f"{label}: {note}")

    def message(self, text: str) -> None:
        with self._lock:
            self._print(text)


class BarProgress(LineProgress):
    """Bars redrawn in place on a terminal."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._drawn = 0
        self._last = 0.0

    def add(self, key: str, label: str, total: int | None) -> None:
        with self._lock:
            self._items[key] = _Item(label, total)
            self._draw(force=True)

    def update(self, key: str, done: int) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item.done = done
                self._draw()

    def finish(self, key: str, note: str) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item.note = note
                if item.total:
                    item.done = item.total
            self._draw(force=True)

    def message(self, text: str) -> None:
        with self._lock:
            self._erase()
            self._print(text)
            self._draw(force=True)

    def close(self) -> None:
        with self._lock:
            self._draw(force=True)
            self._drawn = 0

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _line(self, item: _Item) -> str:
        if item.total:
            frac = min(1.0, item.done / item.total)
            fill = int(frac * self.WIDTH)
            bar = "=" * fill + (">" if fill < self.WIDTH else "") + " " * (self.WIDTH - fill - 1)
            counts = f"{human(item.done)} / {human(item.total)}"
        else:
            bar, counts = " " * self.WIDTH, human(item.done)
        tail = item.note if item.note else counts
        return f"{item.label[:40]:<40} [{bar[: self.WIDTH]}] {tail}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self._erase()
        lines = [self._line(i) for i in self._items.values()]
        for line in lines:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = len(lines)


def make_progress(quiet: bool = False, stream: TextIO | None = None) -> NullProgress:
    """The display for this run: nothing, bars on a terminal, or lines."""
    if quiet:
        return NullProgress()
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", lambda: False)
    return BarProgress(stream) if isatty() else LineProgress(stream)
