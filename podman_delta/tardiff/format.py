"""The tar-diff delta format (``tardf1`` / ``tardf2``): a streaming reader and a writer.

A delta is an 8-byte magic followed by a zstd stream whose content is a flat sequence of ops
(see ``shared/reference/tardiff-format.md``). Both directions stream: the reader never holds more
than one bounded payload chunk, and the writer compresses as ops arrive.

Bounds are enforced on both sides so that a hostile delta cannot make us allocate by a size it
declares: names at most 4 KiB, DATA/ADD/ZSTD_DICT payloads at most 64 MiB per op.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from podman_delta.errors import DeltaFormatError

MAGIC_V1 = b"tardf1\n\x00"
MAGIC_V2 = b"tardf2\n\x00"
MAGIC_LEN = 8

#: Longest OPEN name, as the current Go applier allows.
MAX_NAME = 4096
#: Largest DATA, ADD or ZSTD_DICT payload in one op. Writers split at this size; readers refuse
#: anything larger (Go's newer applier refuses ADD over 100 MiB, so 64 MiB keeps us compatible).
MAX_PAYLOAD = 64 << 20
#: Largest zstd window we accept when decoding (the Go applier's limit as well).
MAX_WINDOW = 512 << 20
#: Chunk size used when streaming payloads.
CHUNK = 1 << 20
#: DATA/ADD/ZSTD_DICT payloads up to this size come whole from :meth:`DeltaReader.next_op`.
SMALL_PAYLOAD = 64 << 10
#: Pending literal bytes are written as one DATA op once this many have gathered (as Go does).
DATA_FLUSH = 4 << 20


class Op(enum.IntEnum):
    """Delta op codes."""

    DATA = 0
    OPEN = 1
    COPY = 2
    ADD = 3
    SEEK = 4
    ZSTD_DICT = 5


def encode_varint(value: int) -> bytes:
    """Encode an unsigned LEB128 varint (Go ``binary.PutUvarint``)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def clean_name(name: bytes) -> bytes:
    """Normalise a tar entry name the way tar-diff names OPEN paths.

    Prepend ``/``, clean lexically (``//``, ``.``, ``..`` never above the root) and drop the
    leading ``/``. Returns ``b""`` when nothing is left (the name is then invalid).
    """
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts)


# --------------------------------------------------------------------------- zstd framing


