"""The source side of the differ: which old files exist after stacking, and which may match.

Old layer tars are stacked like image layers (lowest first): a later path overwrites an earlier
one, ``.wh.NAME`` removes ``NAME`` from the layers below and ``.wh..wh..opq`` empties a directory
of everything below. Only files that survive all of that may be named in an OPEN, because those
are the only bytes the applier will find on disk. Of those, only world-readable, non-sparse,
non-empty regular files qualify as sources (tar-diff's rules: tar-patch may run unprivileged, and
files like /etc/shadow must never be needed).

Matching by name is deliberately loose (versions, hashes and Python ABI tags in names are
normalised away) because the worker ranks candidates by content anyway; a bad candidate costs a
little CPU, a missed one costs delta size.
"""

from __future__ import annotations

import heapq
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from zlib import crc32

from podman_delta.tardiff.format import MAX_NAME, clean_name
from podman_delta.tardiff.tarindex import TarEntry

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

#: Names whose content is already compressed with a non-rsyncable compressor: bsdiff is useless.
NO_DELTA_SUFFIXES = (b".xz", b".bz2", b".zst", b".lz4", b".lzma")

_HEXHASH = re.compile(rb"(?<![0-9a-z])[0-9a-f]{7,}(?![0-9a-z])")
_DIGITS = re.compile(rb"[0-9]+")


@dataclass
class OldFile:
    """A regular file of the merged old tree that may be used as a source."""

    sid: int
    tar: int
    offset: int  # content offset in the (uncompressed) old tar
    size: int
    path: bytes  # the entry's own cleaned path
    names: list[bytes] = field(default_factory=list)  # surviving names, own path first

    @property
    def name(self) -> bytes:
        """The name written in OPEN: the first surviving name."""
        return self.names[0]


def is_source_entry(entry: TarEntry) -> bool:
    """tar-diff's qualification rules for an old file (tardiff-format.md §9.2)."""
    return (
        entry.is_regular
        and not entry.sparse
        and entry.size > 0
        and bool(entry.mode & 0o004)
        and bool(entry.path)
    )


def merge_old_tars(tars: Sequence[Iterable[TarEntry]]) -> list[OldFile]:
    """Stack old tars (lowest first) and return the surviving source files.

    Hardlinks add names to their target when the target is a source in the same tar (the only
    case where the on-disk inode is certainly that content, as in Go tar-diff main).
    """
    merged: dict[bytes, OldFile | None] = {}
    dirs: set[bytes] = set()  # directories of the merged tree (a file replacing one empties it)
    files: list[OldFile] = []
    for tidx, entries in enumerate(tars):
        layer: list[tuple[bytes, OldFile | None, bool]] = []
        whiteouts: list[bytes] = []
        opaques: list[bytes] = []
        own: dict[bytes, OldFile] = {}  # sources of this tar by their current path
        for entry in entries:
            path = entry.bpath
            if not path:
                continue
            parent, base = posixpath.split(path)
            if base == OPAQUE_MARKER:
                opaques.append(parent)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                whiteouts.append(posixpath.join(parent, base[len(WHITEOUT_PREFIX) :]))
                continue
            item: OldFile | None = None
            if is_source_entry(entry):
                item = OldFile(len(files), tidx, entry.data_offset, entry.size, path)
                files.append(item)
            elif entry.is_hardlink:
                item = own.get(clean_name(os.fsencode(entry.linkname)))
            if item is None:
                own.pop(path, None)
            else:
                own[path] = item
            layer.append((path, item, entry.is_dir))
        for gone in whiteouts:
            _remove_tree(merged, gone, include_self=True)
        for directory in opaques:
            _remove_tree(merged, directory, include_self=False)
        for path, item, is_dir in layer:
            if is_dir:
                dirs.add(path)
            elif path in dirs:
                dirs.discard(path)
                _remove_tree(merged, path, include_self=False)
            merged[path] = item
    for path, item in merged.items():
        if item is not None and len(path) <= MAX_NAME:
            item.names.append(path)
    alive = [f for f in files if f.names]
    for f in alive:
        f.names.sort(key=lambda n: (n != f.path, n))
    return alive


def _remove_tree(merged: dict[bytes, OldFile | None], path: bytes, *, include_self: bool) -> None:
    """Drop ``path`` (when ``include_self``) and everything below it from the merged tree."""
    if include_self:
        merged.pop(path, None)
    prefix = path + b"/" if path else b""
    for p in [p for p in merged if p.startswith(prefix)]:
        del merged[p]


# --------------------------------------------------------------------------- name matching


