"""containers-storage lock files, taken the way c/storage takes them.

c/storage guards ``layers.json`` and ``images.json`` with POSIX record locks (``fcntl`` with
``F_SETLKW``) on ``layers.lock`` / ``images.lock``. Python's :func:`fcntl.lockf` issues the same
call, so a shared lock here excludes a concurrent podman writer and never sees a half state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from podman_delta.errors import StorageError


@contextlib.contextmanager
def shared_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a shared (read) lock on the c/storage lock file ``path``.

    A missing lock file means nobody has written the store yet: nothing to exclude.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    except PermissionError as exc:
        raise StorageError(
            f"cannot open the storage lock {path}: permission denied; run as the store's owner"
        ) from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def exclusive_flock(path: str | os.PathLike[str], *, create: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (podman-delta's own lock files); yield the fd."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open lock file {path}: {exc.strerror}") from exc
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
        yield fd
    finally:
        os.close(fd)
