"""The fuzz target shared by the atheris campaign (``fuzz/fuzz_patcher.py``) and the seed replay
test (``tests/test_fuzz_replay.py``).

One input is run through :class:`DeltaReader` + :func:`apply` against a :class:`DirSource` sandbox
that is full of traps (symlinks out of the tree, a FIFO, a char device, a directory, a secret file
next to the root). The oracle:

* the only exceptions allowed are :class:`podman_delta.errors.DeltaError` subclasses;
* every old file the patcher opens resolves (``/proc/self/fd``) to a regular file *inside* the
  root, and the secret's marker never shows up in the output;
* no descriptor leaks.

Input encoding (first byte = mode, so the fuzzer can reach both layers cheaply):

* ``mode & 1 == 1``: the rest is a whole delta file (magic + zstd), as downloaded;
* ``mode & 1 == 0``: the rest is a raw op stream; the harness adds the magic (``tardf2`` when
  ``mode & 2``, else ``tardf1``) and compresses it, so mutations hit the op parser directly.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile

import zstandard

from podman_delta.errors import DeltaError
from podman_delta.tardiff.format import MAGIC_V1, MAGIC_V2
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import DirSource

#: 32 bytes no valid delta or tree file contains; seeing them in the output means a read escaped.
MARKER = b"\x8fSECRET-OUTSIDE-THE-SANDBOX-\x17\x42\x99"
#: Bound on the output, as the pull sets one (keeps each execution fast, and is itself tested).
MAX_OUTPUT = 4 << 20

#: The files inside the sandbox: their names are what a seed delta OPENs.
TREE: dict[str, bytes] = {
    "usr/bin/tool": bytes(range(256)) * 16,
    "usr/lib/libx.so.1": b"\x7fELF" + b"lib" * 700,
    "etc/os-release": b"NAME=test\nVERSION=1\n",
    "empty": b"",
}


class Sandbox:
    """A temporary old tree with traps, and a secret file outside it."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="pd-fuzz-")
        top = self._tmp.name
        self.root = os.path.join(top, "root")
        with open(os.path.join(top, "secret"), "wb") as f:
            f.write(MARKER * 8)
        os.makedirs(os.path.join(top, "outside"))
        with open(os.path.join(top, "outside", "lib.so"), "wb") as f:
            f.write(MARKER * 8)
        for name, data in TREE.items():
            path = os.path.join(self.root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        os.makedirs(os.path.join(self.root, "dir"))
        os.symlink(os.path.join(top, "secret"), os.path.join(self.root, "escape"))
        os.symlink("../../secret", os.path.join(self.root, "usr", "rel"))
        os.symlink("../outside", os.path.join(self.root, "lib64"))
        os.symlink("/etc/shadow", os.path.join(self.root, "shadow"))
        os.symlink("/proc/self/environ", os.path.join(self.root, "environ"))
        os.mkfifo(os.path.join(self.root, "fifo"))
        with contextlib.suppress(PermissionError):  # not root: no device trap then
            os.mknod(os.path.join(self.root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        self.source = _CheckedSource(self.root)

    def close(self) -> None:
        self.source.close()
        self._tmp.cleanup()


class Escape(AssertionError):
    """An old file outside the sandbox was opened or its bytes reached the output."""


class _CheckedSource(DirSource):
    """A DirSource that proves every file it serves really lies inside the root."""

    def open(self, name: bytes):  # type: ignore[no-untyped-def]
        f = super().open(name)
        real = os.readlink(f"/proc/self/fd/{f._fd}")  # type: ignore[attr-defined]
        st = os.fstat(f._fd)  # type: ignore[attr-defined]
        if not real.startswith(self.root + os.sep) or not stat.S_ISREG(st.st_mode):
            f.close()
            raise Escape(f"OPEN {name!r} reached {real}")
        return f


def build_delta(data: bytes) -> bytes:
    """Turn a fuzz input into delta-file bytes (see the module docstring)."""
    if not data:
        return b""
    mode, rest = data[0], data[1:]
    if mode & 1:
        return rest
    magic = MAGIC_V2 if mode & 2 else MAGIC_V1
    return magic + zstandard.ZstdCompressor(level=1).compress(rest)


def run_one(sandbox: Sandbox, data: bytes) -> str:
    """Run one input; return ``"ok"`` or the DeltaError class name; raise on any other outcome."""
    delta = build_delta(data)
    out = io.BytesIO()
    fds = len(os.listdir("/proc/self/fd"))
    try:
        apply(io.BytesIO(delta), sandbox.source, out, max_output=MAX_OUTPUT)
        outcome = "ok"
    except DeltaError as exc:
        msg = str(exc)
        if "\n" in msg or not msg:
            raise AssertionError(f"error message is not one line: {msg!r}") from exc
        outcome = type(exc).__name__
    if MARKER[:16] in out.getvalue():
        raise Escape("bytes of a file outside the sandbox reached the output")
    if out.tell() > MAX_OUTPUT:
        raise AssertionError(f"output of {out.tell()} bytes passed max_output")
    # DirSource caches up to 128 directory descriptors; beyond that, something leaked.
    if len(os.listdir("/proc/self/fd")) > fds + DirSource._CACHE_SIZE + 1:
        raise AssertionError("file descriptors leak")
    return outcome
