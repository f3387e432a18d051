"""Read-only access to a containers-storage store: layers, images and their files on disk.

podman-delta never writes ``layers.json`` or ``images.json``; it reads them under the store's own
lock files (shared), maps DiffIDs to layers and layers to their extracted files, and offers those
files to the patcher as delta sources. Writing goes through podman (see :mod:`.importer`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from podman_delta.errors import DigestMismatchError, SourceError, StorageError
from podman_delta.storage.config import StoreOptions, load_options
from podman_delta.storage.locks import shared_lock

log = logging.getLogger(__name__)

#: Set in the environment of a process re-run inside ``podman unshare``.
UNSHARE_MARK = "PODMAN_DELTA_IN_USERNS"


@dataclass(frozen=True)
class Layer:
    """One ``layers.json`` record (``raw`` keeps every field, including unknown newer ones)."""

    id: str
    parent: str | None
    diff_digest: str | None
    compressed_digest: str | None
    diff_size: int | None
    names: tuple[str, ...]
    flags: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> Layer:
        return cls(
            id=rec["id"],
            parent=rec.get("parent") or None,
            diff_digest=rec.get("diff-digest") or None,
            compressed_digest=rec.get("compressed-diff-digest") or None,
            diff_size=rec.get("diff-size"),
            names=tuple(rec.get("names") or ()),
            flags=dict(rec.get("flags") or {}),
            raw=rec,
        )

    @property
    def incomplete(self) -> bool:
        """A layer c/storage is still writing (or will delete on its next load)."""
        return bool(self.flags.get("incomplete"))


@dataclass(frozen=True)
class Image:
    """One ``images.json`` record."""

    id: str
    names: tuple[str, ...]
    top_layer: str | None
    digest: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> Image:
        return cls(
            id=rec["id"],
            names=tuple(rec.get("names") or ()),
            top_layer=rec.get("layer") or None,
            digest=rec.get("digest") or None,
            raw=rec,
        )


def _load_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except PermissionError as exc:
        raise StorageError(
            f"cannot read {path}: permission denied; run as the store's owner "
            "(rootless: podman-delta re-runs itself in `podman unshare`)"
        ) from exc
    if not data.strip():
        return []
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{path} is not valid JSON ({exc}); is the store damaged?") from exc
    if not isinstance(value, list):
        raise StorageError(f"{path} does not hold a list of records")
    return value


def _candidate_names(name: str) -> set[str]:
    """Stored forms a user-typed image name may have (podman stores fully qualified names)."""
    name = name.strip()
    if "@" not in name:
        last = name.rsplit("/", 1)[-1]
        if ":" not in last:
            name += ":latest"
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return {name}
    # A short name: podman's own images live under localhost/, Docker Hub's under docker.io.
    hub = f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"
    return {name, f"localhost/{name}", hub}


class Store:
    """A snapshot of a containers-storage store's layers and images, with their files."""

    def __init__(self, options: StoreOptions) -> None:
        self.options = options
        self._layers: list[Layer] | None = None
        self._images: list[Image] | None = None

    @classmethod
    def open(cls, options: StoreOptions | None = None) -> Store:
        """A store for ``options`` (default: what podman would use)."""
        return cls(options or load_options())

    # -- paths

    @property
    def graph_root(self) -> Path:
        return self.options.graph_root

    @property
    def driver(self) -> str:
        return self.options.driver

    @property
    def layers_dir(self) -> Path:
        return self.graph_root / f"{self.driver}-layers"

    @property
    def images_dir(self) -> Path:
        return self.graph_root / f"{self.driver}-images"

    # -- records

    def refresh(self) -> None:
        """Forget the snapshot; the next query re-reads the JSON files."""
        self._layers = None
        self._images = None

    def layers(self) -> list[Layer]:
        """Every layer record, read under ``layers.lock`` (shared)."""
        if self._layers is None:
            volatile = self.options.run_root / f"{self.driver}-layers" / "volatile-layers.json"
            with shared_lock(self.layers_dir / "layers.lock"):
                records = _load_json_list(self.layers_dir / "layers.json")
                records += _load_json_list(volatile)
            self._layers = [Layer.from_json(r) for r in records if isinstance(r, dict)]
        return self._layers

    def images(self) -> list[Image]:
        """Every image record, read under ``images.lock`` (shared)."""
        if self._images is None:
            with shared_lock(self.images_dir / "images.lock"):
                records = _load_json_list(self.images_dir / "images.json")
            self._images = [Image.from_json(r) for r in records if isinstance(r, dict)]
        return self._images

    def layer(self, layer_id: str) -> Layer | None:
        return next((la for la in self.layers() if la.id == layer_id), None)

    def layer_by_diff_id(self, diff_id: str) -> Layer | None:
        """A complete layer whose uncompressed content has DiffID ``diff_id``.

        Prefer one with a tar-split file, which lets ``--verify-sources`` check it.
        """
        found = [la for la in self.layers() if la.diff_digest == diff_id and not la.incomplete]
        found.sort(key=lambda la: not self.tar_split_path(la).exists())
        return found[0] if found else None

    def layer_by_compressed_digest(self, digest: str) -> Layer | None:
        return next(
            (la for la in self.layers() if la.compressed_digest == digest and not la.incomplete),
            None,
        )

    def has_diff_id(self, diff_id: str) -> bool:
        return self.layer_by_diff_id(diff_id) is not None

    def image(self, ref: str) -> Image | None:
        """An image by full ID, unique ID prefix (≥ 3 chars), or name."""
        ref = ref.removeprefix("sha256:")
        images = self.images()
        for img in images:
            if img.id == ref:
                return img
        wanted = {ref} | _candidate_names(ref)
        for img in images:
            if wanted & set(img.names):
                return img
        if len(ref) >= 3 and all(c in "0123456789abcdef" for c in ref):
            matches = [img for img in images if img.id.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        return None

    def image_layers(self, image: Image) -> list[Layer]:
        """The image's layers, BOTTOM FIRST (the order of ``rootfs.diff_ids``)."""
        chain: list[Layer] = []
        layer_id = image.top_layer
        seen: set[str] = set()
        while layer_id:
            if layer_id in seen:
                raise StorageError(f"layer parent loop at {layer_id}; the store is damaged")
            seen.add(layer_id)
            layer = self.layer(layer_id)
            if layer is None:
                raise StorageError(
                    f"image {image.id[:12]} refers to missing layer {layer_id[:12]}; "
                    "run `podman system check` or pull the image again"
                )
            chain.append(layer)
            layer_id = layer.parent
        return chain[::-1]

    def image_diff_ids(self, image: Image) -> list[str]:
        return [la.diff_digest or "" for la in self.image_layers(image)]

    # -- files

    def layer_dir(self, layer: Layer) -> Path:
        """Where ``layer``'s extracted files are (overlay: only its own; vfs: the full tree)."""
        if self.driver == "overlay":
            path = self.graph_root / "overlay" / layer.id / "diff"
        elif self.driver == "vfs":
            path = self.graph_root / "vfs" / "dir" / layer.id
        else:  # pragma: no cover - config rejects other drivers
            raise StorageError(f"storage driver {self.driver} is not supported")
        if not path.is_dir():
            raise StorageError(
                f"layer {layer.id[:12]} has no directory {path}; its files are not readable "
                "(composefs or a partial pull?)"
            )
        return path

    def tar_split_path(self, layer: Layer) -> Path:
        return self.layers_dir / f"{layer.id}.tar-split.gz"

    def layer_source(self, diff_id: str, *, verify: bool = False):  # type: ignore[no-untyped-def]
        """A patcher :class:`Source` over the files of the layer with ``diff_id`` alone.

        vfs keeps full trees, so its view is narrowed to the names in the layer's tar-split.
        With ``verify``, the layer's tar is regenerated first and must match the DiffID.
        """
        from podman_delta.tardiff.sources import DirSource

        layer = self._require(diff_id)
        if verify:
            self.verify_layer(layer)
        directory = self.layer_dir(layer)
        if self.driver == "vfs" and self.tar_split_path(layer).exists():
            return FilteredSource(DirSource(directory), set(self._tar_split_names(layer)))
        return DirSource(directory)

    def layers_source(self, layers: Sequence[Layer], *, verify: bool = False):  # type: ignore[no-untyped-def]
        """A merged :class:`Source` over ``layers`` (BOTTOM FIRST), as the image's root sees it."""
        from podman_delta.tardiff.sources import DirSource, StackedSource

        if not layers:
            raise SourceError("no old layers in the store to read from")
        if verify:
            for layer in layers:
                self.verify_layer(layer)
        if self.driver == "vfs":
            return DirSource(self.layer_dir(layers[-1]))
        opened = [DirSource(self.layer_dir(la)) for la in reversed(layers)]
        return StackedSource(opened)

    def image_source(self, image: Image | str, *, verify: bool = False):  # type: ignore[no-untyped-def]
        """A merged :class:`Source` over an image's layers (upper first, whiteouts honoured)."""
        img = self.image(image) if isinstance(image, str) else image
        if img is None:
            raise StorageError(f"image {image} is not in the store; pull it first")
        return self.layers_source(self.image_layers(img), verify=verify)

    def _require(self, diff_id: str) -> Layer:
        layer = self.layer_by_diff_id(diff_id)
        if layer is None:
            raise StorageError(f"no layer with DiffID {diff_id} in {self.graph_root}")
        return layer

    # -- tar-split

    def _tar_split_entries(self, layer: Layer) -> Iterator[dict[str, Any]]:
        path = self.tar_split_path(layer)
        try:
            with gzip.open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        except FileNotFoundError as exc:
            raise StorageError(
                f"layer {layer.id[:12]} has no tar-split file, so it cannot be verified"
            ) from exc
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc

    @staticmethod
    def _entry_name(entry: dict[str, Any]) -> bytes:
        raw = entry.get("name_raw")
        if raw:
            return base64.b64decode(raw)
        return str(entry.get("name", "")).encode("utf-8", "surrogateescape")

    def _tar_split_names(self, layer: Layer) -> Iterator[bytes]:
        for entry in self._tar_split_entries(layer):
            if entry.get("type") == 1:
                yield _clean(self._entry_name(entry))

    def regenerate_tar(self, layer: Layer, out: BinaryIO | None = None) -> str:
        """Rebuild the layer's exact tar from its tar-split and files; return its sha256 digest.

        The file bodies come from the layer's own directory (overlay diff or vfs dir). The
        result is the DiffID when nothing on disk was modified.
        """
        directory = self.layer_dir(layer)
        h = hashlib.sha256()
        for entry in self._tar_split_entries(layer):
            if entry.get("type") == 2:
                chunk = base64.b64decode(entry.get("payload") or "")
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                continue
            size = int(entry.get("size") or 0)
            if size <= 0:
                continue
            name = _clean(self._entry_name(entry))
            self._copy_body(directory, name, size, h, out, layer)
        return "sha256:" + h.hexdigest()

    @staticmethod
    def _copy_body(
        directory: Path, name: bytes, size: int, h: Any, out: BinaryIO | None, layer: Layer
    ) -> None:
        path = os.path.join(os.fsencode(directory), name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DigestMismatchError(
                f"layer {layer.id[:12]}: file {name.decode(errors='replace')} is missing or "
                f"unreadable ({exc.strerror}); the layer was modified on disk"
            ) from exc
        try:
            left = size
            with os.fdopen(fd, "rb", closefd=False) as f:
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise DigestMismatchError(
                            f"layer {layer.id[:12]}: file {name.decode(errors='replace')} is "
                            "shorter than recorded; the layer was modified on disk"
                        )
                    h.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    left -= len(chunk)
        finally:
            os.close(fd)

    def verify_layer(self, layer: Layer) -> None:
        """Raise :class:`DigestMismatchError` unless the layer's files still give its DiffID."""
        got = self.regenerate_tar(layer)
        if got != layer.diff_digest:
            raise DigestMismatchError(
                f"layer {layer.id[:12]} on disk gives {got[:19]}…, not its DiffID "
                f"{(layer.diff_digest or '?')[:19]}…; it was modified: not using it as a source"
            )

    def verified_layers(self, diff_ids: Sequence[str]) -> list[str]:
        """The subset of ``diff_ids`` whose stored layer passes :meth:`verify_layer` (logged)."""
        good = []
        for diff_id in diff_ids:
            layer = self.layer_by_diff_id(diff_id)
            if layer is None:
                continue
            try:
                self.verify_layer(layer)
            except (DigestMismatchError, StorageError) as exc:
                log.warning("skipping source layer: %s", exc)
                continue
            good.append(diff_id)
        return good


def _clean(name: bytes) -> bytes:
    """A tar member name as a relative path (``./etc/x`` → ``etc/x``)."""
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    return b"/".join(parts)


class FilteredSource:
    """A :class:`Source` limited to a set of names (a vfs layer's own files within its tree)."""

    def __init__(self, inner: Any, names: set[bytes]) -> None:
        self.inner = inner
        self.names = names

    def open(self, name: bytes):  # type: ignore[no-untyped-def]
        from podman_delta.tardiff.sources import SourceNotFoundError

        if _clean(name) not in self.names:
            raise SourceNotFoundError(
                f"source file {name.decode(errors='replace')!r} is not in this layer"
            )
        return self.inner.open(name)

    def lookup(self, parts: list[bytes], name: bytes, stacked: bool = False):  # type: ignore[no-untyped-def]
        from podman_delta.tardiff.sources import Found

        if b"/".join(parts) not in self.names:
            return Found.ABSENT
        return self.inner.lookup(parts, name, stacked)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FilteredSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- rootless


def needs_userns(options: StoreOptions) -> bool:
    """True when a rootless store must be read inside the user namespace (podman unshare)."""
    return os.geteuid() != 0 and options.rootless and not os.environ.get(UNSHARE_MARK)


def reexec_in_userns(
    argv: Sequence[str] | None = None,
    podman: str = "podman",
    *,
    command: Sequence[str] | None = None,
) -> None:
    """Re-run this command inside ``podman unshare`` (does not return on success).

    Rootless layer files can belong to subordinate UIDs or have mode 000; inside the user
    namespace the process is root over them, exactly as podman is when it reads them.
    ``command`` replaces the default ``python -m podman_delta <argv>``.
    """
    exe = shutil.which(podman)
    if exe is None:
        raise StorageError("podman is not installed; cannot enter the rootless user namespace")
    if command is None:
        args = list(sys.argv[1:] if argv is None else argv)
        command = [sys.executable, "-m", "podman_delta", *args]
    os.environ[UNSHARE_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, [exe, "unshare", *command])
