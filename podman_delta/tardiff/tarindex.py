"""Reading layer tars: sniffing compression and listing entries with their byte offsets.

The differ needs, for every entry of the new tar, where its header bytes and its content lie in
the uncompressed stream, so that everything but file contents can be copied verbatim into the
delta. The tar source needs the same index to serve old-file contents in place.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from podman_delta.errors import DeltaError
from podman_delta.tardiff.format import clean_name

#: Type flags of regular files (the old NUL type folds into REGTYPE, as in Go archive/tar).
REGULAR_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def sniff_compression(path: str | os.PathLike[str]) -> str:
    """Return ``"gzip"``, ``"zstd"``, ``"bzip2"``, ``"xz"`` or ``"none"`` from the file's magic."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "none"


def _decompressing_reader(path: str | os.PathLike[str], kind: str) -> BinaryIO:
    if kind == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    raw = open(path, "rb")  # noqa: SIM115 - closed with the returned reader
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        raw, read_across_frames=True, closefd=True
    )
    return reader  # type: ignore[return-value]


@contextlib.contextmanager
def open_tar(
    path: str | os.PathLike[str], tmpdir: str | None = None
) -> Iterator[tuple[BinaryIO, str]]:
    """Open a layer tar as a seekable uncompressed stream.

    Yields ``(file, path)``: an uncompressed tar is used in place; a compressed one is first
    decompressed into a temporary file (removed afterwards), since both the differ and the tar
    source need random access.
    """
    kind = sniff_compression(path)
    if kind == "none":
        with open(path, "rb") as f:
            yield f, os.fspath(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="podman-delta-", suffix=".tar", dir=tmpdir)
    try:
        with os.fdopen(fd, "w+b") as out:
            try:
                with _decompressing_reader(path, kind) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
                raise DeltaError(f"cannot decompress {path} ({kind}): {exc}") from exc
            out.seek(0)
            yield out, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@dataclass(frozen=True)
class TarEntry:
    """One member of a tar, with its location in the uncompressed stream.

    ``path`` is the cleaned name as tar-diff uses it for OPEN (``""`` for ``.``); ``header_offset``
    is where the member's first header block (including PAX or GNU long-name records) starts and
    ``data_offset`` where its content starts.
    """

    path: str
    type: bytes
    mode: int
    size: int
    header_offset: int
    data_offset: int
    linkname: str
    sparse: bool
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    xattrs: tuple[tuple[str, str], ...] = ()

    @property
    def is_regular(self) -> bool:
        return self.type in REGULAR_TYPES

    @property
    def is_hardlink(self) -> bool:
        return self.type == tarfile.LNKTYPE

    @property
    def is_symlink(self) -> bool:
        return self.type == tarfile.SYMTYPE

    @property
    def is_dir(self) -> bool:
        return self.type == tarfile.DIRTYPE

    @property
    def end_offset(self) -> int:
        """Offset just past this member's content (before padding)."""
        return self.data_offset + (self.size if self.has_data else 0)

    @property
    def has_data(self) -> bool:
        return self.type in REGULAR_TYPES or self.type == tarfile.GNUTYPE_SPARSE

    @property
    def bpath(self) -> bytes:
        """The cleaned path as bytes (OPEN names are byte strings)."""
        return os.fsencode(self.path)


def clean_path(name: str) -> str:
    """Clean a tar member name as tar-diff does (see :func:`format.clean_name`)."""
    return os.fsdecode(clean_name(os.fsencode(name)))


def _is_sparse(info: tarfile.TarInfo) -> bool:
    if info.type == tarfile.GNUTYPE_SPARSE or info.sparse is not None:
        return True
    return any(k.startswith("GNU.sparse.") for k in info.pax_headers)


def scan(fileobj: BinaryIO) -> Iterator[TarEntry]:
    """List the members of an uncompressed, seekable tar in order.

    Raises :class:`DeltaError` for a tar that Python's reader cannot parse.
    """
    fileobj.seek(0)
    try:
        with tarfile.open(
            fileobj=fileobj, mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tf:
            for info in tf:
                xattrs = tuple(
                    sorted(
                        (k[len("SCHILY.xattr.") :], v)
                        for k, v in info.pax_headers.items()
                        if k.startswith("SCHILY.xattr.")
                    )
                )
                yield TarEntry(
                    path=clean_path(info.name),
                    type=info.type,
                    mode=info.mode,
                    size=info.size,
                    header_offset=info.offset,
                    data_offset=info.offset_data,
                    linkname=info.linkname,
                    sparse=_is_sparse(info),
                    uid=info.uid,
                    gid=info.gid,
                    mtime=info.mtime,
                    xattrs=xattrs,
                )
                tf.members.clear()  # keep memory flat on layers with many files
    except tarfile.TarError as exc:
        raise DeltaError(f"cannot read tar: {exc}") from exc


def read_at(fileobj: BinaryIO, offset: int, size: int) -> bytes:
    """Read exactly ``size`` bytes at ``offset`` (a short read is an error)."""
    fileobj.seek(offset)
    data = fileobj.read(size)
    if len(data) != size:
        raise DeltaError(f"tar is truncated: wanted {size} bytes at offset {offset}")
    return data
