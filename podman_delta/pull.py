"""``podman-delta pull``: plan and run a pull that downloads deltas instead of whole layers.

:func:`plan_pull` resolves the reference the way podman does (short names, mirrors, the platform
of a manifest list), reads the target manifest and config, looks up which DiffIDs the store
already has, discovers the delta artifacts published for the target manifest and picks, per
missing layer, the cheapest way to get it: a tar-diff whose source layers are all in the store,
or the layer blob itself. :func:`execute_plan` downloads in parallel, rebuilds each layer from
the store's files, verifies every DiffID and hands the tars to the storage importer, which ends
with the real ``podman pull`` by digest.

A delta pull must never be worse for the user than a plain pull: a layer whose delta fails for
any reason (missing source, corrupt delta, digest mismatch) is fetched in full in the same run,
and :func:`pull` falls back to a plain ``podman pull`` when anything else goes wrong.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from podman_delta.errors import (
    DeltaError,
    DigestMismatchError,
    RegistryError,
    SourceError,
    StorageError,
)
from podman_delta.progress import NullProgress, human
from podman_delta.registry.artifact import DeltaArtifact, DeltaLayer, parse_artifact
from podman_delta.registry.auth import parse_creds
from podman_delta.registry.client import (
    INDEXES,
    MAX_CONFIG_SIZE,
    ClientOptions,
    ImageNotFoundError,
    MalformedManifestError,
    Manifest,
    Platform,
    RegistryClient,
    RegistryUnavailableError,
    choose_platform,
    host_platform,
)
from podman_delta.registry.config import resolve_short_name
from podman_delta.registry.discovery import find_referrers
from podman_delta.registry.image import ClientPool, ImageInfo, image_info
from podman_delta.registry.reference import ImageReference, ReferenceError, parse_reference
from podman_delta.storage import blobcache
from podman_delta.storage.importer import LayerTar, import_image
from podman_delta.storage.store import Layer, Store

log = logging.getLogger(__name__)

#: How each target layer is obtained.
PRESENT = "reused"
DELTA = "delta"
FULL = "full"

LOCK_NAME = "podman-delta.lock"
#: A rebuilt layer may be at most this many times its compressed size (or of its sources) ...
OUTPUT_FACTOR = 50
#: ... and never less than this bound: a guard against a hostile delta filling the disk.
MIN_OUTPUT_BOUND = 256 << 20
#: Errors after which a plain ``podman pull`` would fail the same way: no fallback.
NO_FALLBACK = (ReferenceError, ImageNotFoundError)


# ----------------------------------------------------------------------------- options


@dataclass
class PullOptions:
    """podman's pull flags plus podman-delta's own."""

    tls_verify: bool | None = None
    creds: str | None = None
    authfile: str | None = None
    cert_dir: str | None = None
    platform: Platform | None = None
    #: The real podman (never the pre-pull wrapper: see hooks/README.md).
    podman: str = "podman"
    jobs: int = 3
    #: Bytes per second for all downloads together (None: no limit).
    limit_rate: int | None = None
    #: Where blobs and rebuilt tars are written (default: $TMPDIR).
    workdir: str | None = None
    #: Keep completed downloads in ``workdir`` after a failure (prefetch resumes with them).
    keep_downloads: bool = False
    #: Extra podman pull arguments for the plain fallback (e.g. ``--arch``) as the user gave them.
    plain_args: list[str] = field(default_factory=list)
    #: How long to wait for a concurrent run on the same store (None: forever).
    lock_timeout: float | None = None

    def client_options(self) -> ClientOptions:
        return ClientOptions(
            tls_verify=self.tls_verify,
            creds=parse_creds(self.creds) if self.creds else None,
            authfile=self.authfile,
            certs_dir=self.cert_dir,
        )


# ----------------------------------------------------------------------------- the plan


@dataclass
class LayerPlan:
    """How one target layer is obtained."""

    index: int
    diff_id: str
    descriptor: dict  # the target manifest's layer descriptor
    how: str
    delta: DeltaLayer | None = None
    artifact: str | None = None
    source_diff_ids: tuple[str, ...] = ()
    #: Set when the delta failed and the layer was fetched in full instead.
    fallback_reason: str | None = None

    @property
    def size(self) -> int:
        return int(self.descriptor["size"])

    @property
    def fetch_bytes(self) -> int:
        if self.how == PRESENT:
            return 0
        if self.how == DELTA and self.delta is not None:
            return self.delta.size
        return self.size

    @property
    def compression(self) -> str:
        return compression_of(self.descriptor.get("mediaType", ""))


@dataclass
class PullPlan:
    """Everything decided before any layer is downloaded."""

    reference: str  # what the image is named after the pull (registry/repo:tag or @digest)
    repo: str  # repository in the registry actually used
    client: RegistryClient
    info: ImageInfo
    layers: list[LayerPlan]
    artifacts: int  # delta artifacts found for the target
    overhead: int  # bytes fetched to plan: config, artifact manifests, source configs
    image_present: bool  # the store already has this exact image under this name

    @property
    def manifest_digest(self) -> str:
        return self.info.digest

    @property
    def image_id(self) -> str:
        return self.info.config_digest.split(":", 1)[1]

    @property
    def missing(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.how != PRESENT]

    @property
    def plain_bytes(self) -> int:
        """What a plain ``podman pull`` would download: the config and every missing layer."""
        if self.image_present:
            return 0
        return len(self.info.config) + sum(lp.size for lp in self.missing)

    @property
    def planned_bytes(self) -> int:
        if self.image_present:
            return 0
        return self.overhead + sum(lp.fetch_bytes for lp in self.layers)

    def table(self) -> str:
        """The ``--dry-run`` listing: one line per layer, then the totals."""
        lines = [f"{self.reference} ({self.manifest_digest}):"]
        n = len(self.layers)
        for lp in self.layers:
            what = {
                PRESENT: "reused (already in the store)",
                DELTA: f"delta from {len(lp.source_diff_ids)} local layer(s)",
                FULL: "full layer",
            }[lp.how]
            if self.image_present:
                what = "reused (image already present)"
            fetch = human(lp.fetch_bytes) if not self.image_present else human(0)
            lines.append(
                f"  layer {lp.index + 1}/{n} {lp.diff_id[:19]}  {what:<34} "
                f"{fetch:>10}  (layer {human(lp.size)})"
            )
        lines.append(
            f"would fetch {human(self.planned_bytes)} instead of {human(self.plain_bytes)} "
            f"({saving_pct(self.planned_bytes, self.plain_bytes):.1f}% saved); "
            f"{self.artifacts} delta artifact(s) found"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "image_id": self.image_id,
            "image_present": self.image_present,
            "artifacts": self.artifacts,
            "planned_bytes": self.planned_bytes,
            "plain_bytes": self.plain_bytes,
            "saving_percent": round(saving_pct(self.planned_bytes, self.plain_bytes), 1),
            "layers": [
                {
                    "diff_id": lp.diff_id,
                    "digest": lp.descriptor["digest"],
                    "size": lp.size,
                    "how": "reused" if self.image_present else lp.how,
                    "fetch_bytes": 0 if self.image_present else lp.fetch_bytes,
                    "delta": lp.delta.descriptor["digest"] if lp.delta else None,
                    "source_diff_ids": list(lp.source_diff_ids),
                }
                for lp in self.layers
            ],
        }


@dataclass
class PullResult:
    """What a pull did; :meth:`summary` is the one line the command prints."""

    reference: str
    status: str  # "pulled" | "up-to-date" | "plain" | "planned"
    image_id: str | None = None
    manifest_digest: str | None = None
    fetched_bytes: int = 0
    plain_bytes: int = 0
    seconds: float = 0.0
    layers: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    reason: str | None = None
    #: Whether ``fetched_bytes`` was measured (False after a plain pull: it is an estimate).
    measured: bool = True

    @property
    def saving(self) -> float:
        return saving_pct(self.fetched_bytes, self.plain_bytes)

    def summary(self) -> str:
        image = f" ({self.image_id[:12]})" if self.image_id else ""
        counts = ", ".join(f"{n} {k}" for k, n in self.layers.items() if n)
        counts = f"; layers: {counts}" if counts else ""
        took = f"in {self.seconds:.1f} s"
        if self.status == "up-to-date":
            return f"{self.reference}{image} is up to date: fetched 0 B {took}"
        if self.status == "plain":
            return (
                f"{self.reference}{image}: plain podman pull ({self.reason}): about "
                f"{human(self.plain_bytes)} fetched, no saving, {took}"
            )
        verb = "would fetch" if self.status == "planned" else "fetched"
        return (
            f"{self.reference}{image}: {verb} {human(self.fetched_bytes)} instead of "
            f"{human(self.plain_bytes)} ({self.saving:.1f}% saved) {took}{counts}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "status": self.status,
            "image_id": self.image_id,
            "manifest_digest": self.manifest_digest,
            "fetched_bytes": self.fetched_bytes,
            "plain_bytes": self.plain_bytes,
            "saving_percent": round(self.saving, 1),
            "seconds": round(self.seconds, 3),
            "layers": self.layers,
            "fallbacks": self.fallbacks,
            "reason": self.reason,
            "measured": self.measured,
        }


def saving_pct(fetched: int, plain: int) -> float:
    if plain <= 0:
        return 0.0
    return max(0.0, 100.0 * (plain - fetched) / plain)


def compression_of(media_type: str) -> str:
    """The c/image compressor name of a layer media type (blob-info-cache rows need it)."""
    if media_type.endswith("+zstd") or "zstd" in media_type:
        return "zstd"
    if media_type.endswith("gzip") or media_type.endswith(".tar.gzip") or "gzip" in media_type:
        return "gzip"
    if media_type.endswith(".tar") or media_type.endswith("tar"):
        return "uncompressed"
    return "gzip"  # docker's rootfs.diff.tar.gzip and unknown types: sniffed when decompressed


# ----------------------------------------------------------------------------- resolution


@dataclass
class Resolved:
    """The reference podman would end up with, and where its manifest came from."""

    name: ImageReference  # the logical name (candidate), tag defaulted
    client: RegistryClient
    target: ImageReference  # the endpoint actually used (a mirror, maybe)
    info: ImageInfo


def resolve(ref_text: str, pool: ClientPool, platform: Platform | None) -> Resolved:
    """Short-name candidates × mirrors in podman's order; the first that has the image wins."""
    ref = parse_reference(ref_text)
    platform = platform or host_platform()
    errors: list[RegistryError] = []
    for candidate in resolve_short_name(ref, pool.conf):
        for endpoint, target in pool.conf.pull_endpoints(candidate):
            client = pool.client(target.registry or "", endpoint.insecure)
            try:
                manifest = client.get_manifest(target.repository, target.ref)
            except (ImageNotFoundError, RegistryUnavailableError) as exc:
                log.debug("%s: %s", target, exc)
                errors.append(exc)
                continue
            info = _load_image(client, target, manifest, platform)
            name = candidate
            if name.tag is None and name.digest is None:
                name = name.with_tag("latest")
            return Resolved(name, client, target, info)
    if len(errors) == 1:
        raise errors[0]
    tried = "; ".join(str(e) for e in errors[-3:])
    raise ImageNotFoundError(f"{ref_text} not found in any configured registry ({tried})")


