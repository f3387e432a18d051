"""OCI image layouts: ``oci:DIR`` directories and ``oci-archive:FILE`` (the layout in a tar).

Used for the delta artifact as a file (air-gapped hosts; the same files containers/oci-delta
reads and writes) and as image sources/outputs of ``create`` and ``apply``. Archives are read in
place (tar members are seekable in an uncompressed tar), never extracted to disk. Every blob read
is verified against its digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from podman_delta.errors import DeltaFormatError, DigestMismatchError
from podman_delta.registry.client import (
    INDEXES,
    MAX_CONFIG_SIZE,
    MAX_ENTRIES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    Manifest,
    Platform,
    ProgressFn,
    check_descriptor,
    choose_platform,
    guess_media_type,
    host_platform,
    parse_manifest_json,
    sha256_digest,
)
from podman_delta.registry.image import ImageInfo, image_info
from podman_delta.tardiff.outfile import open_in_place, writes_in_place

REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1 << 20


def blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise DeltaFormatError(f"unsupported digest {digest!r}")
    return f"blobs/sha256/{hexpart}"


class LayoutReader:
    """Read blobs and ``index.json`` from an OCI layout directory or archive."""

    def __init__(self, path: Path, archive: bool) -> None:
        self.path = Path(path)
        self.archive = archive
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if archive:
            try:
                self._tar = tarfile.open(self.path, "r:")  # noqa: SIM115 - closed in close()
                for m in self._tar:
                    if m.isfile():
                        self._members[m.name.removeprefix("./")] = m
            except (OSError, tarfile.TarError) as exc:
                raise DeltaFormatError(f"cannot read oci-archive {self.path}: {exc}") from exc
        elif not (self.path / "index.json").is_file():
            raise DeltaFormatError(f"{self.path} is not an OCI layout (no index.json)")

    def close(self) -> None:
        if self._tar:
            self._tar.close()
            self._tar = None

    def _open(self, name: str) -> tuple[BinaryIO, int]:
        if self._tar is not None:
            m = self._members.get(name)
            if m is None:
                raise DeltaFormatError(f"{self.path}: {name} is missing from the archive")
            f = self._tar.extractfile(m)
            assert f is not None
            return f, m.size  # type: ignore[return-value]
        p = self.path / name
        try:
            return open(p, "rb"), p.stat().st_size
        except FileNotFoundError as exc:
            raise DeltaFormatError(f"{self.path}: {name} is missing from the layout") from exc

    def has_blob(self, digest: str) -> bool:
        name = blob_name(digest)
        if self._tar is not None:
            return name in self._members
        return (self.path / name).is_file()

    def blob_size(self, digest: str) -> int:
        f, size = self._open(blob_name(digest))
        f.close()
        return size

    def index(self) -> dict:
        f, size = self._open("index.json")
        with f:
            if size > MAX_MANIFEST_SIZE:
                raise DeltaFormatError(f"{self.path}: index.json is too large")
            data = f.read()
        try:
            return parse_manifest_json(data, OCI_INDEX)
        except Exception as exc:
            raise DeltaFormatError(f"{self.path}: invalid index.json: {exc}") from exc

    def read_blob(self, digest: str, max_size: int = MAX_CONFIG_SIZE) -> bytes:
        f, size = self._open(blob_name(digest))
        with f:
            if size > max_size:
                raise DeltaFormatError(f"{self.path}: blob {digest} is larger than {max_size}")
            data = f.read()
        if sha256_digest(data) != digest:
            raise DigestMismatchError(f"{self.path}: blob {digest} is corrupt (digest mismatch)")
        return data

    def copy_blob(
        self, digest: str, dest: BinaryIO | Path, progress: ProgressFn | None = None
    ) -> int:
        """Copy a blob to ``dest`` (a path or a file), verifying its digest."""
        f, size = self._open(blob_name(digest))
        h = hashlib.sha256()
        done = 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(f)
            out = dest if not isinstance(dest, Path) else stack.enter_context(open(dest, "wb"))
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(digest, done, size)
        if "sha256:" + h.hexdigest() != digest:
            if isinstance(dest, Path):
                dest.unlink(missing_ok=True)
            raise DigestMismatchError(f"{self.path}: blob {digest} is corrupt (digest mismatch)")
        return done

    def manifest(self, desc: dict) -> Manifest:
        data = self.read_blob(desc["digest"], MAX_MANIFEST_SIZE)
        doc = parse_manifest_json(data, desc.get("mediaType"))
        return Manifest(data, desc.get("mediaType") or guess_media_type(doc), desc["digest"])


def select_manifest(index: dict, ref_name: str | None, where: str) -> dict:
    """The ``index.json`` entry named ``ref_name``, or the only entry."""
    entries = index.get("manifests", [])
    if ref_name:
        named = [d for d in entries if (d.get("annotations") or {}).get(REF_NAME) == ref_name]
        if not named:
            raise DeltaFormatError(f"{where}: no image named {ref_name!r} in index.json")
        return named[0]
    if len(entries) != 1:
        raise DeltaFormatError(
            f"{where}: index.json lists {len(entries)} manifests; name one as PATH:NAME"
        )
    return entries[0]


class LayoutImageSource:
    """An image in an OCI layout or oci-archive (the :class:`ImageSource` interface)."""

    def __init__(
        self,
        path: Path,
        *,
        archive: bool,
        ref_name: str | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.reader = LayoutReader(path, archive)
        self.name = f"{'oci-archive' if archive else 'oci'}:{path}"
        self.ref_name = ref_name
        self.platform = platform or host_platform()
        self._info: ImageInfo | None = None

    def image(self) -> ImageInfo:
        if self._info is None:
            desc = select_manifest(self.reader.index(), self.ref_name, self.name)
            m = self.reader.manifest(desc)
            index_digest = None
            if m.media_type in INDEXES:
                index_digest = m.digest
                m = self.reader.manifest(choose_platform(m.json(), self.platform))
            config = self.reader.read_blob(m.json()["config"]["digest"])
            self._info = image_info(m, config, index_digest)
        return self._info

    def fetch_blob(self, desc: dict, dest: Path, progress: ProgressFn | None = None) -> Path:
        self.reader.copy_blob(desc["digest"], Path(dest), progress)
        return Path(dest)

    def close(self) -> None:
        self.reader.close()


class ArchiveWriter:
    """Write an oci-archive: ``oci-layout``, blobs, then ``index.json`` (as oci-delta does).

    The tar is written to a temporary file beside ``path`` and renamed on :meth:`close`, so a
    failed run leaves no half-written archive behind; into a device or FIFO (``/dev/null``) it
    is copied instead.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        beside = None if writes_in_place(str(self.path)) else self.path.parent  # not into /dev
        fd, tmp = tempfile.mkstemp(prefix=".podman-delta-", suffix=".tar", dir=beside)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._written: set[str] = set()
        self._mtime = int(time.time())
        self._add_dir("blobs/")
        self._add_dir("blobs/sha256/")
        self._add_bytes("oci-layout", OCI_LAYOUT)

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = self._mtime
        return info

    def _add_dir(self, name: str) -> None:
        info = self._info(name, 0)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self._tar.addfile(info)

    def _add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if digest not in self._written:
            self._add_bytes(blob_name(digest), data)
            self._written.add(digest)
        return digest

    def add_blob_file(self, path: Path, digest: str) -> None:
        """Add a blob from a file (already verified by whoever wrote it)."""
        if digest in self._written:
            return
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            self._tar.addfile(self._info(blob_name(digest), size), f)
        self._written.add(digest)

    def finish(self, manifests: list[dict]) -> None:
        """Write ``index.json`` listing ``manifests`` and move the archive into place."""
        if len(manifests) > MAX_ENTRIES:
            raise DeltaFormatError("too many manifests for one archive")
        for d in manifests:
            check_descriptor(d)
            if d["digest"] not in self._written:
                raise DeltaFormatError(f"index.json names {d['digest']}, which was not written")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        self._add_bytes("index.json", json.dumps(index, separators=(",", ":")).encode())
        self._tar.close()
        if writes_in_place(str(self.path)):  # /dev/null, a FIFO: copy into it, never rename
            out = os.fdopen(open_in_place(str(self.path)), "wb")
            with open(self._tmp, "rb") as src, out:
                shutil.copyfileobj(src, out, 1 << 20)
            self._tmp.unlink()
            return
        os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp made it 0600
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or (self._tmp.exists() and not self._tar.closed):
            self.abort()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
