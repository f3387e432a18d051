"""The tar-diff differ: make a delta that rebuilds a new layer tar from old layer contents.

Everything in the new tar except the contents of matched regular files is copied verbatim as DATA
(headers, PAX records, padding, the end-of-archive blocks), so applying the delta reproduces the
new tar byte for byte. For each regular file of the new tar the differ tries several encodings
and keeps the one whose ops compress smallest:

* **copy**: identical content anywhere in the merged old tree (whole-file COPY);
* **bsdiff** against a *reference* made of one or more old files: the best match by name
  (same path, version-normalised path, basename, Go's basename prefix), ranked by content, plus
  old files that share many lines with the new one (code that moved between modules). bsdiff's
  (diff, extra, seek) triples over the concatenated reference become OPEN/SEEK/ADD/COPY/DATA runs
  that switch source file wherever the reference does. Files above the bsdiff cap are diffed in
  windows, so memory stays bounded;
* **zstd dictionary frame** (op 5, ``tardf2`` only) with the best single source as raw dictionary;
* **literal** DATA.

Candidates are compared by the size of their ops compressed at a mid level (9): at level 3 the
comparison wrongly favours bsdiff over the dictionary frame for binaries. Only the winning
dictionary frame is redone at the final level, since dictionary loading is the slow part.

Format choice (``DiffOptions.format``): ``tardf1`` uses ops 0-4 only and applies with Go
tar-patch v0.1.2. ``tardf2`` also allows op 5. ``auto`` (the default) allows op 5 per file only
where it beats every op 0-4 encoding of that file, and writes a ``tardf1`` delta whenever no op 5
ended up in the stream (the magic is fixed up afterwards), so the result is the delta every
applier accepts whenever op 5 does not pay. The per-file choice is an estimate: on the benchmark
corpus op 5 saved 1.3-1.6 % on an OS security update and a Python app update, and cost 0.3 % on
an OS major update (where ``--format tardf1`` is the better choice). The frames that go into the
delta keep their literals raw (:mod:`.rawframe`), so the op stream's compressor sees them.

Work runs in a thread pool (bsdiff4 and zstandard release the GIL); results are written in tar
order with a bounded look-ahead, and bsdiff jobs reserve memory from a budget so peak RSS stays
under about 1 GiB whatever the layer size.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import bsdiff4.core
import zstandard

from podman_delta.errors import DeltaError, DeltaTooLargeError
from podman_delta.tardiff import rawframe
from podman_delta.tardiff.format import (
    MAGIC_LEN,
    MAGIC_V1,
    MAX_PAYLOAD,
    DeltaWriter,
    WriterOptions,
    encode_varint,
)
from podman_delta.tardiff.matching import (
    MAX_ANCHOR_FILE,
    AnchorIndex,
    NameIndex,
    OldFile,
    delta_candidate,
    is_text,
    merge_old_tars,
)
from podman_delta.tardiff.outfile import open_in_place, writes_in_place
from podman_delta.tardiff.tarindex import REGULAR_TYPES, TarEntry, open_tar, scan

log = logging.getLogger(__name__)

#: New files smaller than this go out literally: OPEN + COPY would cost about as much.
TINY = 96
#: bsdiff needs about this many bytes of RAM per reference byte (two suffix arrays + copies).
BSDIFF_RAM_PER_BYTE = 18
#: Memory the workers may reserve for bsdiff and dictionary compression together.
WORK_BUDGET = 512 << 20
#: Largest reference for op 5 (the applier holds it in memory as a dictionary).
MAX_ZSTD_DICT_SOURCE = 128 << 20
#: Level used to compare candidate encodings of one file (fast; relative sizes are what count).
ESTIMATE_LEVEL = 9
#: Percentage charged on a dictionary frame's size when comparing it with other encodings.
ZDICT_MARGIN = 103
#: ... and on the frame of a substantially changed, compressible file (frame above 10 % of it):
#: there bsdiff's literal bytes also compress against the rest of the op stream, which a frame
#: cannot (measured: op 5 everywhere made an OS major-update delta 5 % larger than tardf1).
ZDICT_MARGIN_CHANGED = 140
#: ``dir/__pycache__/stem.tag.pyc``: groups dir/, stem and .tag.pyc.
_PYC = re.compile(rb"(.*/)__pycache__/([^/.]+)(\.[^/]+\.pyc)")
#: Binary old files up to this size are indexed for moved code too.
MAX_ANCHOR_BINARY = 1 << 20
#: Old files besides the best match that may join one bsdiff reference.
MAX_EXTRA_SOURCES = 4
#: New bytes allowed in flight (read but not yet written) in the ordered pipeline.
INFLIGHT_BYTES = 96 << 20
#: New files above this are streamed window by window instead of being held in memory.
HUGE = 64 << 20


@dataclass
class DiffOptions:
    """How to make a delta. ``threads`` 0 means all cores; sizes are in bytes."""

    format: str = "auto"
    level: int = 19
    threads: int = 0
    max_bsdiff_size: int = 24 << 20
    tmpdir: str | None = None
    check_size: bool = True


@dataclass
class DiffStats:
    """What a diff produced. ``files`` counts new regular files per encoding."""

    delta_size: int = 0
    new_tar_size: int = 0
    compressed_new_size: int = 0  # zstd -3 size of the new tar; a lower bound unless exact
    compressed_exact: bool = False
    files: dict[str, int] = field(default_factory=dict)
    version: int = 1

    def compressed_text(self) -> str:
        """The compressed new tar's size as measured: exact, a lower bound, or not measured."""
        if not self.compressed_new_size:
            return "zstd size not measured"
        more = "" if self.compressed_exact else "over "
        return f"zstd {more}{self.compressed_new_size} bytes"