def _load_image(
    client: RegistryClient, target: ImageReference, m: Manifest, platform: Platform
) -> ImageInfo:
    index_digest = None
    if m.media_type in INDEXES:
        index_digest = m.digest
        desc = choose_platform(m.json(), platform)
        m = client.get_manifest(target.repository, desc["digest"])
        if m.media_type in INDEXES:
            raise MalformedManifestError(f"{target}: nested manifest lists are not supported")
    config = client.get_blob_bytes(target.repository, m.json()["config"]["digest"], MAX_CONFIG_SIZE)
    return image_info(m, config, index_digest)


# ----------------------------------------------------------------------------- planning


def _image_present(store: Store, info: ImageInfo, name: str) -> bool:
    """The store has this image (same config) under ``name`` with this manifest recorded."""
    img = store.image(info.config_digest.split(":", 1)[1])
    if img is None:
        return False
    digests = set(img.raw.get("digests") or []) | ({img.digest} if img.digest else set())
    return info.digest in digests and ("@" in name or name in img.names)


def _artifacts(
    client: RegistryClient, repo: str, info: ImageInfo, count: Callable[[int], None]
) -> list[DeltaArtifact]:
    """Every valid delta artifact whose target is ``info``; broken ones are skipped."""
    found: list[DeltaArtifact] = []
    try:
        descs = find_referrers(client, repo, info.digest)
    except RegistryError as exc:
        log.info("cannot list the deltas of %s (%s); pulling whole layers", info.digest, exc)
        return found

    def fetch(desc: dict) -> bytes:
        if desc["digest"] == info.digest:
            return info.manifest.data
        if desc["digest"] == info.config_digest:
            return info.config
        data = client.get_blob_bytes(repo, desc["digest"], MAX_CONFIG_SIZE)
        count(len(data))
        return data

    for desc in descs:
        try:
            m = client.get_manifest(repo, desc["digest"])
            count(len(m.data))
            art = parse_artifact(m.data, desc["digest"])
            if art.target != info.digest:
                continue
            found.append(art.resolve(fetch))
        except DeltaError as exc:
            log.warning("ignoring delta artifact %s: %s", desc.get("digest"), exc)
    return found


