"""Image references parsed the way podman parses them.

podman (containers/image ``docker/reference``) accepts ``fedora:33``, ``quay.io/ns/name:tag``,
``localhost:5000/name``, ``name@sha256:…`` and ``name:tag@sha256:…``. A first path component is a
registry host when it contains ``.`` or ``:``, is ``localhost``, or has upper-case letters;
otherwise the name is a *short name* that ``registries.conf`` resolves. ``docker.io`` names with
one component get ``library/``, so ``docker.io/busybox`` and ``busybox`` resolved to Docker Hub
are the same image. We keep that behaviour so users type the same names as with podman.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from podman_delta.errors import DeltaError

DOCKER_IO = "docker.io"
_LEGACY_DOCKER = ("index.docker.io", "registry-1.docker.io")

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_TRANSPORT = "docker://"
MAX_NAME = 255


class ReferenceError(DeltaError):
    """An image reference could not be parsed."""

    exit_code = 2


@dataclass(frozen=True)
class ImageReference:
    """A registry image reference: ``registry/repository[:tag][@digest]``.

    ``registry`` is ``None`` for a short name (resolve it with
    :func:`podman_delta.registry.config.resolve_short_name`).
    """

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def is_short(self) -> bool:
        """True when no registry was given (podman would consult registries.conf)."""
        return self.registry is None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag (default latest)."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """``registry/repository`` (the repository alone for a short name)."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def with_registry(self, registry: str) -> ImageReference:
        """Qualify a short name with ``registry`` (adding ``library/`` on docker.io)."""
        repo = self.repository
        if registry == DOCKER_IO and "/" not in repo:
            repo = f"library/{repo}"
        return replace(self, registry=registry, repository=repo)

    def with_tag(self, tag: str | None, digest: str | None = None) -> ImageReference:
        return replace(self, tag=tag, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _is_registry(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` like podman; short names stay short (``registry`` is None).

    A leading ``docker://`` transport is accepted. When neither tag nor digest is given, ``tag``
    stays ``None`` (``ref`` then says ``latest``), so callers can tell "no tag" from ``:latest``.
    """
    original = text
    if text.startswith(_TRANSPORT):
        text = text[len(_TRANSPORT) :]
    if not text:
        raise ReferenceError("empty image reference")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise ReferenceError(
                f"invalid digest in {original!r}: expected sha256: and 64 lower-case hex digits"
            )
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError(f"invalid tag {tag!r} in {original!r}")
    registry: str | None = None
    first, sep, rest = text.partition("/")
    if sep and _is_registry(first):
        if not _HOST.fullmatch(first):
            raise ReferenceError(f"invalid registry host {first!r} in {original!r}")
        registry, text = first, rest
        if registry in _LEGACY_DOCKER:
            registry = DOCKER_IO
    if not text or any(not _COMPONENT.fullmatch(c) for c in text.split("/")):
        raise ReferenceError(
            f"invalid image name {original!r}: repository names must be lower-case "
            "(a-z, 0-9, '.', '_', '-' separated by '/')"
        )
    if len(text) + len(registry or "") > MAX_NAME:
        raise ReferenceError(f"image name too long: {original!r}")
    ref = ImageReference(registry, text, tag, digest)
    if registry == DOCKER_IO:
        ref = ref.with_registry(DOCKER_IO)
    return ref


def parse_qualified(text: str) -> ImageReference:
    """Parse ``text`` and refuse short names (for pushes, where podman refuses them too)."""
    ref = parse_reference(text)
    if ref.is_short:
        raise ReferenceError(
            f"{text!r} is a short name: give the registry too (e.g. localhost:5000/{text})"
        )
    return ref
