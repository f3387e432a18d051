"""containers/image's BoltDB blob-info-cache (c/image < 5.28, e.g. podman 4.3.1): read and write.

No maintained Python BoltDB writer exists, and the PyPI ``boltdb`` package corrupts the file
(zero meta checksums, a freelist overwritten in place, ``lockf`` instead of ``flock``). So this
module implements the subset of the bbolt file format that a full rewrite needs:

* read every bucket (nested, inline or paged) into memory;
* change the buckets;
* write a brand-new, compact file — two meta pages with FNV-64a checksums, an empty freelist
  page, leaf and branch pages, small leaf-only buckets inline as bbolt makes them — into a
  temporary file next to the old one, and rename it into place.

All of it runs under an exclusive ``flock`` on the old file, the lock bbolt itself takes for a
writable open, so a concurrent podman is never inside the file while it is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from podman_delta.errors import StorageError

log = logging.getLogger(__name__)

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER = 16  # id u64, flags u16, count u16, overflow u32
ELEMENT = 16  # leaf: flags, pos, ksize, vsize (u32 each); branch: pos, ksize (u32), pgid (u64)
BUCKET_HEADER = 16  # root pgid u64, sequence u64
META_SIZE = 64  # magic, version, pageSize, flags, root{pgid, seq}, freelist, pgid, txid, checksum
BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF_FLAG = 0x01
DEFAULT_PAGE_SIZE = 4096

_META = struct.Struct("<IIIIQQQQQQ")
_PAGE = struct.Struct("<QHHI")
_LEAF_ELEM = struct.Struct("<IIII")
_BRANCH_ELEM = struct.Struct("<IIQ")
_BUCKET = struct.Struct("<QQ")

# Bucket names used by containers/image pkg/blobinfocache/boltdb.
UNCOMPRESSED_DIGEST = b"uncompressedDigest"
DIGEST_BY_UNCOMPRESSED = b"digestByUncompressed"
DIGEST_COMPRESSOR = b"digestCompressor"


class BoltFormatError(StorageError):
    """The file is not a BoltDB file this module understands."""


def fnv64a(data: bytes) -> int:
    """FNV-1a 64-bit hash: bbolt's meta page checksum."""
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass
class Bucket:
    """A bucket: keys map to values (bytes) or to nested buckets."""

    items: dict[bytes, bytes | Bucket] = field(default_factory=dict)
    sequence: int = 0

    def bucket(self, name: bytes, create: bool = False) -> Bucket | None:
        """The nested bucket ``name``; created empty when missing and ``create`` is set."""
        value = self.items.get(name)
        if isinstance(value, Bucket):
            return value
        if value is not None:
            raise BoltFormatError(f"key {name!r} holds a value, not a bucket")
        if not create:
            return None
        new = Bucket()
        self.items[name] = new
        return new


@dataclass
class Meta:
    page_size: int
    flags: int
    root: int
    root_sequence: int
    freelist: int
    pgid: int
    txid: int


# ---------------------------------------------------------------------------------------- reading


def _parse_meta(buf: bytes, offset: int) -> Meta | None:
    if len(buf) < offset + PAGE_HEADER + META_SIZE:
        return None
    _, flags, _, _ = _PAGE.unpack_from(buf, offset)
    fields = _META.unpack_from(buf, offset + PAGE_HEADER)
    magic, version, page_size, mflags, root, seq, freelist, pgid, txid, checksum = fields
    if not flags & META_PAGE or magic != MAGIC or version != VERSION:
        return None
    body = buf[offset + PAGE_HEADER : offset + PAGE_HEADER + META_SIZE - 8]
    if checksum != fnv64a(body):
        return None
    return Meta(page_size, mflags, root, seq, freelist, pgid, txid)


def read_meta(buf: bytes) -> Meta:
    """Return the valid meta page with the highest transaction id, as bbolt does."""
    first = _parse_meta(buf, 0)
    page_size = first.page_size if first else DEFAULT_PAGE_SIZE
    second = _parse_meta(buf, page_size)
    candidates = [m for m in (first, second) if m is not None]
    if not candidates:
        raise BoltFormatError("not a valid BoltDB file (no valid meta page)")
    return max(candidates, key=lambda m: m.txid)