# --------------------------------------------------------------------------- op lists

# A file's encoding is a list of ops applied to the DeltaWriter in order:
#   ("open", name) ("seek", pos) ("copy", n) ("add", diff) ("data", bytes) ("zdict", frame, size)
OpList = list[tuple]


def _serialize(ops: OpList) -> bytes:
    """Encode ops the way they land in the op stream (for size estimates only)."""
    out = bytearray()
    for op in ops:
        kind = op[0]
        if kind == "open":
            # The name is charged as one byte: the outer compressor finds it in the tar header
            # just before, and every encoding of a file opens the same source.
            out += b"\x01\x01"
        elif kind == "seek":
            out += b"\x04" + encode_varint(op[1])
        elif kind == "copy":
            out += b"\x02" + encode_varint(op[1])
        elif kind == "add":
            out += b"\x03" + encode_varint(len(op[1])) + op[1]
        elif kind == "data":
            out += b"\x00" + encode_varint(len(op[1])) + op[1]
        elif kind == "zdict":
            out += b"\x05" + encode_varint(len(op[1])) + op[1]
    return bytes(out)


def _apply(writer: DeltaWriter, ops: OpList) -> None:
    for op in ops:
        kind = op[0]
        if kind == "open":
            writer.open(op[1])
        elif kind == "seek":
            writer.seek(op[1])
        elif kind == "copy":
            writer.copy(op[1])
        elif kind == "add":
            writer.add(op[1])
        elif kind == "data":
            writer.data(op[1])
        elif kind == "zdict":
            writer.zstd_dict(op[1], op[2])


def _zdict_cost(frame_size: int, new_size: int, literal_cost: int) -> int:
    """The size a dictionary frame is charged when compared with op 0-4 encodings."""
    changed = frame_size * 10 >= new_size and literal_cost * 10 < new_size * 9
    margin = ZDICT_MARGIN_CHANGED if changed else ZDICT_MARGIN
    return (frame_size + 8) * margin // 100


# --------------------------------------------------------------------------- memory budget


