"""Put rebuilt layers into containers-storage so podman sees exactly what a normal pull makes.

The flow (containers-integration.md §10):

1. ``podman pull oci:DIR`` a staging OCI layout directory holding the verified, uncompressed
   layer tars (hard links, not copies) under a *synthetic* config (same DiffIDs, plus a label, so
   its image ID differs from the target's). The layers get the IDs a registry pull computes,
   because those depend only on DiffIDs. ``podman load`` of an oci-archive, the fallback when
   the ``oci:`` pull fails, writes each layer three more times before storing it (into the
   archive, and twice out of it into /var/tmp; podman 4.3.1 writes 3x the layer size there
   for a load, 1x for a pull of the layout).
2. Record (compressed digest → DiffID) for the verified layers in the blob-info-cache that the
   installed podman reads.
3. ``podman pull repo@digest``: c/image finds every layer through the cache, fetches only the
   manifest and config, runs the signature policy and stores the registry's manifest. Tag it.
4. Remove the staging image (while the tag is written). Its layers stay: the pulled image
   uses them.

Everything runs under podman-delta's import lock; a staging image found while holding it was
left by a killed run and is removed first. Where the cache cannot be written the image is loaded
directly with the target config under the user's name, and the message says what a later
``podman pull`` will download.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podman_delta.errors import DeltaError, DigestMismatchError, RegistryError, StorageError
from podman_delta.storage import blobcache
from podman_delta.storage.locks import exclusive_flock
from podman_delta.storage.store import Store

log = logging.getLogger(__name__)

STAGING_REPO = "localhost/podman-delta-staging"
STAGING_LABEL = "io.github.podman-delta.staging-for"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
LOCK_NAME = "podman-delta-import.lock"
#: The staging OCI layout's directory name. podman < 5 ignores the ``oci:DIR:NAME`` name and
#: calls the image ``localhost/<DIR>:latest``: such a name, below our scratch directory, is
#: a staging name as well (left if a run is killed before it renames the image).
LAYOUT_DIR = "podman-delta-staging"
SCRATCH_PREFIX = "podman-delta-import-"
_PATH_STAGING_NAME = re.compile(
    rf"localhost/(?:[^:]+/)?{SCRATCH_PREFIX}[0-9a-f]{{12}}/{LAYOUT_DIR}:latest"
)
#: One path component of an image name (distribution/reference), and the longest name.
_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_NAME_MAX = 255
#: How long an interrupted podman gets to clean up before it is killed.
STOP_TIMEOUT_S = 30


#: (DiffID, verified tar path or None when the store has the layer, size) per layer.
_Rows = list[tuple[str, str | None, int]]


@dataclass(frozen=True)
class LayerTar:
    """One layer of the target image, as the pull command hands it over."""

    diff_id: str
    compressed_digest: str
    compression: str  # "gzip" | "zstd" | ...
    path: str | None  # verified uncompressed tar, or None when the store already has the layer


@dataclass(frozen=True)
class ImportResult:
    image_id: str
    cache_written: bool
    message: str


# ----------------------------------------------------------------------------- podman runner


@dataclass
class _Podman:
    binary: str
    store: Store

    def args(self, *more: str) -> list[str]:
        return [self.binary, *self.store.options.podman_args(), *more]

    def _spawn(
        self, more: tuple[str, ...], cwd: Path | None, capture: bool
    ) -> subprocess.Popen[str]:
        cmd = self.args(*more)
        log.debug("running %s", " ".join(cmd))
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *more: str, cwd: Path | None = None) -> str:
        start = time.monotonic()
        try:
            proc = self._spawn(more, cwd, capture=True)
        except OSError as exc:
            raise StorageError(
                f"cannot run {self.binary}: {exc.strerror}; is podman installed?"
            ) from exc
        out, err = _finish(proc)
        log.debug("podman %s took %.2f s", more[0], time.monotonic() - start)
        if proc.returncode != 0:
            lines = err.strip().splitlines()
            detail = lines[-1] if lines else f"exit code {proc.returncode}"
            raise _PodmanFailed(more[0], detail)
        return out

    def start(self, *more: str) -> subprocess.Popen[str] | None:
        """Start a command whose outcome is checked later (None: it could not be started)."""
        try:
            return self._spawn(more, None, capture=False)
        except OSError as exc:
            log.debug("cannot start %s: %s", self.binary, exc.strerror)
            return None

    def try_run(self, *more: str) -> bool:
        try:
            self.run(*more)
        except _PodmanFailed as exc:
            log.debug("%s", exc)
            return False
        return True


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for ``proc`` and return its output; stop it cleanly if we are interrupted meanwhile."""
    try:
        return proc.communicate()
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen[str]) -> None:
    """Let an interrupted podman clean up after itself (SIGTERM), then make sure it is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _PodmanFailed(StorageError):
    def __init__(self, command: str, detail: str) -> None:
        super().__init__(f"`podman {command}` failed: {detail}")
        self.command = command
        self.detail = detail


# ----------------------------------------------------------------------------- helpers


def _sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def split_reference(reference: str) -> tuple[str, str | None]:
    """(repository, tag) of ``host/repo:tag`` or ``host/repo@digest`` (tag None then)."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
        return repo, tag
    return name, (None if "@" in reference else "latest")


