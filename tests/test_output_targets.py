"""Outputs that are devices or FIFOs (``/dev/null``, ``/dev/stdout``, named pipes) are written
in place: ``diff``, ``patch`` and ``create`` must never rename a temporary file over them.

The tests use a FIFO in the test directory, the same kind of target as ``/dev/null`` for the
code under test, so a regression cannot destroy the machine's ``/dev/null``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from podman_delta.cli import main
from podman_delta.errors import DeltaError
from podman_delta.tardiff.outfile import writes_in_place
from tests.test_differ_roundtrip import make_tar, rand
from tests.test_patcher_helpers import COPY, DATA, OPEN, write_delta, write_tree


class FifoReader:
    """Read everything written to a new FIFO ``path`` in a thread."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path, self.data = path, b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            self.data = f.read()

    def result(self) -> bytes:
        self._thread.join(60)
        assert not self._thread.is_alive(), "nothing closed the FIFO"
        assert stat.S_ISFIFO(os.lstat(self.path).st_mode), "the FIFO was replaced"
        return self.data


def test_patch_into_a_fifo(tmp_path: Path) -> None:
    old = write_tree(tmp_path / "old", {"usr/bin/a": b"0123456789"})
    delta = write_delta(tmp_path / "d", [DATA(b"hdr"), OPEN(b"usr/bin/a"), COPY(10)])
    fifo = FifoReader(tmp_path / "out")
    digest = "sha256:" + hashlib.sha256(b"hdr0123456789").hexdigest()
    assert main(["patch", "--digest", digest, str(delta), str(old), str(fifo.path)]) == 0
    assert fifo.result() == b"hdr0123456789"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "old", "out"]  # no temp file


def test_diff_into_a_fifo(tmp_path: Path) -> None:
    blob = rand(40, 200_000)
    old = make_tar(tmp_path / "old.tar", [("f", "file", blob, {})])
    new = make_tar(tmp_path / "new.tar", [("f", "file", blob + b"more", {})])
    fifo = FifoReader(tmp_path / "delta")
    assert main(["diff", str(old), str(new), str(fifo.path)]) == 0
    assert fifo.result()[:6] in (b"tardf1", b"tardf2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta", "new.tar", "old.tar"]


def test_regular_and_missing_outputs_are_replaced_and_directories_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_bytes(b"x")
    assert not writes_in_place(str(tmp_path / "file"))
    assert not writes_in_place(str(tmp_path / "missing"))
    assert writes_in_place("/dev/null")
    with pytest.raises(DeltaError, match="is a directory"):
        writes_in_place(str(tmp_path))


def test_oci_archive_into_a_fifo(tmp_path: Path) -> None:
    from podman_delta.registry.layout import ArchiveWriter

    fifo = FifoReader(tmp_path / "archive")
    writer = ArchiveWriter(fifo.path)
    digest = writer.add_blob(b"{}")
    manifest = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest}
    writer.finish([{**manifest, "size": 2}])
    data = fifo.result()
    assert b"index.json" in data and b"oci-layout" in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]
