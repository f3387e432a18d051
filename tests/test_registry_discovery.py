"""Finding delta artifacts: the referrers API (stub) and the sha256-<hex> tag fallback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from podman_delta.registry.artifact import ARTIFACT_TYPE, EMPTY_DATA, EMPTY_DIGEST
from podman_delta.registry.client import OCI_MANIFEST, ClientOptions, RegistryClient
from podman_delta.registry.discovery import (
    add_referrer_to_fallback,
    fallback_tag,
    find_referrers,
    read_fallback_index,
    referrer_descriptor,
    remove_from_fallback,
)
from tests.support.ocibuild import sha
from tests.support.referrers_stub import ReferrersProxy
from tests.support.registry import Registry

REPO = "d/app"
SUBJECT = "sha256:" + "5" * 64


def _opts() -> ClientOptions:
    return ClientOptions(tls_verify=False, backoff=0.01)


def _push_referrer(c: RegistryClient, name: str, artifact_type: str = ARTIFACT_TYPE) -> bytes:
    """Push a small artifact manifest with ``subject`` = SUBJECT; return its bytes."""
    c.upload_blob(REPO, EMPTY_DATA, EMPTY_DIGEST)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": EMPTY_DIGEST,
            "size": 2,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST, "size": 2}
        ],
        "subject": {"mediaType": OCI_MANIFEST, "digest": SUBJECT, "size": 100},
        "annotations": {"name": name},
    }
    data = json.dumps(doc).encode()
    c.put_manifest(REPO, sha(data), data, OCI_MANIFEST)
    return data


@pytest.fixture
def client(registry: Registry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, _opts()) as c:
        yield c


def test_fallback_tag_schema() -> None:
    assert fallback_tag(SUBJECT) == "sha256-" + "5" * 64
    assert fallback_tag("sha512:" + "a" * 128) == "sha512-" + "a" * 64
    assert fallback_tag("x+y:ab") == "x-y-ab"


def test_tag_fallback_on_plain_registry(client: RegistryClient) -> None:
    assert find_referrers(client, REPO, SUBJECT) == []  # 404 API, no tag: no referrers
    assert client.referrers_supported is False  # type: ignore[attr-defined]
    foreign = _push_referrer(client, "signature", "application/vnd.dev.cosign")
    add_referrer_to_fallback(client, REPO, SUBJECT, referrer_descriptor(foreign), settle=0.01)
    mine = _push_referrer(client, "delta")
    entries = add_referrer_to_fallback(
        client, REPO, SUBJECT, referrer_descriptor(mine), settle=0.01
    )
    assert [e["digest"] for e in entries] == [sha(foreign), sha(mine)]  # the other is kept
    found = find_referrers(client, REPO, SUBJECT)
    assert [d["digest"] for d in found] == [sha(mine)]  # filtered by artifactType
    assert found[0]["annotations"] == {"name": "delta"}
    assert len(find_referrers(client, REPO, SUBJECT, None)) == 2
    # adding again does not duplicate
    add_referrer_to_fallback(client, REPO, SUBJECT, referrer_descriptor(mine), settle=0.01)
    assert len(read_fallback_index(client, REPO, SUBJECT)) == 2
    remove_from_fallback(client, REPO, SUBJECT, sha(mine))
    assert [d["digest"] for d in read_fallback_index(client, REPO, SUBJECT)] == [sha(foreign)]


def test_invalid_fallback_tag_means_no_referrers(client: RegistryClient) -> None:
    manifest = _push_referrer(client, "x")
    client.put_manifest(REPO, fallback_tag(SUBJECT), manifest, OCI_MANIFEST)  # not an index
    assert find_referrers(client, REPO, SUBJECT) == []


def test_concurrent_publishers_keep_each_others_entries(registry: Registry) -> None:
    with RegistryClient(registry.host, _opts()) as setup:
        manifests = [_push_referrer(setup, f"p{i}") for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def publisher(mine: list[bytes]) -> None:
        try:
            with RegistryClient(registry.host, _opts()) as c:
                start.wait()
                for m in mine:
                    add_referrer_to_fallback(c, REPO, SUBJECT, referrer_descriptor(m), settle=0.05)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=publisher, args=(manifests[0::2],)),
        threading.Thread(target=publisher, args=(manifests[1::2],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with RegistryClient(registry.host, _opts()) as c:
        listed = {d["digest"] for d in read_fallback_index(c, REPO, SUBJECT)}
    assert listed == {sha(m) for m in manifests}


def test_referrers_api_through_stub(registry: Registry) -> None:
    with ReferrersProxy(registry.host) as proxy, RegistryClient(proxy.host, _opts()) as c:
        mine = _push_referrer(c, "delta")
        other = _push_referrer(c, "sig", "application/vnd.dev.cosign")
        found = find_referrers(c, REPO, SUBJECT)
        assert [d["digest"] for d in found] == [sha(mine)]
        assert found[0]["artifactType"] == ARTIFACT_TYPE
        assert c.referrers_supported is True  # type: ignore[attr-defined]
        assert {d["digest"] for d in find_referrers(c, REPO, SUBJECT, None)} == {
            sha(mine),
            sha(other),
        }
        reqs = proxy.requests("GET", "/referrers/")
        assert "artifactType=application%2Fvnd.io.github.containers.oci-delta.v1" in reqs[0][1]
        assert proxy.requests("GET", f"/manifests/{fallback_tag(SUBJECT)}") == []
