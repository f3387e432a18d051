"""Where the ``diff`` and ``patch`` commands put their output file.

A regular output is written to a temporary file beside it and renamed into place once it is
complete, so a half-written or unverified file never appears under the final name. An output
that already exists as a device, FIFO or socket (``/dev/null``, ``/dev/stdout``, a named pipe)
must be written in place instead: renaming over it would replace the device node itself.
"""

from __future__ import annotations

import os
import stat

from podman_delta.errors import DeltaError


def writes_in_place(path: str) -> bool:
    """Whether ``path`` is an existing non-regular file that must be opened, not replaced."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise DeltaError(f"cannot use {path} as output: {exc.strerror}") from exc
    if stat.S_ISDIR(mode):
        raise DeltaError(f"{path} is a directory: give a file name for the output")
    return not stat.S_ISREG(mode)


def open_in_place(path: str) -> int:
    """Open an existing device/FIFO output for writing (no create, no truncate of a file)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeltaError(f"cannot write to {path}: {exc.strerror}") from exc
