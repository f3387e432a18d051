"""What changed between two layer trees: a git-like list of added, removed and modified paths.

Each side is a directory, a tar (compressed or not), or several of them stacked like image
layers. File contents are compared only where sizes agree (by sha256, streamed through the same
sandboxed sources the patcher uses), so listing a large layer pair reads each same-size file once
and never follows a symlink. Modification times are ignored: rebuilt layers change them all, and
a change list full of mtime noise hides what matters. Mode, owner, xattr and link-target changes
count as modifications, noted as such.

``changes_from_delta`` first rebuilds the new tar from a delta into a temporary file (streaming,
bounded memory) and then compares, so users can see what a delta pull will change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from podman_delta.errors import DeltaError, SourceError
from podman_delta.tardiff.format import CHUNK
from podman_delta.tardiff.patcher import PatchResult, patch_file
from podman_delta.tardiff.sources import (
    OPAQUE_MARKER,
    OPAQUE_XATTRS,
    WHITEOUT_PREFIX,
    DirSource,
    Source,
    StackedSource,
    TarSource,
    _Kind,
    open_source,
)

#: xattrs that describe the overlay layering itself, not the file: never compared.
_IGNORED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

_TAR_TYPES = {
    _Kind.REGULAR: "file",
    _Kind.DIR: "dir",
    _Kind.SYMLINK: "symlink",
    _Kind.SPARSE: "file",
    _Kind.BROKEN_LINK: "hardlink",
}


@dataclass(frozen=True)
class Meta:
    """What we compare about one path."""

    type: str  # file, dir, symlink, char, block, fifo, socket, hardlink (unresolved), other
    size: int
    mode: int
    uid: int
    gid: int
    link: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    whiteout: bool = False  # an overlay 0:0 char device or a .wh. file (layer markers)
    opaque: bool = False  # a directory marked opaque (xattr) or a .wh..wh..opq file


@dataclass(frozen=True)
class Change:
    """One line of the change list."""

    status: str  # "A" added, "D" removed, "M" modified
    path: str
    type: str
    old_size: int | None = None
    new_size: int | None = None
    what: tuple[str, ...] = ()  # for M: content, type, mode, owner, xattrs, link
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "path": self.path, "type": self.type}
        if self.old_size is not None:
            out["old_size"] = self.old_size
        if self.new_size is not None:
            out["new_size"] = self.new_size
        if self.status == "M":
            out["what"] = list(self.what)
            out["metadata_only"] = "content" not in self.what and "type" not in self.what
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class ChangeList:
    """The change list, sorted by path."""

    changes: list[Change] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for c in self.changes if c.status == status)

    @property
    def bytes_added(self) -> int:
        return sum(c.new_size or 0 for c in self.changes if c.status == "A")

    @property
    def bytes_removed(self) -> int:
        return sum(c.old_size or 0 for c in self.changes if c.status == "D")

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.count("A"),
            "removed": self.count("D"),
            "modified": self.count("M"),
            "bytes_added": self.bytes_added,
            "bytes_removed": self.bytes_removed,
            "changes": [c.to_dict() for c in self.changes],
        }

    def lines(self) -> Iterator[str]:
        """Human-readable lines: one per change, then a summary."""
        for c in self.changes:
            yield f"{c.status}  {_display_path(c)}{_display_detail(c)}"
        yield (
            f"{self.count('A')} added (+{self.bytes_added} bytes), "
            f"{self.count('D')} removed (-{self.bytes_removed} bytes), "
            f"{self.count('M')} modified"
        )


def _display_path(c: Change) -> str:
    return c.path + ("/" if c.type == "dir" else "")


def _display_detail(c: Change) -> str:
    parts = []
    if c.type == "file":
        if c.status == "A":
            parts.append(f"{c.new_size} bytes")
        elif c.status == "D":
            parts.append(f"{c.old_size} bytes")
        elif c.old_size != c.new_size:
            parts.append(f"{c.old_size} -> {c.new_size} bytes")
        else:
            parts.append(f"{c.new_size} bytes")
    elif c.type != "dir":
        parts.append(c.type)
    if c.note:
        parts.append(c.note)
    return f"  ({'; '.join(parts)})" if parts else ""


# --------------------------------------------------------------------------- trees


class Tree:
    """A listing of one side (``path -> Meta``) plus a source to read file contents from."""

    def __init__(self, entries: dict[str, Meta], source: Source) -> None:
        self.entries = entries
        self.source = source

    def digest(self, path: str) -> bytes:
        """sha256 of a regular file's content, streamed."""
        f = self.source.open(os.fsencode(path))
        try:
            h = hashlib.sha256()
            offset = 0
            while chunk := f.pread(offset, CHUNK):
                h.update(chunk)
                offset += len(chunk)
            return h.digest()
        finally:
            f.close()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _xattrs_of(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in names:
        if name.startswith(_IGNORED_XATTR_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(out))


def _dir_opaque(path: str) -> bool:
    for key in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, key, follow_symlinks=False) == b"y":
                return True
    return False


