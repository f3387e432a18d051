"""Images as podman-delta reads them: manifest + config + layer descriptors, from any source.

:class:`ImageSource` is the one interface the publisher and ``create``/``apply`` read images
through (as c/image's ``ImageSource``): a registry (:class:`RegistryImageSource`, which resolves
short names, mirrors and the platform like podman) or an OCI layout / oci-archive
(:class:`podman_delta.registry.layout.LayoutImageSource`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from podman_delta.errors import RegistryError
from podman_delta.registry.client import (
    INDEXES,
    MAX_CONFIG_SIZE,
    ClientOptions,
    ImageNotFoundError,
    MalformedManifestError,
    Manifest,
    Platform,
    ProgressFn,
    RegistryClient,
    check_descriptor,
    choose_platform,
    host_platform,
)
from podman_delta.registry.config import load_registries_conf, resolve_short_name
from podman_delta.registry.reference import ImageReference, parse_reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageInfo:
    """One platform's image: its manifest, config and layers (lowest first)."""

    manifest: Manifest
    config: bytes
    layers: tuple[dict, ...]
    diff_ids: tuple[str, ...]
    index_digest: str | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def config_digest(self) -> str:
        return self.manifest.json()["config"]["digest"]

    @property
    def config_json(self) -> dict:
        return json.loads(self.config)

    @property
    def created(self) -> str:
        """The config's ``created`` time (RFC 3339, sorts as text) or ``""``."""
        value = self.config_json.get("created")
        return value if isinstance(value, str) else ""


def image_info(manifest: Manifest, config: bytes, index_digest: str | None = None) -> ImageInfo:
    """Build :class:`ImageInfo`, checking that the config gives one DiffID per layer."""
    doc = manifest.json()
    if manifest.is_index or "layers" not in doc:
        raise MalformedManifestError(f"{manifest.digest} is not an image manifest")
    layers = tuple(check_descriptor(d) for d in doc["layers"])
    try:
        cfg = json.loads(config)
        diff_ids = tuple(cfg["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedManifestError(f"image config of {manifest.digest} has no rootfs") from exc
    if len(diff_ids) != len(layers) or not all(isinstance(d, str) for d in diff_ids):
        raise MalformedManifestError(
            f"image {manifest.digest}: {len(layers)} layers but {len(diff_ids)} DiffIDs"
        )
    return ImageInfo(manifest, config, layers, diff_ids, index_digest)


class ImageSource(Protocol):
    """Where an image's manifest, config and blobs come from."""

    #: Human-readable name for messages.
    name: str

    def image(self) -> ImageInfo: ...

    def fetch_blob(self, desc: dict, dest: Path, progress: ProgressFn | None = None) -> Path: ...

    def close(self) -> None: ...


class ClientPool:
    """One :class:`RegistryClient` per (host, TLS setting), shared by the sources of a run."""

    def __init__(self, opts: ClientOptions | None = None) -> None:
        self.opts = opts or ClientOptions()
        if self.opts.registries_conf is None:
            self.opts = replace(self.opts, registries_conf=load_registries_conf())
        self._clients: dict[tuple[str, bool | None], RegistryClient] = {}

    @property
    def conf(self):
        return self.opts.registries_conf

    def client(self, host: str, insecure: bool = False) -> RegistryClient:
        tls = self.opts.tls_verify
        if tls is None and insecure:
            tls = False
        key = (host, tls)
        if key not in self._clients:
            self._clients[key] = RegistryClient(host, replace(self.opts, tls_verify=tls))
        return self._clients[key]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def push_target(self, ref: ImageReference) -> tuple[RegistryClient, ImageReference]:
        """The client and rewritten reference to push ``ref`` to (no mirrors)."""
        candidates = resolve_short_name(ref, self.conf)
        endpoint, target = self.conf.push_endpoint(candidates[0])
        return self.client(target.registry or "", endpoint.insecure), target


class RegistryImageSource:
    """An image in a registry, resolved the way podman resolves it."""

    def __init__(
        self, ref: ImageReference | str, pool: ClientPool, platform: Platform | None = None
    ) -> None:
        self.ref = parse_reference(ref) if isinstance(ref, str) else ref
        self.pool = pool
        self.platform = platform or host_platform()
        self.name = str(self.ref)
        self.client: RegistryClient | None = None
        self.resolved: ImageReference | None = None
        self._info: ImageInfo | None = None

    @property
    def repo(self) -> str:
        assert self.resolved is not None
        return self.resolved.repository

    def image(self) -> ImageInfo:
        if self._info is None:
            self._info = self._resolve()
        return self._info

    def _resolve(self) -> ImageInfo:
        """Try short-name candidates × mirrors in order; the first that has the image wins."""
        errors: list[RegistryError] = []
        for candidate in resolve_short_name(self.ref, self.pool.conf):
            for endpoint, target in self.pool.conf.pull_endpoints(candidate):
                client = self.pool.client(target.registry or "", endpoint.insecure)
                try:
                    manifest = client.get_manifest(target.repository, target.ref)
                except RegistryError as exc:  # like c/image: try the next mirror/candidate
                    log.debug("%s: %s", target, exc)
                    errors.append(exc)
                    continue
                self.client, self.resolved = client, target
                self.name = str(target)
                return self._load(client, target, manifest)
        if len(errors) == 1:
            raise errors[0]
        tried = "; ".join(str(e) for e in errors[-3:])
        raise ImageNotFoundError(f"{self.ref} not found in any configured registry ({tried})")

    def _load(self, client: RegistryClient, target: ImageReference, m: Manifest) -> ImageInfo:
        index_digest = None
        if m.media_type in INDEXES:
            index_digest = m.digest
            desc = choose_platform(m.json(), self.platform)
            m = client.get_manifest(target.repository, desc["digest"])
            if m.media_type in INDEXES:
                raise MalformedManifestError(f"{target}: nested manifest lists are not supported")
        doc = m.json()
        config = client.get_blob_bytes(target.repository, doc["config"]["digest"], MAX_CONFIG_SIZE)
        return image_info(m, config, index_digest)

    def fetch_blob(self, desc: dict, dest: Path, progress: ProgressFn | None = None) -> Path:
        self.image()
        assert self.client is not None
        return self.client.get_blob(
            self.repo, desc["digest"], dest, size=desc.get("size"), progress=progress
        )

    def close(self) -> None:
        pass


def open_image_source(
    text: str, pool: ClientPool | None = None, platform: Platform | None = None
) -> ImageSource:
    """Open ``oci-archive:PATH``, ``oci:DIR``, ``docker://REF`` or a plain reference."""
    from podman_delta.registry.layout import LayoutImageSource

    for prefix in ("oci-archive:", "oci:"):
        if text.startswith(prefix):
            path, _, name = text[len(prefix) :].partition(":")
            if not path:
                raise RegistryError(f"{text!r}: give a path after {prefix}")
            return LayoutImageSource(
                Path(path),
                archive=prefix == "oci-archive:",
                ref_name=name or None,
                platform=platform,
            )
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    return RegistryImageSource(parse_reference(text), pool or ClientPool(), platform)
