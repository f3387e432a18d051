"""Make the deltas from one image to another and push them as a delta artifact.

Works registry to registry without podman and without extracting layers: the old image's layer
blobs and the new image's changed layer blobs are downloaded into a work directory, decompressed
once to plain tars (checked against the configs' DiffIDs) and handed to the differ.

Per new layer that the old image lacks (by DiffID), candidate deltas are:

* against **all** old layers stacked (lowest first): the most reuse;
* against the **single** old layer sharing the most file paths (only when the old image has
  several layers): usable by any client holding that one layer, from any image. When that layer
  alone holds at least 99 % of what all old layers share with the new one (by path and size),
  the stacked delta is skipped: it could not be meaningfully smaller.

Each candidate is self-tested (applied to its sources and compared with the DiffID) before it
can be chosen. The single-layer delta wins when it is within 5 % of the stacked one. If no
candidate is smaller than the layer blob itself, the artifact lists the original blob.

Publishing is idempotent: an artifact for the same (source, target) found through discovery
means nothing is pushed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from podman_delta.errors import DeltaError, DigestMismatchError, RegistryError
from podman_delta.registry.artifact import (
    ANN_SOURCE,
    ANN_TARGET,
    ARTIFACT_TYPE,
    EMPTY_DATA,
    EMPTY_DIGEST,
    TAR_DIFF,
    LayerPlan,
    build_manifest,
)
from podman_delta.registry.client import OCI_MANIFEST, Platform, RegistryClient, sha256_digest
from podman_delta.registry.discovery import (
    add_referrer_to_fallback,
    find_referrers,
    referrer_descriptor,
)
from podman_delta.registry.image import ClientPool, ImageInfo, ImageSource, RegistryImageSource
from podman_delta.registry.reference import parse_reference
from podman_delta.tardiff.tarindex import scan, sniff_compression

log = logging.getLogger(__name__)

#: Prefer the single-layer delta when it is at most this much larger than the stacked one.
SINGLE_SLACK = 1.05
_CHUNK = 1 << 20
_FALLBACK_TAG = re.compile(r"^sha256-[0-9a-f]{64}$")


@dataclass
class PublishOptions:
    """Knobs for making deltas."""

    jobs: int = 2
    dry_run: bool = False
    workdir: str | None = None
    try_single: bool = True
    self_test: bool = True
    level: int = 19
    chunk_size: int | None = None
    report: Callable[[str], None] | None = None


@dataclass
class Candidate:
    label: str  # "stacked" | "single"
    source_diff_ids: tuple[str, ...]
    path: Path | None = None
    size: int | None = None
    error: str | None = None


@dataclass
class LayerResult:
    """What the artifact will carry for one changed target layer."""

    index: int
    to_digest: str
    diff_id: str
    blob_size: int
    media_type: str
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None  # None: ship the original layer
    blob_path: Path | None = None  # downloaded original blob (for archives)

    @property
    def payload_size(self) -> int:
        return self.chosen.size if self.chosen and self.chosen.size is not None else self.blob_size

    def plan(self) -> LayerPlan:
        if self.chosen is None:
            desc = {"mediaType": self.media_type, "digest": self.to_digest, "size": self.blob_size}
            return LayerPlan(self.to_digest, desc)
        assert self.chosen.path is not None and self.chosen.size is not None
        digest = _file_digest(self.chosen.path)
        desc = {"mediaType": TAR_DIFF, "digest": digest, "size": self.chosen.size}
        return LayerPlan(self.to_digest, desc, self.chosen.source_diff_ids)


@dataclass
class DeltaSet:
    """The deltas from ``source`` to ``target``, ready to push or to write as a file."""

    source: ImageInfo
    target: ImageInfo
    layers: list[LayerResult]
    reused: list[tuple[str, str]]

    def manifest(self) -> bytes:
        return build_manifest(
            self.target.manifest,
            self.target.config,
            self.source.digest,
            self.source.config_digest,
            [r.plan() for r in self.layers],
            self.reused,
        )

    def table(self) -> str:
        """Human-readable sizes, one row per changed layer."""
        rows = [f"{'layer':<19} {'blob':>12} {'stacked':>12} {'single':>12}  shipped"]
        for r in self.layers:
            sizes = {c.label: c.size for c in r.candidates}
            shipped = f"{r.chosen.label} delta" if r.chosen else "original layer"
            rows.append(
                f"{r.to_digest[7:19]:<19} {r.blob_size:>12} {_fmt(sizes.get('stacked')):>12} "
                f"{_fmt(sizes.get('single')):>12}  {shipped}"
            )
        total_blob = sum(r.blob_size for r in self.layers)
        total = sum(r.payload_size for r in self.layers)
        rows.append(
            f"{len(self.layers)} changed layer(s), {len(self.reused)} reused: {total} bytes "
            f"instead of {total_blob}"
        )
        return "\n".join(rows)


@dataclass
class PublishResult:
    old: str
    new: str
    deltas: DeltaSet | None
    artifact_digest: str | None
    pushed: bool
    existing: bool
    bytes_pushed: int = 0


def _fmt(size: int | None) -> str:
    return "-" if size is None else str(size)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# -- plan


def plan_layers(old: ImageInfo, new: ImageInfo) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of target layers the source lacks (by DiffID), and reused (digest, DiffID)."""
    have = set(old.diff_ids)
    changed, reused = [], []
    for i, (desc, diff_id) in enumerate(zip(new.layers, new.diff_ids, strict=True)):
        if diff_id in have:
            reused.append((desc["digest"], diff_id))
        elif i not in changed:
            changed.append(i)
    # The same new layer twice in one image: one delta is enough.
    seen: set[str] = set()
    unique = []
    for i in changed:
        if new.diff_ids[i] not in seen:
            seen.add(new.diff_ids[i])
            unique.append(i)
    return unique, reused


