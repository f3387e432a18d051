"""Old-file sources for the patcher: where OPEN names are looked up, safely.

A delta names old files by path (``usr/bin/ls``). Those names come from a file we downloaded, so
they are hostile input: every lookup is resolved below the source root one component at a time
without following symlinks, and only regular files are served. A source is one of

* :class:`DirSource`: an extracted tree (an overlay diff dir, a vfs layer dir, ``old.tar``
  extracted somewhere);
* :class:`TarSource`: a layer tar served in place through an index of its members, so nothing is
  ever extracted (hardlink entries resolve to their target in the same tar);
* :class:`StackedSource`: several of the above stacked like image layers (upper first), with
  whiteouts (overlay 0:0 char devices and ``.wh.`` files) and opaque directories (overlay xattr
  and ``.wh..wh..opq``) respected, so a delta made against a whole image applies against its
  layers without merging them first.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from podman_delta.errors import SourceError
from podman_delta.tardiff.format import MAX_NAME, clean_name

if TYPE_CHECKING:  # tarindex (tarfile, gzip, bz2, lzma) is imported only when a tar is opened
    from podman_delta.tardiff.tarindex import TarEntry

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SourceFile(Protocol):
    """An opened old file.

    The files served here also have ``readinto(offset, view) -> int`` (``pread`` into a
    caller's buffer), which the patcher uses for COPY when present.
    """

    size: int

    def pread(self, offset: int, n: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``; a short result happens only at end of file."""
        ...

    def close(self) -> None: ...


class Source(Protocol):
    """Somewhere old files can be opened by their (delta) name."""

    def open(self, name: bytes) -> SourceFile:
        """Open the regular file ``name``; raise :class:`SourceError` if it cannot be used."""
        ...

    def close(self) -> None: ...


class SourceNotFoundError(SourceError):
    """The named old file does not exist in the source (or is whited out)."""


class Found(enum.Enum):
    """Outcome of looking a name up in one layer of a stack."""

    ABSENT = "absent"  # not in this layer: look in the layer below
    HIDDEN = "hidden"  # whited out / under an opaque dir / below a non-directory: stop here


# --------------------------------------------------------------------------- names


def split_name(name: bytes) -> list[bytes]:
    """Validate an OPEN name and return its components.

    Refuses what could step outside the root or is not a plain relative path: empty names, NUL
    bytes, names over 4 KiB, absolute names and ``..``. ``.`` and empty components are harmless
    and dropped (the Go applier cleans names lexically too).
    """
    shown = _show(name)
    if not name:
        raise SourceError("delta names an empty source path: the delta is corrupt or hostile")
    if len(name) > MAX_NAME:
        raise SourceError(f"delta names a source path over {MAX_NAME} bytes: refusing it")
    if b"\x00" in name:
        raise SourceError(f"delta names a source path with a NUL byte ({shown}): refusing it")
    if name.startswith(b"/"):
        raise SourceError(f"delta names an absolute source path {shown}: refusing it")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise SourceError(f"delta names a source path with '..' ({shown}): refusing it")
    if not parts:
        raise SourceError(f"delta names an empty source path ({shown}): refusing it")
    return parts


def _plain(name: bytes) -> bool:
    """True for a name :func:`split_name` surely accepts unchanged, checked without splitting.

    Non-empty, at most 4 KiB, no NUL, relative, and no component that is empty or starts with a
    dot (so none is ``.`` or ``..``). Other names (``.bashrc`` included) take the full path.
    """
    return (
        0 < len(name) <= MAX_NAME
        and name[0] != 0x2F  # "/"
        and name[0] != 0x2E  # "."
        and name[-1] != 0x2F
        and b"\x00" not in name
        and b"//" not in name
        and b"/." not in name
    )


def _show(name: bytes) -> str:
    text = name[:200].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(name) > 200 else ""))


def _refuse(name: bytes, why: str) -> SourceError:
    return SourceError(f"source {_show(name)} {why}: refusing to read it")