def normalize(path: bytes) -> bytes:
    """Replace versions and hash-like runs by ``#``: ``libz.so.1.2.13`` -> ``libz.so.#.#.#``."""
    return _DIGITS.sub(b"#", _HEXHASH.sub(b"#", path.lower()))


def similar_size(a: int, b: int) -> bool:
    """Go tar-diff's rule: both small, or neither 10x the other."""
    if a < 65536 and b < 65536:
        return True
    return a * 10 > b and b * 10 > a


def delta_candidate(path: bytes) -> bool:
    """False for names whose content bsdiff cannot help (already compressed)."""
    return not path.endswith(NO_DELTA_SUFFIXES)


class NameIndex:
    """Look old files up by path, normalised path, basename and basename prefix."""

    def __init__(self, files: Iterable[OldFile]) -> None:
        self.by_path: dict[bytes, OldFile] = {}
        self.by_norm: dict[bytes, list[OldFile]] = {}
        self.by_base: dict[bytes, list[OldFile]] = {}
        self.by_nbase: dict[bytes, list[OldFile]] = {}
        self.by_prefix: dict[bytes, list[OldFile]] = {}
        for f in files:
            for name in f.names:
                self.by_path[name] = f
                base = posixpath.basename(name)
                self.by_norm.setdefault(normalize(name), []).append(f)
                self.by_base.setdefault(base, []).append(f)
                self.by_nbase.setdefault(normalize(base), []).append(f)
                self.by_prefix.setdefault(_prefix(base), []).append(f)

    def candidates(self, path: bytes, size: int, limit: int = 6) -> list[OldFile]:
        """Old files likely to resemble the new file ``path`` of ``size`` bytes, best first."""
        out: list[OldFile] = []
        seen: set[int] = set()

        def take(items: Iterable[OldFile], n: int) -> None:
            added = 0
            ranked = heapq.nsmallest(n + len(seen), items, key=lambda f: abs(f.size - size))
            for f in ranked:
                if len(out) >= limit or added >= n:
                    return
                if f.sid in seen or not similar_size(f.size, size):
                    continue
                seen.add(f.sid)
                out.append(f)
                added += 1

        same = self.by_path.get(path)
        if same is not None:
            take([same], 1)
        base = posixpath.basename(path)
        take(self.by_norm.get(normalize(path), ()), 2)
        take(self.by_base.get(base, ()), 2)
        take(self.by_nbase.get(normalize(base), ()), 2)
        take(self.by_prefix.get(_prefix(base), ()), 1)
        return out


def _prefix(base: bytes) -> bytes:
    """Go tar-diff's fuzzy key: the basename up to and including the first dot."""
    dot = base.find(b".")
    return base if dot < 0 else base[: dot + 1]


# --------------------------------------------------------------------------- content anchors

#: Shortest line that counts as evidence of shared content (shorter lines are too common).
MIN_ANCHOR = 24
#: Only text files up to this size are indexed (bigger ones are found by name).
MAX_ANCHOR_FILE = 4 << 20


def is_text(data: bytes) -> bool:
    """Cheap text test: no NUL byte in the first 8 KiB."""
    return b"\0" not in data[:8192]


def anchors(data: bytes) -> dict[int, int]:
    """Content-defined samples of a text: hash of a line -> its length, for 1 line in 4.

    Lines are chosen by their own hash, so the same lines are sampled in old and new files
    wherever they moved; the cost is a C-level split plus one dict operation per line.
    """
    out: dict[int, int] = {}
    for line in data.split(b"\n"):
        if len(line) >= MIN_ANCHOR:
            h = crc32(line)  # not hash(): salted per process, which made deltas vary by run
            if not h & 3:
                out[h] = len(line)
    return out


class AnchorIndex:
    """Which old text files contain which (sampled) lines: finds code that moved between files."""

    def __init__(self) -> None:
        self._where: dict[int, int] = {}  # line hash -> sid (first seen)
        self.files: dict[int, OldFile] = {}

    def add(self, f: OldFile, data: bytes) -> None:
        self.files[f.sid] = f
        where = self._where
        for h in anchors(data):
            where.setdefault(h, f.sid)

    def lookup(self, data: bytes) -> list[tuple[OldFile, int]]:
        """Old files sharing sampled lines with ``data``, with the shared bytes, most first."""
        hits: dict[int, int] = {}
        where = self._where
        for h, n in anchors(data).items():
            sid = where.get(h)
            if sid is not None:
                hits[sid] = hits.get(sid, 0) + n
        ranked = sorted(hits.items(), key=lambda kv: -kv[1])
        return [(self.files[sid], n * 4) for sid, n in ranked]