def _source_ids(
    layer: DeltaLayer,
    art: DeltaArtifact,
    client: RegistryClient,
    repo: str,
    configs: dict[str, list[str] | None],
    count: Callable[[int], None],
) -> tuple[str, ...] | None:
    """The DiffIDs a delta needs: its own list, else all layers of the artifact's source."""
    if layer.source_diff_ids is not None:
        return layer.source_diff_ids
    key = art.source_config
    if key not in configs:
        try:
            data = client.get_blob_bytes(repo, key, MAX_CONFIG_SIZE)
            count(len(data))
            ids = json.loads(data)["rootfs"]["diff_ids"]
            configs[key] = [str(i) for i in ids]
        except (DeltaError, ValueError, KeyError, TypeError) as exc:
            log.info("source config %s of delta %s unusable: %s", key, art.digest, exc)
            configs[key] = None
    ids = configs[key]
    return tuple(ids) if ids else None


def plan_pull(ref_text: str, store: Store, pool: ClientPool, options: PullOptions) -> PullPlan:
    """Decide, per layer of the target, how to get it (no layer is downloaded here)."""
    res = resolve(ref_text, pool, options.platform)
    info, client, repo = res.info, res.client, res.target.repository
    overhead = [len(info.config)]

    def count(n: int) -> None:
        overhead[0] += n

    store.refresh()
    layers = [
        LayerPlan(i, diff_id, desc, PRESENT if store.has_diff_id(diff_id) else FULL)
        for i, (diff_id, desc) in enumerate(zip(info.diff_ids, info.layers, strict=True))
    ]
    present = _image_present(store, info, str(res.name))
    artifacts: list[DeltaArtifact] = []
    if not present and any(lp.how != PRESENT for lp in layers):
        artifacts = _artifacts(client, repo, info, count)
        configs: dict[str, list[str] | None] = {}
        for lp in layers:
            if lp.how == PRESENT:
                continue
            _choose_delta(lp, artifacts, store, client, repo, configs, count)
    return PullPlan(
        reference=str(res.name),
        repo=repo,
        client=client,
        info=info,
        layers=layers,
        artifacts=len(artifacts),
        overhead=overhead[0],
        image_present=present,
    )