# -- workspace


class Workspace:
    """Downloaded blobs and their plain tars, by digest, shared by several publishes."""

    def __init__(self, root: str | None = None) -> None:
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="podman-delta-publish-")
        self.root = Path(root) if root else Path(self._tmp.name)  # type: ignore[union-attr]
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tars").mkdir(exist_ok=True)
        (self.root / "deltas").mkdir(exist_ok=True)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest.split(":", 1)[1]

    def tar(self, diff_id: str) -> Path:
        return self.root / "tars" / (diff_id.split(":", 1)[1] + ".tar")

    def fetch(self, src: ImageSource, desc: dict) -> Path:
        path = self.blob(desc["digest"])
        if not (path.exists() and path.stat().st_size == desc["size"]):
            src.fetch_blob(desc, path)
        return path

    def untar(self, blob: Path, diff_id: str) -> Path:
        """Decompress ``blob`` to a plain tar named by DiffID, checking the DiffID."""
        dest = self.tar(diff_id)
        if dest.exists():
            return dest
        kind = sniff_compression(blob)
        tmp = dest.with_name(f"{dest.name}.{threading.get_ident()}.partial")
        h = hashlib.sha256()
        with open(blob, "rb") as raw, open(tmp, "wb") as out:
            reader: object
            if kind == "gzip":
                reader = gzip.GzipFile(fileobj=raw)
            elif kind == "zstd":
                reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                    raw, read_across_frames=True
                )
            elif kind == "none":
                reader = raw
            else:
                raise DeltaError(f"layer {blob.name} uses {kind} compression, not supported")
            try:
                while chunk := reader.read(_CHUNK):  # type: ignore[attr-defined]
                    h.update(chunk)
                    out.write(chunk)
            except (OSError, EOFError, zstandard.ZstdError) as exc:
                tmp.unlink(missing_ok=True)
                raise DigestMismatchError(f"layer blob {blob.name} is corrupt: {exc}") from exc
        if "sha256:" + h.hexdigest() != diff_id:
            tmp.unlink(missing_ok=True)
            raise DigestMismatchError(
                f"layer blob sha256:{blob.name} does not decompress to DiffID {diff_id}: the "
                "image is inconsistent (manifest and config disagree)"
            )
        os.replace(tmp, dest)
        return dest


def _paths(tar: Path) -> dict[str, int]:
    with open(tar, "rb") as f:
        return {e.path: e.size for e in scan(f) if e.is_regular}


@dataclass(frozen=True)
class Overlap:
    """How much of a new layer (file bytes, matched by path) each old layer could provide."""

    best: int | None  # index of the old layer providing the most
    best_score: int
    union_score: int

    @property
    def single_suffices(self) -> bool:
        """One old layer holds (nearly) everything any of them holds: skip the stacked diff."""
        return self.best is not None and self.best_score >= 0.99 * self.union_score


def overlap(old_tars: Sequence[Path], new_tar: Path) -> Overlap:
    """Score the old layers against ``new_tar`` by shared regular-file paths (sizes)."""
    new_files = _paths(new_tar)
    scores, union = [], 0
    matched: set[str] = set()
    for t in old_tars:
        old_files = _paths(t)
        hits = [p for p in new_files if p in old_files]
        scores.append(sum(new_files[p] + 1 for p in hits))
        matched.update(hits)
    union = sum(new_files[p] + 1 for p in matched)
    if not scores or max(scores) == 0:
        return Overlap(None, 0, union)
    best = max(range(len(scores)), key=lambda i: scores[i])
    return Overlap(best, scores[best], union)


# -- making deltas


