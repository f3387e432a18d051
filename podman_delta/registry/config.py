"""``registries.conf`` (v2 TOML and the old v1 tables), drop-ins, short names and certs.d.

We read the same files as containers/image (``sysregistriesv2``) so that a name means the same
registry to podman-delta as to podman:

* the main file: ``$CONTAINERS_REGISTRIES_CONF``, else (non-root)
  ``~/.config/containers/registries.conf``, else ``/etc/containers/registries.conf``;
* drop-ins: ``*.conf`` in ``/etc/containers/registries.conf.d`` and (non-root)
  ``~/.config/containers/registries.conf.d``, in lexical order, each overriding earlier files:
  ``unqualified-search-registries`` and ``short-name-mode`` are replaced when set, ``[aliases]``
  merge, ``[[registry]]`` entries replace those with the same prefix;
* the short-name alias cache ``~/.cache/containers/short-name-aliases.conf`` (lowest priority).

``[[registry]]`` entries give ``insecure``, ``blocked``, ``location`` rewriting and ``mirror``
lists; ``prefix`` matches at a path boundary and may be a ``*.example.com`` wildcard.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from podman_delta.errors import RegistryError
from podman_delta.registry.reference import (
    DOCKER_IO,
    ImageReference,
    ReferenceError,
    parse_reference,
)

log = logging.getLogger(__name__)

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_DROPINS = Path("/etc/containers/registries.conf.d")


class BlockedRegistryError(RegistryError):
    """registries.conf marks the registry as blocked."""


class ShortNameError(RegistryError):
    """A short name cannot be resolved (no search registries, or an ambiguous alias)."""


class ConfigError(RegistryError):
    """registries.conf is malformed."""


@dataclass(frozen=True)
class Endpoint:
    """One place to pull from: a registry host (and path prefix) with its TLS setting."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # all | digest-only | tag-only

    def rewrite(self, ref: ImageReference, prefix: str) -> ImageReference:
        """``ref`` with ``prefix`` replaced by this endpoint's location."""
        full = ref.name
        tail = full[len(prefix) :] if prefix and full.startswith(prefix) else ""
        if prefix.startswith("*."):
            tail = full[len(ref.registry or "") :]
        new = parse_reference(self.location + tail)
        return ImageReference(new.registry, new.repository, ref.tag, ref.digest)


