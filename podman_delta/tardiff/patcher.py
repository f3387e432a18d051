"""Apply a tar-diff delta: rebuild the new layer tar from old files, streaming.

The delta is a program of DATA/OPEN/COPY/ADD/SEEK/ZSTD_DICT ops (``tardiff-format.md`` §4-§5).
Memory stays bounded whatever the layer size: payloads arrive in chunks of at most 1 MiB, source
bytes are read in matching chunks, and the output is hashed and written as it is produced (by a
second thread, so sha256 and the write overlap with decoding and ADD). The only unbounded-looking
allocation is the whole source file that op 5 uses as a zstd dictionary, capped at 512 MiB.

ADD (bytewise addition mod 256) runs in C through ``bsdiff4.core.patch`` with a single control
triple: a Python loop over bytes would be a hundred times slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import BinaryIO

import bsdiff4.core
import zstandard

from podman_delta.errors import DeltaError, DeltaFormatError, DigestMismatchError, SourceError
from podman_delta.tardiff.format import (
    CHUNK,
    MAX_WINDOW,
    DeltaReader,
    Op,
    Record,
    check_zstd_frame,
)
from podman_delta.tardiff.sources import Source, SourceFile

#: Largest source file op 5 may use as a dictionary (the Go writer's own limit).
MAX_DICT_SOURCE = 512 << 20
#: Output pieces smaller than this are gathered before hashing and writing.
_SMALL = 64 << 10
_ZEROS = bytes(CHUNK)
_TRIPLE_TAIL = bytes(16)  # y = 0 extra bytes, z = 0 seek, as bsdiff sign-magnitude int64s
#: Ops that write nothing (OPEN, SEEK, empty DATA/COPY/ADD) allowed beyond two per output byte.
#: A writer needs at most two per bsdiff triple (ADD 0 + SEEK), and a triple writes at least one
#: byte; without a bound, a 2 KB delta expanding to millions of SEEKs burns CPU for hours.
MAX_IDLE_OPS = 1 << 16


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
    """Gathers output pieces, counts them against the limit, and hashes + writes them.

    Hashing and writing run in a worker thread (both release the GIL), fed through a small
    bounded queue so memory stays at a few MiB.
    """

    _DEPTH = 8

    def __init__(self, out: BinaryIO, max_output: int | None) -> None:
        self._out = out
        self._max = max_output
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self.size = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(self._DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="patch-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            if self._error is not None:
                continue  # drain so the producer never blocks on a dead consumer
            try:
                self._hash.update(piece)
                self._out.write(piece)
            except BaseException as exc:
                self._error = exc

    def write(self, data: bytes) -> None:
        n = len(data)
        if self._max is not None and self.size + n > self._max:
            raise DeltaFormatError(
                f"delta output exceeds the allowed {self._max} bytes: the delta is corrupt or "
                "not for this layer"
            )
        self.size += n
        if n < _SMALL:
            self._buf += data
            if len(self._buf) >= CHUNK:
                self._flush()
            return
        self._flush()
        self._put(data)

    def _flush(self) -> None:
        if self._buf:
            piece, self._buf = bytes(self._buf), bytearray()
            self._put(piece)

    def _put(self, piece: bytes) -> None:
        if self._error is not None:
            self._raise()
        self._queue.put(piece)

    def _raise(self) -> None:
        err = self._error
        assert err is not None
        raise err

    def finish(self) -> str:
        """Write what is left, wait for the worker and return the hex digest."""
        self._flush()
        self.stop()
        if self._error is not None:
            self._raise()
        return self._hash.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Applier:
    """The applier state machine: current source and position (§4.1)."""

    def __init__(self, reader: DeltaReader, source: Source, sink: _Sink) -> None:
        self.reader = reader
        self.source = source
        self.sink = sink
        self.current: SourceFile | None = None
        self.name = b""
        self.pos = 0

    def run(self) -> None:
        idle = 0
        try:
            for rec in self.reader:
                before = self.sink.size
                self._step(rec)
                if self.sink.size == before:
                    idle += 1
                    if idle > MAX_IDLE_OPS + 2 * self.sink.size:
                        raise DeltaFormatError(
                            f"delta is corrupt: {idle} ops write nothing ({self.sink.size} "
                            "bytes written so far); refusing a decompression bomb"
                        )
        finally:
            self._close_current()

    def _step(self, rec: Record) -> None:
        """Run one op."""
        op = rec.op
        if op is Op.DATA:
            for chunk in self.reader.payload():
                self.sink.write(chunk)
        elif op is Op.ADD:
            self._add()
        elif op is Op.SEEK:
            self._need_source("SEEK")
            self.pos = rec.size
        elif op is Op.COPY:
            self._copy(rec.size)
        elif op is Op.OPEN:
            self._open(rec.name)
        else:  # Op.ZSTD_DICT; the reader already refused it in tardf1 deltas
            self._zstd_dict()

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
            shown = self.name.decode("utf-8", "backslashreplace")
            raise SourceError(
                f"source file {shown!r} is too short ({current.size} bytes; the delta reads "
                f"{n} bytes at offset {self.pos}): the old tree differs from the one the delta "
                "was made against"
            )
        self.pos += n
        return data

    def _copy(self, size: int) -> None:
        self._need_source("COPY")
        while size:
            n = min(size, CHUNK)
            self.sink.write(self._read_source(n))
            size -= n

    def _add(self) -> None:
        self._need_source("ADD")
        for diff in self.reader.payload():
            self.sink.write(add_bytes(self._read_source(len(diff)), diff))

    def _zstd_dict(self) -> None:
        current = self._need_source("ZSTD_DICT")
        frame = bytearray()  # grown in place: no second copy of a frame of up to 64 MiB
        for chunk in self.reader.payload():
            frame += chunk
        check_zstd_frame(frame)  # type: ignore[arg-type]
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
            with dctx.stream_reader(frame, read_across_frames=True) as stream:
                while chunk := stream.read(CHUNK):
                    self.sink.write(chunk)
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"delta is corrupt: ZSTD_DICT frame: {exc}") from exc
        self.pos = current.size


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
    wrong layer never appears under the final name.
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
        return _patch_to_file(delta, source, os.fspath(out_path), expected_digest, max_output)


def _patch_to_file(
    delta: BinaryIO,
    source: Source,
    out_path: str,
    expected_digest: str | None,
    max_output: int | None,
) -> PatchResult:
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(out_path)}.", suffix=".partial", dir=directory
        )
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