def _stat_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "other"


def list_dir(root: str | os.PathLike[str]) -> dict[str, Meta]:
    """List an extracted tree without following symlinks (the root itself is not listed)."""
    entries: dict[str, Meta] = {}
    root = os.fspath(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError as exc:
            raise SourceError(f"cannot list {os.path.join(root, rel)}: {exc.strerror}") from exc
        with it:
            for item in it:
                path = f"{rel}/{item.name}" if rel else item.name
                st = item.stat(follow_symlinks=False)
                kind = _stat_type(st.st_mode)
                full = os.path.join(root, path)
                entries[path] = Meta(
                    type=kind,
                    size=st.st_size if kind == "file" else 0,
                    mode=stat.S_IMODE(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    link=os.readlink(full) if kind == "symlink" else "",
                    xattrs=_xattrs_of(full),
                    whiteout=kind == "char" and st.st_rdev == 0,
                    opaque=kind == "dir" and _dir_opaque(full),
                )
                if kind == "dir":
                    stack.append(path)
    return entries


def list_tar(source: TarSource) -> dict[str, Meta]:
    """List a tar as extracting it would leave it (last entry wins, hardlinks resolved)."""
    entries: dict[str, Meta] = {}
    for bpath, node in source.nodes.items():
        e = node.entry
        kind = _TAR_TYPES.get(node.kind) or _special_type(e.type)
        entries[os.fsdecode(bpath)] = Meta(
            type=kind,
            size=node.size if kind == "file" else 0,
            mode=e.mode & 0o7777,
            uid=e.uid,
            gid=e.gid,
            link=e.linkname if node.kind is _Kind.SYMLINK else "",
            xattrs=tuple(
                (k, os.fsencode(v) if isinstance(v, str) else v)
                for k, v in e.xattrs
                if not k.startswith(_IGNORED_XATTR_PREFIXES)
            ),
        )
    return entries


def _special_type(tar_type: bytes) -> str:
    return {b"3": "char", b"4": "block", b"6": "fifo"}.get(tar_type, "other")


def _merge_layers(layers: Sequence[dict[str, Meta]]) -> dict[str, Meta]:
    """Merge layer listings LOWEST FIRST, applying whiteouts and opaque directories."""
    merged: dict[str, Meta] = {}
    for layer in layers:
        gone: set[str] = set()  # paths removed with everything below them
        emptied: set[str] = set()  # directories whose lower contents disappear
        for path, meta in layer.items():
            parent, _, base = path.rpartition("/")
            if base == os.fsdecode(OPAQUE_MARKER):
                emptied.add(parent)
            elif base.startswith(os.fsdecode(WHITEOUT_PREFIX)):
                gone.add(f"{parent}/{base[4:]}" if parent else base[4:])
            elif meta.whiteout:
                gone.add(path)
            elif meta.opaque:
                emptied.add(path)
        if gone or emptied:
            merged = {p: m for p, m in merged.items() if not _hidden(p, gone, emptied)}
        for path, meta in layer.items():
            base = path.rpartition("/")[2]
            if meta.whiteout or base.startswith(os.fsdecode(WHITEOUT_PREFIX)):
                continue
            merged[path] = meta
    return merged


def _hidden(path: str, gone: set[str], emptied: set[str]) -> bool:
    if path in gone:
        return True
    parent = path
    while parent:
        parent = parent.rpartition("/")[0]
        if parent in gone or parent in emptied:
            return True
    return False


def open_tree(paths: Sequence[str | os.PathLike[str]]) -> Tree:
    """Open one side: a directory, a tar, or several stacked LOWEST FIRST."""
    source = open_source(paths)
    try:
        layers = source.layers[::-1] if isinstance(source, StackedSource) else [source]
        listings = [_list_source(layer) for layer in layers]
        # A lone tree shows whiteout markers as what they are; a stack applies them.
        entries = listings[0] if len(listings) == 1 else _merge_layers(listings)
        return Tree(entries, source)
    except BaseException:
        source.close()
        raise


def _list_source(source: Source) -> dict[str, Meta]:
    if isinstance(source, DirSource):
        return list_dir(source.root)
    if isinstance(source, TarSource):
        return list_tar(source)
    raise DeltaError(f"cannot list a {type(source).__name__}")


# --------------------------------------------------------------------------- comparing


def compare(old: Tree, new: Tree) -> ChangeList:
    """The change list from ``old`` to ``new``, sorted by path."""
    changes = []
    for path in sorted(old.entries.keys() | new.entries.keys()):
        a, b = old.entries.get(path), new.entries.get(path)
        if a is None:
            assert b is not None
            changes.append(Change("A", path, b.type, new_size=_size(b)))
        elif b is None:
            changes.append(Change("D", path, a.type, old_size=_size(a)))
        else:
            change = _modified(path, a, b, old, new)
            if change is not None:
                changes.append(change)
    return ChangeList(changes)


def _size(meta: Meta) -> int | None:
    return meta.size if meta.type == "file" else None


def _modified(path: str, a: Meta, b: Meta, old: Tree, new: Tree) -> Change | None:
    what: list[str] = []
    notes: list[str] = []
    if a.type != b.type:
        what.append("type")
        notes.append(f"type {a.type} -> {b.type}")
    elif a.type == "file" and (a.size != b.size or _content_differs(path, a, old, new)):
        what.append("content")
        if a.size == b.size:
            notes.append("content changed")
    if a.mode != b.mode:
        what.append("mode")
        notes.append(f"mode {a.mode:04o} -> {b.mode:04o}")
    if (a.uid, a.gid) != (b.uid, b.gid):
        what.append("owner")
        notes.append(f"owner {a.uid}:{a.gid} -> {b.uid}:{b.gid}")
    if a.type == b.type == "symlink" and a.link != b.link:
        what.append("link")
        notes.append(f"link {a.link} -> {b.link}")
    if a.xattrs != b.xattrs:
        what.append("xattrs")
        notes.append("xattrs " + _xattr_delta(a.xattrs, b.xattrs))
    if not what:
        return None
    return Change("M", path, b.type, _size(a), _size(b), tuple(what), "; ".join(notes))


def _content_differs(path: str, a: Meta, old: Tree, new: Tree) -> bool:
    if a.size == 0:
        return False
    return old.digest(path) != new.digest(path)


def _xattr_delta(a: tuple[tuple[str, bytes], ...], b: tuple[tuple[str, bytes], ...]) -> str:
    da, db = dict(a), dict(b)
    parts = [f"+{k}" for k in sorted(db.keys() - da.keys())]
    parts += [f"-{k}" for k in sorted(da.keys() - db.keys())]
    parts += [f"~{k}" for k in sorted(da.keys() & db.keys()) if da[k] != db[k]]
    return ",".join(parts)


def changes(
    old_paths: Sequence[str | os.PathLike[str]], new_paths: Sequence[str | os.PathLike[str]]
) -> ChangeList:
    """Compare two sides, each a directory, a tar, or a stack of them (lowest first)."""
    with open_tree(old_paths) as old, open_tree(new_paths) as new:
        return compare(old, new)


def changes_from_delta(
    delta_path: str | os.PathLike[str],
    old_paths: Sequence[str | os.PathLike[str]],
    *,
    expected_digest: str | None = None,
    max_output: int | None = None,
    tmpdir: str | None = None,
) -> tuple[ChangeList, PatchResult]:
    """Rebuild the new tar from ``delta_path`` into a temporary file, then compare with OLD."""
    with (
        open_tree(old_paths) as old,
        tempfile.TemporaryDirectory(prefix="podman-delta-changes-", dir=tmpdir) as work,
    ):
        new_tar = os.path.join(work, "new.tar")
        result = patch_file(
            delta_path, old.source, new_tar, expected_digest=expected_digest, max_output=max_output
        )
        with open_tree([new_tar]) as new:
            return compare(old, new), result