def _choose_delta(
    lp: LayerPlan,
    artifacts: Sequence[DeltaArtifact],
    store: Store,
    client: RegistryClient,
    repo: str,
    configs: dict[str, list[str] | None],
    count: Callable[[int], None],
) -> None:
    """Pick the smallest delta for ``lp`` whose sources are all local, if smaller than the layer."""
    best: tuple[int, DeltaLayer, DeltaArtifact, tuple[str, ...]] | None = None
    for art in artifacts:
        layer = art.layer_for(lp.descriptor["digest"])
        if layer is None or not layer.is_delta or layer.to_diff_id != lp.diff_id:
            continue
        if best is not None and layer.size >= best[0]:
            continue
        ids = _source_ids(layer, art, client, repo, configs, count)
        if not ids or not all(store.has_diff_id(i) for i in ids):
            continue
        best = (layer.size, layer, art, ids)
    if best is not None and best[0] < lp.size:
        lp.how, lp.delta, lp.artifact, lp.source_diff_ids = DELTA, best[1], best[2].digest, best[3]


# ----------------------------------------------------------------------------- downloads


class RateLimiter:
    """A token bucket shared by every download of a run (``--limit-rate``).

    It is fed from the download progress callback: sleeping there stops the reader, the socket
    buffer fills and TCP slows the sender, so the cap holds on the wire too (on average, over
    a second or so).
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        if rate <= 0:
            raise DeltaError("--limit-rate must be a positive number of bytes per second")
        self.rate = float(rate)
        self.capacity = float(burst or max(rate, 64 << 10))
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int, cancelled: threading.Event | None = None) -> None:
        """Take ``n`` bytes' worth of tokens, sleeping as needed (cut short by ``cancelled``)."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            if cancelled is None:
                time.sleep(wait)
            else:
                cancelled.wait(wait)