def _self_test(delta: Path, sources: Sequence[Path], diff_id: str) -> None:
    from podman_delta.tardiff.patcher import apply
    from podman_delta.tardiff.sources import open_source

    class _Null:
        def write(self, data: bytes) -> int:
            return len(data)

    source = open_source(list(sources))
    try:
        with open(delta, "rb") as f:
            apply(f, source, _Null(), expected_digest=diff_id)  # type: ignore[arg-type]
    finally:
        source.close()


def _make_candidate(
    cand: Candidate,
    sources: Sequence[Path],
    new_tar: Path,
    out: Path,
    diff_id: str,
    opts: PublishOptions,
    threads: int,
) -> None:
    from podman_delta.tardiff.differ import DiffOptions, diff_file

    options = DiffOptions(
        level=opts.level, threads=threads, tmpdir=str(out.parent), check_size=False
    )
    try:
        stats = diff_file([str(p) for p in sources], str(new_tar), out, options)
        if opts.self_test:
            _self_test(out, sources, diff_id)
    except DeltaError as exc:
        log.warning("%s delta for %s failed: %s", cand.label, diff_id, exc)
        out.unlink(missing_ok=True)
        cand.error = str(exc)
        return
    cand.path, cand.size = out, stats.delta_size


def _choose(result: LayerResult) -> None:
    ok = {c.label: c for c in result.candidates if c.size is not None}
    if not ok:
        result.chosen = None
        return
    best = min(ok.values(), key=lambda c: c.size or 0)
    single = ok.get("single")
    if single and single.size is not None and single.size <= (best.size or 0) * SINGLE_SLACK:
        best = single
    result.chosen = best if best.size is not None and best.size < result.blob_size else None


def make_deltas(
    old_src: ImageSource,
    new_src: ImageSource,
    ws: Workspace,
    opts: PublishOptions,
) -> DeltaSet:
    """Download what is needed and compute, self-test and choose a delta per changed layer."""
    old, new = old_src.image(), new_src.image()
    changed, reused = plan_layers(old, new)
    report = opts.report or (lambda _msg: None)
    report(
        f"{len(changed)} changed layer(s), {len(reused)} reused; "
        f"downloading {len(old.layers)} old and {len(changed)} new layer blob(s)"
    )
    jobs = max(1, opts.jobs)
    results = [
        LayerResult(
            i,
            new.layers[i]["digest"],
            new.diff_ids[i],
            new.layers[i]["size"],
            new.layers[i]["mediaType"],
        )
        for i in changed
    ]
    if not results:
        return DeltaSet(old, new, [], reused)

    def old_tar(i: int) -> Path:
        return ws.untar(ws.fetch(old_src, old.layers[i]), old.diff_ids[i])

    def new_tar(r: LayerResult) -> Path:
        r.blob_path = ws.fetch(new_src, new.layers[r.index])
        return ws.untar(r.blob_path, r.diff_id)

    first = {d: old.diff_ids.index(d) for d in old.diff_ids}  # one download per DiffID
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        unique = dict(zip(first, pool.map(old_tar, first.values()), strict=True))
        new_tars = list(pool.map(new_tar, results))
    old_tars = [unique[d] for d in old.diff_ids]
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def work(item: tuple[LayerResult, Path]) -> None:
        r, ntar = item
        outdir = ws.root / "deltas"
        stem = f"{old.digest[7:23]}-{r.diff_id[7:23]}"
        ov = overlap(old_tars, ntar) if opts.try_single and len(old_tars) > 1 else None
        if old_tars and not (ov and ov.single_suffices):
            cand = Candidate("stacked", tuple(old.diff_ids))
            r.candidates.append(cand)
            _make_candidate(cand, old_tars, ntar, outdir / f"{stem}-all", r.diff_id, opts, threads)
        single = ov.best if ov else None
        if single is not None:
            cand = Candidate("single", (old.diff_ids[single],))
            r.candidates.append(cand)
            src = [old_tars[single]]
            _make_candidate(cand, src, ntar, outdir / f"{stem}-{single}", r.diff_id, opts, threads)
        _choose(r)
        report(
            f"layer {r.to_digest[7:19]}: blob {r.blob_size}, "
            + ", ".join(f"{c.label} {_fmt(c.size)}" for c in r.candidates)
            + f" -> {r.chosen.label + ' delta' if r.chosen else 'original layer'}"
        )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, zip(results, new_tars, strict=True)))
    return DeltaSet(old, new, results, reused)


# -- pushing


def find_existing(client: RegistryClient, repo: str, source: str, target: str) -> dict | None:
    """An artifact already published for (source, target), via discovery."""
    for desc in find_referrers(client, repo, target, ARTIFACT_TYPE):
        ann = desc.get("annotations") or {}
        if ann.get(ANN_SOURCE) == source and ann.get(ANN_TARGET, target) == target:
            return desc
    return None


