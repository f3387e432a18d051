"""The containers/oci-delta v1 delta artifact: build it, and read/validate it.

Layout (one OCI image manifest; the same in a registry and in an oci-archive file)::

    artifactType  application/vnd.io.github.containers.oci-delta.v1
    config        application/vnd.oci.empty.v1+json  ({}, 2 bytes)
    subject       the target image manifest descriptor (so the referrers API finds it)
    annotations   io.github.containers.delta.target         target manifest digest
                  io.github.containers.delta.source         source (old) manifest digest
                  io.github.containers.delta.source-config  source config digest
                  io.github.containers.delta.reused         JSON array: target layer digests the
                                                            source already has (absent here)
                  io.github.containers.delta.reused-diff-id JSON array: their DiffIDs
    layers        content=image-manifest  the target manifest bytes
                  content=image-config    the target config bytes (gives the DiffIDs)
                  content=image-layer     per changed target layer: an application/vnd.tar-diff
                                          delta, or the original layer blob when the delta would
                                          not be smaller; delta.to = target layer COMPRESSED
                                          digest (readers also accept a DiffID, 2020 style)

**podman-delta extension** (ignored by other readers, which dispatch on ``delta.content`` and
``delta.to`` only): every tar-diff layer also carries
``io.github.containers.delta.source-diff-ids``, a JSON array of the DiffIDs of the source layers
the delta was made against, lowest first (stacked in that order). A client that holds exactly
those layers, from *any* image, can apply the delta; one made from a single source layer thus
helps every image built on that layer. Without it a reader must assume the delta needs all
source layers (``delta.source-config`` gives their DiffIDs).

Readers refuse manifests over 4 MiB and more than 10,000 layers, and unknown ``delta.content``
values are skipped (cosign signature entries, future additions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from podman_delta.errors import DeltaFormatError
from podman_delta.registry.client import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    IMAGE_MANIFESTS,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_MANIFEST,
    MalformedManifestError,
    Manifest,
    check_descriptor,
    parse_manifest_json,
    sha256_digest,
)

ARTIFACT_TYPE = "application/vnd.io.github.containers.oci-delta.v1"
LEGACY_ARTIFACT_TYPES = ("application/vnd.redhat.oci-delta.v1",)
TAR_DIFF = "application/vnd.tar-diff"
TAR_DIFF_TYPES = (TAR_DIFF, "application/vnd.redhat.tar-diff")
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

_P = "io.github.containers.delta."
ANN_TARGET = _P + "target"
ANN_SOURCE = _P + "source"
ANN_SOURCE_CONFIG = _P + "source-config"
ANN_REUSED = _P + "reused"
ANN_REUSED_DIFF_ID = _P + "reused-diff-id"
ANN_CONTENT = _P + "content"
ANN_TO = _P + "to"
ANN_FROM = _P + "from"  # 2020 format: a single source DiffID
#: podman-delta extension: JSON array of the source DiffIDs a tar-diff was made against.
ANN_SOURCE_DIFF_IDS = _P + "source-diff-ids"

CONTENT_MANIFEST = "image-manifest"
CONTENT_CONFIG = "image-config"
CONTENT_LAYER = "image-layer"

MAX_LAYERS = 10_000


@dataclass(frozen=True)
class LayerPlan:
    """How the artifact provides one changed target layer."""

    to_digest: str  # target layer compressed digest
    descriptor: dict  # the blob: a tar-diff or the original layer
    source_diff_ids: tuple[str, ...] = ()  # for tar-diffs: what it was made against

    @property
    def is_delta(self) -> bool:
        return self.descriptor["mediaType"] in TAR_DIFF_TYPES


def build_manifest(
    target_manifest: Manifest,
    target_config: bytes,
    source_manifest_digest: str,
    source_config_digest: str,
    layers: Sequence[LayerPlan],
    reused: Sequence[tuple[str, str]],
) -> bytes:
    """The artifact manifest bytes. ``reused`` = (target layer digest, DiffID) pairs."""
    if target_manifest.media_type not in IMAGE_MANIFESTS:
        raise DeltaFormatError(f"target {target_manifest.digest} is not an image manifest")
    doc = target_manifest.json()
    config_type = OCI_CONFIG if target_manifest.media_type == OCI_MANIFEST else DOCKER_CONFIG
    if target_manifest.media_type == DOCKER_MANIFEST:
        manifest_type = DOCKER_MANIFEST
    else:
        manifest_type = OCI_MANIFEST
    entries = [
        {
            "mediaType": manifest_type,
            "digest": target_manifest.digest,
            "size": len(target_manifest.data),
            "annotations": {ANN_CONTENT: CONTENT_MANIFEST},
        },
        {
            "mediaType": doc["config"].get("mediaType", config_type),
            "digest": sha256_digest(target_config),
            "size": len(target_config),
            "annotations": {ANN_CONTENT: CONTENT_CONFIG},
        },
    ]
    for plan in layers:
        desc = {k: plan.descriptor[k] for k in ("mediaType", "digest", "size")}
        ann = {ANN_CONTENT: CONTENT_LAYER, ANN_TO: plan.to_digest}
        if plan.is_delta and plan.source_diff_ids:
            ann[ANN_SOURCE_DIFF_IDS] = json.dumps(list(plan.source_diff_ids))
        desc["annotations"] = ann
        entries.append(desc)
    annotations = {
        ANN_TARGET: target_manifest.digest,
        ANN_SOURCE: source_manifest_digest,
        ANN_SOURCE_CONFIG: source_config_digest,
    }
    if reused:
        annotations[ANN_REUSED] = json.dumps([d for d, _ in reused])
        annotations[ANN_REUSED_DIFF_ID] = json.dumps([i for _, i in reused])
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_DATA)},
        "layers": entries,
        "subject": {
            "mediaType": target_manifest.media_type,
            "digest": target_manifest.digest,
            "size": len(target_manifest.data),
        },
        "annotations": annotations,
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


# -- reading


@dataclass(frozen=True)
class DeltaLayer:
    """One image-layer entry, resolved against the target image."""

    descriptor: dict
    to_digest: str  # target layer compressed digest
    to_diff_id: str  # target layer DiffID (what the rebuilt tar must hash to)
    source_diff_ids: tuple[str, ...] | None  # None: needs all source layers (no extension)

    @property
    def is_delta(self) -> bool:
        return self.descriptor["mediaType"] in TAR_DIFF_TYPES

    @property
    def size(self) -> int:
        return int(self.descriptor["size"])


@dataclass
class DeltaArtifact:
    """A parsed, validated delta artifact."""

    digest: str
    target: str
    source: str
    source_config: str
    manifest_desc: dict
    config_desc: dict
    raw_layers: list[dict]
    reused: list[tuple[str, str]] = field(default_factory=list)
    target_manifest: Manifest | None = None
    target_config: bytes | None = None
    layers: list[DeltaLayer] = field(default_factory=list)

    @property
    def target_layers(self) -> list[dict]:
        assert self.target_manifest is not None
        return self.target_manifest.json()["layers"]

    @property
    def target_diff_ids(self) -> list[str]:
        assert self.target_config is not None
        return json.loads(self.target_config)["rootfs"]["diff_ids"]

    def layer_for(self, to_digest: str) -> DeltaLayer | None:
        for layer in self.layers:
            if to_digest in (layer.to_digest, layer.to_diff_id):
                return layer
        return None

    def resolve(self, fetch: Callable[[dict], bytes]) -> DeltaArtifact:
        """Load the embedded target manifest and config with ``fetch(descriptor)`` and map
        every ``delta.to`` (a compressed digest or, 2020 style, a DiffID) to both."""
        mdata = fetch(self.manifest_desc)
        if sha256_digest(mdata) != self.manifest_desc["digest"]:
            raise DeltaFormatError("embedded target manifest does not match its digest")
        if self.manifest_desc["digest"] != self.target:
            raise DeltaFormatError(
                f"embedded manifest {self.manifest_desc['digest']} is not the target {self.target}"
            )
        try:
            mdoc = parse_manifest_json(mdata, None)
        except MalformedManifestError as exc:
            raise DeltaFormatError(f"embedded target manifest: {exc}") from exc
        media_type = mdoc.get("mediaType") or self.manifest_desc.get("mediaType") or OCI_MANIFEST
        self.target_manifest = Manifest(mdata, media_type, self.target)
        if mdoc.get("config", {}).get("digest") != self.config_desc["digest"]:
            raise DeltaFormatError("embedded config is not the target manifest's config")
        cdata = fetch(self.config_desc)
        if sha256_digest(cdata) != self.config_desc["digest"]:
            raise DeltaFormatError("embedded target config does not match its digest")
        self.target_config = cdata
        try:
            diff_ids = json.loads(cdata)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeltaFormatError("embedded target config has no rootfs.diff_ids") from exc
        tlayers = mdoc["layers"]
        if len(diff_ids) != len(tlayers):
            raise DeltaFormatError("target config and manifest disagree on the layer count")
        by_digest = {d["digest"]: i for i, d in enumerate(tlayers)}
        by_diff = {d: i for i, d in enumerate(diff_ids)}
        self.layers = []
        for desc in self.raw_layers:
            ann = desc.get("annotations") or {}
            to = ann.get(ANN_TO, "")
            index = by_digest.get(to, by_diff.get(to))
            if index is None:
                raise DeltaFormatError(f"delta layer {desc['digest']} targets unknown layer {to}")
            self.layers.append(
                DeltaLayer(desc, tlayers[index]["digest"], diff_ids[index], _source_ids(ann))
            )
        return self


def _source_ids(ann: dict) -> tuple[str, ...] | None:
    raw = ann.get(ANN_SOURCE_DIFF_IDS)
    if raw is None:
        return (ann[ANN_FROM],) if ann.get(ANN_FROM) else None
    try:
        ids = json.loads(raw)
    except ValueError as exc:
        raise DeltaFormatError(f"{ANN_SOURCE_DIFF_IDS} is not a JSON array") from exc
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_LAYERS
        or not all(isinstance(i, str) and i.startswith("sha256:") for i in ids)
    ):
        raise DeltaFormatError(f"{ANN_SOURCE_DIFF_IDS} must be a JSON array of sha256 digests")
    return tuple(ids)


def _json_list(ann: dict, key: str) -> list[str]:
    raw = ann.get(key)
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise DeltaFormatError(f"annotation {key} is not JSON") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DeltaFormatError(f"annotation {key} must be a JSON array of strings")
    if len(value) > MAX_LAYERS:
        raise DeltaFormatError(f"annotation {key} lists too many layers")
    return value


def is_delta_descriptor(desc: dict) -> bool:
    """Whether a referrers/index entry describes a delta artifact."""
    return desc.get("artifactType") in (ARTIFACT_TYPE, *LEGACY_ARTIFACT_TYPES)


def parse_artifact(data: bytes, digest: str | None = None) -> DeltaArtifact:
    """Parse and validate an artifact manifest (without its embedded blobs; see ``resolve``)."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise DeltaFormatError(f"delta manifest is over {MAX_MANIFEST_SIZE} bytes")
    actual = sha256_digest(data)
    if digest is not None and digest != actual:
        raise DeltaFormatError(f"delta manifest has digest {actual}, expected {digest}")
    try:
        doc = parse_manifest_json(data, OCI_MANIFEST)
    except MalformedManifestError as exc:
        raise DeltaFormatError(f"malformed delta manifest: {exc}") from exc
    atype = doc.get("artifactType")
    if atype not in (ARTIFACT_TYPE, *LEGACY_ARTIFACT_TYPES):
        raise DeltaFormatError(f"not a delta artifact (artifactType {atype!r})")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise DeltaFormatError("delta manifest annotations are not an object")
    for key in (ANN_TARGET, ANN_SOURCE_CONFIG):
        if not isinstance(ann.get(key), str) or not ann[key].startswith("sha256:"):
            raise DeltaFormatError(f"delta manifest lacks the {key} annotation")
    manifest_desc = config_desc = None
    raw_layers = []
    for desc in doc["layers"]:
        check_descriptor(desc)
        dann = desc.get("annotations") or {}
        content = dann.get(ANN_CONTENT)
        if content == CONTENT_MANIFEST:
            manifest_desc = desc
        elif content == CONTENT_CONFIG:
            config_desc = desc
        elif content == CONTENT_LAYER and dann.get(ANN_TO):
            raw_layers.append(desc)
    if manifest_desc is None or config_desc is None:
        raise DeltaFormatError("delta artifact lacks the embedded target manifest or config")
    if manifest_desc["size"] > MAX_MANIFEST_SIZE or config_desc["size"] > MAX_MANIFEST_SIZE:
        raise DeltaFormatError("embedded target manifest or config is too large")
    reused_d = _json_list(ann, ANN_REUSED)
    reused_i = _json_list(ann, ANN_REUSED_DIFF_ID)
    if reused_i and len(reused_i) != len(reused_d):
        raise DeltaFormatError("delta.reused and delta.reused-diff-id differ in length")
    return DeltaArtifact(
        digest=actual,
        target=ann[ANN_TARGET],
        source=str(ann.get(ANN_SOURCE, "")),
        source_config=ann[ANN_SOURCE_CONFIG],
        manifest_desc=manifest_desc,
        config_desc=config_desc,
        raw_layers=raw_layers,
        reused=list(zip(reused_d, reused_i or [""] * len(reused_d), strict=True)),
    )