class _Meter:
    """Counts downloaded bytes across threads and drives the display and the rate limit."""

    def __init__(self, progress: NullProgress, limiter: RateLimiter | None) -> None:
        self.progress = progress
        self.limiter = limiter
        self.total = 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Set when the run is aborting: running downloads stop at their next chunk instead of
        #: keeping the process alive (worker threads are joined at exit) until they finish.
        self.cancelled = threading.Event()

    def callback(self, key: str) -> Callable[[str, int, int | None], None]:
        def cb(_digest: str, done: int, _size: int | None) -> None:
            if self.cancelled.is_set():
                raise DeltaError("download cancelled: the pull is stopping")
            with self._lock:
                prev = self._seen.get(key, 0)
                step = done - prev if done >= prev else done  # a restart counts again
                self._seen[key] = done
                self.total += step
            if self.limiter is not None and step > 0:
                self.limiter.consume(step, self.cancelled)
                if self.cancelled.is_set():
                    raise DeltaError("download cancelled: the pull is stopping")
            self.progress.update(key, done)

        return cb

    def reset(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)


def _fetch(
    client: RegistryClient, repo: str, desc: dict, dest: Path, meter: _Meter, key: str
) -> Path:
    """Download one blob (or reuse a complete earlier download: blobs are verified when
    written, and an interrupted download removes its file)."""
    if dest.exists() and dest.stat().st_size == desc["size"]:
        meter.progress.update(key, desc["size"])
        return dest
    meter.reset(key)
    return client.get_blob(
        repo, desc["digest"], dest, size=desc["size"], progress=meter.callback(key)
    )


