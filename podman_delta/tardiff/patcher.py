"""Apply a tar-diff delta: rebuild the new layer tar from old files, streaming.

The delta is a program of DATA/OPEN/COPY/ADD/SEEK/ZSTD_DICT ops (``tardiff-format.md`` §4-§5).
Memory stays bounded whatever the layer size: payloads arrive in chunks of at most 1 MiB, source
bytes are read in matching chunks, and the output is hashed and written as it is produced (by a
second thread, so sha256 and the write overlap with decoding and ADD). The only unbounded-looking
allocation is the whole source file that op 5 uses as a zstd dictionary, capped at 512 MiB.

ADD (bytewise addition mod 256) runs in C through ``bsdiff4.core.patch``: a Python loop over
bytes would be a hundred times slower. Real deltas are mostly bsdiff-style ADD/DATA/SEEK triples
of a few bytes each (1.3 million ops for a Debian major upgrade), where per-op Python work is the
whole cost; so the applier parses those straight from the reader's buffer in one loop and
gathers them into *runs*, each applied by a single bsdiff4 call over a bounded source window
(:class:`_Applier`). OPEN and big COPY records (one or two per changed file) are parsed in the
same loop; everything else goes op by op with the reader's full checks. COPY reads land directly
in the output buffers (:class:`_Sink`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

import bsdiff4.core
import zstandard

from podman_delta.errors import DeltaError, DeltaFormatError, DigestMismatchError, SourceError
from podman_delta.tardiff.format import (
    CHUNK,
    MAX_NAME,
    MAX_WINDOW,
    DeltaReader,
    Op,
    check_zstd_frame,
)
from podman_delta.tardiff.outfile import open_in_place, writes_in_place
from podman_delta.tardiff.sources import Source, SourceFile

#: Largest source file op 5 may use as a dictionary (the Go writer's own limit).
MAX_DICT_SOURCE = 512 << 20
_ZEROS = bytes(CHUNK)
_TRIPLE_TAIL = bytes(16)  # y = 0 extra bytes, z = 0 seek, as bsdiff sign-magnitude int64s
#: Ops that write nothing (OPEN, SEEK, empty DATA/COPY/ADD) allowed beyond two per output byte.
#: A writer needs at most two per bsdiff triple (ADD 0 + SEEK), and a triple writes at least one
#: byte; without a bound, a 2 KB delta expanding to millions of SEEKs burns CPU for hours.
MAX_IDLE_OPS = 1 << 16
#: Bounds of one run of small ops applied by a single bsdiff4 call: source window and output
#: bytes. A run also ends with the reader's buffer (about 1 MiB of ops), which bounds its lists.
_RUN_WINDOW = 16 << 20
#: Source windows read whole, in all, stay below this plus 16 times the output: a hostile delta
#: could otherwise make every few bytes of output read a 16 MiB window (real deltas read less
#: than their output). Past the budget, ops run one by one, reading only what they use.
_READ_SLACK = 64 << 20
_RUN_OUTPUT = 4 << 20
_RUN_COPY = 4 << 10  # smaller COPYs join a run as ADDs of zeros (bigger: cheaper read plainly)
_SIGN = 1 << 63  # bsdiff stores a negative seek as its magnitude with the top bit set
#: Op-5 frames declaring at most this much content are decoded in one call (bounded memory).
_ONE_SHOT = 4 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class PatchResult:
    """What was written: the sha256 digest (``sha256:<hex>``) and size of the output."""

    digest: str
    size: int


def add_bytes(src: bytes, diff: bytes) -> bytes:
    """Return ``(src[i] + diff[i]) mod 256`` for every i, at C speed (``len(src) == len(diff)``)."""
    n = len(diff)
    if diff == _ZEROS[:n]:
        return src
    control = bsdiff4.core.encode_int64(n) + _TRIPLE_TAIL
    return bsdiff4.core.patch(src, n, control, diff, b"")  # type: ignore[no-any-return]


class _Sink:
    """Gathers the output in a few reusable buffers, counts it against the limit, and hashes and
    writes each full buffer in a worker thread.

    sha256 and the write both release the GIL, so they overlap with decoding, ADD and source
    reads. Buffers are recycled (no page faults for fresh memory per chunk) and COPY reads land
    in them directly (:meth:`copy`). Memory stays at ``_BUFFERS`` buffers whatever the output
    size: the producer waits for a free one. (4 MiB buffers measured no faster: more page
    faults, and the hand-overs between the threads are cheap next to hashing a MiB.)
    ``out.write`` must not keep the buffer it is given (no io class does).
    """

    _BUFSIZE = 1 << 20
    _BUFFERS = 8

    def __init__(self, out: BinaryIO, max_output: int | None) -> None:
        self._out = out
        self.max_output = max_output
        self._limit = max_output if max_output is not None else 1 << 63
        self._hash = hashlib.sha256()
        self.size = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._allocated = 0
        self._buf = self._new_buffer()
        self._view = memoryview(self._buf)
        self._n = 0  # bytes used in the current buffer
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="patch-writer", daemon=True)
        self._thread.start()

    def _new_buffer(self) -> bytearray:
        if self._allocated < self._BUFFERS:  # allocated on demand: small outputs use one
            self._allocated += 1
            return bytearray(self._BUFSIZE)
        return self._free.get()

    def _work(self) -> None:
        update, write = self._hash.update, self._out.write
        while True:
            item = self._full.get()
            if item is None:
                return
            buf, n = item
            if self._error is None:  # after an error: only recycle, so the producer never waits
                try:
                    with memoryview(buf) as view:
                        piece = view[:n]
                        update(piece)
                        while piece:
                            done = write(piece)
                            if done is None:  # a non-blocking raw stream that would block
                                raise OSError("output stream would block")
                            piece = piece[done:]
                except BaseException as exc:
                    self._error = exc
            self._free.put(buf)

    def _count(self, n: int) -> None:
        if self.size + n > self._limit:
            raise DeltaFormatError(
                f"delta output exceeds the allowed {self.max_output} bytes: the delta is corrupt "
                "or not for this layer"
            )
        self.size += n

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._count(n)
        used = self._n
        if used + n < self._BUFSIZE:  # the common case: it fits
            self._view[used : used + n] = data
            self._n = used + n
            return
        with memoryview(data) as view:
            done = 0
            while done < n:
                k = min(n - done, self._BUFSIZE - self._n)
                self._view[self._n : self._n + k] = view[done : done + k]
                self._n += k
                done += k
                if self._n == self._BUFSIZE:
                    self._ship()

    def copy(self, source: SourceFile, offset: int, n: int) -> int:
        """Append ``n`` bytes of ``source`` at ``offset``, read straight into the buffers.

        Returns how many bytes were there (less than ``n`` only at the source's end; the caller
        raises). The caller has checked the output limit.
        """
        self.size += n
        done = 0
        while done < n:
            k = min(n - done, self._BUFSIZE - self._n)
            got = source.readinto(offset + done, self._view[self._n : self._n + k])  # type: ignore[attr-defined]
            self._n += got
            done += got
            if self._n == self._BUFSIZE:
                self._ship()
            if got < k:
                self.size -= n - done
                break
        return done

    def _ship(self) -> None:
        if self._error is not None:
            self._raise()
        self._full.put((self._buf, self._n))
        self._view.release()
        self._buf = self._new_buffer()
        self._view = memoryview(self._buf)
        self._n = 0

    def _raise(self) -> None:
        err = self._error
        assert err is not None
        raise err

    def finish(self) -> str:
        """Write what is left, wait for the worker and return the hex digest."""
        if self._n:
            self._ship()
        self.stop()
        if self._error is not None:
            self._raise()
        return self._hash.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()


class _Applier:
    """The applier state machine: current source and position (§4.1).

    Real deltas are mostly bsdiff-style ADD/DATA/SEEK triples of a few bytes each (a million of
    them for a distribution upgrade), so per-op Python work dominates. Small ops are therefore
    gathered into a *run* on the current source, kept as a bsdiff control stream, and applied by
    one ``bsdiff4.core.patch`` call over a bounded window of the source (:meth:`_flush_run`).
    Everything else (OPEN, big payloads, ZSTD_DICT, hitting ``max_output``) flushes the run and
    takes the plain op-by-op path.
    """

    def __init__(self, reader: DeltaReader, source: Source, sink: _Sink) -> None:
        self.reader = reader
        self.source = source
        self.sink = sink
        self.current: SourceFile | None = None
        self.name = b""
        self.pos = 0
        self.idle = 0
        self._window_total = 0  # source bytes read as run windows
        self._limit = sink.max_output if sink.max_output is not None else 1 << 63
        self._reset_run()

    def _reset_run(self) -> None:
        # Flat bsdiff control values x, y, z (z already sign-magnitude); the first triple is a
        # placeholder (0, literal bytes before the first ADD, seek from the window start).
        self._ctl: list[int] = [0, 0, 0]
        self._diffs: list[bytes] = []
        self._extra: list[bytes] = []
        self._x = 0  # ADD bytes of the open triple
        self._y = 0  # DATA bytes of the open triple
        self._cursor = -1  # source offset after the open triple's ADD; -1: no ADD yet
        self._first = 0  # source offset of the run's first ADD
        self._lo = 0  # source window of the run's ADDs
        self._hi = 0
        self._runlen = 0  # output bytes the run will write

    def run(self) -> None:
        reader = self.reader
        try:
            self._hot()
            while (op := reader.next_op()) is not None:
                self._slow(*op)
                self._hot()
            self._flush_run()
        finally:
            self._close_current()

    def _slow(self, code: int, size: int, data: bytes | None) -> None:
        """Run one op the plain way, after flushing the run (it may change the source)."""
        self._flush_run()
        before = self.sink.size
        self._step(code, size, data)
        if self.sink.size == before:
            self.idle += 1
            if self.idle > MAX_IDLE_OPS + 2 * self.sink.size:
                self._idle_bomb(self.idle, 0)

    def _hot(self) -> None:
        """Parse and run the simple records at hand straight from the reader's buffer.

        Simple: SEEK, DATA and ADD whose payload is wholly in the buffer, small COPY, on the
        current source, within the run's bounds and ``max_output``. OPEN and big COPY records
        (one of each per changed file) are parsed here too and run as :meth:`_slow` would.
        The loop stops at anything else (ZSTD_DICT, big or bad ops, a record cut by the buffer
        end), leaving it to :meth:`DeltaReader.next_op`, which refills the buffer and raises the
        exact errors. Run state lives in locals here and in attributes in between.
        """
        buf, pos = self.reader.buffered()
        end = len(buf)
        safe = end - 11  # a header (op + 10-byte varint) starting before this is all here
        while True:
            special = -1
            ctl, add_diff, add_extra = self._ctl, self._diffs.append, self._extra.append
            x, y, cursor, runlen = self._x, self._y, self._cursor, self._runlen
            lo, hi, src, idle = self._lo, self._hi, self.pos, self.idle
            cur = self.current
            src_size = cur.size if cur is not None else -1
            room = min(self._limit - self.sink.size, _RUN_OUTPUT)  # for runlen
            idle_base = MAX_IDLE_OPS + 2 * self.sink.size  # + 2 * runlen
            # Below this, an idle op is surely allowed (runlen only grows): one compare per SEEK.
            idle_cap = idle_base + 2 * runlen if cur is not None else -1
            budget = _READ_SLACK + 16 * self.sink.size - self._window_total  # + 16 * runlen
            while pos < safe:
                code = buf[pos]
                size = buf[pos + 1]
                if size < 0x80:
                    p = pos + 2
                else:  # multi-byte varint: 2 bytes unrolled (most SEEK offsets), then a loop
                    byte = buf[pos + 2]
                    if byte < 0x80:
                        size = (size & 0x7F) | byte << 7
                        p = pos + 3
                    elif buf[pos + 3] < 0x80:
                        size = (size & 0x7F) | (byte & 0x7F) << 7 | buf[pos + 3] << 14
                        p = pos + 4
                    else:
                        size = (size & 0x7F) | (byte & 0x7F) << 7
                        p, shift = pos + 3, 14
                        while byte >= 0x80 and shift < 63:
                            byte = buf[p]
                            p += 1
                            size |= (byte & 0x7F) << shift
                            shift += 7
                        if byte >= 0x80 or size >= 1 << 64:
                            break  # overlong: next_op raises the error
                if code == 4:  # SEEK
                    if idle >= idle_cap and (cur is None or idle >= idle_base + 2 * runlen):
                        break  # _slow raises the error (or refuses the idle-op bomb)
                    src = size
                    idle += 1
                    pos = p
                    continue
                if code == 1 or (code == 2 and size > _RUN_COPY):
                    if code == 1 and (size > MAX_NAME or p + size > end):
                        break  # next_op refuses the name or refills the buffer
                    special = code
                    break
                if runlen + size > room:
                    break
                if code == 0:  # DATA (any size: the payload is in the buffer or we stop)
                    q = p + size
                    if q > end:
                        break
                    if size:
                        add_extra(buf[p:q])
                        y += size
                        runlen += size
                    elif idle >= idle_base + 2 * runlen:
                        break
                    else:
                        idle += 1
                    pos = q
                    continue
                if code == 3:  # ADD
                    q = p + size
                    if q > end:
                        break
                    data = buf[p:q]
                elif code == 2 and size <= _RUN_COPY:  # a small COPY is an ADD of zeros
                    q = p
                    data = _ZEROS[:size]
                else:
                    break
                if not size:
                    if cur is None or idle >= idle_base + 2 * runlen:
                        break
                    idle += 1
                    pos = q
                    continue
                stop = src + size
                if stop > src_size:
                    break  # no source, or past its end: _slow raises the error
                if cursor < 0:  # the run's first ADD
                    self._first = lo = src
                    hi = stop
                    ctl[1] = y
                    x, y = size, 0
                else:
                    nlo = src if src < lo else lo
                    nhi = stop if stop > hi else hi
                    window = nhi - nlo
                    if window > _RUN_WINDOW or window > budget + (runlen << 4):
                        break  # flush first: too much to read (or read so far) for what is written
                    if src == cursor and not y:  # continues the open triple's ADD
                        x += size
                    else:  # a new triple; z seeks from the end of the last one
                        z = src - cursor
                        ctl += (x, y, z if z >= 0 else -z | _SIGN)
                        x, y = size, 0
                    lo, hi = nlo, nhi
                add_diff(data)
                runlen += size
                src = cursor = stop
                pos = q
            self._x, self._y, self._cursor, self._runlen = x, y, cursor, runlen
            self._lo, self._hi, self.pos, self.idle = lo, hi, src, idle
            if special < 0:
                break
            # OPEN or a big COPY, whole in the buffer: run it here, sparing next_op's parse.
            self._flush_run()
            if special == 1:
                q = p + size
                self._open(buf[p:q])
                pos = q
                self.idle += 1  # OPEN writes nothing
                if self.idle > MAX_IDLE_OPS + 2 * self.sink.size:
                    self._idle_bomb(self.idle, 0)
            else:
                self._copy(size)  # writes size > 0 bytes (or raises): not idle
                pos = p
        self.reader.advance(pos)

    def _idle_bomb(self, idle: int, pending: int) -> None:
        written = self.sink.size + pending
        raise DeltaFormatError(
            f"delta is corrupt: {idle} ops write nothing ({written} bytes written so far); "
            "refusing a decompression bomb"
        )

    def _flush_run(self) -> None:
        """Write the gathered run: one bsdiff4 patch over the source window it reads."""
        if not self._runlen:  # nothing gathered: the run state is still the reset one
            return
        ctl, extra = self._ctl, b"".join(self._extra)
        if self._cursor < 0:  # literals only
            self.sink.write(extra)
            self._reset_run()
            return
        ctl += (self._x, self._y, 0)
        ctl[2] = self._first - self._lo
        current = self._need_source("ADD")
        lo, n = self._lo, self._hi - self._lo
        window = current.pread(lo, n)
        self._window_total += n
        if len(window) != n:
            self._too_short(current, n, lo)
        control = array.array("Q", ctl)
        if sys.byteorder != "little":
            control.byteswap()
        diff = b"".join(self._diffs)
        runlen = self._runlen
        self._reset_run()
        self.sink.write(bsdiff4.core.patch(window, runlen, control.tobytes(), diff, extra))

    def _step(self, code: int, size: int, data: bytes | None) -> None:
        """Run one op the plain way (``data``: its payload if the reader already has it)."""
        if code == Op.DATA:
            for chunk in self._payload(data):
                self.sink.write(chunk)
        elif code == Op.ADD:
            self._add(data)
        elif code == Op.SEEK:
            self._need_source("SEEK")
            self.pos = size
        elif code == Op.COPY:
            self._copy(size)
        elif code == Op.OPEN:
            assert data is not None
            self._open(data)
        else:  # Op.ZSTD_DICT; the reader already refused it in tardf1 deltas
            self._zstd_dict(data)

    def _payload(self, data: bytes | None) -> Iterator[bytes]:
        if data is None:
            yield from self.reader.payload()
        elif data:
            yield data

    def _open(self, name: bytes) -> None:
        self._close_current()
        self.current = self.source.open(name)
        self.name, self.pos = name, 0

    def _close_current(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def _need_source(self, what: str) -> SourceFile:
        if self.current is None:
            raise DeltaFormatError(f"delta is corrupt: {what} before any OPEN")
        return self.current

    def _read_source(self, n: int) -> bytes:
        current = self._need_source("COPY/ADD")
        data = current.pread(self.pos, n)
        if len(data) != n:
            self._too_short(current, n, self.pos)
        self.pos += n
        return data

    def _too_short(self, current: SourceFile, n: int, offset: int) -> NoReturn:
        shown = self.name.decode("utf-8", "backslashreplace")
        raise SourceError(
            f"source file {shown!r} is too short ({current.size} bytes; the delta reads "
            f"{n} bytes at offset {offset}): the old tree differs from the one the delta "
            "was made against"
        )

    def _copy(self, size: int) -> None:
        current = self._need_source("COPY")
        if not hasattr(current, "readinto"):  # a foreign SourceFile: plain reads
            while size:
                n = min(size, CHUNK)
                self.sink.write(self._read_source(n))
                size -= n
            return
        pos = self.pos
        avail = max(current.size - pos, 0)
        room = self.sink._limit - self.sink.size
        if size > avail or size > room:
            # The error reading CHUNK by CHUNK would meet first (each piece is read, then
            # counted): the piece that comes up short, or the one crossing the limit.
            short_at = avail // CHUNK if size > avail else 1 << 64
            if short_at <= (room // CHUNK if size > room else 1 << 64):
                self._copy_short(current, size, pos, short_at * CHUNK)
            self.sink._count(size)  # raises: over the limit
        got = self.sink.copy(current, pos, size)
        if got < size:  # the file shrank since it was opened
            self._copy_short(current, size, pos, got // CHUNK * CHUNK)
        self.pos = pos + size

    def _copy_short(self, current: SourceFile, size: int, pos: int, start: int) -> NoReturn:
        self._too_short(current, min(CHUNK, size - start), pos + start)

    def _add(self, data: bytes | None) -> None:
        self._need_source("ADD")
        for diff in self._payload(data):
            self.sink.write(add_bytes(self._read_source(len(diff)), diff))

    def _zstd_dict(self, data: bytes | None) -> None:
        current = self._need_source("ZSTD_DICT")
        frame = bytearray()  # grown in place: no second copy of a frame of up to 64 MiB
        for chunk in self._payload(data):
            frame += chunk
        frames = check_zstd_frame(frame)
        if current.size > MAX_DICT_SOURCE:
            raise DeltaFormatError(
                f"delta is corrupt: ZSTD_DICT uses a {current.size}-byte dictionary "
                f"(max {MAX_DICT_SOURCE})"
            )
        self.pos = 0
        content = self._read_source(current.size)
        dict_data = zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        del content
        dctx = zstandard.ZstdDecompressor(dict_data=dict_data, max_window_size=MAX_WINDOW)
        try:
            if frames == 1 and (small := _one_shot(dctx, frame)) is not None:
                self.sink.write(small)
            else:
                with dctx.stream_reader(frame, read_across_frames=True) as stream:
                    while chunk := stream.read(CHUNK):
                        self.sink.write(chunk)
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"delta is corrupt: ZSTD_DICT frame: {exc}") from exc
        self.pos = current.size


def _one_shot(dctx: zstandard.ZstdDecompressor, frame: bytearray) -> bytes | None:
    """Decode a small single frame in one call, or None to leave it to the stream reader.

    A layer delta can hold thousands of small op-5 frames: one call straight into a result
    buffer saves the stream's window buffer and 1 MiB reads on each. Memory stays bounded by
    _ONE_SHOT: a frame that declares more, or that has no declared size (podman-delta's own)
    and holds more than its window, goes to the stream reader, which also reports corruption.
    """
    if frame[:4] != _ZSTD_MAGIC:  # a skippable frame first: leave it to the stream reader
        return None
    params = zstandard.get_frame_parameters(frame)
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
        return dctx.decompress(frame) if params.content_size <= _ONE_SHOT else None
    if params.window_size > _ONE_SHOT:
        return None
    try:  # podman-delta's frames have a window at least as large as their content
        return dctx.decompress(frame, max_output_size=params.window_size)
    except zstandard.ZstdError:
        return None


def apply(
    delta: BinaryIO,
    source: Source,
    out: BinaryIO,
    *,
    expected_digest: str | None = None,
    max_output: int | None = None,
) -> PatchResult:
    """Run ``delta`` against ``source``, writing the new tar to ``out``; stream all the way.

    Raises :class:`DigestMismatchError` when ``expected_digest`` is given and the output differs
    (``out`` then holds bad bytes: the caller must discard them), :class:`DeltaFormatError` for a
    malformed delta or output over ``max_output`` bytes, :class:`SourceError` for an unusable old
    file.
    """
    expected = _normalize_digest(expected_digest) if expected_digest else None
    reader = DeltaReader(delta)
    sink = _Sink(out, max_output)
    try:
        _Applier(reader, source, sink).run()
        digest = "sha256:" + sink.finish()
    finally:
        sink.stop()
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            f"patched layer has digest {digest}, expected {expected}: the old tree differs from "
            "the one the delta was made against (output discarded)"
        )
    return PatchResult(digest=digest, size=sink.size)


def _normalize_digest(digest: str) -> str:
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        algo, hexpart = "sha256", digest
    hexpart = hexpart.lower()
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise DeltaError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return "sha256:" + hexpart


def patch_file(
    delta_path: str | os.PathLike[str],
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    expected_digest: str | None = None,
    max_output: int | None = None,
) -> PatchResult:
    """Apply the delta file ``delta_path`` to ``out_path`` (``"-"`` = stdout).

    The output goes to a temporary file beside ``out_path`` that is renamed into place only after
    the whole delta applied and the digest matched; on any error it is removed, so a partial or
    wrong layer never appears under the final name. An existing device or FIFO (``/dev/null``)
    is written in place instead (:mod:`podman_delta.tardiff.outfile`).
    """
    if expected_digest:
        _normalize_digest(expected_digest)  # fail before doing any work
    try:
        delta = open(delta_path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DeltaError(f"cannot open delta {os.fspath(delta_path)}: {exc.strerror}") from exc
    with delta:
        if os.fspath(out_path) == "-":
            stdout = sys.stdout.buffer
            result = apply(
                delta, source, stdout, expected_digest=expected_digest, max_output=max_output
            )
            stdout.flush()
            return result
        out = os.fspath(out_path)
        if writes_in_place(out):
            with os.fdopen(open_in_place(out), "wb", buffering=0) as raw:
                return apply(
                    delta,
                    source,
                    raw,  # type: ignore[arg-type]
                    expected_digest=expected_digest,
                    max_output=max_output,
                )
        return _patch_to_file(delta, source, out, expected_digest, max_output)


def _patch_to_file(
    delta: BinaryIO,
    source: Source,
    out_path: str,
    expected_digest: str | None,
    max_output: int | None,
) -> PatchResult:
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = _create_partial(directory, os.path.basename(out_path))
    except OSError as exc:
        raise DeltaError(f"cannot write into {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            result = apply(
                delta,
                source,
                raw,  # type: ignore[arg-type]
                expected_digest=expected_digest,
                max_output=max_output,
            )
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result


def _create_partial(directory: str, base: str) -> tuple[int, str]:
    """Create ``.<base>.<random>.partial`` in ``directory`` exclusively, mode 0600.

    What ``tempfile.mkstemp`` does, without importing tempfile (and random and shutil).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = os.path.join(directory, f".{base}.{os.urandom(6).hex()}.partial")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