class _Reader:
    def __init__(self, buf: bytes, page_size: int) -> None:
        self.buf = buf
        self.page_size = page_size

    def page(self, pgid: int) -> tuple[int, int, int]:
        """(offset, flags, count) of page ``pgid``."""
        off = pgid * self.page_size
        if off + PAGE_HEADER > len(self.buf):
            raise BoltFormatError(f"page {pgid} lies beyond the end of the file")
        pid, flags, count, _ = _PAGE.unpack_from(self.buf, off)
        if pid != pgid:
            raise BoltFormatError(f"page {pgid} has id {pid}")
        return off, flags, count

    def read_node(self, buf: bytes, off: int, flags: int, count: int, into: Bucket) -> None:
        """Read the node at ``off`` in ``buf`` (a page or an inline page) into ``into``."""
        if flags & LEAF_PAGE:
            for i in range(count):
                eoff = off + PAGE_HEADER + i * ELEMENT
                eflags, pos, ksize, vsize = _LEAF_ELEM.unpack_from(buf, eoff)
                key = bytes(buf[eoff + pos : eoff + pos + ksize])
                value = bytes(buf[eoff + pos + ksize : eoff + pos + ksize + vsize])
                into.items[key] = self.read_bucket(value) if eflags & BUCKET_LEAF_FLAG else value
        elif flags & BRANCH_PAGE:
            for i in range(count):
                eoff = off + PAGE_HEADER + i * ELEMENT
                _, _, child = _BRANCH_ELEM.unpack_from(buf, eoff)
                coff, cflags, ccount = self.page(child)
                self.read_node(self.buf, coff, cflags, ccount, into)
        else:
            raise BoltFormatError(f"unexpected page flags {flags:#x} in a bucket")

    def read_bucket(self, value: bytes) -> Bucket:
        if len(value) < BUCKET_HEADER:
            raise BoltFormatError("short bucket header")
        root, seq = _BUCKET.unpack_from(value, 0)
        bucket = Bucket(sequence=seq)
        if root == 0:  # inline bucket: a page follows the header
            _, flags, count, _ = _PAGE.unpack_from(value, BUCKET_HEADER)
            self.read_node(value, BUCKET_HEADER, flags, count, bucket)
        else:
            off, flags, count = self.page(root)
            self.read_node(self.buf, off, flags, count, bucket)
        return bucket


def parse(buf: bytes) -> tuple[Meta, Bucket]:
    """Parse a whole BoltDB file into (its current meta, the root bucket)."""
    meta = read_meta(buf)
    reader = _Reader(buf, meta.page_size)
    root = Bucket(sequence=meta.root_sequence)
    off, flags, count = reader.page(meta.root)
    reader.read_node(buf, off, flags, count, root)
    return meta, root


# ---------------------------------------------------------------------------------------- writing


class _Writer:
    """Lays out pages: children are written before their parents, which need their ids."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: list[bytes] = []  # page images starting at pgid 3
        self.next_pgid = 3  # 0, 1: meta; 2: freelist

    def _alloc(self, image: bytearray) -> int:
        npages = max(1, -(-len(image) // self.page_size))
        pgid = self.next_pgid
        _PAGE.pack_into(image, 0, pgid, *_PAGE.unpack_from(image, 0)[1:3], npages - 1)
        image.extend(b"\0" * (npages * self.page_size - len(image)))
        self.pages.append(bytes(image))
        self.next_pgid += npages
        return pgid

    @staticmethod
    def leaf_image(elements: list[tuple[int, bytes, bytes]]) -> bytearray:
        """A leaf node: element headers first, then the keys and values, as bbolt writes it."""
        n = len(elements)
        image = bytearray(_PAGE.pack(0, LEAF_PAGE, n, 0))
        image.extend(b"\0" * (n * ELEMENT))
        for i, (flags, key, value) in enumerate(elements):
            eoff = PAGE_HEADER + i * ELEMENT
            _LEAF_ELEM.pack_into(image, eoff, flags, len(image) - eoff, len(key), len(value))
            image.extend(key)
            image.extend(value)
        return image

    def _chunks(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Split elements into runs that fit a page (a lone oversize element gets overflow)."""
        runs, start, used = [], 0, PAGE_HEADER
        for i, size in enumerate(sizes):
            if i > start and used + size > self.page_size:
                runs.append((start, i))
                start, used = i, PAGE_HEADER
            used += size
        runs.append((start, len(sizes)))
        return runs

    def write_tree(self, elements: list[tuple[int, bytes, bytes]]) -> int:
        """Write a bucket's sorted leaf elements as a B+tree; return the root page id."""
        sizes = [ELEMENT + len(k) + len(v) for _, k, v in elements]
        level: list[tuple[bytes, int]] = []
        for a, b in self._chunks(sizes):
            run = elements[a:b]
            level.append((run[0][1] if run else b"", self._alloc(self.leaf_image(run))))
        while len(level) > 1:
            sizes = [ELEMENT + len(k) for k, _ in level]
            upper: list[tuple[bytes, int]] = []
            for a, b in self._chunks(sizes):
                run = level[a:b]
                image = bytearray(_PAGE.pack(0, BRANCH_PAGE, len(run), 0))
                image.extend(b"\0" * (len(run) * ELEMENT))
                for i, (key, child) in enumerate(run):
                    eoff = PAGE_HEADER + i * ELEMENT
                    _BRANCH_ELEM.pack_into(image, eoff, len(image) - eoff, len(key), child)
                    image.extend(key)
                upper.append((run[0][0], self._alloc(image)))
            level = upper
        return level[0][1]

    def elements(self, bucket: Bucket) -> list[tuple[int, bytes, bytes]]:
        out = []
        for key in sorted(bucket.items):
            value = bucket.items[key]
            if isinstance(value, Bucket):
                out.append((BUCKET_LEAF_FLAG, key, self.bucket_value(value)))
            else:
                out.append((0, key, value))
        return out

    def bucket_value(self, bucket: Bucket) -> bytes:
        """The value stored under a bucket's key: its header, plus the page when inline.

        Like bbolt's ``inlineable``: a bucket without sub-buckets whose node fits in a quarter
        of a page is stored inline.
        """
        has_sub = any(isinstance(v, Bucket) for v in bucket.items.values())
        if not has_sub:
            image = self.leaf_image(self.elements(bucket))
            if BUCKET_HEADER + len(image) <= self.page_size // 4:
                return _BUCKET.pack(0, bucket.sequence) + bytes(image)
        root = self.write_tree(self.elements(bucket))
        return _BUCKET.pack(root, bucket.sequence)


