"""Helpers shared by the patcher, sources and changes tests: raw deltas and small tars.

``raw_delta`` writes op records exactly as given (no merging, no name checks), so tests can make
the malformed and hostile deltas that :class:`format.DeltaWriter` refuses to write.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import zstandard

from podman_delta.tardiff.format import MAGIC_V1, MAGIC_V2, encode_varint


def rec(code: int, size: int | None = None, payload: bytes = b"") -> bytes:
    """One raw op record: ``size`` defaults to ``len(payload)``."""
    return bytes((code,)) + encode_varint(len(payload) if size is None else size) + payload


def DATA(payload: bytes) -> bytes:
    return rec(0, payload=payload)


def OPEN(name: bytes) -> bytes:
    return rec(1, payload=name)


def COPY(n: int) -> bytes:
    return rec(2, n)


def ADD(diff: bytes) -> bytes:
    return rec(3, payload=diff)


def SEEK(pos: int) -> bytes:
    return rec(4, pos)


def ZSTD_DICT(frame: bytes) -> bytes:
    return rec(5, payload=frame)


def raw_delta(records: Iterable[bytes], version: int = 1) -> bytes:
    """A delta file holding ``records`` as its (zstd-compressed) op stream."""
    body = b"".join(records)
    magic = MAGIC_V2 if version == 2 else MAGIC_V1
    return magic + zstandard.ZstdCompressor(level=3, write_checksum=True).compress(body)


def dict_frame(old: bytes, new: bytes) -> bytes:
    """A zstd frame of ``new`` compressed with the whole of ``old`` as raw-content dictionary."""
    zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    # A window that covers the whole dictionary plus the output, so every match is reachable.
    window_log = min(29, max(10, (len(old) + len(new)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, enable_ldm=True, write_checksum=True
    )
    return zstandard.ZstdCompressor(dict_data=zdict, compression_params=params).compress(new)


def sub_bytes(new: bytes, old: bytes) -> bytes:
    """The ADD payload that turns ``old`` into ``new`` (test-sized inputs only)."""
    return bytes((a - b) & 0xFF for a, b in zip(new, old, strict=True))


def write_delta(path: Path, records: Iterable[bytes], version: int = 1) -> Path:
    path.write_bytes(raw_delta(records, version))
    return path


def make_tar(path: Path, members: Iterable[tuple], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write a tar from ``(name, kind, arg)`` members.

    kinds: ``file`` (arg = bytes), ``dir``, ``symlink`` / ``hardlink`` (arg = target),
    ``fifo``, ``chr`` (arg = (major, minor)).
    """
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, kind, *rest in members:
            arg = rest[0] if rest else None
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            data = None
            if kind == "file":
                info.size = len(arg)
                data = io.BytesIO(arg)
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, arg
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, arg
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = arg
            else:
                raise ValueError(kind)
            tf.addfile(info, data)
    return path


def extract(tar: Path, dest: Path) -> Path:
    """Extract like a layer is extracted as root: numeric owners, xattrs, everything trusted."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar, encoding="utf-8", errors="surrogateescape") as tf:
        # The filter argument exists from Python 3.11.4 (and Debian's backport); older ones
        # trust everything anyway.
        kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tf.extractall(dest, numeric_owner=True, **kwargs)
        for info in tf.getmembers():  # tarfile does not restore xattrs itself
            for key, value in info.pax_headers.items():
                if key.startswith("SCHILY.xattr.") and not info.issym():
                    os.setxattr(dest / info.name, key[13:], os.fsencode(value))
    return dest


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Create regular files (and their parent directories) under ``root``."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.makedirs(root, exist_ok=True)
    return root