class _HashingWriter:
    """A file that hashes what is written to it (the DiffID of a decompressed layer)."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0
        self.limit = limit

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise DigestMismatchError(f"decompressed layer exceeds {self.limit} bytes")
        self.h.update(data)
        return self.f.write(data)


def decompress_layer(blob: Path, out: Path, diff_id: str, limit: int) -> None:
    """Decompress a layer blob (gzip, zstd or plain tar) to ``out`` and verify its DiffID."""
    with open(blob, "rb") as f:
        head = f.read(4)
    try:
        with open(blob, "rb") as src, open(out, "wb") as dst:
            w = _HashingWriter(dst, limit)
            if head[:2] == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=src) as gz:
                    shutil.copyfileobj(gz, w, 1 << 20)  # type: ignore[misc]
            elif head == b"\x28\xb5\x2f\xfd":
                dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
                with dctx.stream_reader(src, read_across_frames=True) as zr:
                    shutil.copyfileobj(zr, w, 1 << 20)  # type: ignore[misc]
            else:
                shutil.copyfileobj(src, w, 1 << 20)  # type: ignore[misc]
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        out.unlink(missing_ok=True)
        raise DigestMismatchError(f"layer {diff_id[:19]} cannot be decompressed: {exc}") from exc
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    got = "sha256:" + w.h.hexdigest()
    if got != diff_id:
        out.unlink(missing_ok=True)
        raise DigestMismatchError(
            f"layer blob decompresses to {got}, not the DiffID {diff_id} the config names"
        )


def open_layers_source(store: Store, diff_ids: Sequence[str]):  # type: ignore[no-untyped-def]
    """A patcher source over exactly the layers ``diff_ids`` (lowest first), as stacked.

    A single layer is read alone; a chain that is one image's bottom layers is read as that
    image sees it (vfs keeps the merged tree in the top layer's directory). Anything else on
    vfs cannot be reconstructed from directories: the caller falls back to the full layer.
    """
    layers: list[Layer] = []
    for d in diff_ids:
        layer = store.layer_by_diff_id(d)
        if layer is None:
            raise SourceError(f"source layer {d[:19]} is no longer in the store")
        layers.append(layer)
    if len(layers) == 1:
        return store.layer_source(diff_ids[0])
    if store.driver == "vfs":
        chain = _chain_with(store, list(diff_ids))
        if chain is None:
            raise SourceError("source layers are not one stack in the vfs store")
        return store.layers_source(chain)
    return store.layers_source(layers)


def _chain_with(store: Store, diff_ids: list[str]) -> list[Layer] | None:
    """Stored layers forming exactly ``diff_ids`` as a parent chain (vfs needs one)."""
    for top in store.layers():
        if top.diff_digest != diff_ids[-1] or top.incomplete:
            continue
        chain: list[Layer] = []
        cur: Layer | None = top
        while cur is not None:
            chain.append(cur)
            cur = store.layer(cur.parent) if cur.parent else None
        chain.reverse()
        if [la.diff_digest for la in chain] == diff_ids:
            return chain
    return None


def _output_bound(store: Store, lp: LayerPlan) -> int:
    sources = 0
    for d in lp.source_diff_ids:
        layer = store.layer_by_diff_id(d)
        sources += int(layer.diff_size or 0) if layer else 0
    return max(MIN_OUTPUT_BOUND, OUTPUT_FACTOR * lp.size, 4 * sources)


def _apply_delta(store: Store, lp: LayerPlan, delta: Path, out: Path) -> None:
    from podman_delta.tardiff.patcher import apply

    source = open_layers_source(store, lp.source_diff_ids)
    try:
        with open(delta, "rb") as df, open(out, "wb") as of:
            apply(df, source, of, expected_digest=lp.diff_id, max_output=_output_bound(store, lp))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        source.close()


def _layer_label(lp: LayerPlan, total: int) -> str:
    return f"layer {lp.index + 1}/{total} {lp.diff_id[7:19]}"


def _get_layer(plan: PullPlan, store: Store, lp: LayerPlan, work: Path, meter: _Meter) -> Path:
    """The verified uncompressed tar of ``lp``: from its delta, else from the full blob."""
    n = len(plan.layers)
    label = _layer_label(lp, n)
    hexid = lp.diff_id.split(":", 1)[1]
    out = work / f"{hexid}.tar"
    if lp.how == DELTA and lp.delta is not None:
        key = f"{hexid}:delta"
        meter.progress.add(key, f"{label} (delta)", lp.delta.size)
        desc = lp.delta.descriptor
        try:
            blob = _fetch(plan.client, plan.repo, desc, work / desc["digest"][7:], meter, key)
            _apply_delta(store, lp, blob, out)
            blob.unlink(missing_ok=True)
            meter.progress.finish(key, f"rebuilt from a {human(lp.delta.size)} delta")
            return out
        except (DeltaError, OSError) as exc:
            lp.fallback_reason = str(exc)
            meter.progress.finish(key, "delta failed; fetching the full layer")
            meter.progress.message(f"{label}: delta failed ({exc}); fetching the full layer")
            log.info("%s: delta failed (%s); fetching the full layer", label, exc)
    key = f"{hexid}:full"
    meter.progress.add(key, label, lp.size)
    blob = _fetch(
        plan.client, plan.repo, lp.descriptor, work / lp.descriptor["digest"][7:], meter, key
    )
    decompress_layer(blob, out, lp.diff_id, max(MIN_OUTPUT_BOUND, OUTPUT_FACTOR * lp.size))
    blob.unlink(missing_ok=True)  # only the uncompressed tar is imported
    meter.progress.finish(key, "done")
    return out


def _get_layers(
    plan: PullPlan,
    store: Store,
    todo: Sequence[LayerPlan],
    work: Path,
    meter: _Meter,
    jobs: int,
) -> dict[int, Path]:
    """Fetch and rebuild the missing layers in parallel; the first hard failure cancels the
    rest without waiting for running downloads (they die with their temporary directory)."""
    ex = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="layer")
    futures = {lp.index: ex.submit(_get_layer, plan, store, lp, work, meter) for lp in todo}
    paths: dict[int, Path] = {}
    try:
        for index, fut in futures.items():
            paths[index] = fut.result()
    except BaseException:
        meter.cancelled.set()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return paths


def execute_plan(
    plan: PullPlan,
    store: Store,
    options: PullOptions,
    progress: NullProgress | None = None,
) -> PullResult:
    """Download, rebuild, verify and import; raise on anything but a per-layer delta failure."""
    progress = progress or NullProgress()
    start = time.monotonic()
    limiter = RateLimiter(options.limit_rate) if options.limit_rate else None
    meter = _Meter(progress, limiter)
    result = PullResult(
        reference=plan.reference,
        status="up-to-date",
        image_id=plan.image_id,
        manifest_digest=plan.manifest_digest,
        plain_bytes=plan.plain_bytes,
    )
    if plan.image_present:
        result.layers = {PRESENT: len(plan.layers)}
        return result
    cache = _detect_cache_soon(options.podman)
    with _workdir(options) as work:
        todo = plan.missing
        paths: dict[int, Path] = {}
        if todo:
            paths = _get_layers(plan, store, todo, work, meter, options.jobs)
        log.info(
            "timing: %d layer(s) downloaded and rebuilt in %.2f s",
            len(todo),
            time.monotonic() - start,
        )
        progress.close()
        tars = [
            LayerTar(
                diff_id=lp.diff_id,
                compressed_digest=lp.descriptor["digest"],
                compression=lp.compression,
                path=str(paths[lp.index]) if lp.index in paths else None,
            )
            for lp in plan.layers
        ]
        progress.message(f"importing {plan.reference}")
        imported_from = time.monotonic()
        imported = import_image(
            store,
            plan.reference,
            plan.manifest_digest,
            plan.info.config,
            tars,
            podman=options.podman,
            tls_verify=options.tls_verify,
            authfile=options.authfile,
            creds=options.creds,
            tmpdir=str(work),
            manifest=plan.info.manifest.data,
            cache=cache(),
        )
        if not imported.cache_written:
            log.warning("%s", imported.message)
        log.info("timing: imported in %.2f s", time.monotonic() - imported_from)
    result.status = "pulled"
    result.image_id = imported.image_id
    result.fetched_bytes = plan.overhead + meter.total
    result.seconds = time.monotonic() - start
    fell = [lp for lp in todo if lp.fallback_reason]
    result.layers = {
        DELTA: sum(1 for lp in todo if lp.how == DELTA and not lp.fallback_reason),
        FULL: sum(1 for lp in todo if lp.how == FULL) + len(fell),
        PRESENT: len(plan.layers) - len(todo),
    }
    result.fallbacks = [f"{lp.diff_id}: {lp.fallback_reason}" for lp in fell]
    return result


def _detect_cache_soon(podman: str) -> Callable[[], blobcache.BlobInfoCache | None]:
    """Find the blob-info-cache the importer writes (``podman --version``, ~40 ms) while the
    layers download; the returned call waits for it. None when that failed: the importer
    then detects it itself and reports the error."""
    found: list[blobcache.BlobInfoCache] = []

    def work() -> None:
        try:
            found.append(blobcache.detect(podman))
        except Exception as exc:  # reported by the importer's own detection
            log.debug("cannot detect the blob-info-cache yet: %s", exc)

    thread = threading.Thread(target=work, name="detect-cache", daemon=True)
    thread.start()

    def get() -> blobcache.BlobInfoCache | None:
        thread.join()
        return found[0] if found else None

    return get


@contextlib.contextmanager
def _workdir(options: PullOptions) -> Iterator[Path]:
    """A scratch directory; with ``keep_downloads`` a fixed one whose blobs survive failures."""
    if options.keep_downloads and options.workdir:
        path = Path(options.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        shutil.rmtree(path, ignore_errors=True)  # only after success: a failure keeps blobs
        return
    if options.workdir:
        Path(options.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="podman-delta-pull-", dir=options.workdir) as tmp:
        yield Path(tmp)


# ----------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def store_lock(
    store: Store,
    on_wait: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Serialize podman-delta runs on one store (``<runroot>/podman-delta.lock``, flock).

    The holder writes its pid and command into the file, so a waiter can say what it waits for.
    """
    path = store.options.run_root / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        waited = 0.0
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc
            if timeout is not None and waited >= timeout:
                raise StorageError(
                    f"another podman-delta run ({_holder(fd)}) holds {path}; try again later"
                )
            if not told and on_wait is not None:
                on_wait(f"waiting for another podman-delta run ({_holder(fd)}) holding {path}")
                told = True
            time.sleep(0.2)
            waited += 0.2
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(_argv())}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def _argv() -> list[str]:
    import sys

    return ["podman-delta", *sys.argv[1:]][:12]