def _meta_page(page_size: int, pgid: int, meta: Meta) -> bytes:
    image = bytearray(page_size)
    _PAGE.pack_into(image, 0, pgid, META_PAGE, 0, 0)
    body = _META.pack(
        MAGIC,
        VERSION,
        page_size,
        meta.flags,
        meta.root,
        meta.root_sequence,
        meta.freelist,
        meta.pgid,
        meta.txid,
        0,
    )
    body = body[:-8] + struct.pack("<Q", fnv64a(body[:-8]))
    image[PAGE_HEADER : PAGE_HEADER + META_SIZE] = body
    return bytes(image)


def serialize(root: Bucket, *, page_size: int = DEFAULT_PAGE_SIZE, txid: int = 0) -> bytes:
    """A complete, compact BoltDB file holding ``root``; meta txids ``txid+1``, ``txid+2``."""
    writer = _Writer(page_size)
    root_pgid = writer.write_tree(writer.elements(root))
    freelist = bytearray(page_size)
    _PAGE.pack_into(freelist, 0, 2, FREELIST_PAGE, 0, 0)
    high = writer.next_pgid
    out = bytearray()
    t1 = txid + 1
    metas = {}
    for t in (t1, t1 + 1):  # bbolt writes txid t's meta into page t % 2
        metas[t % 2] = Meta(page_size, 0, root_pgid, root.sequence, 2, high, t)
    out += _meta_page(page_size, 0, metas[0])
    out += _meta_page(page_size, 1, metas[1])
    out += freelist
    for image in writer.pages:
        out += image
    assert len(out) == high * page_size
    return bytes(out)


# ------------------------------------------------------------------------------- file operations


def read_file(path: str | os.PathLike[str]) -> Bucket:
    """Read the whole cache under a shared ``flock`` (as bbolt's read-only open)."""
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            data = f.read()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    if not data:
        return Bucket()
    return parse(data)[1]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[tuple[int, bytes]]:
    """Open (creating) ``path``, take bbolt's exclusive flock, yield (fd, content)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        yield fd, data
    finally:
        os.close(fd)  # releases the flock


def update_file(path: str | os.PathLike[str], change) -> None:  # type: ignore[no-untyped-def]
    """Apply ``change(root_bucket)`` to the cache at ``path`` and replace the file atomically.

    The new file is complete before the rename, so a crash leaves either the old or the new
    file; the exclusive flock on the old file keeps podman out meanwhile.
    """
    path = Path(path)
    with _locked(path) as (fd, data):
        if data:
            meta, root = parse(data)
            page_size, txid = meta.page_size, meta.txid
        else:
            root, page_size, txid = Bucket(), os.sysconf("SC_PAGESIZE"), 0
        change(root)
        image = serialize(root, page_size=page_size, txid=txid)
        st = os.fstat(fd)
        tmp_fd, tmp = tempfile.mkstemp(prefix=".bolt-", dir=path.parent)
        try:
            with os.fdopen(tmp_fd, "wb") as out:
                out.write(image)
                out.flush()
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def record_pairs(
    root: Bucket, pairs: list[tuple[str, str]], compressors: dict[str, str] | None = None
) -> None:
    """Record (any digest → uncompressed digest) pairs as c/image's boltdb cache does."""
    for any_digest, uncompressed in pairs:
        unc = root.bucket(UNCOMPRESSED_DIGEST, create=True)
        assert unc is not None
        unc.items[any_digest.encode()] = uncompressed.encode()
        by_unc = root.bucket(DIGEST_BY_UNCOMPRESSED, create=True)
        assert by_unc is not None
        inner = by_unc.bucket(uncompressed.encode(), create=True)
        assert inner is not None
        inner.items[any_digest.encode()] = b""
    if compressors:
        comp = root.bucket(DIGEST_COMPRESSOR, create=True)
        assert comp is not None
        for digest, name in compressors.items():
            comp.items[digest.encode()] = name.encode()


def lookup_uncompressed(root: Bucket, digest: str) -> str | None:
    """The uncompressed digest recorded for ``digest`` (as c/image's UncompressedDigest)."""
    unc = root.bucket(UNCOMPRESSED_DIGEST)
    if unc is not None:
        value = unc.items.get(digest.encode())
        if isinstance(value, bytes):
            return value.decode()
    by_unc = root.bucket(DIGEST_BY_UNCOMPRESSED)
    if by_unc is not None and by_unc.bucket(digest.encode()) is not None:
        return digest  # known as an uncompressed digest itself
    return None