class _Budget:
    """A counting semaphore over bytes, so concurrent bsdiffs never exceed the RAM budget."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int):
        amount = min(amount, self.total)
        with self._cond:
            while self.free < amount:
                self._cond.wait()
            self.free -= amount
        try:
            yield
        finally:
            with self._cond:
                self.free += amount
                self._cond.notify_all()


# --------------------------------------------------------------------------- bsdiff mapping


@dataclass(frozen=True)
class _Segment:
    """A piece of a bsdiff reference: ``length`` bytes of ``src`` from ``start``."""

    src: OldFile
    start: int
    length: int


_TRIPLE = struct.Struct("<QQQ")
_SIGN = 1 << 63


def _signed(value: int) -> int:
    return -(value & ~_SIGN) if value & _SIGN else value


def bsdiff_ops(segments: Sequence[_Segment], ref: bytes, new: bytes) -> OpList:
    """bsdiff ``new`` against ``ref`` (the concatenated ``segments``) and map it to ops.

    Each diff block becomes ADD (COPY when it is all zeros) runs, split wherever the reference
    crosses from one old file to the next; each extra block becomes DATA. A short diff block
    that sits between two jumps in the reference goes out as DATA instead: its SEEK (an
    absolute offset, which compresses badly) costs more than the few literal bytes.
    """
    control, diff, extra = bsdiff4.core.diff(ref, new)
    starts = []
    acc = 0
    for seg in segments:
        starts.append(acc)
        acc += seg.length
    triples = [(_signed(x), _signed(y), _signed(z)) for x, y, z in _TRIPLE.iter_unpack(control)]
    ops: OpList = []
    pos = dpos = epos = npos = 0
    jumped = True  # the first run needs a SEEK
    for i, (x, y, z) in enumerate(triples):
        jumps_after = z != 0 or i + 1 == len(triples)
        if x:
            if jumped and jumps_after and _literal_pays(diff, dpos, x):
                ops.append(("data", new[npos : npos + x]))
            else:
                _add_run(ops, segments, starts, pos, diff[dpos : dpos + x])
            jumped = jumps_after
        elif z:
            jumped = True
        if y:
            ops.append(("data", extra[epos : epos + y]))
            epos += y
        dpos += x
        npos += x + y
        pos += x + z
    return ops


def _literal_pays(diff: bytes, start: int, n: int) -> bool:
    """Whether ``n`` literal bytes cost less than a SEEK plus an ADD of this diff block.

    Measured on the compressed op stream: a literal byte of code costs about 0.4 byte, a SEEK
    with its op codes about 12 bytes, and each non-zero diff byte about one byte.
    """
    if n >= 256:
        return False
    changed = n - diff.count(0, start, start + n)
    return 2 * n < 60 + 5 * changed


def _add_run(
    ops: OpList, segments: Sequence[_Segment], starts: list[int], pos: int, diff: bytes
) -> None:
    """Emit ADD/COPY for ``diff`` applied to reference bytes at ``pos``."""
    done = 0
    while done < len(diff):
        i = bisect.bisect_right(starts, pos + done) - 1
        seg = segments[i]
        inner = pos + done - starts[i]
        n = min(len(diff) - done, seg.length - inner)
        piece = diff[done : done + n]
        ops.append(("open", seg.src.name))
        ops.append(("seek", seg.start + inner))
        if piece.count(0) == n:
            ops.append(("copy", n))
        else:
            ops.append(("add", piece))
        done += n


# --------------------------------------------------------------------------- the differ


@dataclass
class _Job:
    entry: TarEntry
    result: OpList | None = None
    method: str = "literal"


class _Differ:
    """State shared by the workers of one diff run."""

    def __init__(
        self,
        options: DiffOptions,
        old_fds: list[int],
        new_fd: int,
        files: list[OldFile],
        new_entries: list[TarEntry],
        allow_zdict: bool,
    ) -> None:
        self.options = options
        self.old_fds = old_fds
        self.new_fd = new_fd
        self.files = files
        self.names = NameIndex(files)
        self.by_digest: dict[tuple[int, bytes], OldFile] = {}
        self.allow_zdict = allow_zdict
        # New files by path, for a compiled module to find its own source (_compiled_from).
        self.new_by_path = {e.bpath: e for e in new_entries if _is_target(e)}
        self.budget = _Budget(WORK_BUDGET)
        self.anchors = AnchorIndex()
        self._local = threading.local()

    # -- helpers

    def read_old(self, f: OldFile, start: int = 0, length: int | None = None) -> bytes:
        n = f.size - start if length is None else length
        data = os.pread(self.old_fds[f.tar], n, f.offset + start)
        if len(data) != n:
            raise DeltaError("old tar is truncated: re-create it and retry")
        return data

    def _estimator(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=ESTIMATE_LEVEL)
        return cctx

    def estimate(self, payload: bytes) -> int:
        return len(self._estimator().compress(payload))

    def index_digests(self, sizes: set[int], pool: ThreadPoolExecutor) -> None:
        """Hash old files whose size some new file has (only those can be identical)."""
        wanted = [f for f in self.files if f.size in sizes]
        for f, digest in zip(wanted, pool.map(self._digest_old, wanted), strict=True):
            self.by_digest[(f.size, digest)] = f

    def index_anchors(self) -> None:
        """Index the lines of old text files, to find code that moved between files."""
        for f in self.files:
            if f.size > MAX_ANCHOR_FILE or not delta_candidate(f.path):
                continue
            if f.size > MAX_ANCHOR_BINARY and not is_text(self.read_old(f, 0, min(f.size, 8192))):
                continue
            self.anchors.add(f, self.read_old(f))

    def _digest_old(self, f: OldFile) -> bytes:
        h = hashlib.sha256()
        done = 0
        while done < f.size:
            n = min(8 << 20, f.size - done)
            h.update(self.read_old(f, done, n))
            done += n
        return h.digest()

    # -- per file

    def diff_file(self, job: _Job) -> _Job:
        entry = job.entry
        new = os.pread(self.new_fd, entry.size, entry.data_offset)
        if len(new) != entry.size:
            raise DeltaError("new tar is truncated: re-create it and retry")
        same = self.by_digest.get((entry.size, hashlib.sha256(new).digest()))
        if same is not None:
            job.method, job.result = (
                "copied",
                [("open", same.name), ("seek", 0), ("copy", same.size)],
            )
            return job
        literal: OpList = [("data", new)]
        best_cost = literal_cost = self.estimate(new)
        best: tuple[str, OpList] = ("literal", literal)
        path = entry.bpath
        if not delta_candidate(path):
            job.method, job.result = best
            return job
        cands = [f for f in self.names.candidates(path, entry.size) if delta_candidate(f.path)]
        hits = self._moved_from(path, new, bool(cands))
        for f, _ in hits[:2]:
            if f not in cands and delta_candidate(f.path):
                cands.append(f)
        if not cands:
            job.method, job.result = best
            return job
        same_path = self.names.by_path.get(path)
        if same_path in cands and len(new) // 2 <= same_path.size <= 2 * len(new):
            primary = same_path  # by far the usual best match: skip the ranking work
        else:
            primary = self._rank(cands, new)
        extras = self._extras(primary, hits, len(new))
        fallback, fallback_cost = best, best_cost
        for method, ops in self._encodings(primary, extras, new):
            if method == "zstd_dict":
                # The frame is opaque to the outer compressor while other ops still shrink at
                # the final level: charge it a margin so op 5 is used only where it clearly pays.
                cost = _zdict_cost(len(ops[-1][1]), len(new), literal_cost)
            else:
                cost = self.estimate(_serialize(ops))
            if cost < best_cost:
                best_cost, best = cost, (method, ops)
            if method != "zstd_dict" and cost < fallback_cost:
                fallback_cost, fallback = cost, (method, ops)
        if best[0] == "zstd_dict":
            best = self._final_zdict(best[1], new) or fallback
        job.method, job.result = best
        log.debug("%s: %s, %d bytes -> ~%d", entry.path, best[0], entry.size, best_cost)
        return job

    def _moved_from(self, path: bytes, new: bytes, named: bool) -> list[tuple[OldFile, int]]:
        """Old files that share sampled lines with ``new``: where its code may have moved from.

        Text files are always looked up. Small binaries (compiled modules, message catalogs)
        only when nothing matched by name: their strings and docstrings still split into
        lines, which is how a renamed or split module (``server_cursor`` into
        ``_server_cursor_base``) is found.
        """
        if len(new) > MAX_ANCHOR_FILE:
            return []
        if is_text(new):
            return self.anchors.lookup(new)
        if named or len(new) > MAX_ANCHOR_BINARY:
            return []
        return self._compiled_from(path) or self.anchors.lookup(new)

    def _compiled_from(self, path: bytes) -> list[tuple[OldFile, int]]:
        """For a new ``__pycache__`` module: the old compiled modules of the moved source.

        A ``.pyc`` follows its ``.py``: when the new source's code came from old sources, the
        old ``.pyc`` files of those sources are the best references for the new ``.pyc``.
        """
        m = _PYC.fullmatch(path)
        source = self.new_by_path.get(m[1] + m[2] + b".py") if m else None
        if m is None or source is None or source.size > MAX_ANCHOR_FILE:
            return []
        text = os.pread(self.new_fd, source.size, source.data_offset)
        found = []
        for old, shared in self.anchors.lookup(text)[:MAX_EXTRA_SOURCES]:
            head, _, stem = old.path.rpartition(b"/")
            if stem.endswith(b".py"):
                pyc = self.names.by_path.get(head + b"/__pycache__/" + stem[:-3] + m[3])
                if pyc is not None:
                    found.append((pyc, shared))
        return found

    def _final_zdict(self, ops: OpList, new: bytes) -> tuple[str, OpList] | None:
        """Redo the chosen dictionary frame at the real level, with raw literals (:mod:`.rawframe`).

        A raw-literal frame is longer than the estimate by design (the op stream compresses its
        literals), so it is always kept; without libzstd the frame is a normal one, kept only
        when the real level made it smaller than the estimate.
        """
        source, estimate = ops[-1][3], ops[-1][1]
        if len(estimate) <= 64:  # already tiny: a better level cannot gain anything
            return "zstd_dict", ops
        # Dictionary loading runs at about 1 MB/s at level 19: cap the level for huge files.
        level = self.options.level if len(new) <= 8 << 20 else min(self.options.level, 12)
        raw = rawframe.available()
        frame = self._zdict_frame(source, new, level, raw_literals=raw)
        if frame is None or (not raw and len(frame) >= len(estimate)):
            frame = estimate
        return "zstd_dict", [("open", source.name), ("zdict", frame, source.size)]

    def _extras(
        self, primary: OldFile, hits: list[tuple[OldFile, int]], size: int
    ) -> list[OldFile]:
        """Other old files holding enough of the new file's lines to join the bsdiff reference."""
        room = self.options.max_bsdiff_size - primary.size
        out = []
        for f, shared in hits:
            if len(out) >= MAX_EXTRA_SOURCES or shared < max(256, size // 50):
                break
            if f is primary or f.size > room or not delta_candidate(f.path):
                continue
            out.append(f)
            room -= f.size
        return out

    def _rank(self, cands: list[OldFile], new: bytes) -> OldFile:
        """Pick the candidate that compresses ``new`` best as a dictionary (content sampling)."""
        if len(cands) == 1:
            return cands[0]
        sample = new if len(new) <= 1 << 20 else new[: 1 << 19] + new[-(1 << 19) :]
        best, best_size = cands[0], None
        for f in cands:
            ref = self.read_old(f, 0, min(f.size, 8 << 20))
            with self.budget.reserve(8 * len(ref)):
                zdict = zstandard.ZstdCompressionDict(ref, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                size = len(zstandard.ZstdCompressor(level=1, dict_data=zdict).compress(sample))
            if best_size is None or size < best_size:
                best, best_size = f, size
        return best

    def _encodings(self, source: OldFile, extras: list[OldFile], new: bytes):
        """Yield (method, ops) candidates; the dictionary frame first, as it is the cheaper."""
        cap = self.options.max_bsdiff_size
        if self.allow_zdict and source.size <= MAX_ZSTD_DICT_SOURCE and len(new) > 1024:
            # A mid-level frame to compare with the other encodings; the chosen one is redone at
            # the real level (dictionary loading at high levels is the costly part).
            frame = self._zdict_frame(source, new, ESTIMATE_LEVEL)
            if frame is not None:
                yield "zstd_dict", [("open", source.name), ("zdict", frame, source.size, source)]
                if len(frame) <= 64 + len(new) // 256:
                    return  # nearly identical: bsdiff cannot gain enough to pay for itself
        if source.size <= cap and len(new) <= 4 * cap:
            segments = [_Segment(f, 0, f.size) for f in [source, *extras]]
            ref = b"".join(self.read_old(f) for f in [source, *extras])
            with self.budget.reserve(BSDIFF_RAM_PER_BYTE * len(ref) + 3 * len(new)):
                ops = bsdiff_ops(segments, ref, new)
                yield "bsdiff", ops
        else:
            yield "bsdiff", self._windowed_bsdiff(source, new)

    def stream_huge(self, writer: DeltaWriter, entry: TarEntry) -> str:
        """Encode a file too big to hold in memory: whole COPY, windowed bsdiff or literal.

        Runs in the writer's thread, one window at a time, so memory stays bounded by the
        bsdiff cap whatever the file size.
        """
        h = hashlib.sha256()
        for start in range(0, entry.size, 8 << 20):
            h.update(self._read_new(entry, start, min(8 << 20, entry.size - start)))
        same = self.by_digest.get((entry.size, h.digest()))
        if same is not None:
            writer.open(same.name)
            writer.copy(same.size, at=0)
            return "copied"
        source = None
        if delta_candidate(entry.bpath):
            cands = self.names.candidates(entry.bpath, entry.size)
            source = next((f for f in cands if delta_candidate(f.path)), None)
        window = max(64 << 10, self.options.max_bsdiff_size // 2)
        for start in range(0, entry.size, window):
            chunk = self._read_new(entry, start, min(window, entry.size - start))
            ops: OpList = [("data", chunk)]
            if source is not None:
                diffed = self._window_ops(source, chunk, start * source.size // entry.size, window)
                if self.estimate(_serialize(diffed)) < self.estimate(chunk):
                    ops = diffed
            _apply(writer, ops)
        return "literal" if source is None else "bsdiff"

    def _read_new(self, entry: TarEntry, start: int, n: int) -> bytes:
        data = os.pread(self.new_fd, n, entry.data_offset + start)
        if len(data) != n:
            raise DeltaError("new tar is truncated: re-create it and retry")
        return data

    def _window_ops(self, source: OldFile, chunk: bytes, centre: int, window: int) -> OpList:
        """bsdiff ``chunk`` against the source region around ``centre``."""
        lo = max(0, centre - window // 4)
        hi = min(source.size, centre + len(chunk) + window // 4)
        if hi <= lo:
            return [("data", chunk)]
        ref = self.read_old(source, lo, hi - lo)
        if ref[centre - lo : centre - lo + len(chunk)] == chunk:
            # An unchanged stretch of a big file (the usual case): no need to bsdiff it.
            return [("open", source.name), ("seek", centre), ("copy", len(chunk))]
        with self.budget.reserve(BSDIFF_RAM_PER_BYTE * len(ref) + 3 * len(chunk)):
            return bsdiff_ops([_Segment(source, lo, hi - lo)], ref, chunk)

    def _windowed_bsdiff(self, source: OldFile, new: bytes) -> OpList:
        """bsdiff a large file window by window against the proportional region of the source."""
        window = max(64 << 10, self.options.max_bsdiff_size // 2)
        ops: OpList = []
        for i in range(0, len(new), window):
            centre = i * source.size // max(1, len(new))
            ops += self._window_ops(source, new[i : i + window], centre, window)
        return ops

    def _zdict_frame(
        self, source: OldFile, new: bytes, level: int, *, raw_literals: bool = False
    ) -> bytes | None:
        """A zstd frame of ``new`` with all of ``source`` as raw dictionary (op 5's payload).

        ``raw_literals`` stores the frame's literals uncompressed (see :mod:`.rawframe`), for
        the frame that goes into the delta; estimates use a normal frame, whose size is close
        to what the raw one costs once the op stream is compressed.
        """
        ref = self.read_old(source)
        window_log = max(10, (max(source.size, len(new)) - 1).bit_length())
        with self.budget.reserve(8 * (len(ref) + len(new)) + (64 << 20)):
            frame = rawframe.compress(new, ref, level, window_log) if raw_literals else None
            if frame is not None:
                return frame if len(frame) <= MAX_PAYLOAD else None
            zdict = zstandard.ZstdCompressionDict(ref, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            params = zstandard.ZstdCompressionParameters.from_level(
                level, window_log=window_log, write_content_size=False, write_checksum=False
            )
            frame = zstandard.ZstdCompressor(compression_params=params, dict_data=zdict).compress(
                new
            )
        return frame if len(frame) <= MAX_PAYLOAD else None


# --------------------------------------------------------------------------- driver


def _is_target(entry: TarEntry) -> bool:
    return entry.type in REGULAR_TYPES and not entry.sparse and entry.size >= TINY


def _compressed_beyond(fd: int, size: int, bound: int) -> tuple[int, bool]:
    """zstd level 3 size of the new tar (what shipping the layer would cost), or a part of it.

    Compression stops as soon as its output exceeds ``bound`` (the delta's size): the delta
    is then known to be smaller, which is all the size check needs. For a typical update the
    delta is a few percent of the layer, so only the first few MiB are compressed. Returns
    (bytes, whether that is the whole compressed size).
    """
    comp = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    total = offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        total += len(comp.compress(chunk))
        if total > bound:
            return total, False
    return total + len(comp.flush()), True


def diff(
    old_paths: Sequence[str | os.PathLike[str]],
    new_path: str | os.PathLike[str],
    out: BinaryIO,
    options: DiffOptions | None = None,
) -> DiffStats:
    """Write to ``out`` a delta that rebuilds ``new_path`` from the stacked ``old_paths``.

    ``old_paths`` are layer tars lowest first (raw, gzip or zstd, sniffed). Raises
    :class:`DeltaTooLargeError` (after writing) when ``options.check_size`` is set and the delta
    is not smaller than the zstd-compressed new tar.
    """
    opts = options or DiffOptions()
    if opts.format not in ("auto", "tardf1", "tardf2"):
        raise DeltaError(f"unknown delta format {opts.format!r}: use auto, tardf1 or tardf2")
    threads = opts.threads or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        old_tars = [stack.enter_context(open_tar(p, opts.tmpdir))[0] for p in old_paths]
        new_tar = stack.enter_context(open_tar(new_path, opts.tmpdir))[0]
        files = merge_old_tars([list(scan(t)) for t in old_tars])
        new_entries = list(scan(new_tar))
        new_size = os.fstat(new_tar.fileno()).st_size
        differ = _Differ(
            opts,
            [t.fileno() for t in old_tars],
            new_tar.fileno(),
            files,
            new_entries,
            allow_zdict=opts.format != "tardf1",
        )
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=threads))
        differ.index_digests({e.size for e in new_entries if _is_target(e)}, pool)
        t0 = time.monotonic()
        differ.index_anchors()
        log.debug("anchor index built in %.2f s", time.monotonic() - t0)
        stats = DiffStats(new_tar_size=new_size)
        version = 1 if opts.format == "tardf1" else 2
        sink, finish = _open_sink(out, opts.tmpdir)
        writer = DeltaWriter(
            sink, version=version, options=WriterOptions(level=opts.level, threads=threads)
        )
        counts = _write_ops(writer, differ, new_entries, new_tar.fileno(), new_size, pool)
        writer.close()
        used_zdict = counts.get("zstd_dict", 0) > 0
        stats.version = 2 if used_zdict else 1
        stats.delta_size = finish(stats.version)
        stats.files = dict(counts)
        if opts.check_size:
            stats.compressed_new_size, stats.compressed_exact = _compressed_beyond(
                new_tar.fileno(), new_size, stats.delta_size
            )
    log.info(
        "delta %d bytes (tardf%d) for a %d-byte tar (%s); files: %s",
        stats.delta_size,
        stats.version,
        stats.new_tar_size,
        stats.compressed_text(),
        ", ".join(f"{k} {v}" for k, v in sorted(stats.files.items())),
    )
    if opts.check_size and stats.delta_size >= stats.compressed_new_size:
        raise DeltaTooLargeError(
            f"delta ({stats.delta_size} bytes) is not smaller than the zstd-compressed layer "
            f"({stats.compressed_new_size} bytes): ship the layer instead"
        )
    return stats


def _open_sink(out: BinaryIO, tmpdir: str | None) -> tuple[BinaryIO, Callable[[int], int]]:
    """Where the writer writes, and a finisher that fixes the magic and returns the size.

    The writer starts a ``tardf2`` stream whenever op 5 may be used; when none was emitted the
    magic is rewritten to ``tardf1`` (the op stream is identical), so the choice is made after
    the fact without a second pass.
    """
    seekable = False
    with contextlib.suppress(OSError, AttributeError, ValueError):
        seekable = out.seekable()
    if seekable:
        start = out.tell()

        def finish_in_place(version: int) -> int:
            end = out.tell()
            if version == 1:
                out.seek(start)
                out.write(MAGIC_V1)
                out.seek(end)
            return end - start

        return out, finish_in_place
    spool = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - closed by the finisher

    def finish_spooled(version: int) -> int:
        size = spool.tell()
        spool.seek(0)
        head = spool.read(MAGIC_LEN)
        out.write(MAGIC_V1 if version == 1 else head)
        shutil.copyfileobj(spool, out, 1 << 20)
        spool.close()
        return size

    return spool, finish_spooled


def _write_ops(
    writer: DeltaWriter,
    differ: _Differ,
    entries: list[TarEntry],
    new_fd: int,
    new_size: int,
    pool: ThreadPoolExecutor,
) -> Counter:
    """Walk the new tar in order, emitting header bytes as DATA and file contents as ops."""
    counts: Counter = Counter()
    # (start, end, job): DATA for new-tar bytes [start, end), then the job's ops; a job is a
    # future, a huge entry streamed by the main thread, or None at the end.
    pending: deque[tuple[int, int, Future | TarEntry | None]] = deque()
    inflight = 0
    # Many small jobs may wait behind a big one (a 4 MB binary's bsdiff): the look-ahead is
    # bounded by bytes (INFLIGHT_BYTES), and a generous job count keeps the other workers busy.
    max_jobs = 256 * (pool._max_workers or 1)

    def drain_one() -> None:
        nonlocal inflight
        start, end, fut = pending.popleft()
        if start < end:
            _emit_data(writer, new_fd, start, end)
        if fut is None:
            return
        if isinstance(fut, TarEntry):
            counts[differ.stream_huge(writer, fut)] += 1
            inflight -= fut.size
            return
        job = fut.result()
        inflight -= job.entry.size
        counts[job.method] += 1
        _apply(writer, job.result or [])
        job.result = None

    prev = 0
    for entry in entries:
        if not _is_target(entry):
            if entry.type in REGULAR_TYPES and entry.size:
                counts["literal"] += 1
            continue
        job = entry if entry.size > HUGE else pool.submit(differ.diff_file, _Job(entry))
        pending.append((prev, entry.data_offset, job))
        inflight += entry.size
        prev = entry.data_offset + entry.size
        while pending and (inflight > INFLIGHT_BYTES or len(pending) > max_jobs):
            drain_one()
        while pending and isinstance(pending[0][2], Future) and pending[0][2].done():
            drain_one()
    pending.append((prev, new_size, None))
    while pending:
        drain_one()
    return counts


def _emit_data(writer: DeltaWriter, fd: int, start: int, end: int) -> None:
    """Copy new-tar bytes [start, end) as DATA, in bounded chunks."""
    while start < end:
        n = min(4 << 20, end - start)
        chunk = os.pread(fd, n, start)
        if len(chunk) != n:
            raise DeltaError("new tar is truncated: re-create it and retry")
        writer.data(chunk)
        start += n


def diff_file(
    old_paths: Sequence[str | os.PathLike[str]],
    new_path: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    options: DiffOptions | None = None,
) -> DiffStats:
    """Like :func:`diff`, writing ``delta_path`` atomically (temp file + rename), or in place
    when it is an existing device or FIFO.

    Leaves no file behind on any error, including :class:`DeltaTooLargeError`.
    """
    delta_path = os.fspath(delta_path)
    if writes_in_place(delta_path):  # /dev/null, a FIFO: never rename over it
        with os.fdopen(open_in_place(delta_path), "wb") as out:
            return diff(old_paths, new_path, out, options)
    directory = os.path.dirname(os.path.abspath(delta_path))
    fd, tmp = tempfile.mkstemp(prefix=".podman-delta-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as out:
            stats = diff(old_paths, new_path, out, options)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, delta_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return stats
