"""Registry credentials, found where podman finds them, and the auth challenges.

Lookup order (containers/image ``pkg/docker/config``): ``--creds`` wins; then ``--authfile`` or
``$REGISTRY_AUTH_FILE`` alone when given; otherwise ``${XDG_RUNTIME_DIR}/containers/auth.json``,
``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``, ``~/.docker/config.json`` and
``~/.dockercfg``. In each file the most specific key wins (``host/ns/repo`` before ``host/ns``
before ``host``), and a ``credHelpers`` entry runs ``docker-credential-<helper> get``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from podman_delta.errors import RegistryError

log = logging.getLogger(__name__)

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


class AuthFileError(RegistryError):
    """An auth file cannot be read."""


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity (refresh) token when ``username`` is empty."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:  # never leak secrets into logs
        return f"Credentials(username={self.username!r}, password=***)"


def parse_creds(text: str) -> Credentials:
    """Parse ``--creds user[:password]``."""
    user, _, password = text.partition(":")
    if not user:
        raise AuthFileError("--creds must be USER:PASSWORD with a non-empty user")
    return Credentials(user, password)


def auth_file_candidates(authfile: str | os.PathLike[str] | None = None) -> list[Path]:
    """The auth files to read, in podman's order."""
    explicit = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return [Path(explicit)]
    home = Path(os.path.expanduser("~"))
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(Path(runtime) / "containers/auth.json")
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    out.append(config_home / "containers/auth.json")
    out.append(home / ".docker/config.json")
    out.append(home / ".dockercfg")
    return out


def _keys(host: str, repository: str | None) -> Iterator[str]:
    """Keys to try, most specific first."""
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            yield f"{host}/{'/'.join(parts[:i])}"
    yield host
    if host == "docker.io":
        yield from _DOCKER_HUB_KEYS


def _normalise_key(key: str) -> str:
    """Drop a scheme and trailing ``/v1/``-style paths, as c/image does for legacy keys."""
    key = re.sub(r"^https?://", "", key)
    if key.endswith("/v1/") or key.endswith("/v2/"):
        key = key[:-4]
    return key.rstrip("/")


def _decode(entry: dict, path: Path) -> Credentials | None:
    token = entry.get("identitytoken")
    raw = entry.get("auth")
    if raw:
        try:
            user, _, password = base64.b64decode(raw).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuthFileError(f"{path}: an 'auth' value is not base64 of user:password") from exc
        return Credentials(user, password, token)
    if token:
        return Credentials("", "", token)
    return None


def _helper(helper: str, host: str) -> Credentials | None:
    try:
        res = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=host.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthFileError(f"credential helper docker-credential-{helper} failed: {exc}") from exc
    if res.returncode != 0:
        log.debug("credential helper %s has nothing for %s", helper, host)
        return None
    try:
        data = json.loads(res.stdout)
        return Credentials(data["Username"], data["Secret"])
    except (ValueError, KeyError) as exc:
        raise AuthFileError(f"docker-credential-{helper} returned malformed output") from exc


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def lookup_credentials(
    host: str,
    repository: str | None = None,
    *,
    authfile: str | os.PathLike[str] | None = None,
) -> Credentials | None:
    """Credentials for ``host`` (and ``repository``) from the auth files, or None."""
    for path in auth_file_candidates(authfile):
        data = _load(path)
        if data is None:
            if authfile:
                raise AuthFileError(f"auth file {path} does not exist; check --authfile")
            continue
        auths = data.get("auths", data if path.name == ".dockercfg" else {})
        normalised = {_normalise_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        for key in _keys(host, repository):
            helper = data.get("credHelpers", {}).get(key)
            if helper:
                creds = _helper(helper, key)
                if creds:
                    return creds
            entry = normalised.get(_normalise_key(key))
            if entry:
                creds = _decode(entry, path)
                if creds:
                    return creds
        store = data.get("credsStore")
        if store:
            creds = _helper(store, host)
            if creds:
                return creds
    return None


# -- WWW-Authenticate

_PARAM = re.compile(r'([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str  # lower case: bearer | basic
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m[1].lower(): (m[2] if m[2] is not None else m[3]) for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