def staging_name(manifest_digest: str) -> str:
    return f"{STAGING_REPO}:{_hex(manifest_digest)[:16]}"


def synthetic_config(config: dict[str, Any], manifest_digest: str) -> dict[str, Any]:
    """The target config plus a label: same DiffIDs (so same layer IDs), different image ID."""
    new = json.loads(json.dumps(config))
    inner = new.setdefault("config", {}) or {}
    new["config"] = inner
    labels = inner.get("Labels") or {}
    labels[STAGING_LABEL] = manifest_digest
    inner["Labels"] = labels
    return new


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, digest: str, data: bytes) -> None:
    _add_bytes(tar, f"blobs/sha256/{_hex(digest)}", data)


def _layout_documents(
    config: bytes, layers: Sequence[tuple[str, str | None, int]], ref_name: str
) -> tuple[bytes, bytes]:
    """(manifest, index.json) of an OCI layout naming ``ref_name``; layers uncompressed."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _sha256_bytes(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": LAYER_MEDIA_TYPE, "digest": diff_id, "size": size}
            for diff_id, _, size in layers
        ],
    }
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _sha256_bytes(mbytes),
                "size": len(mbytes),
                "annotations": {"org.opencontainers.image.ref.name": ref_name},
            }
        ],
    }
    return mbytes, json.dumps(index).encode()


def write_oci_archive(
    path: Path, config: bytes, layers: Sequence[tuple[str, str | None, int]], ref_name: str
) -> None:
    """Write an oci-archive: ``layers`` = (DiffID, tar path or None, size), uncompressed.

    A layer without a path is listed but not included: podman finds it in the store by DiffID
    (c/image reuse step 3) without reading the blob.
    """
    mbytes, index = _layout_documents(config, layers, ref_name)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", OCI_LAYOUT)
        _add_bytes(tar, "index.json", index)
        _add_blob(tar, _sha256_bytes(mbytes), mbytes)
        _add_blob(tar, _sha256_bytes(config), config)
        seen: set[str] = set()
        for diff_id, tar_path, _ in layers:
            if tar_path is None or diff_id in seen:
                continue
            seen.add(diff_id)
            tar.add(tar_path, arcname=f"blobs/sha256/{_hex(diff_id)}", recursive=False)


def write_oci_layout(
    path: Path, config: bytes, layers: Sequence[tuple[str, str | None, int]], ref_name: str
) -> None:
    """Write an OCI layout directory like :func:`write_oci_archive`, into the new ``path``.

    Layer tars are hard-linked (copied only across filesystems): no byte of a layer is written
    here, and podman reads each tar once, straight from the layout.
    """
    mbytes, index = _layout_documents(config, layers, ref_name)
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / _hex(_sha256_bytes(mbytes))).write_bytes(mbytes)
    (blobs / _hex(_sha256_bytes(config))).write_bytes(config)
    for diff_id, tar_path, _ in layers:
        target = blobs / _hex(diff_id)
        if tar_path is not None and not target.exists():
            _link_or_copy(Path(tar_path), target)
    (path / "oci-layout").write_bytes(OCI_LAYOUT)
    (path / "index.json").write_bytes(index)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:  # EXDEV, or a filesystem/permission that refuses hard links
        log.debug("cannot hard-link %s (%s); copying it", src, exc.strerror)
        shutil.copyfile(src, dst)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so cleanup runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _scratch_dir(tmpdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A private temporary directory named ``podman-delta-import-<hex>``.

    Unlike ``tempfile``'s names (which may contain ``_`` at either end), a hex suffix keeps the
    path a valid image name, which podman < 5 needs to pull the layout in it by absolute path.
    """
    parent = Path(os.path.abspath(tmpdir if tmpdir is not None else tempfile.gettempdir()))
    while True:
        path = parent / f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _lock_path(store: Store) -> Path:
    return store.options.run_root / LOCK_NAME