def push_deltas(
    client: RegistryClient, repo: str, deltas: DeltaSet, opts: PublishOptions
) -> tuple[str, int]:
    """Upload the blobs and the artifact manifest; keep the fallback tag. Returns
    (artifact digest, bytes uploaded)."""
    sent = 0
    target = deltas.target
    if client.upload_blob(repo, EMPTY_DATA, EMPTY_DIGEST):
        sent += len(EMPTY_DATA)
    if client.upload_blob(repo, target.manifest.data, target.digest):
        sent += len(target.manifest.data)
    if client.upload_blob(repo, target.config, target.config_digest):
        sent += len(target.config)
    for r in deltas.layers:
        plan = r.plan()
        if r.chosen is None:
            if not client.blob_exists(repo, r.to_digest):
                if r.blob_path is None:
                    raise RegistryError(f"layer {r.to_digest} is missing from {repo}")
                client.upload_blob(repo, r.blob_path, r.to_digest, r.blob_size)
                sent += r.blob_size
            continue
        assert r.chosen.path is not None
        digest = plan.descriptor["digest"]
        if client.upload_blob(
            repo, r.chosen.path, digest, plan.descriptor["size"], chunk_size=opts.chunk_size
        ):
            sent += plan.descriptor["size"]
    manifest = deltas.manifest()
    result = client.put_manifest(repo, sha256_digest(manifest), manifest, OCI_MANIFEST)
    sent += len(manifest)
    if result.subject != target.digest:
        add_referrer_to_fallback(client, repo, target.digest, referrer_descriptor(manifest))
    return result.digest, sent


def publish(
    old_ref: str,
    new_ref: str,
    pool: ClientPool,
    opts: PublishOptions,
    ws: Workspace | None = None,
    platform: Platform | None = None,
) -> PublishResult:
    """Make and push the delta artifact from ``old_ref`` to ``new_ref`` (registry refs)."""
    own_ws = ws is None
    ws = ws or Workspace(opts.workdir)
    report = opts.report or (lambda _msg: None)
    try:
        new_src = RegistryImageSource(parse_reference(new_ref), pool, platform)
        old_src = RegistryImageSource(parse_reference(old_ref), pool, platform)
        new, old = new_src.image(), old_src.image()
        client, repo = new_src.client, new_src.repo
        assert client is not None
        if old.digest == new.digest:
            report(f"{old_ref} and {new_ref} are the same image: nothing to do")
            return PublishResult(old_src.name, new_src.name, None, None, False, False)
        existing = find_existing(client, repo, old.digest, new.digest)
        if existing is not None:
            report(f"delta {existing['digest']} already published: nothing pushed")
            return PublishResult(old_src.name, new_src.name, None, existing["digest"], False, True)
        deltas = make_deltas(old_src, new_src, ws, opts)
        if opts.dry_run:
            return PublishResult(old_src.name, new_src.name, deltas, None, False, False)
        digest, sent = push_deltas(client, repo, deltas, opts)
        report(f"pushed delta artifact {client.host}/{repo}@{digest} ({sent} bytes)")
        return PublishResult(old_src.name, new_src.name, deltas, digest, True, False, sent)
    finally:
        if own_ws:
            ws.cleanup()


def previous_tags(
    ref: str, count: int, pool: ClientPool, platform: Platform | None = None
) -> list[str]:
    """The ``count`` most recent other tags of ``ref``'s repository (older than ``ref``).

    Candidates are the last 100 tags in the registry's tag-list order; they are ordered by the
    config ``created`` time (newest first), skipping ``sha256-…`` fallback tags and tags whose
    image is the target itself or a duplicate of an already chosen one.
    """
    src = RegistryImageSource(parse_reference(ref), pool, platform)
    target = src.image()
    assert src.client is not None and src.resolved is not None
    tags = [
        t
        for t in src.client.list_tags(src.repo)
        if not _FALLBACK_TAG.match(t) and t != src.resolved.tag
    ][-100:]
    found: list[tuple[str, int, str, str]] = []
    for pos, tag in enumerate(tags):
        cand = RegistryImageSource(src.resolved.with_tag(tag), pool, src.platform)
        try:
            info = cand.image()
        except RegistryError as exc:
            log.info("skipping tag %s: %s", tag, exc)
            continue
        if info.digest == target.digest:
            continue
        if target.created and info.created and info.created > target.created:
            continue
        found.append((info.created, pos, tag, info.digest))
    found.sort(reverse=True)
    out, seen = [], set()
    for _created, _pos, tag, digest in found:
        if digest in seen:
            continue
        seen.add(digest)
        out.append(str(src.resolved.with_tag(tag)))
        if len(out) == count:
            break
    return out
