"""Finding delta artifacts for an image: the OCI 1.1 referrers API, else the tag fallback.

Readers ask ``GET /v2/<name>/referrers/<digest>?artifactType=…``; a 404 means the registry does
not implement it (CNCF distribution 2.8, GHCR), and the ``sha256-<hex>`` tag holding an OCI index
of referrers is read instead (distribution-spec "Referrers Tag Schema").

Writers of the fallback tag have no lock, so :func:`add_referrer_to_fallback` does a
read-modify-write with dedupe by digest, then waits a moment and re-reads: if a concurrent
publisher overwrote the tag without our entry, it merges again. Entries other publishers added
are never dropped, since each write starts from what the registry holds at that moment.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable

from podman_delta.errors import RegistryError
from podman_delta.registry.artifact import ARTIFACT_TYPE, LEGACY_ARTIFACT_TYPES
from podman_delta.registry.client import (
    OCI_INDEX,
    OCI_MANIFEST,
    ImageNotFoundError,
    MalformedManifestError,
    RegistryClient,
    parse_manifest_json,
    sha256_digest,
)

log = logging.getLogger(__name__)


def fallback_tag(digest: str) -> str:
    """``<alg>-<hex>`` with the spec's truncation (32/64) and invalid characters as ``-``."""
    alg, _, hexpart = digest.partition(":")
    tag = f"{alg[:32]}-{hexpart[:64]}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", tag)


def referrer_descriptor(manifest: bytes, media_type: str = OCI_MANIFEST) -> dict:
    """The descriptor of a referrer as the referrers API lists it."""
    doc = json.loads(manifest)
    desc = {"mediaType": media_type, "digest": sha256_digest(manifest), "size": len(manifest)}
    atype = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
    if atype:
        desc["artifactType"] = atype
    if doc.get("annotations"):
        desc["annotations"] = doc["annotations"]
    return desc


def _matches(desc: dict, artifact_type: str | None) -> bool:
    if artifact_type is None:
        return True
    if artifact_type == ARTIFACT_TYPE:
        return desc.get("artifactType") in (ARTIFACT_TYPE, *LEGACY_ARTIFACT_TYPES)
    return desc.get("artifactType") == artifact_type


def read_fallback_index(client: RegistryClient, repo: str, digest: str) -> list[dict]:
    """Entries of the ``sha256-<hex>`` index; missing or invalid means "no referrers"."""
    tag = fallback_tag(digest)
    try:
        m = client.get_manifest(repo, tag, accept=(OCI_INDEX,))
    except ImageNotFoundError:
        return []
    except MalformedManifestError as exc:
        log.warning("%s:%s is not a valid referrers index (%s); ignoring it", repo, tag, exc)
        return []
    try:
        doc = parse_manifest_json(m.data, OCI_INDEX)
    except MalformedManifestError:
        return []
    return [d for d in doc.get("manifests", []) if isinstance(d, dict)]


def find_referrers(
    client: RegistryClient, repo: str, digest: str, artifact_type: str | None = ARTIFACT_TYPE
) -> list[dict]:
    """Referrers of ``digest`` in ``repo`` (API first, tag fallback on 404), filtered."""
    supported = getattr(client, "referrers_supported", None)
    if supported is not False:
        found = client.referrers_api(repo, digest, artifact_type)
        if found is not None:
            client.referrers_supported = True  # type: ignore[attr-defined]
            return [d for d in found if _matches(d, artifact_type)]
        client.referrers_supported = False  # type: ignore[attr-defined]
        log.debug("%s has no referrers API; using the %s tag", client.host, fallback_tag(digest))
    return [d for d in read_fallback_index(client, repo, digest) if _matches(d, artifact_type)]


def _write_index(client: RegistryClient, repo: str, tag: str, entries: list[dict]) -> None:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    data = json.dumps(index, separators=(",", ":")).encode()
    client.put_manifest(repo, tag, data, OCI_INDEX)


def add_referrer_to_fallback(
    client: RegistryClient,
    repo: str,
    subject: str,
    desc: dict,
    *,
    attempts: int = 10,
    settle: float = 0.3,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict]:
    """Add ``desc`` to the fallback index of ``subject`` without losing others' entries.

    Returns the index entries as last read back. Raises :class:`RegistryError` if the entry
    keeps disappearing (a very busy tag).
    """
    tag = fallback_tag(subject)
    for attempt in range(attempts):
        entries = read_fallback_index(client, repo, subject)
        if not any(e.get("digest") == desc["digest"] for e in entries):
            merged = [e for e in entries if e.get("digest") != desc["digest"]] + [desc]
            _write_index(client, repo, tag, merged)
        # Verify twice after a pause: a publisher that read before our write and writes after
        # our first check would otherwise drop our entry unnoticed.
        lost = False
        for _ in range(2):
            sleep(settle * (1 + random.random()))
            entries = read_fallback_index(client, repo, subject)
            if not any(e.get("digest") == desc["digest"] for e in entries):
                lost = True
                break
        if not lost:
            return entries
        log.info("%s:%s lost our entry to a concurrent writer; merging again", repo, tag)
        sleep(settle * random.random() * (attempt + 1))
    raise RegistryError(
        f"could not keep {desc['digest']} in {repo}:{tag} after {attempts} attempts "
        "(concurrent publishers); run publish again"
    )


def remove_from_fallback(client: RegistryClient, repo: str, subject: str, digest: str) -> None:
    """Drop one entry (used when deleting an artifact)."""
    entries = read_fallback_index(client, repo, subject)
    kept = [e for e in entries if e.get("digest") != digest]
    if len(kept) != len(entries):
        _write_index(client, repo, fallback_tag(subject), kept)