class _FrameTracker:
    """Walk the zstd frame structure of the compressed bytes as they pass by.

    ``zstandard``'s stream reader reports a truncated stream as a clean end of data, so we follow
    frame and block headers ourselves (cheap: no decompression) to tell a complete stream from a
    cut one.
    """

    _ZSTD_MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self._state, self._need = "magic", 4
        self._buf = bytearray()
        self._skip = 0  # payload bytes to pass over before the next header
        self._end_after_skip = False
        self._checksum = False
        self.frames = 0

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly after a whole frame (or are empty)."""
        return self._state == "magic" and not self._buf and not self._skip

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                if not self._skip and self._end_after_skip:
                    self._end_frame()
                continue
            n = min(self._need - len(self._buf), len(view))
            self._buf += view[:n]
            view = view[n:]
            if len(self._buf) == self._need:
                piece = bytes(self._buf)
                self._buf.clear()
                self._step(piece)

    def _expect(self, state: str, need: int) -> None:
        self._state, self._need = state, need

    def _step(self, piece: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(piece, "little")
            if magic == self._ZSTD_MAGIC:
                self._expect("fhd", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._expect("skipsize", 4)
            else:
                raise DeltaFormatError("delta body is not a zstd stream (bad frame magic)")
        elif state == "skipsize":
            self._skip, self._end_after_skip = int.from_bytes(piece, "little"), False
            self._expect("magic", 4)
        elif state == "fhd":
            fhd = piece[0]
            fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool(fhd & 4)
            fcs = single if fcs_flag == 0 else (2, 4, 8)[fcs_flag - 1]
            rest = (1 - single) + (0, 1, 2, 4)[dict_flag] + fcs
            self._expect("fhrest", rest) if rest else self._expect("block", 3)
        elif state == "fhrest":
            self._expect("block", 3)
        elif state == "block":
            header = int.from_bytes(piece, "little")
            last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
            if btype == 3:
                raise DeltaFormatError("delta body is corrupt (reserved zstd block type)")
            self._skip = 1 if btype == 1 else bsize
            self._end_after_skip = bool(last)
            if last and not self._skip:
                self._end_frame()
        elif state == "checksum":
            self.frames += 1
            self._expect("magic", 4)

    def _end_frame(self) -> None:
        self._end_after_skip = False
        if self._checksum:
            self._expect("checksum", 4)
        else:
            self.frames += 1
            self._expect("magic", 4)


class _TeeReader(io.RawIOBase):
    """A raw reader that shows every byte read from ``src`` to a frame tracker."""

    def __init__(self, src: BinaryIO, tracker: _FrameTracker) -> None:
        self._src = src
        self._tracker = tracker
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._src.read(len(buffer))
        if not data:
            self.eof = True
            return 0
        self._tracker.feed(data)
        buffer[: len(data)] = data
        return len(data)


def check_zstd_frame(frame: bytes | bytearray) -> int:
    """Raise :class:`DeltaFormatError` unless ``frame`` holds only complete zstd frames.

    Returns how many zstd frames (skippable frames aside) it holds. The walk is the stream's own
    (:class:`_FrameTracker`), so one parser decides what a complete zstd frame is.
    """
    tracker = _FrameTracker()
    tracker.feed(frame)
    if not tracker.at_boundary or tracker.frames == 0:
        raise DeltaFormatError("delta is corrupt: truncated zstd frame in a ZSTD_DICT op")
    return tracker.frames


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class Record:
    """One op as read from a delta: the op, its size, and the name for OPEN."""

    op: Op
    size: int
    name: bytes = b""


class DeltaReader:
    """Stream the ops of a delta.

    Iterate to get :class:`Record` objects. For DATA, ADD and ZSTD_DICT the payload must then be
    consumed with :meth:`payload` (chunks) or :meth:`read_payload` (whole, bounded); any payload
    left unread is skipped before the next op.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        magic = _read_exact_or_short(fileobj, MAGIC_LEN)
        if magic == MAGIC_V1:
            self.version = 1
        elif magic == MAGIC_V2:
            self.version = 2
        else:
            raise DeltaFormatError("not a tar-diff delta (bad magic; expected tardf1 or tardf2)")
        self._tracker = _FrameTracker()
        self._tee = _TeeReader(fileobj, self._tracker)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._stream = dctx.stream_reader(
            io.BufferedReader(self._tee, CHUNK), read_size=CHUNK, read_across_frames=True
        )
        self._buf = b""
        self._pos = 0
        self._pending = 0

    # -- low level

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` bytes available in the buffer; False at a clean end."""
        while len(self._buf) - self._pos < need:
            try:
                chunk = self._stream.read(CHUNK)
            except zstandard.ZstdError as exc:
                raise DeltaFormatError(f"delta is corrupt: {exc}") from exc
            if not chunk:
                if not self._tracker.at_boundary:
                    raise DeltaFormatError("delta is truncated (incomplete zstd frame)")
                return False
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        if not self._fill(n):
            raise DeltaFormatError("delta is truncated (unexpected end inside an op)")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def _read_varint(self) -> int:
        value = 0
        for i in range(10):
            byte = self._take(1)[0]
            if i == 9 and byte > 1:
                raise DeltaFormatError("delta is corrupt: varint overflows 64 bits")
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return value
        raise DeltaFormatError("delta is corrupt: varint longer than 10 bytes")

    # -- records

    def __iter__(self) -> Iterator[Record]:
        while True:
            if self._pending:
                for _ in self.payload():
                    pass
            if not self._fill(1):
                return
            yield self._next_record()

    def _next_record(self) -> Record:
        code, size, name = self._next_header()
        return Record(Op(code), size, name)

    def _next_header(self) -> tuple[int, int, bytes]:
        """Read and check one record header: the op code, its size and, for OPEN, the name.

        For DATA, ADD and ZSTD_DICT the payload is left pending. Plain ints, no :class:`Op` or
        :class:`Record`: the patcher reads ten thousand of these per layer.
        """
        buf, pos = self._buf, self._pos
        fast = pos + 11 <= len(buf)  # the whole header is at hand: parse it in place
        code = buf[pos] if fast else self._take(1)[0]
        if code > 5:
            raise DeltaFormatError(f"delta is corrupt: unknown op {code}")
        if code == 5 and self.version < 2:
            raise DeltaFormatError("delta is corrupt: ZSTD_DICT op in a tardf1 delta")
        if not fast:
            size = self._read_varint()
        elif buf[pos + 1] < 0x80:
            size = buf[pos + 1]
            self._pos = pos + 2
        else:
            size, self._pos = _varint_at(buf, pos + 1)
        if code == 1:
            if size > MAX_NAME:
                raise DeltaFormatError(f"delta is corrupt: OPEN name of {size} bytes (max 4096)")
            return code, size, self._take(size)
        if code != 2 and code != 4:
            if size > MAX_PAYLOAD:
                raise DeltaFormatError(
                    f"delta is corrupt: {Op(code).name} op of {size} bytes (max {MAX_PAYLOAD})"
                )
            self._pending = size
        return code, size, b""

    def next_op(self) -> tuple[int, int, bytes | None] | None:
        """Return the next op as ``(op, size, payload)``, or None at the clean end of the delta.

        ``payload`` is the OPEN name, the whole payload of a DATA, ADD or ZSTD_DICT op of at
        most :data:`SMALL_PAYLOAD` bytes, or None: for a larger payload (stream it with
        :meth:`payload`) and for COPY and SEEK. Same checks and errors as iterating records.
        """
        if self._pending:
            for _ in self.payload():
                pass
        if self._pos >= len(self._buf) and not self._fill(1):
            return None
        code, size, name = self._next_header()
        if code == 1:
            return (code, size, name)
        pending = self._pending
        if not pending:
            return (code, size, b"" if code != 2 and code != 4 else None)
        if pending <= SMALL_PAYLOAD:
            buf, pos = self._buf, self._pos
            if pos + pending <= len(buf):
                data = buf[pos : pos + pending]
                self._pos = pos + pending
            else:
                data = self._take(pending)
            self._pending = 0
            return (code, size, data)
        return (code, size, None)

    def buffered(self) -> tuple[bytes, int]:
        """Return the decoded bytes at hand and the offset of the next record in them.

        For a caller that parses the simplest records itself, in one loop with local variables
        (the patcher: a million tiny ops cost more in per-record calls than in the work they
        do). It must leave every record it does not fully check to :meth:`next_op` and report
        where it stopped with :meth:`advance`. Call only between ops (no payload pending).
        """
        if self._pending:
            raise RuntimeError("DeltaReader.buffered() called with a payload left unread")
        return self._buf, self._pos

    def advance(self, pos: int) -> None:
        """Mark the records before offset ``pos`` of :meth:`buffered`'s bytes as consumed."""
        if not self._pos <= pos <= len(self._buf):
            raise ValueError("DeltaReader.advance() outside the buffered bytes")
        self._pos = pos

    def payload(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield the current op's payload in chunks of at most ``chunk`` bytes."""
        while self._pending:
            avail = len(self._buf) - self._pos
            if not avail:
                self._fill(1) or self._take(1)
                avail = len(self._buf) - self._pos
            n = min(self._pending, avail, chunk)
            data = self._buf[self._pos : self._pos + n]
            self._pos += n
            self._pending -= n
            yield data

    def read_payload(self) -> bytes:
        """Return the current op's whole payload (bounded by :data:`MAX_PAYLOAD`)."""
        return b"".join(self.payload())


def _varint_at(buf: bytes, p: int) -> tuple[int, int]:
    """Decode the varint at ``buf[p]`` (at least 10 bytes there); return it and its end."""
    value = 0
    for shift in range(0, 70, 7):
        byte = buf[p]
        p += 1
        if shift == 63 and byte > 1:
            raise DeltaFormatError("delta is corrupt: varint overflows 64 bits")
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, p
    raise AssertionError("unreachable: the tenth byte either ends the varint or overflows")


def _read_exact_or_short(fileobj: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = fileobj.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class WriterOptions:
    """How a delta's op stream is compressed.

    The level favours size: deltas are made once and fetched many times. The window is what
    every applier must hold while decoding, so it bounds the patcher's memory whatever the layer
    size: 32 MiB (``window_log`` 25) cost 0.01 % on a 213 MB Python layer and 0.25 % on an OS
    major update against 128 MiB, which made Go tar-patch peak at 200 MB.
    """

    level: int = 19
    window_log: int = 25
    long_distance: bool = True
    threads: int = 0


class DeltaWriter:
    """Write a delta op by op, compressing as it goes.

    Adjacent DATA is merged and every DATA/ADD payload is split at :data:`MAX_PAYLOAD`. The writer
    tracks the current source and position so that redundant OPEN and SEEK ops are never
    written. ``version`` 2 (``tardf2``) is required for :meth:`zstd_dict`.
    """

    def __init__(
        self, fileobj: BinaryIO, version: int = 1, options: WriterOptions | None = None
    ) -> None:
        if version not in (1, 2):
            raise ValueError("version must be 1 or 2")
        opts = options or WriterOptions()
        self.version = version
        fileobj.write(MAGIC_V2 if version == 2 else MAGIC_V1)
        params = zstandard.ZstdCompressionParameters.from_level(
            opts.level,
            window_log=opts.window_log,
            enable_ldm=opts.long_distance,
            threads=opts.threads,
            # Several jobs, so that more than one core compresses; each job still sees the
            # whole window before it (full overlap), which keeps the size within 0.01 %.
            job_size=(4 << 20) if opts.threads > 1 else 0,
            overlap_log=9,
            write_checksum=True,
        )
        self._cctx = zstandard.ZstdCompressor(compression_params=params)
        self._out = self._cctx.stream_writer(fileobj, closefd=False)
        self._data = bytearray()
        self.source: bytes | None = None
        self.position: int | None = None
        self.bytes_in = 0  # uncompressed op-stream bytes written

    def _emit(self, op: Op, size: int, payload: bytes | memoryview = b"") -> None:
        header = bytes((op,)) + encode_varint(size)
        self._out.write(header)
        if payload:
            self._out.write(payload)
        self.bytes_in += len(header) + len(payload)

    def _flush_data(self) -> None:
        if not self._data:
            return
        data, self._data = self._data, bytearray()
        self._emit_split(Op.DATA, data)

    def _emit_split(self, op: Op, payload: bytes | bytearray | memoryview) -> None:
        """Write ``payload`` as consecutive ``op`` records of at most :data:`MAX_PAYLOAD`."""
        with memoryview(payload) as view:
            for start in range(0, len(view), MAX_PAYLOAD):
                part = view[start : start + MAX_PAYLOAD]
                self._emit(op, len(part), part)

    def data(self, payload: bytes | memoryview) -> None:
        """Append literal bytes to the output."""
        self._data += payload
        if len(self._data) >= DATA_FLUSH:
            self._flush_data()

    def open(self, name: bytes) -> None:
        """Make ``name`` (a cleaned old-tree path) the current source, unless it already is."""
        if name == self.source:
            return
        if not name or len(name) > MAX_NAME or clean_name(name) != name:
            raise ValueError(f"invalid source name: {name!r}")
        self._flush_data()
        self._emit(Op.OPEN, len(name), name)
        self.source, self.position = name, 0

    def seek(self, position: int) -> None:
        """Move the source position (absolute), unless it is already there."""
        self._require_source()
        if position == self.position:
            return
        self._flush_data()
        self._emit(Op.SEEK, position)
        self.position = position

    def copy(self, size: int, at: int | None = None) -> None:
        """Append ``size`` source bytes (from ``at`` when given)."""
        if at is not None:
            self.seek(at)
        self._require_source()
        if size <= 0:
            return
        self._flush_data()
        self._emit(Op.COPY, size)
        assert self.position is not None
        self.position += size

    def add(self, diff: bytes | memoryview) -> None:
        """Append source bytes plus ``diff`` bytewise (bsdiff's diff block)."""
        self._require_source()
        self._flush_data()
        self._emit_split(Op.ADD, diff)
        assert self.position is not None
        self.position += len(diff)

    def zstd_dict(self, frame: bytes, source_size: int) -> None:
        """Append the content of a zstd frame made with the whole source as dictionary."""
        if self.version < 2:
            raise ValueError("ZSTD_DICT needs a tardf2 delta")
        if len(frame) > MAX_PAYLOAD:
            raise ValueError("ZSTD_DICT frame larger than 64 MiB")
        self.seek(0)  # Both readings of op 5 (whole file vs. from position) then agree.
        self._flush_data()
        self._emit(Op.ZSTD_DICT, len(frame), frame)
        self.position = source_size

    def _require_source(self) -> None:
        if self.source is None:
            raise ValueError("COPY/ADD/SEEK with no open source")

    def close(self) -> None:
        """Flush pending DATA and end the zstd stream (the underlying file stays open)."""
        self._flush_data()
        self._out.flush(zstandard.FLUSH_FRAME)
        self._out.close()
