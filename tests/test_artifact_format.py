"""The containers/oci-delta v1 artifact: what we write, and how strictly we read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podman_delta.errors import DeltaFormatError, DigestMismatchError
from podman_delta.registry.artifact import (
    ANN_CONTENT,
    ANN_REUSED,
    ANN_REUSED_DIFF_ID,
    ANN_SOURCE,
    ANN_SOURCE_CONFIG,
    ANN_SOURCE_DIFF_IDS,
    ANN_TARGET,
    ANN_TO,
    ARTIFACT_TYPE,
    EMPTY_DIGEST,
    TAR_DIFF,
    LayerPlan,
    build_manifest,
    parse_artifact,
)
from podman_delta.registry.client import OCI_MANIFEST, Manifest, sha256_digest
from podman_delta.registry.layout import ArchiveWriter, LayoutReader
from podman_delta.registry.offline import read_delta_archive
from tests.support.ocibuild import image_manifest, make_layer

SRC = "sha256:" + "a" * 64
SRC_CFG = "sha256:" + "b" * 64


def _target(tmp_path: Path) -> tuple[Manifest, bytes, list]:
    layers = [make_layer({"a": b"1"}), make_layer({"b": b"2"}), make_layer({"c": b"3"})]
    mdata, config = image_manifest(tmp_path / "t", layers)
    return Manifest(mdata, OCI_MANIFEST, sha256_digest(mdata)), config, layers


def _artifact(tmp_path: Path, to_diff_id: bool = False) -> tuple[bytes, Manifest, bytes, list]:
    target, config, layers = _target(tmp_path)
    delta = b"tardf1\n\x00fake"
    plans = [
        LayerPlan(
            layers[1].diff_id if to_diff_id else layers[1].digest,
            {"mediaType": TAR_DIFF, "digest": sha256_digest(delta), "size": len(delta)},
            ("sha256:" + "c" * 64,),
        ),
        LayerPlan(
            layers[2].digest,
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layers[2].digest,
                "size": len(layers[2].blob),
            },
        ),
    ]
    data = build_manifest(
        target, config, SRC, SRC_CFG, plans, [(layers[0].digest, layers[0].diff_id)]
    )
    return data, target, config, layers


def test_written_manifest_matches_oci_delta(tmp_path: Path) -> None:
    data, target, config, layers = _artifact(tmp_path)
    doc = json.loads(data)
    assert doc["artifactType"] == ARTIFACT_TYPE
    assert doc["mediaType"] == OCI_MANIFEST and doc["schemaVersion"] == 2
    assert doc["config"] == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": EMPTY_DIGEST,
        "size": 2,
    }
    assert sha256_digest(b"{}") == EMPTY_DIGEST
    assert doc["subject"] == {
        "mediaType": OCI_MANIFEST,
        "digest": target.digest,
        "size": len(target.data),
    }
    ann = doc["annotations"]
    assert ann[ANN_TARGET] == target.digest
    assert ann[ANN_SOURCE] == SRC and ann[ANN_SOURCE_CONFIG] == SRC_CFG
    assert json.loads(ann[ANN_REUSED]) == [layers[0].digest]
    assert json.loads(ann[ANN_REUSED_DIFF_ID]) == [layers[0].diff_id]
    contents = [entry["annotations"][ANN_CONTENT] for entry in doc["layers"]]
    assert contents == ["image-manifest", "image-config", "image-layer", "image-layer"]
    assert doc["layers"][0]["digest"] == target.digest
    assert doc["layers"][1]["digest"] == sha256_digest(config)
    delta, original = doc["layers"][2], doc["layers"][3]
    assert delta["mediaType"] == TAR_DIFF and delta["annotations"][ANN_TO] == layers[1].digest
    assert json.loads(delta["annotations"][ANN_SOURCE_DIFF_IDS]) == ["sha256:" + "c" * 64]
    assert (
        original["digest"] == layers[2].digest
        and ANN_SOURCE_DIFF_IDS not in original["annotations"]
    )


@pytest.mark.parametrize("to_diff_id", [False, True])
def test_read_and_resolve(tmp_path: Path, to_diff_id: bool) -> None:
    data, target, config, layers = _artifact(tmp_path, to_diff_id)
    blobs = {target.digest: target.data, sha256_digest(config): config}
    art = parse_artifact(data, sha256_digest(data)).resolve(lambda d: blobs[d["digest"]])
    assert art.target == target.digest and art.source == SRC and art.source_config == SRC_CFG
    assert art.reused == [(layers[0].digest, layers[0].diff_id)]
    assert [(lay.to_digest, lay.to_diff_id, lay.is_delta) for lay in art.layers] == [
        (layers[1].digest, layers[1].diff_id, True),
        (layers[2].digest, layers[2].diff_id, False),
    ]
    assert art.layers[0].source_diff_ids == ("sha256:" + "c" * 64,)
    assert art.layers[1].source_diff_ids is None
    assert art.layer_for(layers[1].diff_id) is art.layers[0]
    assert art.layer_for(layers[0].digest) is None


def _mutate(data: bytes, fn) -> bytes:
    doc = json.loads(data)
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d.update(artifactType="application/other"), "not a delta artifact"),
        (lambda d: d["annotations"].pop(ANN_TARGET), "delta.target"),
        (lambda d: d["annotations"].pop(ANN_SOURCE_CONFIG), "source-config"),
        (lambda d: d["layers"].pop(0), "embedded target manifest"),
        (lambda d: d["layers"][2].update(size=-1), "invalid size"),
        (lambda d: d["layers"][2].update(digest="sha256:xyz"), "invalid digest"),
        (lambda d: d["annotations"].update({ANN_REUSED: "not json"}), "not JSON"),
        (
            lambda d: d["annotations"].update({ANN_REUSED_DIFF_ID: "[]", ANN_REUSED: '["a","b"]'}),
            None,
        ),
        (
            lambda d: d["annotations"].update(
                {ANN_REUSED_DIFF_ID: '["x"]', ANN_REUSED: '["a","b"]'}
            ),
            "length",
        ),
        (lambda d: d.update(layers=d["layers"] * 2600), "entries"),
    ],
)
def test_malformed_artifacts(tmp_path: Path, mutation, message: str | None) -> None:
    data, *_ = _artifact(tmp_path)
    bad = _mutate(data, mutation)
    if message is None:
        parse_artifact(bad)  # an empty reused-diff-id list is tolerated
        return
    with pytest.raises(DeltaFormatError, match=message):
        parse_artifact(bad)


def test_oversized_and_digest_checks(tmp_path: Path) -> None:
    data, target, config, _ = _artifact(tmp_path)
    with pytest.raises(DeltaFormatError, match="bytes"):
        parse_artifact(data + b" " * (4 << 20))
    with pytest.raises(DeltaFormatError, match="expected"):
        parse_artifact(data, "sha256:" + "0" * 64)
    art = parse_artifact(data)
    with pytest.raises(DeltaFormatError, match="does not match"):
        art.resolve(lambda d: b"tampered")
    bad_ids = _mutate(
        data, lambda d: d["layers"][2]["annotations"].update({ANN_SOURCE_DIFF_IDS: '["md5:x"]'})
    )
    blobs = {target.digest: target.data, sha256_digest(config): config}
    with pytest.raises(DeltaFormatError, match="source-diff-ids"):
        parse_artifact(bad_ids).resolve(lambda d: blobs[d["digest"]])
    unknown = _mutate(
        data, lambda d: d["layers"][2]["annotations"].update({ANN_TO: "sha256:" + "9" * 64})
    )
    with pytest.raises(DeltaFormatError, match="unknown layer"):
        parse_artifact(unknown).resolve(lambda d: blobs[d["digest"]])


def test_archive_roundtrip_and_corruption(tmp_path: Path) -> None:
    data, target, config, layers = _artifact(tmp_path)
    delta = b"tardf1\n\x00fake"
    path = tmp_path / "delta.tar"
    with ArchiveWriter(path) as w:
        for blob in (target.data, config, b"{}", delta, layers[2].blob, data):
            w.add_blob(blob)
        w.finish([{"mediaType": OCI_MANIFEST, "digest": sha256_digest(data), "size": len(data)}])
    reader, art = read_delta_archive(path)
    try:
        assert art.digest == sha256_digest(data)
        assert reader.read_blob(art.layers[0].descriptor["digest"]) == delta
        names = set(reader._members)
        assert {"oci-layout", "index.json"} <= names
        assert all(n.startswith("blobs/sha256/") for n in names - {"oci-layout", "index.json"})
    finally:
        reader.close()
    # a corrupted blob is caught on read
    raw = bytearray(path.read_bytes())
    at = raw.find(delta)
    raw[at + 9] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader = LayoutReader(path, archive=True)
    with pytest.raises(DigestMismatchError):
        reader.read_blob(sha256_digest(delta))
    reader.close()


def test_writer_refuses_index_of_unwritten_blob(tmp_path: Path) -> None:
    with (
        ArchiveWriter(tmp_path / "x.tar") as w,
        pytest.raises(DeltaFormatError, match="not written"),
    ):
        w.finish([{"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 1}])
    assert not (tmp_path / "x.tar").exists()
    assert not list(tmp_path.glob(".podman-delta-*"))
