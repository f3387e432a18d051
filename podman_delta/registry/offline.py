"""The delta artifact as a file, for air-gapped hosts: ``create`` and ``apply``.

``create OLD NEW FILE`` writes the same artifact ``publish`` pushes, as an oci-archive (the
layout containers/oci-delta writes: ``oci-layout``, blobs, ``index.json`` naming the artifact
manifest). ``apply FILE OUT --source OLD`` rebuilds the new image from the artifact and the old
image's layers and writes it as an oci-archive that ``podman load`` accepts. Rebuilt layers are
stored uncompressed (digest = DiffID), so the written manifest differs from the registry's unless
every layer could be copied as is; every layer's DiffID is verified either way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from podman_delta.errors import DeltaFormatError, DigestMismatchError, SourceError
from podman_delta.registry.artifact import (
    ARTIFACT_TYPE,
    EMPTY_DATA,
    DeltaArtifact,
    parse_artifact,
)
from podman_delta.registry.client import (
    DOCKER_CONFIG,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_MANIFEST,
    sha256_digest,
)
from podman_delta.registry.image import ImageSource
from podman_delta.registry.layout import (
    REF_NAME,
    ArchiveWriter,
    LayoutReader,
    select_manifest,
)
from podman_delta.registry.publish import DeltaSet, PublishOptions, Workspace, make_deltas

log = logging.getLogger(__name__)

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def write_delta_archive(deltas: DeltaSet, path: Path, name: str | None = None) -> str:
    """Write ``deltas`` as an oci-archive; return the artifact manifest digest."""
    manifest = deltas.manifest()
    with ArchiveWriter(Path(path)) as w:
        w.add_blob(deltas.target.manifest.data)
        w.add_blob(deltas.target.config)
        w.add_blob(EMPTY_DATA)
        for r in deltas.layers:
            plan = r.plan()
            if r.chosen is None:
                assert r.blob_path is not None
                w.add_blob_file(r.blob_path, r.to_digest)
            else:
                assert r.chosen.path is not None
                w.add_blob_file(r.chosen.path, plan.descriptor["digest"])
        digest = w.add_blob(manifest)
        entry = {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            "artifactType": ARTIFACT_TYPE,
        }
        if name:
            entry["annotations"] = {REF_NAME: name}
        w.finish([entry])
    return digest


def create(
    old: ImageSource, new: ImageSource, path: Path, opts: PublishOptions
) -> tuple[DeltaSet, str | None]:
    """Make the deltas from ``old`` to ``new`` and write them to ``path`` (unless dry-run)."""
    ws = Workspace(opts.workdir)
    try:
        deltas = make_deltas(old, new, ws, opts)
        if opts.dry_run:
            return deltas, None
        return deltas, write_delta_archive(deltas, path)
    finally:
        ws.cleanup()


def read_delta_archive(path: Path, archive: bool = True) -> tuple[LayoutReader, DeltaArtifact]:
    """Open a delta file and parse + resolve its artifact manifest."""
    reader = LayoutReader(Path(path), archive)
    try:
        entry = select_manifest(reader.index(), None, str(path))
        data = reader.read_blob(entry["digest"], MAX_MANIFEST_SIZE)
        art = parse_artifact(data, entry["digest"])
        art.resolve(lambda d: reader.read_blob(d["digest"], MAX_MANIFEST_SIZE))
    except BaseException:
        reader.close()
        raise
    return reader, art


def apply_archive(
    delta_path: Path,
    source: ImageSource,
    out: Path,
    *,
    workdir: str | None = None,
    name: str | None = None,
    report: Callable[[str], None] | None = None,
) -> str:
    """Rebuild the target image of ``delta_path`` from ``source``; write it to ``out``.

    Returns the digest of the written manifest.
    """
    from podman_delta.tardiff.patcher import apply
    from podman_delta.tardiff.sources import open_source

    report = report or (lambda _m: None)
    reader, art = read_delta_archive(delta_path)
    ws = Workspace(workdir)
    try:
        old = source.image()
        if old.config_digest != art.source_config:
            log.warning(
                "source image config %s is not the delta's source %s; using layers by DiffID",
                old.config_digest,
                art.source_config,
            )
        old_by_diff = {d: i for i, d in enumerate(old.diff_ids)}

        def old_tar(diff_id: str) -> Path:
            i = old_by_diff.get(diff_id)
            if i is None:
                raise SourceError(
                    f"the source image lacks layer {diff_id}, which the delta needs; give the "
                    "image the delta was made from with --source"
                )
            return ws.untar(ws.fetch(source, old.layers[i]), diff_id)

        assert art.target_manifest is not None and art.target_config is not None
        tdoc = art.target_manifest.json()
        out_layers: list[tuple[dict, Path]] = []
        for desc, diff_id in zip(tdoc["layers"], art.target_diff_ids, strict=True):
            entry = art.layer_for(desc["digest"])
            if entry is None:  # reused: the source has it
                tar = old_tar(diff_id)
                i = old_by_diff[diff_id]
                blob = ws.blob(old.layers[i]["digest"])
                if old.layers[i]["digest"] == desc["digest"]:
                    out_layers.append((desc, blob))
                else:
                    out_layers.append((_tar_desc(tar, diff_id), tar))
                report(f"layer {diff_id[7:19]}: reused from the source")
            elif entry.is_delta:
                needed = entry.source_diff_ids or tuple(old.diff_ids)
                tars = [old_tar(d) for d in needed]
                delta_file = ws.blob(entry.descriptor["digest"])
                reader.copy_blob(entry.descriptor["digest"], delta_file)
                rebuilt = ws.tar(diff_id)
                tmp = rebuilt.with_name(rebuilt.name + ".partial")
                src = open_source([str(t) for t in tars])
                try:
                    with open(delta_file, "rb") as df, open(tmp, "wb") as of:
                        apply(df, src, of, expected_digest=diff_id)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                finally:
                    src.close()
                tmp.replace(rebuilt)
                out_layers.append((_tar_desc(rebuilt, diff_id), rebuilt))
                report(f"layer {diff_id[7:19]}: rebuilt from a {entry.size}-byte delta")
            else:
                blob = ws.blob(desc["digest"])
                reader.copy_blob(entry.descriptor["digest"], blob)
                if entry.descriptor["digest"] != desc["digest"]:
                    raise DeltaFormatError(
                        f"delta file ships {entry.descriptor['digest']} for layer {desc['digest']}"
                    )
                ws.untar(blob, diff_id)  # verifies the DiffID
                out_layers.append((desc, blob))
                report(f"layer {diff_id[7:19]}: shipped whole in the delta file")
        return _write_image(art, out_layers, Path(out), name)
    finally:
        ws.cleanup()
        reader.close()


def _tar_desc(tar: Path, diff_id: str) -> dict:
    return {"mediaType": OCI_LAYER_TAR, "digest": diff_id, "size": tar.stat().st_size}


def _write_image(
    art: DeltaArtifact, layers: list[tuple[dict, Path]], out: Path, name: str | None
) -> str:
    assert art.target_manifest is not None and art.target_config is not None
    tdoc = art.target_manifest.json()
    same = [d for d, _ in layers] == tdoc["layers"]
    if same:
        manifest, mtype = art.target_manifest.data, art.target_manifest.media_type
    else:
        config_type = tdoc["config"].get("mediaType", OCI_CONFIG)
        if config_type == DOCKER_CONFIG:
            config_type = OCI_CONFIG
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": config_type,
                "digest": sha256_digest(art.target_config),
                "size": len(art.target_config),
            },
            "layers": [{k: d[k] for k in ("mediaType", "digest", "size")} for d, _ in layers],
        }
        if tdoc.get("annotations"):
            doc["annotations"] = tdoc["annotations"]
        manifest, mtype = json.dumps(doc, separators=(",", ":")).encode(), OCI_MANIFEST
    with ArchiveWriter(out) as w:
        w.add_blob(art.target_config)
        for desc, path in layers:
            if path.stat().st_size != desc["size"]:
                raise DigestMismatchError(f"layer {desc['digest']} has the wrong size")
            w.add_blob_file(path, desc["digest"])
        digest = w.add_blob(manifest)
        entry = {"mediaType": mtype, "digest": digest, "size": len(manifest)}
        if name:
            entry["annotations"] = {REF_NAME: name}
        w.finish([entry])
    return digest