def is_staging_name(name: str) -> bool:
    """A name podman-delta gives a staging image, or podman < 5 gives its ``oci:`` pull."""
    return name.startswith(STAGING_REPO + ":") or bool(_PATH_STAGING_NAME.fullmatch(name))


def staging_images(store: Store) -> list[tuple[str, list[str]]]:
    """(image ID, staging names) of every staging image in the store."""
    store.refresh()
    found = []
    for img in store.images():
        names = [n for n in img.names if is_staging_name(n)]
        if names:
            found.append((img.id, names))
    return found


def remove_stale_staging(store: Store, podman: str = "podman") -> int:
    """Remove staging images left by killed runs (call under the import lock); return count."""
    runner = _Podman(podman, store)
    count = 0
    for image_id, names in staging_images(store):
        others = [n for n in store.image(image_id).names if n not in names]  # type: ignore[union-attr]
        for name in names:
            runner.try_run("untag", image_id, name)
        if not others:
            runner.try_run("rmi", image_id)
        log.info("removed staging image %s left by an interrupted run", image_id[:12])
        count += 1
    store.refresh()
    return count


# ----------------------------------------------------------------------------- main flow


def _check_manifest(
    manifest: bytes, manifest_digest: str, config: bytes, layers: Sequence[LayerTar]
) -> None:
    """Cache rows are claims from manifest + config: refuse a set that does not belong together."""
    if _sha256_bytes(manifest) != manifest_digest:
        raise DigestMismatchError(f"the manifest given does not have digest {manifest_digest}")
    try:
        parsed = json.loads(manifest)
        config_digest = parsed["config"]["digest"]
        blobs = [la["digest"] for la in parsed["layers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"the manifest given is not an image manifest ({exc})") from exc
    if config_digest != _sha256_bytes(config):
        raise DigestMismatchError("the config given is not the one the manifest names")
    if blobs != [la.compressed_digest for la in layers]:
        raise DigestMismatchError("the layer digests given are not the manifest's")


def _check_inputs(config: bytes, layers: Sequence[LayerTar]) -> dict[str, Any]:
    try:
        parsed = json.loads(config)
        diff_ids = list(parsed["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"the target config is not an image config ({exc})") from exc
    if diff_ids != [la.diff_id for la in layers]:
        raise StorageError("the layers given do not match the config's rootfs.diff_ids")
    return parsed


def _layer_rows(
    store: Store, layers: Sequence[LayerTar], tmp: Path
) -> list[tuple[str, str | None, int]]:
    """(DiffID, tar path, size) for the archive; stored layers are omitted (path None)."""
    rows: list[tuple[str, str | None, int]] = []
    for la in layers:
        if la.path is not None:
            rows.append((la.diff_id, la.path, os.path.getsize(la.path)))
            continue
        stored = store.layer_by_diff_id(la.diff_id)
        if stored is None:
            raise StorageError(
                f"layer {la.diff_id[:19]}… is neither given as a tar nor in the store"
            )
        rows.append((la.diff_id, None, int(stored.diff_size or 0)))
    return rows


def _with_stored_tars(
    store: Store, rows: list[tuple[str, str | None, int]], tmp: Path
) -> list[tuple[str, str | None, int]]:
    """Fallback: regenerate omitted layers' tars from the store (tar-split) and include them."""
    out = []
    for diff_id, path, size in rows:
        if path is None:
            layer = store.layer_by_diff_id(diff_id)
            if layer is None:
                raise StorageError(f"layer {diff_id[:19]}… vanished from the store")
            target = tmp / f"{_hex(diff_id)}.tar"
            with open(target, "wb") as f:
                got = store.regenerate_tar(layer, f)
            if got != diff_id:
                raise DigestMismatchError(f"stored layer {diff_id[:19]}… no longer matches")
            path, size = str(target), target.stat().st_size
        out.append((diff_id, path, size))
    return out


def _load(runner: _Podman, store: Store, archive: Path, rows, config: bytes, name: str, tmp: Path):  # type: ignore[no-untyped-def]
    """podman load the archive; if omitting stored layers was refused, include them and retry."""
    write_oci_archive(archive, config, rows, name)
    try:
        runner.run("load", "-q", "-i", str(archive))
    except _PodmanFailed as exc:
        if all(path is not None for _, path, _ in rows):
            raise
        log.info("podman load without stored layers failed (%s); including them", exc.detail)
        rows = _with_stored_tars(store, rows, tmp)
        write_oci_archive(archive, config, rows, name)
        runner.run("load", "-q", "-i", str(archive))
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
    image_id = _hex(_sha256_bytes(config))
    _check_staged(store, image_id, rows, "podman load")
    return image_id


def _check_staged(store: Store, image_id: str, rows: _Rows, how: str) -> None:
    store.refresh()
    img = store.image(image_id)
    if img is None:
        raise StorageError(f"{how} did not create image {image_id[:12]}")
    want = [d for d, _, _ in rows]
    got = store.image_diff_ids(img)
    if got != want:
        raise DigestMismatchError(
            f"loaded image {image_id[:12]} has layers {got}, expected {want}; not importing"
        )


def _stage(
    runner: _Podman, store: Store, rows: _Rows, config: bytes, name: str, tmp: Path, archive: str
) -> str:
    """Create image ``config`` from ``rows`` under ``name`` (and no other new name); its ID.

    ``podman pull oci:DIR`` of a layout of hard links; ``podman load`` of an archive if that
    fails (slower where disk writes are: see the module docstring).
    """
    layout = tmp / LAYOUT_DIR
    try:
        return _pull_layout(runner, store, layout, rows, config, name, tmp)
    except _PodmanFailed as exc:
        log.warning("`podman pull oci:` failed (%s); using `podman load` instead", exc.detail)
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    return _load(runner, store, tmp / archive, rows, config, name, tmp)


def _pull_layout(
    runner: _Podman, store: Store, layout: Path, rows: _Rows, config: bytes, name: str, tmp: Path
) -> str:
    """``podman pull`` the layout; if omitting stored layers was refused, include them, retry.

    The image keeps the staging name the pull gave it: ``name`` (podman 5) or podman 4's
    ``localhost/<layout path>:latest``, which is a staging name too (:func:`is_staging_name`),
    so no ``podman tag``/``untag`` is needed. Whatever the pull left is taken back on any
    failure or interrupt.
    """
    image_id = _hex(_sha256_bytes(config))
    store.refresh()
    existing = store.image(image_id)
    before = None if existing is None else set(existing.names)
    ref, cwd = _layout_reference(layout, name)
    try:
        write_oci_layout(layout, config, rows, name)
        try:
            runner.run("pull", "-q", ref, cwd=cwd)
        except _PodmanFailed as exc:
            if all(path is not None for _, path, _ in rows):
                raise
            log.info("podman pull without stored layers failed (%s); including them", exc.detail)
            rows = _with_stored_tars(store, rows, tmp)
            shutil.rmtree(layout)
            write_oci_layout(layout, config, rows, name)
            runner.run("pull", "-q", ref, cwd=cwd)
        store.refresh()
        img = store.image(image_id)
        if img is None:
            raise StorageError(f"`podman pull {ref}` did not create image {image_id[:12]}")
        added = [n for n in img.names if before is None or n not in before]
        for extra in added:
            if not is_staging_name(extra):
                runner.run("untag", image_id, extra)
        if not any(is_staging_name(n) for n in added):
            runner.run("tag", image_id, name)
        _check_staged(store, image_id, rows, f"podman pull {ref}")
    except BaseException:
        _undo_stage(runner, store, image_id, before)
        raise
    return image_id


def _layout_reference(layout: Path, name: str) -> tuple[str, Path | None]:
    """The ``oci:`` reference to pull ``layout`` as ``name``, and the directory to run it in.

    podman < 5 names the image ``localhost/<path>:latest`` and fails when that is no valid
    name (upper case, a component like ``tmp_``, > 255 characters). The absolute path works for
    any podman, also one in a chroot sharing the path; otherwise a path relative to the
    layout's parent makes the name ``localhost/podman-delta-staging:latest``.
    """
    path = os.path.abspath(layout)
    components = path.split("/")[1:]
    if len("localhost" + path) <= _NAME_MAX and all(
        _NAME_COMPONENT.fullmatch(c) for c in components
    ):
        return f"oci:{path}:{name}", None
    return f"oci:{layout.name}:{name}", Path(path).parent


def _undo_stage(runner: _Podman, store: Store, image_id: str, before: set[str] | None) -> None:
    """Remove the image a failed staging pull created, or the names it added to one."""
    store.refresh()
    img = store.image(image_id)
    if img is None:
        return
    if before is None:
        runner.try_run("rmi", "-f", image_id)
        return
    for extra in img.names:
        if extra not in before:
            runner.try_run("untag", image_id, extra)


def _pull_args(tls_verify: bool | None, authfile: str | None, creds: str | None) -> list[str]:
    args = []
    if tls_verify is not None:
        args.append(f"--tls-verify={'true' if tls_verify else 'false'}")
    if authfile:
        args += ["--authfile", authfile]
    if creds:
        args += ["--creds", creds]
    return args


def import_image(
    store: Store,
    reference: str,
    manifest_digest: str,
    config: bytes,
    layers: Sequence[LayerTar],
    *,
    podman: str = "podman",
    tls_verify: bool | None = None,
    authfile: str | None = None,
    creds: str | None = None,
    cache: blobcache.BlobInfoCache | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
    manifest: bytes | None = None,
) -> ImportResult:
    """Import the target image (see the module docstring); return its image ID.

    Every ``LayerTar.path`` must already be verified against its DiffID. Pass ``manifest``
    (the bytes of ``manifest_digest``) to have the config and layer digests checked against it
    before any cache row is written. ``cache`` overrides the detected blob-info-cache (tests,
    or a podman in a chroot). The staging layout is made under ``tmpdir``: on the layer tars'
    filesystem they are hard-linked into it, elsewhere copied.
    Raises :class:`StorageError`/:class:`RegistryError` after undoing its own changes.
    """
    parsed = _check_inputs(config, layers)
    if manifest is not None:
        _check_manifest(manifest, manifest_digest, config, layers)
    image_id = _hex(_sha256_bytes(config))
    runner = _Podman(podman, store)
    if cache is None:
        cache = blobcache.detect(podman)
    reason = blobcache.writable_reason(cache)
    store.options.run_root.mkdir(parents=True, exist_ok=True)
    with (
        _terminate_as_interrupt(),
        exclusive_flock(_lock_path(store)),
        _scratch_dir(tmpdir) as tmp,
    ):
        remove_stale_staging(store, podman)
        rows = _layer_rows(store, layers, tmp)
        if reason is None:
            try:
                return _import_via_pull(
                    store,
                    runner,
                    reference,
                    manifest_digest,
                    config,
                    parsed,
                    layers,
                    rows,
                    cache,
                    tmp,
                    _pull_args(tls_verify, authfile, creds),
                )
            except _CacheWriteFailed as exc:
                reason = str(exc)
        return _import_via_load(
            store, runner, reference, config, rows, cache, reason, tmp, image_id
        )


class _CacheWriteFailed(Exception):
    pass


def _import_via_pull(
    store: Store,
    runner: _Podman,
    reference: str,
    manifest_digest: str,
    config: bytes,
    parsed: dict[str, Any],
    layers: Sequence[LayerTar],
    rows: list[tuple[str, str | None, int]],
    cache: blobcache.BlobInfoCache,
    tmp: Path,
    pull_args: list[str],
) -> ImportResult:
    image_id = _hex(_sha256_bytes(config))
    staging = staging_name(manifest_digest)
    staging_config = json.dumps(synthetic_config(parsed, manifest_digest)).encode()
    staging_id = None
    pulled: list[str] = []
    start = time.monotonic()
    try:
        staging_id = _stage(runner, store, rows, staging_config, staging, tmp, "staging.tar")
        staged = time.monotonic()
        verified = [la for la in layers if la.path is not None]
        pairs = [(la.compressed_digest, la.diff_id) for la in verified]
        compressors = {la.compressed_digest: la.compression for la in verified if la.compression}
        try:
            cache.record(pairs, compressors)
        except (DeltaError, OSError) as exc:
            raise _CacheWriteFailed(f"cannot write {cache.path}: {exc}") from exc
        repo, tag = split_reference(reference)
        by_digest = f"{repo}@{manifest_digest}"
        before = {img.id for img in store.images()}
        try:
            runner.run("pull", "-q", *pull_args, by_digest)
        except _PodmanFailed as exc:
            raise RegistryError(
                f"the final `podman pull {by_digest}` failed: {exc.detail}; nothing was imported"
            ) from exc
        store.refresh()
        created = [img.id for img in store.images() if img.id not in before]
        pulled = [i for i in created if i != staging_id]
        if store.image(image_id) is None:
            raise DigestMismatchError(
                f"`podman pull {by_digest}` did not produce image {image_id[:12]} (the config "
                "given does not belong to that manifest); nothing was imported"
            )
        # The pulled image holds the layers now: remove the staging image while the tag is
        # written (two podman start-ups overlap; c/storage's locks order their writes). If that
        # removal fails, the ``finally`` below tries again.
        removal = _start_staging_removal(runner, store, staging_id)
        try:
            if tag is not None:
                runner.run("tag", image_id, f"{repo}:{tag}")
        finally:
            _wait(removal)
        pulled = []  # complete: keep it
        log.info(
            "timing: staging pull %.2f s; cache rows, final pull and tag %.2f s",
            staged - start,
            time.monotonic() - staged,
        )
        return ImportResult(
            image_id=image_id,
            cache_written=True,
            message=f"imported {reference} ({image_id[:12]}); the registry sent only the "
            f"manifest and config, and cache rows for {len(pairs)} layer(s) were recorded "
            f"in {cache.path}",
        )
    finally:
        # Also when interrupted after the staging pull made the image but before _stage
        # returned its ID (SIGTERM while the layout is being removed): look it up by its ID.
        _remove_staging(runner, store, staging_id or _hex(_sha256_bytes(staging_config)))
        for pulled_id in pulled:  # pulled but not verified/tagged: do not leave it half-done
            runner.try_run("rmi", pulled_id)


def _start_staging_removal(
    runner: _Podman, store: Store, staging_id: str
) -> subprocess.Popen[str] | None:
    """Start ``podman rmi`` of the staging image if only staging names name it."""
    store.refresh()
    img = store.image(staging_id)
    if img is None or not all(is_staging_name(n) for n in img.names):
        return None
    return runner.start("rmi", staging_id)


def _wait(proc: subprocess.Popen[str] | None) -> None:
    """Wait for a command from :meth:`_Podman.start`; stop it if interrupted meanwhile."""
    if proc is None:
        return
    _, err = _finish(proc)
    if proc.returncode != 0:
        log.debug("podman rmi of the staging image failed: %s", err.strip()[-300:])


def _remove_staging(runner: _Podman, store: Store, staging_id: str, keep: bool = False) -> None:
    """Take the staging names off image ``staging_id``; remove the image itself if nothing else
    names it and not ``keep``. Its layers stay while another image uses them."""
    store.refresh()
    img = store.image(staging_id)
    if img is None:
        return
    staging = [n for n in img.names if is_staging_name(n)]
    if keep or len(staging) < len(img.names):
        for name in staging:
            runner.try_run("untag", staging_id, name)
    else:
        runner.try_run("rmi", staging_id)


def _import_via_load(
    store: Store,
    runner: _Podman,
    reference: str,
    config: bytes,
    rows: list[tuple[str, str | None, int]],
    cache: blobcache.BlobInfoCache,
    reason: str | None,
    tmp: Path,
    image_id: str,
) -> ImportResult:
    """No cache to write: load the target config itself and tag it with the user's name."""
    staging = staging_name("sha256:" + image_id)
    existed = store.image(image_id) is not None
    loaded = None
    try:
        loaded = _stage(runner, store, rows, config, staging, tmp, "image.tar")
        repo, tag = split_reference(reference)
        runner.run("tag", loaded, f"{repo}:{tag or 'latest'}")
    except BaseException:
        if loaded is not None and not existed:
            runner.try_run("rmi", "-f", loaded)
        raise
    finally:
        if loaded is not None:
            _remove_staging(runner, store, loaded, keep=True)
    size = sum(size for _, path, size in rows if path is not None)
    return ImportResult(
        image_id=image_id,
        cache_written=False,
        message=f"imported {reference} ({image_id[:12]}) with `podman load`, but the "
        f"blob-info-cache could not be written ({reason}). The image ID and layers are "
        "right, but RepoDigests shows a local manifest digest, and a later `podman pull "
        f"{reference}` will download the changed layers' compressed blobs once more "
        f"(about {size} bytes uncompressed) before recognising them as already stored",
    )