@dataclass
class RegistryEntry:
    """A ``[[registry]]`` table."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: list[Endpoint] = field(default_factory=list)
    mirror_by_digest_only: bool = False

    def matches(self, name: str) -> bool:
        """Prefix match at a boundary, as ``refMatchingPrefix`` in c/image."""
        if self.prefix.startswith("*."):
            host = name.split("/", 1)[0]
            return host.endswith(self.prefix[1:])
        if not name.startswith(self.prefix):
            return False
        return len(name) == len(self.prefix) or name[len(self.prefix)] in "/:@"


@dataclass
class RegistriesConf:
    """The merged configuration."""

    search: list[str] = field(default_factory=list)
    registries: list[RegistryEntry] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    short_name_mode: str = "permissive"
    files: list[Path] = field(default_factory=list)

    def find(self, ref: ImageReference) -> RegistryEntry | None:
        """The ``[[registry]]`` entry with the longest matching prefix."""
        name = ref.name
        best: RegistryEntry | None = None
        for entry in self.registries:
            if entry.matches(name) and (best is None or _rank(entry) > _rank(best)):
                best = entry
        return best

    def is_insecure(self, host: str) -> bool:
        entry = self.find(ImageReference(host, "x"))
        return bool(entry and entry.insecure and entry.location.split("/")[0] == host)

    def pull_endpoints(self, ref: ImageReference) -> list[tuple[Endpoint, ImageReference]]:
        """Where to try pulling ``ref``: mirrors first, then the primary location.

        Raises :class:`BlockedRegistryError` if the matching entry is blocked.
        """
        entry = self.find(ref)
        if entry is None:
            return [(Endpoint(ref.registry or DOCKER_IO), ref)]
        if entry.blocked:
            raise BlockedRegistryError(
                f"registry {entry.prefix} is blocked in registries.conf ({_names(self.files)})"
            )
        out = []
        for mirror in entry.mirrors:
            by_digest = entry.mirror_by_digest_only or mirror.pull_from_mirror == "digest-only"
            if by_digest and ref.digest is None:
                continue
            if mirror.pull_from_mirror == "tag-only" and ref.digest is not None:
                continue
            out.append((mirror, mirror.rewrite(ref, entry.prefix)))
        if entry.prefix.startswith("*."):
            out.append((Endpoint(ref.registry or "", entry.insecure), ref))
            return out
        primary = Endpoint(entry.location, entry.insecure)
        out.append((primary, primary.rewrite(ref, entry.prefix)))
        return out

    def push_endpoint(self, ref: ImageReference) -> tuple[Endpoint, ImageReference]:
        """Where pushes of ``ref`` go (the primary location; mirrors are pull-only)."""
        return self.pull_endpoints(ref.with_tag(ref.tag, None) if ref.digest else ref)[-1]


def _rank(entry: RegistryEntry) -> int:
    # A wildcard is less specific than any literal prefix of the same length.
    return len(entry.prefix) * 2 - (1 if entry.prefix.startswith("*.") else 0)


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in paths) or "defaults"


def _is_root() -> bool:
    return os.geteuid() == 0


def default_paths() -> tuple[Path, list[Path]]:
    """The main file and the drop-in directories, in c/image's order."""
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    home = Path(os.path.expanduser("~"))
    user_conf = home / ".config/containers/registries.conf"
    if env:
        main = Path(env)
    elif not _is_root() and user_conf.exists():
        main = user_conf
    else:
        main = SYSTEM_CONF
    dirs = [SYSTEM_DROPINS]
    if not _is_root():
        dirs.append(home / ".config/containers/registries.conf.d")
    env_dir = os.environ.get("CONTAINERS_REGISTRIES_CONF_DIR")
    if env_dir:  # also honoured by c/image's tests; lets users isolate the drop-ins
        dirs = [Path(env_dir)]
    return main, dirs


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}; fix the TOML syntax") from exc


def _mirrors(raw: Sequence[dict], path: Path) -> list[Endpoint]:
    out = []
    for m in raw:
        if "location" not in m:
            raise ConfigError(f"{path}: a [[registry.mirror]] has no location")
        out.append(
            Endpoint(
                str(m["location"]).rstrip("/"),
                bool(m.get("insecure", False)),
                str(m.get("pull-from-mirror", "all") or "all"),
            )
        )
    return out


def _entries(data: dict, path: Path) -> list[RegistryEntry]:
    out = []
    for raw in data.get("registry", []):
        location = str(raw.get("location", "")).rstrip("/")
        prefix = str(raw.get("prefix", "") or location)
        if not prefix:
            raise ConfigError(f"{path}: a [[registry]] has neither prefix nor location")
        if prefix.startswith("*.") and location:
            raise ConfigError(f"{path}: wildcard prefix {prefix} cannot have a location")
        out.append(
            RegistryEntry(
                prefix=prefix,
                location=location or prefix,
                insecure=bool(raw.get("insecure", False)),
                blocked=bool(raw.get("blocked", False)),
                mirrors=_mirrors(raw.get("mirror", []), path),
                mirror_by_digest_only=bool(raw.get("mirror-by-digest-only", False)),
            )
        )
    # v1 format: [registries.search] registries = [...], likewise insecure and block
    v1 = data.get("registries", {})
    if isinstance(v1, dict):
        for host in v1.get("insecure", {}).get("registries", []):
            out.append(RegistryEntry(prefix=host, location=host, insecure=True))
        for host in v1.get("block", {}).get("registries", []):
            out.append(RegistryEntry(prefix=host, location=host, blocked=True))
    return out


def _merge(conf: RegistriesConf, data: dict, path: Path) -> None:
    conf.files.append(path)
    if "unqualified-search-registries" in data:
        conf.search = [str(s) for s in data["unqualified-search-registries"]]
    v1 = data.get("registries", {})
    if isinstance(v1, dict) and "search" in v1:
        conf.search = [str(s) for s in v1["search"].get("registries", [])]
    if "short-name-mode" in data:
        conf.short_name_mode = str(data["short-name-mode"])
    for alias, value in data.get("aliases", {}).items():
        conf.aliases[str(alias)] = str(value)
    for entry in _entries(data, path):
        conf.registries = [e for e in conf.registries if e.prefix != entry.prefix]
        conf.registries.append(entry)