def _missing(name: bytes, why: str = "does not exist") -> SourceNotFoundError:
    return SourceNotFoundError(
        f"source file {_show(name)} {why} in the old tree: the delta was made against "
        "different old layers"
    )


def _open_by_lookup(source: DirSource | TarSource | StackedSource, name: bytes) -> SourceFile:
    """Open ``name`` through ``source.lookup``, turning a miss into :class:`SourceNotFoundError`."""
    found = source.lookup(split_name(name), name)
    if isinstance(found, Found):
        raise _not_found(name, found)
    return found


def _not_found(name: bytes, found: Found) -> SourceNotFoundError:
    return _missing(name, "is whited out" if found is Found.HIDDEN else "does not exist")


# --------------------------------------------------------------------------- files


class _FdFile:
    """A byte range of an open descriptor: a whole file of a tree, or a member of a tar.

    ``owns_fd`` says whether :meth:`close` closes the descriptor (a tree's file) or leaves it
    to its owner (the tar descriptor a :class:`TarSource` shares among its members).
    """

    def __init__(self, fd: int, size: int, base: int = 0, owns_fd: bool = True) -> None:
        self._fd = fd
        self._base = base
        self._owns_fd = owns_fd
        self.size = size

    def pread(self, offset: int, n: int) -> bytes:
        if n <= 0 or offset >= self.size:
            return b""
        n = min(n, self.size - offset)
        start = self._base + offset
        data = os.pread(self._fd, n, start)
        while len(data) < n:  # pread may return less than asked on some filesystems
            more = os.pread(self._fd, n - len(data), start + len(data))
            if not more:
                break
            data += more
        return data

    def readinto(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` straight into ``view``; return the count.

        The patcher's COPY path: no bytes object per read, the output buffer is filled in place.
        Short only at end of file.
        """
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        start = self._base + offset
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], start + done)
            if not got:
                break
            done += got
        return done

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


# --------------------------------------------------------------------------- directories


def _is_overlay_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _exists(name: bytes, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:  # ENOENT, and ENAMETOOLONG for ".wh." + a 252-byte name
        return False
    return True


def _overlay_opaque(fd: int) -> bool:
    for key in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, key) == b"y":
                return True
        except OSError:  # ENODATA, EOPNOTSUPP, EBADF for O_PATH descriptors
            continue
    return False


class DirSource:
    """Old files from an extracted tree, resolved beneath ``root`` without following symlinks.

    The walk opens each directory component with ``O_NOFOLLOW | O_DIRECTORY`` relative to its
    parent's descriptor, so neither a symlink inside the tree nor a rename race can lead outside
    it. The last component is checked to be a regular file before it is opened (with
    ``O_NONBLOCK``, so a FIFO swapped in meanwhile cannot block) and checked again after.
    Directory descriptors are kept in a small LRU cache: deltas open files in tar order, so
    consecutive OPENs share their directories and most lookups cost three syscalls.
    """

    _CACHE_SIZE = 128

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(
                f"cannot open old tree {self.root}: {exc.strerror}; give an existing directory"
            ) from exc
        # (stacked, directory path joined with "/", b"" for the root) -> (descriptor, opaque)
        self._cache: OrderedDict[tuple[bool, bytes], tuple[int, bool]] = OrderedDict()

    def open(self, name: bytes) -> SourceFile:
        # Fast path for the common case, a plain name in a directory already open: the same
        # checks as split_name + lookup, without building the component list (a layer delta
        # opens every changed file, ten thousand of them for an application update).
        if _plain(name):
            dirpart, _, comp = name.rpartition(b"/")
            key = (False, dirpart)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                found = self._in_dir(hit[0], False, comp, name, False)
                if isinstance(found, Found):
                    raise _not_found(name, found)
                return found
        return _open_by_lookup(self, name)

    def lookup(self, parts: list[bytes], name: bytes, stacked: bool = False) -> SourceFile | Found:
        """Find ``parts`` in this tree; with ``stacked``, honour ``.wh.`` and opaque markers."""
        try:
            walked = self._walk_dirs(parts[:-1], name, stacked)
        except SourceError:
            raise
        except OSError as exc:
            raise self._os_error(name, exc) from exc
        if isinstance(walked, Found):
            return walked
        return self._in_dir(walked[0], walked[1], parts[-1], name, stacked)

    def _in_dir(
        self, dfd: int, opaque: bool, comp: bytes, name: bytes, stacked: bool
    ) -> SourceFile | Found:
        """Open the file ``comp`` of the directory ``dfd`` (the last step of a lookup)."""
        try:
            if stacked and _exists(WHITEOUT_PREFIX + comp, dfd):
                return Found.HIDDEN
            try:
                st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return Found.HIDDEN if opaque else Found.ABSENT
            if _is_overlay_whiteout(st):
                return Found.HIDDEN
            return self._open_file(comp, dfd, st, name)
        except SourceError:
            raise
        except OSError as exc:
            raise self._os_error(name, exc) from exc

    def _os_error(self, name: bytes, exc: OSError) -> SourceError:
        return SourceError(f"cannot open source {_show(name)} below {self.root}: {exc.strerror}")

    def _walk_dirs(self, dirs: list[bytes], name: bytes, stacked: bool) -> tuple[int, bool] | Found:
        """Open the directory holding the file; return its descriptor and opacity (cached)."""
        depth = len(dirs)
        while depth >= 0:  # the deepest directory already open
            key = (stacked, b"/".join(dirs[:depth]))
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                break
            depth -= 1
        if hit is None:
            fd = os.dup(self._root_fd)
            hit = self._remember((stacked, b""), fd, stacked and self._dir_opaque(fd))
            depth = 0
        dfd, opaque = hit
        for i in range(depth, len(dirs)):
            comp = dirs[i]
            if stacked and _exists(WHITEOUT_PREFIX + comp, dfd):
                return Found.HIDDEN
            try:
                fd = self._open_dir(comp, dfd)
            except FileNotFoundError:
                return Found.HIDDEN if opaque else Found.ABSENT
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                return self._not_a_dir(comp, dfd, name, stacked)
            opaque = opaque or (stacked and self._dir_opaque(fd))
            dfd, opaque = self._remember((stacked, b"/".join(dirs[: i + 1])), fd, opaque)
        return dfd, opaque

    def _remember(self, key: tuple[bool, bytes], fd: int, opaque: bool) -> tuple[int, bool]:
        self._cache[key] = (fd, opaque)
        if len(self._cache) > self._CACHE_SIZE:
            # Never the entry just added, so never a descriptor the caller is about to use.
            os.close(self._cache.popitem(last=False)[1][0])
        return fd, opaque

    @staticmethod
    def _open_dir(comp: bytes, dfd: int) -> int:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=dfd)
        except PermissionError:  # searchable but unreadable: we can still walk through it
            return os.open(
                comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
            )

    @staticmethod
    def _not_a_dir(comp: bytes, dfd: int, name: bytes, stacked: bool) -> Found:
        """A path component is not a directory: refuse a symlink, else the file is not there."""
        st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(name, "goes through a symlink")
        if stacked or _is_overlay_whiteout(st):
            return Found.HIDDEN  # a whiteout or a non-directory hides everything below it
        raise _missing(name, "has a non-directory parent")

    @staticmethod
    def _dir_opaque(fd: int) -> bool:
        return _exists(OPAQUE_MARKER, fd) or _overlay_opaque(fd)

    @staticmethod
    def _open_file(comp: bytes, dfd: int, st: os.stat_result, name: bytes) -> _FdFile:
        _check_regular(st.st_mode, name)
        try:
            fd = os.open(comp, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse(name, "is a symlink") from exc
            raise
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise _refuse(name, "changed while it was being opened")
        return _FdFile(fd, fst.st_size)

    def close(self) -> None:
        while self._cache:
            os.close(self._cache.popitem()[1][0])
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> DirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_regular(mode: int, name: bytes) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise _refuse(name, "is a directory")
    if stat.S_ISLNK(mode):
        raise _refuse(name, "is a symlink")
    if stat.S_ISFIFO(mode):
        raise _refuse(name, "is a FIFO")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise _refuse(name, "is a device")
    raise _refuse(name, "is not a regular file")


# --------------------------------------------------------------------------- tars


class _Kind(enum.Enum):
    REGULAR = "regular"
    DIR = "directory"
    SYMLINK = "symlink"
    SPARSE = "sparse file"
    OTHER = "device, FIFO or other special file"
    BROKEN_LINK = "hardlink to a missing file"


@dataclass(frozen=True)
class TarNode:
    """What a path is in a tar after all its entries are applied in order.

    For a hardlink, this is its target's node (same inode): ``entry`` is the target's entry.
    """

    kind: _Kind
    offset: int
    size: int
    entry: TarEntry


_GNUTYPE_SPARSE = b"S"  # tarfile.GNUTYPE_SPARSE, without importing tarfile


def _kind_of(entry: TarEntry) -> _Kind:
    if entry.is_regular:
        return _Kind.SPARSE if entry.sparse else _Kind.REGULAR
    if entry.type == _GNUTYPE_SPARSE:
        return _Kind.SPARSE
    if entry.is_dir:
        return _Kind.DIR
    if entry.is_symlink:
        return _Kind.SYMLINK
    return _Kind.OTHER


class TarSource:
    """Old files read in place from a layer tar, through an index of its members.

    A compressed tar is decompressed once to a temporary file (``tarindex.open_tar``); an
    uncompressed one is used as is. The index mirrors what extracting the tar would give: a later
    entry replaces an earlier one at the same path, and a hardlink entry serves the bytes its
    target had when the link was made.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from podman_delta.tardiff.tarindex import open_tar, scan

        self.path = os.fspath(path)
        self._stack = contextlib.ExitStack()
        try:
            fileobj, _ = self._stack.enter_context(open_tar(self.path))
            self._fd = fileobj.fileno()
            self.nodes: dict[bytes, TarNode] = {}
            self._dirs: set[bytes] = {b""}
            self._whiteouts: set[bytes] = set()
            self._opaque: set[bytes] = set()
            for entry in scan(fileobj):
                self._index(entry)
        except OSError as exc:
            self._stack.close()
            raise SourceError(f"cannot read old tar {self.path}: {exc.strerror or exc}") from exc
        except BaseException:
            self._stack.close()
            raise

    def _index(self, entry: TarEntry) -> None:
        path = entry.bpath
        if not path:
            return
        if entry.is_hardlink:
            # The same inode as the target: its content and its metadata.
            target = self.nodes.get(clean_name(os.fsencode(entry.linkname)))
            node = target or TarNode(_Kind.BROKEN_LINK, 0, 0, entry)
        else:
            node = TarNode(_kind_of(entry), entry.data_offset, entry.size, entry)
        self.nodes[path] = node
        parent, _, base = path.rpartition(b"/")
        while parent and parent not in self._dirs:  # implied parent directories
            self._dirs.add(parent)
            parent = parent.rpartition(b"/")[0]
        if node.kind is _Kind.DIR:
            self._dirs.add(path)
        if base == OPAQUE_MARKER:
            self._opaque.add(path.rpartition(b"/")[0])
        elif base.startswith(WHITEOUT_PREFIX):
            prefix = path[: len(path) - len(base)]
            self._whiteouts.add(prefix + base[len(WHITEOUT_PREFIX) :])

    def open(self, name: bytes) -> SourceFile:
        return _open_by_lookup(self, name)

    def lookup(self, parts: list[bytes], name: bytes, stacked: bool = False) -> SourceFile | Found:
        """Find ``parts`` in this tar; with ``stacked``, honour ``.wh.`` and opaque entries."""
        opaque = stacked and b"" in self._opaque
        path = b""
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            path = path + b"/" + comp if path else comp
            if stacked and path in self._whiteouts:
                return Found.HIDDEN
            node = self.nodes.get(path)
            if node is None:
                if path not in self._dirs:
                    return Found.HIDDEN if opaque else Found.ABSENT
                kind = _Kind.DIR  # implied by a member below it
            else:
                kind = node.kind
            if kind is _Kind.SYMLINK:
                raise _refuse(name, "goes through a symlink")
            if last:
                if node is None:
                    raise _refuse(name, "is a directory")
                return self._file(node, name)
            if kind is not _Kind.DIR:
                if stacked:
                    return Found.HIDDEN
                raise _missing(name, "has a non-directory parent")
            opaque = opaque or (stacked and path in self._opaque)
        raise AssertionError("unreachable: parts is never empty")

    def _file(self, node: TarNode, name: bytes) -> _FdFile:
        if node.kind is _Kind.REGULAR:
            return _FdFile(self._fd, node.size, base=node.offset, owns_fd=False)
        if node.kind is _Kind.BROKEN_LINK:
            raise _missing(name, "is a hardlink whose target is not in the tar, so it")
        raise _refuse(name, f"is a {node.kind.value}")

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TarSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- stacks


class StackedSource:
    """Several sources seen as one merged tree, like image layers; ``layers`` are UPPER FIRST.

    A name is served by the uppermost layer that has it. A whiteout (overlay 0:0 char device or
    ``.wh.<name>``) of the file or of any parent directory, an opaque parent directory (overlay
    ``*.overlay.opaque=y`` xattr or ``.wh..wh..opq``), or a non-directory at a parent's place hides
    every lower layer for that name, exactly as the merged mount would.
    """

    def __init__(self, layers: Sequence[Source]) -> None:
        if not layers:
            raise SourceError("no old layers given: pass at least one directory or tar")
        self.layers = list(layers)

    def open(self, name: bytes) -> SourceFile:
        return _open_by_lookup(self, name)

    def lookup(self, parts: list[bytes], name: bytes, stacked: bool = True) -> SourceFile | Found:
        for layer in self.layers:
            found = _layer_lookup(layer, parts, name)
            if found is Found.HIDDEN:
                return Found.HIDDEN
            if found is not Found.ABSENT:
                return found
        return Found.ABSENT

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> StackedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layer_lookup(layer: Source, parts: list[bytes], name: bytes) -> SourceFile | Found:
    lookup = getattr(layer, "lookup", None)
    if lookup is not None:
        return lookup(parts, name, stacked=True)  # type: ignore[no-any-return]
    try:  # a foreign Source: it can only say "here" or "not here"
        return layer.open(name)
    except SourceNotFoundError:
        return Found.ABSENT


def open_source(paths: Sequence[str | os.PathLike[str]]) -> Source:
    """Open old trees given LOWEST FIRST (image layer order); each a directory or a tar.

    One path gives a :class:`DirSource` or :class:`TarSource`; several give a
    :class:`StackedSource` with the last path on top.
    """
    if not paths:
        raise SourceError("no old tree given: pass a directory or a tar")
    opened: list[Source] = []
    try:
        for path in paths:
            opened.append(_open_one(path))
    except BaseException:
        for source in opened:
            source.close()
        raise
    if len(opened) == 1:
        return opened[0]
    return StackedSource(opened[::-1])


def _open_one(path: str | os.PathLike[str]) -> Source:
    if os.path.isdir(path):
        return DirSource(path)
    if os.path.isfile(path):
        return TarSource(path)
    raise SourceError(f"old tree {os.fspath(path)} not found: give a directory or a layer tar")
