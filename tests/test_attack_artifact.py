"""Lying delta artifacts and store sources, against the real registry, store and ``pull``.

* an artifact whose ``subject``/``delta.target`` name another image, or whose ``delta.to`` names
  a layer of another image: ignored, whole layers are planned;
* a delta that claims source layers the host does not have: that layer is planned in full;
* a valid delta served for the wrong layer (it rebuilds other bytes): the layer is fetched in
  full in the same run (DigestMismatch/SourceError), the image ends up exact;
* a store source built for the layers of one image never serves a file of another image.

(tests/test_pull_e2e.py::test_corrupt_delta_is_fetched_in_full covers a delta blob with flipped
bytes; tests/test_artifact_format.py covers malformed artifact JSON.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from podman_delta.pull import open_layers_source
from podman_delta.registry.artifact import ANN_SOURCE_DIFF_IDS, ANN_TARGET, ANN_TO
from podman_delta.registry.client import OCI_MANIFEST, ClientOptions, RegistryClient, sha256_digest
from podman_delta.registry.discovery import _write_index, fallback_tag, read_fallback_index
from podman_delta.storage.store import Store
from podman_delta.tardiff.sources import SourceNotFoundError
from tests.support.podman import Podman, PushedImage, isolated_blob_cache, push_image, tar_bytes
from tests.support.registry import Registry
from tests.test_pull_e2e import Pair, delta_pull, publish, push_pair

REPO = "attack/art"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Pair, Path]]:
    tmp = tmp_path_factory.mktemp("attackart")
    with Registry(tmp / "reg") as reg:
        pair = push_pair(reg.host, REPO, 51)
        publish(reg, pair)
        yield reg, pair, tmp


@pytest.fixture(scope="module")
def store(world: tuple[Registry, Pair, Path]) -> Iterator[Podman]:
    """A store holding v1 (the delta sources) and an unrelated image; only dry runs use it."""
    reg, pair, tmp = world
    with isolated_blob_cache():
        p = Podman(tmp / "store")
        p.pull(pair.v1.reference)
        other = push_image(reg.host, "attack/other", "v1", [tar_bytes({"other/secret": b"B" * 99})])
        p.pull(other.reference)
        p.other = other  # type: ignore[attr-defined]
        yield p


def _client(reg: Registry) -> RegistryClient:
    return RegistryClient(reg.host, ClientOptions(tls_verify=False))


def _real_artifact(reg: Registry, pair: Pair) -> tuple[dict, dict]:
    with _client(reg) as c:
        entries = read_fallback_index(c, REPO, pair.v2.manifest_digest)
        assert len(entries) == 1
        return entries[0], json.loads(c.get_manifest(REPO, entries[0]["digest"]).data)


@pytest.fixture
def forge(world: tuple[Registry, Pair, Path]) -> Iterator:
    """Replace v2's artifact list by one forged artifact; restore the real one afterwards."""
    reg, pair, _ = world
    entry, doc = _real_artifact(reg, pair)

    def push(forged: dict) -> None:
        data = json.dumps(forged).encode()
        with _client(reg) as c:
            c.put_manifest(REPO, sha256_digest(data), data, OCI_MANIFEST)
            desc = dict(entry, digest=sha256_digest(data), size=len(data))
            desc["annotations"] = forged.get("annotations", {})
            _write_index(c, REPO, fallback_tag(pair.v2.manifest_digest), [desc])

    yield json.loads(json.dumps(doc)), push
    with _client(reg) as c:
        _write_index(c, REPO, fallback_tag(pair.v2.manifest_digest), [entry])


def _plan(p: Podman, pair: Pair) -> dict:
    return json.loads(delta_pull(p, pair.v2.reference, "--dry-run", "--json").stdout)


def _hows(plan: dict) -> list[str]:
    return [la["how"] for la in plan["layers"]]


def test_the_real_artifact_gives_deltas(world, store: Podman) -> None:  # type: ignore[no-untyped-def]
    assert _hows(_plan(store, world[1])) == ["delta", "delta"]


def test_artifact_naming_another_image(world, store: Podman, forge) -> None:  # type: ignore[no-untyped-def]
    _, pair, _ = world
    doc, push = forge
    doc["subject"] = {
        "mediaType": OCI_MANIFEST,
        "digest": pair.v1.manifest_digest,
        "size": len(pair.v1.manifest),
    }
    doc["annotations"][ANN_TARGET] = pair.v1.manifest_digest
    push(doc)
    plan = _plan(store, pair)
    assert plan["artifacts"] == 0 and _hows(plan) == ["full", "full"]


def test_delta_to_names_a_layer_of_another_image(world, store: Podman, forge) -> None:  # type: ignore[no-untyped-def]
    _, pair, _ = world
    doc, push = forge
    for layer in doc["layers"]:
        if ANN_TO in layer.get("annotations", {}):
            layer["annotations"][ANN_TO] = store.other.compressed_digests[0]
    push(doc)
    assert _hows(_plan(store, pair)) == ["full", "full"]


def test_delta_claiming_a_source_the_host_lacks(world, store: Podman, forge) -> None:  # type: ignore[no-untyped-def]
    _, pair, _ = world
    doc, push = forge
    missing = "sha256:" + "5" * 64
    claimed = 0
    for layer in doc["layers"]:
        ann = layer.get("annotations", {})
        if ann.get(ANN_TO) == pair.v2.compressed_digests[1]:
            ann[ANN_SOURCE_DIFF_IDS] = json.dumps([missing])
            claimed += 1
    assert claimed == 1
    push(doc)
    assert _hows(_plan(store, pair)) == ["delta", "full"]


def test_valid_delta_for_the_wrong_layer(world, forge, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Swap the two delta blobs: each is a real delta, but for the other layer."""
    _, pair, _ = world
    doc, push = forge
    deltas = [la for la in doc["layers"] if ANN_TO in la.get("annotations", {})]
    assert len(deltas) == 2
    a, b = deltas
    for key in ("digest", "size"):
        a[key], b[key] = b[key], a[key]
    push(doc)
    with isolated_blob_cache():
        p = Podman(tmp_path / "s")
        p.pull(pair.v1.reference)
        result = json.loads(delta_pull(p, pair.v2.reference, "--json").stdout)
        assert result["status"] == "pulled"
        assert result["layers"]["full"] == 2 and len(result["fallbacks"]) == 2, result
        info = p.inspect(pair.v2.reference)
        assert info["Id"] == pair.v2.config_digest.split(":")[1]
        assert info["RootFS"]["Layers"] == pair.v2.diff_ids


def test_store_source_never_serves_another_images_files(world, store: Podman) -> None:  # type: ignore[no-untyped-def]
    _, pair, _ = world
    other: PushedImage = store.other
    s = Store(store.options)
    s.refresh()
    chains = [[d] for d in pair.v1.diff_ids] + [list(pair.v1.diff_ids)]
    for ids in chains:
        source = open_layers_source(s, ids)
        try:
            with pytest.raises(SourceNotFoundError):
                source.open(b"other/secret")
        finally:
            source.close()
    # and the other image's own source serves it, so the name was right
    source = open_layers_source(s, other.diff_ids)
    try:
        assert source.open(b"other/secret").pread(0, 3) == b"BBB"
        with pytest.raises(SourceNotFoundError):
            source.open(b"app/bin")
    finally:
        source.close()
    # a single upper layer on vfs (a full tree on disk) serves only its own files
    base_only = b"etc/hostname"
    source = open_layers_source(s, [pair.v1.diff_ids[1]])
    try:
        with pytest.raises(SourceNotFoundError):
            source.open(base_only)
    finally:
        source.close()