# ----------------------------------------------------------------------------- plain pull


def plain_pull_command(ref_text: str, store: Store, options: PullOptions, quiet: bool) -> list[str]:
    """The ``podman pull`` the user would have run, with the same store and flags."""
    cmd = [options.podman, *store.options.podman_args(), "pull"]
    if quiet:
        cmd.append("-q")
    if options.tls_verify is not None:
        cmd.append(f"--tls-verify={'true' if options.tls_verify else 'false'}")
    if options.creds:
        cmd.append(f"--creds={options.creds}")
    if options.authfile:
        cmd.append(f"--authfile={options.authfile}")
    if options.cert_dir:
        cmd.append(f"--cert-dir={options.cert_dir}")
    cmd += options.plain_args
    cmd.append(ref_text)
    return cmd


def plain_pull(ref_text: str, store: Store, options: PullOptions, quiet: bool) -> str | None:
    """Run the real ``podman pull``; its progress goes to stderr. Return the image ID."""
    cmd = plain_pull_command(ref_text, store, options, quiet=True)
    log.debug("running %s", " ".join(cmd))
    env = dict(os.environ, PODMAN_DELTA_DISABLE="1")
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None,
            text=True,
            env=env,
        )
    except OSError as exc:
        raise StorageError(f"cannot run {options.podman}: {exc.strerror}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()
        raise RegistryError(
            f"plain `podman pull {ref_text}` failed too (exit {proc.returncode})"
            + (f": {detail[-1]}" if detail else "")
        )
    out = proc.stdout.strip().splitlines()
    return out[-1] if out else None


# ----------------------------------------------------------------------------- entry point


def pull(
    ref_text: str,
    store: Store,
    options: PullOptions,
    *,
    progress: NullProgress | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    notify: Callable[[str], None] | None = None,
    fallback: bool = True,
) -> PullResult | PullPlan:
    """Delta-pull ``ref_text`` into ``store``; a plan with ``dry_run``.

    Falls back to a plain ``podman pull`` (and says why through ``notify``) when the delta path
    fails for a reason a plain pull might not share.
    """
    start = time.monotonic()
    progress = progress or NullProgress()
    notify = notify or (lambda _msg: None)
    pool = ClientPool(options.client_options())
    try:
        if dry_run:
            return plan_pull(ref_text, store, pool, options)
        with store_lock(store, notify, options.lock_timeout):
            plan: PullPlan | None = None
            try:
                _remove_stale_staging(store, options)
                plan = plan_pull(ref_text, store, pool, options)
                log.info("timing: planned in %.2f s", time.monotonic() - start)
                result = execute_plan(plan, store, options, progress)
            except NO_FALLBACK:
                raise
            except (DeltaError, OSError) as exc:
                if not fallback:
                    raise
                progress.close()
                reason = _one_line(exc)
                notify(f"delta pull failed ({reason}); running a plain podman pull")
                image_id = plain_pull(ref_text, store, options, quiet)
                plain = plan.plain_bytes if plan is not None else 0
                result = PullResult(
                    reference=ref_text,
                    status="plain",
                    image_id=image_id,
                    fetched_bytes=plain,
                    plain_bytes=plain,
                    reason=reason,
                    measured=False,
                )
    finally:
        pool.close()
    result.seconds = time.monotonic() - start
    return result


def _remove_stale_staging(store: Store, options: PullOptions) -> None:
    """Remove a staging image a killed run left, BEFORE planning: its layers would count as
    present, then vanish when the import removes it, and the delta pull would fail."""
    from podman_delta.storage.importer import _lock_path, remove_stale_staging
    from podman_delta.storage.locks import exclusive_flock

    with exclusive_flock(_lock_path(store)):
        if remove_stale_staging(store, options.podman):
            store.refresh()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