def load_registries_conf(
    path: Path | None = None, dropin_dirs: Sequence[Path] | None = None
) -> RegistriesConf:
    """Read and merge registries.conf, its drop-ins and the alias cache."""
    main, dirs = default_paths()
    if path is not None:
        main = Path(path)
    if dropin_dirs is not None:
        dirs = [Path(d) for d in dropin_dirs]
    conf = RegistriesConf()
    cache = Path(os.path.expanduser("~/.cache/containers/short-name-aliases.conf"))
    if cache.is_file():
        try:
            conf.aliases.update(_read_toml(cache).get("aliases", {}))
        except ConfigError as exc:  # a broken cache must not stop pulls
            log.warning("ignoring %s", exc)
    if main.is_file():
        _merge(conf, _read_toml(main), main)
    for d in dirs:
        if d.is_dir():
            for f in sorted(d.glob("*.conf")):
                _merge(conf, _read_toml(f), f)
    return conf


def resolve_short_name(ref: ImageReference, conf: RegistriesConf) -> list[ImageReference]:
    """Candidate fully qualified references for ``ref``, in the order podman tries them.

    A qualified reference is returned unchanged. An alias wins over the search list (as in
    c/image); ``localhost/`` is tried first for short names, like podman does for local images,
    only when it is listed in ``unqualified-search-registries``.
    """
    if not ref.is_short:
        return [ref]
    alias = conf.aliases.get(ref.repository)
    if alias:
        try:
            target = parse_reference(alias)
        except ReferenceError as exc:
            raise ShortNameError(f"alias {ref.repository!r} = {alias!r} is invalid: {exc}") from exc
        if target.is_short:
            raise ShortNameError(f"alias {ref.repository!r} = {alias!r} must be fully qualified")
        tag = ref.tag if ref.tag or ref.digest else target.tag
        return [ImageReference(target.registry, target.repository, tag, ref.digest)]
    if not conf.search:
        raise ShortNameError(
            f"short name {ref.repository!r}: no unqualified-search-registries in "
            f"{_names(conf.files)}; use a fully qualified name such as "
            f"quay.io/{ref.repository}"
        )
    return [ref.with_registry(host) for host in conf.search]


# -- certs.d


def certs_dirs(host: str, certs_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories holding ``*.crt`` CAs and ``*.cert``/``*.key`` client pairs for ``host``.

    As in c/image ``tlsclientconfig``: ``--cert-dir`` alone when given; else
    ``~/.config/containers/certs.d/<host>`` (non-root), ``/etc/containers/certs.d/<host>`` and
    ``/etc/docker/certs.d/<host>``.
    """
    if certs_dir:
        return [Path(certs_dir)]
    roots = []
    if not _is_root():
        roots.append(Path(os.path.expanduser("~/.config/containers/certs.d")))
    roots += [Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d")]
    return [r / host for r in roots if (r / host).is_dir()]


@dataclass(frozen=True)
class TLSFiles:
    """CA bundle files and an optional client certificate for one host."""

    ca_files: tuple[Path, ...] = ()
    client_cert: tuple[Path, Path] | None = None


def tls_files(host: str, certs_dir: str | os.PathLike[str] | None = None) -> TLSFiles:
    """Collect ``*.crt`` files and the first ``*.cert``/``*.key`` pair from the certs dirs."""
    cas: list[Path] = []
    client: tuple[Path, Path] | None = None
    for d in certs_dirs(host, certs_dir):
        for f in sorted(d.iterdir()):
            if f.suffix == ".crt":
                cas.append(f)
            elif f.suffix == ".cert" and client is None:
                key = f.with_suffix(".key")
                if not key.exists():
                    raise ConfigError(f"{f} has no matching {key.name}; add the key or remove it")
                client = (f, key)
    return TLSFiles(tuple(cas), client)
