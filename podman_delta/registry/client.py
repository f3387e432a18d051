"""An OCI distribution (v2) client on ``requests``: what podman-delta needs from a registry.

Modelled on containers/image's ``docker`` transport: one :class:`RegistryClient` per registry
host, which finds the scheme (https, or http when TLS verification is off, as podman does),
answers auth challenges (Bearer token flow, Basic) with credentials from :mod:`.auth`, retries
429 (honouring ``Retry-After``), 5xx and dropped connections with backoff, and turns every
failure into a one-line :class:`RegistryError` subclass that tells the user what to do.

Blob downloads stream to disk, hash on the fly and resume with ``Range`` after a dropped
connection; :func:`download_blobs` runs several at once and reports progress through a
``progress(digest, done, total)`` callback so the CLI can draw bars.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform as _platform
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin

import requests
import urllib3

from podman_delta import __version__
from podman_delta.errors import DigestMismatchError, RegistryError
from podman_delta.registry import auth as _auth
from podman_delta.registry.config import RegistriesConf, tls_files

log = logging.getLogger(__name__)

# -- media types

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
DEFAULT_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

#: Refuse manifests and indexes above this size (c/image uses 4 MiB too).
MAX_MANIFEST_SIZE = 4 << 20
#: Refuse indexes/manifests listing more entries than this.
MAX_ENTRIES = 10_000
#: Small blobs (configs) read into memory are capped too.
MAX_CONFIG_SIZE = 16 << 20

ProgressFn = Callable[[str, int, int | None], None]

# -- errors


class ImageNotFoundError(RegistryError):
    """The repository, tag or manifest does not exist."""


class BlobNotFoundError(RegistryError):
    """A blob the manifest names is missing from the registry."""


class AuthRequiredError(RegistryError):
    """The registry wants credentials and we have none."""


class AuthDeniedError(RegistryError):
    """The credentials were rejected or lack permission."""


class TLSFailureError(RegistryError):
    """The TLS handshake or certificate check failed."""


class RateLimitedError(RegistryError):
    """HTTP 429 persisted after backing off."""


class RegistryServerError(RegistryError):
    """HTTP 5xx persisted after retries."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached (refused, reset, timed out)."""


class MalformedManifestError(RegistryError):
    """A manifest or index is not valid JSON of a known shape, or is too large."""


class UnsupportedError(RegistryError):
    """The registry does not implement an endpoint (for example referrers)."""


# -- platforms


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` as in OCI index entries."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return f"{out}/{self.variant}" if self.variant else out


_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """The platform podman would pick on this host."""
    arch, variant = _ARCH.get(_platform.machine(), (_platform.machine(), None))
    return Platform("linux", arch, variant)


def parse_platform(
    text: str | None = None, arch: str | None = None, os_: str | None = None
) -> Platform:
    """Parse ``--platform os/arch[/variant]``, with ``--arch``/``--os`` overriding parts."""
    base = host_platform()
    if text:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"invalid --platform {text!r}: use os/arch[/variant]")
        base = Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if arch:
        arch_name, variant = _ARCH.get(arch, (arch, None))
        base = Platform(base.os, arch_name, variant if arch_name != base.architecture else None)
    if os_:
        base = Platform(os_, base.architecture, base.variant)
    return base


def choose_platform(index: dict, want: Platform) -> dict:
    """Pick the manifest descriptor for ``want`` from an index / manifest list.

    The variant must match when both sides give one; an entry without variant matches any
    (arm64 images often omit ``v8``). Among equals the first wins, as in c/image.
    """
    candidates = []
    for desc in index.get("manifests", []):
        p = desc.get("platform") or {}
        if p.get("os") != want.os or p.get("architecture") != want.architecture:
            continue
        variant = p.get("variant")
        if want.variant and variant and variant != want.variant:
            continue
        candidates.append((0 if variant == want.variant else 1, desc))
    if not candidates:
        have = sorted(
            {
                str(
                    Platform(
                        (d.get("platform") or {}).get("os", "?"),
                        (d.get("platform") or {}).get("architecture", "?"),
                        (d.get("platform") or {}).get("variant"),
                    )
                )
                for d in index.get("manifests", [])
            }
        )
        raise ImageNotFoundError(
            f"no image for platform {want} in the manifest list (it has: {', '.join(have)}); "
            "choose one with --platform"
        )
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


# -- manifests


@dataclass(frozen=True)
class Manifest:
    """Raw manifest bytes with their media type and digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict:
        return parse_manifest_json(self.data, self.media_type)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def guess_media_type(doc: dict) -> str:
    """The media type a manifest says it is (the ``mediaType`` field, else by shape)."""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def parse_manifest_json(data: bytes, media_type: str | None = None) -> dict:
    """Parse and sanity-check a manifest or index; raise :class:`MalformedManifestError`."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise MalformedManifestError(
            f"manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit"
        )
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedManifestError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedManifestError("manifest is not a JSON object")
    mt = media_type or guess_media_type(doc)
    if mt == DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise MalformedManifestError(
            "Docker schema 1 manifests are not supported; re-push the image with a current tool"
        )
    key = "manifests" if mt in INDEXES or "manifests" in doc else "layers"
    entries = doc.get(key, [])
    if not isinstance(entries, list):
        raise MalformedManifestError(f"manifest field {key!r} is not a list")
    if len(entries) > MAX_ENTRIES:
        raise MalformedManifestError(f"manifest lists {len(entries)} entries (max {MAX_ENTRIES})")
    for d in entries + ([doc["config"]] if key == "layers" and "config" in doc else []):
        check_descriptor(d)
    if key == "layers" and "config" not in doc:
        raise MalformedManifestError("image manifest has no config descriptor")
    return doc


def check_descriptor(d: Any) -> dict:
    """Validate one descriptor's shape (mediaType, digest, non-negative size)."""
    if not isinstance(d, dict):
        raise MalformedManifestError("a descriptor is not a JSON object")
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise MalformedManifestError(f"descriptor has an invalid digest: {digest!r}")
    try:
        bytes.fromhex(digest[7:])
    except ValueError as exc:
        raise MalformedManifestError(f"descriptor has an invalid digest: {digest!r}") from exc
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise MalformedManifestError(f"descriptor {digest} has an invalid size: {size!r}")
    if not isinstance(d.get("mediaType", ""), str):
        raise MalformedManifestError(f"descriptor {digest} has an invalid mediaType")
    return d


# -- options and client


@dataclass
class ClientOptions:
    """How to talk to registries; mirrors podman's flags."""

    tls_verify: bool | None = None  # None: from registries.conf (insecure = false)
    creds: _auth.Credentials | None = None
    authfile: str | None = None
    certs_dir: str | None = None
    user_agent: str = f"podman-delta/{__version__}"
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_retry_wait: float = 60.0
    registries_conf: RegistriesConf | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PutResult:
    """Result of a manifest PUT."""

    digest: str
    subject: str | None  # the OCI-Subject header: the registry tracks referrers itself


_RETRY_STATUS = frozenset({500, 502, 503, 504})
_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)
Body = bytes | Callable[[], Any] | None


def _error_detail(resp: requests.Response) -> str:
    """``CODE: message`` from an OCI error body, else the start of the body."""
    try:
        errors = resp.json().get("errors") or []
        if errors:
            e = errors[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except (ValueError, AttributeError):
        pass
    text = (resp.text or "").strip().splitlines()
    return text[0][:200] if text else resp.reason or ""


def _retry_after(resp: requests.Response, default: float) -> float:
    value = resp.headers.get("Retry-After")
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


class RegistryClient:
    """Talk to one registry host (``host[:port]``)."""

    def __init__(self, host: str, options: ClientOptions | None = None) -> None:
        self.host = host
        self.opts = options or ClientOptions()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = self.opts.user_agent
        self._session.headers.update(self.opts.extra_headers)
        self._base: str | None = None
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._challenge: _auth.Challenge | None = None
        self._creds_loaded = False
        self._creds: _auth.Credentials | None = self.opts.creds
        self._bundle: str | None = None
        self.tls_verify = self._decide_tls()
        self._configure_tls()

    # -- setup

    def _decide_tls(self) -> bool:
        if self.opts.tls_verify is not None:
            return self.opts.tls_verify
        conf = self.opts.registries_conf
        return not (conf and conf.is_insecure(self.host))

    def _configure_tls(self) -> None:
        """Client certificate and trust: system CAs plus certs.d ``*.crt`` files.

        ``self._verify`` is passed on every request, because requests lets
        ``$REQUESTS_CA_BUNDLE`` override a session-level setting.
        """
        files = tls_files(self.host, self.opts.certs_dir)
        if files.client_cert:
            self._session.cert = (str(files.client_cert[0]), str(files.client_cert[1]))
        self._verify: bool | str = True
        if not self.tls_verify:
            self._verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif files.ca_files:
            fd, bundle = tempfile.mkstemp(prefix="podman-delta-ca-", suffix=".pem")
            with os.fdopen(fd, "wb") as out:
                out.write(Path(_system_ca_bundle()).read_bytes())
                for ca in files.ca_files:
                    out.write(b"\n" + ca.read_bytes())
            self._bundle = bundle
            self._verify = bundle

    def close(self) -> None:
        self._session.close()
        if self._bundle:
            with contextlib.suppress(OSError):
                os.unlink(self._bundle)
            self._bundle = None

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _credentials(self, repo: str | None) -> _auth.Credentials | None:
        if self._creds is None and not self._creds_loaded:
            self._creds = _auth.lookup_credentials(self.host, repo, authfile=self.opts.authfile)
            self._creds_loaded = True
        return self._creds

    # -- scheme detection

    def base_url(self) -> str:
        """``https://host`` or, with TLS verification off and no TLS server, ``http://host``."""
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._base = self._detect_scheme()
        return self._base

    def _detect_scheme(self) -> str:
        https = f"https://{self.host}"
        try:
            self._session.get(
                https + "/v2/", timeout=min(self.opts.timeout, 15), verify=self._verify
            )
            return https
        except requests.exceptions.SSLError as exc:
            if self.tls_verify:
                raise TLSFailureError(
                    f"TLS failure talking to {self.host}: {_short(exc)}; add its CA to "
                    f"/etc/containers/certs.d/{self.host}/ca.crt, or use --tls-verify=false "
                    "for a test registry"
                ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            if self.tls_verify:
                raise RegistryUnavailableError(
                    f"cannot reach registry {self.host}: {_short(exc)}; check the name and "
                    "that it is running"
                ) from exc
        log.debug("%s: no TLS, falling back to http (TLS verification is off)", self.host)
        return f"http://{self.host}"

    # -- the request loop

    def _scope_key(self, repo: str | None, push: bool, extra: Sequence[str]) -> str:
        scopes = []
        if repo:
            scopes.append(f"repository:{repo}:{'pull,push' if push else 'pull'}")
        scopes.extend(extra)
        return " ".join(scopes)

    def _auth_header(self, scope: str) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = self._credentials(None)
            return _auth.basic_header(creds) if creds else None
        token = self._tokens.get(scope)
        return f"Bearer {token}" if token else None

    def _fetch_token(self, challenge: _auth.Challenge, scope: str, repo: str | None) -> None:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthRequiredError(f"{self.host} sent a Bearer challenge without a realm")
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        for s in scope.split(" ") if scope else []:
            params.append(("scope", s))
        creds = self._credentials(repo)
        headers = {}
        method = "GET"
        data = None
        if creds and creds.identity_token:
            method = "POST"
            data = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "podman-delta",
                "service": challenge.params.get("service", ""),
                "scope": scope,
            }
        elif creds:
            headers["Authorization"] = _auth.basic_header(creds)
        try:
            resp = self._session.request(
                method,
                realm,
                verify=self._verify,
                params=params if method == "GET" else None,
                data=data,
                headers=headers,
                timeout=self.opts.timeout,
            )
        except requests.exceptions.SSLError as exc:
            raise TLSFailureError(f"TLS failure talking to token server {realm}") from exc
        except _NETWORK_ERRORS as exc:
            raise RegistryUnavailableError(
                f"cannot reach the token server {realm}: {_short(exc)}"
            ) from exc
        if resp.status_code in (401, 403):
            if creds:
                raise AuthDeniedError(
                    f"{self.host} rejected the credentials (token server said "
                    f"{resp.status_code}); check --creds or run podman login {self.host}"
                )
            raise AuthRequiredError(
                f"{self.host} requires authentication: run podman login {self.host} "
                "or pass --creds USER:PASSWORD"
            )
        if resp.status_code != 200:
            raise RegistryServerError(
                f"token server {realm} answered {resp.status_code}: {_error_detail(resp)}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise RegistryServerError(f"token server {realm} returned no token")
        self._tokens[scope] = token

    def request(
        self,
        method: str,
        path: str,
        *,
        repo: str | None = None,
        push: bool = False,
        extra_scopes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Body = None,
        stream: bool = False,
        allow_redirects: bool = True,
        what: str = "",
    ) -> requests.Response:
        """Send a request with auth, retries and errors; return any non-error response.

        The caller handles 2xx, 3xx and 404 (and 416 for ranges); 401/403, 429, 5xx and
        network errors are handled here.
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url() + path
        scope = self._scope_key(repo, push, extra_scopes)
        what = what or f"{method} {path}"
        attempt = 0
        auth_tried = False
        while True:
            hdrs = dict(headers or {})
            ch = self._challenge
            if ch is not None and ch.scheme == "bearer" and scope and scope not in self._tokens:
                self._fetch_token(ch, scope, repo)  # known realm: skip the 401 round trip
            authz = self._auth_header(scope)
            if authz:
                hdrs["Authorization"] = authz
            data = body() if callable(body) else body
            try:
                resp = self._session.request(
                    method,
                    url,
                    verify=self._verify,
                    headers=hdrs,
                    params=params,
                    data=data,
                    stream=stream,
                    timeout=self.opts.timeout,
                    allow_redirects=allow_redirects,
                )
            except requests.exceptions.SSLError as exc:
                raise TLSFailureError(
                    f"TLS failure talking to {self.host}: {_short(exc)}; add its CA under "
                    f"/etc/containers/certs.d/{self.host}/ or use --tls-verify=false"
                ) from exc
            except _NETWORK_ERRORS as exc:
                if attempt >= self.opts.retries:
                    raise RegistryUnavailableError(
                        f"cannot reach registry {self.host} ({what}): {_short(exc)}; "
                        "check that it is running and reachable"
                    ) from exc
                self._sleep(attempt, None)
                attempt += 1
                continue
            except requests.RequestException as exc:  # bad URL, redirect loop, bad header
                raise RegistryError(
                    f"request to {self.host} failed ({what}): {_short(exc)}"
                ) from exc
            finally:
                if hasattr(data, "close"):
                    data.close()
            status = resp.status_code
            if status == 401:
                challenge = _auth.parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                resp.close()
                if auth_tried or challenge is None:
                    self._raise_auth(status, repo, what)
                auth_tried = True
                self._challenge = challenge
                if challenge.scheme == "bearer":
                    self._fetch_token(challenge, scope, repo)
                elif self._credentials(repo) is None:
                    self._raise_auth(status, repo, what)
                continue
            if status == 403:
                resp.close()
                self._raise_auth(status, repo, what)
            if status == 429 or status in _RETRY_STATUS:
                if attempt >= self.opts.retries:
                    detail = _error_detail(resp)
                    resp.close()
                    if status == 429:
                        raise RateLimitedError(
                            f"{self.host} is rate-limiting requests (HTTP 429, {what}); "
                            "wait and try again, or log in for a higher limit"
                        )
                    raise RegistryServerError(
                        f"{self.host} failed with HTTP {status} ({what}): {detail}; try again later"
                    )
                wait = _retry_after(resp, -1.0)
                resp.close()
                self._sleep(attempt, wait if wait >= 0 else None)
                attempt += 1
                continue
            return resp

    def _raise_auth(self, status: int, repo: str | None, what: str) -> None:
        creds = self._credentials(repo)
        if status == 403 or creds is not None:
            raise AuthDeniedError(
                f"{self.host} denied access ({what}, HTTP {status}); check --creds/--authfile "
                f"and your permissions on {repo or self.host}"
            )
        raise AuthRequiredError(
            f"{self.host} requires authentication ({what}): run podman login {self.host} "
            "or pass --creds USER:PASSWORD"
        )

    def _sleep(self, attempt: int, wait: float | None) -> None:
        if wait is None:
            wait = self.opts.backoff * (2**attempt) * (0.5 + random.random() / 2)
        wait = min(wait, self.opts.max_retry_wait)
        log.info("%s: retrying in %.1f s", self.host, wait)
        time.sleep(wait)

    def _unexpected(self, resp: requests.Response, what: str) -> RegistryError:
        detail = _error_detail(resp)
        resp.close()
        return RegistryError(f"{self.host}: unexpected HTTP {resp.status_code} ({what}): {detail}")

    # -- API

    def ping(self) -> None:
        """Check that ``/v2/`` answers (authenticating if asked)."""
        resp = self.request("GET", "/v2/", what="ping")
        if resp.status_code != 200:
            raise self._unexpected(resp, "ping")
        resp.close()

    def get_manifest(self, repo: str, ref: str, accept: Iterable[str] = DEFAULT_ACCEPT) -> Manifest:
        """Fetch a manifest by tag or digest, size-capped and digest-checked."""
        what = f"manifest {repo}:{ref}" if not ref.startswith("sha256:") else f"{repo}@{ref}"
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            repo=repo,
            headers={"Accept": ", ".join(accept)},
            stream=True,
            what=what,
        )
        with resp:
            if resp.status_code == 404:
                sep = "@" if ref.startswith("sha256:") else ":"
                raise ImageNotFoundError(
                    f"image {self.host}/{repo}{sep}{ref} not found: check the name and tag "
                    f"({_error_detail(resp)})"
                )
            if resp.status_code != 200:
                raise self._unexpected(resp, what)
            data = _read_capped(resp, MAX_MANIFEST_SIZE, what)
        digest = sha256_digest(data)
        if ref.startswith("sha256:") and digest != ref:
            raise DigestMismatchError(
                f"manifest {repo}@{ref} from {self.host} has digest {digest}; the registry "
                "served wrong content"
            )
        header_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        doc = parse_manifest_json(data, None)
        media_type = doc.get("mediaType") or header_type or guess_media_type(doc)
        if media_type in ("application/json", "text/plain"):
            media_type = guess_media_type(doc)
        return Manifest(data, media_type, digest)

    def head_manifest(self, repo: str, ref: str) -> str | None:
        """The digest of ``repo:ref`` or None when it does not exist."""
        resp = self.request(
            "HEAD",
            f"/v2/{repo}/manifests/{ref}",
            repo=repo,
            headers={"Accept": ", ".join(DEFAULT_ACCEPT)},
            what=f"manifest {repo}:{ref}",
        )
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._unexpected(resp, f"HEAD manifest {repo}:{ref}")
        return resp.headers.get("Docker-Content-Digest")

    def get_blob_bytes(self, repo: str, digest: str, max_size: int = MAX_CONFIG_SIZE) -> bytes:
        """A small blob (config, embedded manifest) in memory, verified."""
        what = f"blob {repo}@{digest}"
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, stream=True, what=what)
        with resp:
            if resp.status_code == 404:
                raise BlobNotFoundError(f"{self.host}: {what} not found")
            if resp.status_code != 200:
                raise self._unexpected(resp, what)
            data = _read_capped(resp, max_size, what)
        if sha256_digest(data) != digest:
            raise DigestMismatchError(
                f"{what} from {self.host} has digest {sha256_digest(data)}: corrupt download"
            )
        return data

    def get_blob(
        self,
        repo: str,
        digest: str,
        dest: str | os.PathLike[str],
        *,
        size: int | None = None,
        progress: ProgressFn | None = None,
        max_resumes: int = 5,
    ) -> Path:
        """Stream a blob to ``dest``, hashing on the fly; resume with Range when cut off.

        On a digest or size mismatch the file is removed and :class:`DigestMismatchError`
        raised.
        """
        dest = Path(dest)
        what = f"blob {repo}@{digest}"
        hasher = hashlib.sha256()
        done = 0
        resumes = 0
        try:
            with open(dest, "wb") as out:
                while True:
                    headers = {"Range": f"bytes={done}-"} if done else {}
                    resp = self.request(
                        "GET",
                        f"/v2/{repo}/blobs/{digest}",
                        repo=repo,
                        headers=headers,
                        stream=True,
                        what=what,
                    )
                    with resp:
                        if resp.status_code == 404:
                            raise BlobNotFoundError(f"{self.host}: {what} not found")
                        if done and resp.status_code == 200:
                            log.info("%s: server ignored Range, restarting %s", self.host, digest)
                            out.seek(0)
                            out.truncate()
                            hasher = hashlib.sha256()
                            done = 0
                        elif resp.status_code not in (200, 206) or (
                            resp.status_code == 206 and not done
                        ):
                            raise self._unexpected(resp, what)
                        try:
                            for chunk in resp.raw.stream(1 << 20, decode_content=False):
                                out.write(chunk)
                                hasher.update(chunk)
                                done += len(chunk)
                                if size is not None and done > size:
                                    raise DigestMismatchError(
                                        f"{what} from {self.host} is larger than its "
                                        f"{size} bytes: corrupt or wrong blob"
                                    )
                                if progress:
                                    progress(digest, done, size)
                            if size is None or done == size:
                                break
                            reason = f"ended at {done} of {size} bytes"
                        except _NETWORK_ERRORS as exc:
                            reason = _short(exc)
                    resumes += 1
                    if resumes > max_resumes:
                        raise RegistryUnavailableError(
                            f"download of {what} from {self.host} kept failing ({reason}); "
                            "try again later"
                        )
                    log.info(
                        "%s: %s interrupted (%s); resuming at %d", self.host, what, reason, done
                    )
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise DigestMismatchError(
                    f"{what} from {self.host} has digest {got}: the registry served wrong "
                    "content; try again or report it to the registry operator"
                )
            if size is not None and done != size:
                raise DigestMismatchError(f"{what}: got {done} bytes, expected {size}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise
        return dest

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request(
            "HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo, what=f"HEAD blob {digest}"
        )
        resp.close()
        if resp.status_code in (200, 307):
            return True
        if resp.status_code == 404:
            return False
        raise self._unexpected(resp, f"HEAD blob {repo}@{digest}")

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True when the registry mounted it (201)."""
        resp = self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            repo=repo,
            push=True,
            extra_scopes=[f"repository:{from_repo}:pull"],
            params={"mount": digest, "from": from_repo},
            what=f"mount {digest} from {from_repo}",
        )
        resp.close()
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:  # not mounted; the upload session it opened is abandoned
            return False
        raise self._unexpected(resp, f"mount {digest}")

    def _start_upload(self, repo: str) -> str:
        resp = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", repo=repo, push=True, what="start upload"
        )
        resp.close()
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise self._unexpected(resp, f"start upload to {repo}")
        return urljoin(self.base_url() + "/", resp.headers["Location"])

    def upload_blob(
        self,
        repo: str,
        source: bytes | str | os.PathLike[str],
        digest: str,
        size: int | None = None,
        *,
        chunk_size: int | None = None,
        mount_from: str | None = None,
        check_exists: bool = True,
    ) -> bool:
        """Upload a blob (monolithic, or chunked when ``chunk_size`` is smaller than it).

        Returns False when nothing was sent (already present or mounted).
        """
        if isinstance(source, bytes):
            size = len(source)
        elif size is None:
            size = os.path.getsize(source)
        if check_exists and self.blob_exists(repo, digest):
            return False
        if mount_from and mount_from != repo and self.mount_blob(repo, digest, mount_from):
            return False
        location = self._start_upload(repo)
        if chunk_size and size > chunk_size:
            location = self._upload_chunks(repo, source, size, chunk_size, location)
            body: Body = b""
        elif isinstance(source, bytes):
            body = source
        else:
            path = os.fspath(source)

            def body() -> BinaryIO:
                return open(path, "rb")

        sep = "&" if "?" in location else "?"
        resp = self.request(
            "PUT",
            location + sep + urlencode({"digest": digest}),
            repo=repo,
            push=True,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            if body != b""
            else {"Content-Length": "0"},
            body=body,
            what=f"upload {digest}",
        )
        resp.close()
        if resp.status_code != 201:
            if resp.status_code == 400:
                raise DigestMismatchError(
                    f"{self.host} refused blob {digest} (digest invalid): {_error_detail(resp)}"
                )
            raise self._unexpected(resp, f"upload {digest}")
        return True

    def _upload_chunks(
        self, repo: str, source: bytes | str | os.PathLike[str], size: int, chunk: int, loc: str
    ) -> str:
        offset = 0
        with contextlib.ExitStack() as stack:
            f = None if isinstance(source, bytes) else stack.enter_context(open(source, "rb"))
            while offset < size:
                if f is None:
                    data = source[offset : offset + chunk]  # type: ignore[index]
                else:
                    f.seek(offset)
                    data = f.read(chunk)
                end = offset + len(data) - 1
                resp = self.request(
                    "PATCH",
                    loc,
                    repo=repo,
                    push=True,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                        "Content-Length": str(len(data)),
                    },
                    body=data,
                    what="upload chunk",
                )
                resp.close()
                if resp.status_code != 202:
                    raise self._unexpected(resp, f"upload chunk at {offset}")
                loc = urljoin(self.base_url() + "/", resp.headers.get("Location", loc))
                offset += len(data)
        return loc

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> PutResult:
        """PUT a manifest under a tag or its digest."""
        what = f"push manifest {repo}:{ref}"
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            repo=repo,
            push=True,
            headers={"Content-Type": media_type},
            body=data,
            what=what,
        )
        resp.close()
        if resp.status_code not in (200, 201):
            if resp.status_code in (400, 404):
                raise RegistryError(
                    f"{self.host} refused the manifest ({what}): {_error_detail(resp)}"
                )
            raise self._unexpected(resp, what)
        digest = sha256_digest(data)
        sent = resp.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            log.warning("%s: registry reports digest %s for %s", self.host, sent, digest)
        return PutResult(digest, resp.headers.get("OCI-Subject"))

    def delete_manifest(self, repo: str, digest: str) -> None:
        resp = self.request(
            "DELETE", f"/v2/{repo}/manifests/{digest}", repo=repo, push=True, what="delete"
        )
        resp.close()
        if resp.status_code not in (202, 200, 404):
            raise self._unexpected(resp, f"delete {repo}@{digest}")

    def list_tags(self, repo: str) -> list[str]:
        """All tags of ``repo`` in the registry's order (following ``Link`` pagination)."""
        tags: list[str] = []
        url: str | None = f"/v2/{repo}/tags/list"
        params: dict[str, str] | None = {"n": "1000"}
        while url:
            resp = self.request("GET", url, repo=repo, params=params, what=f"tags of {repo}")
            with resp:
                if resp.status_code == 404:
                    raise ImageNotFoundError(f"repository {self.host}/{repo} not found")
                if resp.status_code != 200:
                    raise self._unexpected(resp, f"tags of {repo}")
                try:
                    page = resp.json().get("tags") or []
                except ValueError as exc:
                    raise RegistryError(f"{self.host}: malformed tag list for {repo}") from exc
                tags.extend(str(t) for t in page)
                nxt = resp.links.get("next", {}).get("url")
            url = urljoin(self.base_url() + "/", nxt) if nxt else None
            params = None
            if len(tags) > 100_000:
                raise RegistryError(f"{self.host}/{repo} lists more than 100000 tags")
        return tags

    def referrers_api(
        self, repo: str, digest: str, artifact_type: str | None = None
    ) -> list[dict] | None:
        """Descriptors from ``GET /v2/<repo>/referrers/<digest>``; None when unsupported (404).

        Filtering is applied client-side too, since registries may ignore ``artifactType``.
        """
        params = {"artifactType": artifact_type} if artifact_type else None
        out: list[dict] = []
        url: str | None = f"/v2/{repo}/referrers/{digest}"
        while url:
            resp = self.request(
                "GET",
                url,
                repo=repo,
                params=params,
                headers={"Accept": OCI_INDEX},
                stream=True,
                what=f"referrers of {digest}",
            )
            with resp:
                if resp.status_code == 404:
                    return None
                if resp.status_code != 200:
                    raise self._unexpected(resp, f"referrers of {repo}@{digest}")
                data = _read_capped(resp, MAX_MANIFEST_SIZE, "referrers")
                nxt = resp.links.get("next", {}).get("url")
            doc = parse_manifest_json(data, OCI_INDEX)
            out.extend(doc.get("manifests", []))
            if len(out) > MAX_ENTRIES:
                raise MalformedManifestError(f"more than {MAX_ENTRIES} referrers of {digest}")
            url = urljoin(self.base_url() + "/", nxt) if nxt else None
            params = None
        if artifact_type:
            out = [d for d in out if d.get("artifactType") == artifact_type]
        return out


def _system_ca_bundle() -> str:
    """The CA bundle podman would trust: the environment's, the system's, else certifi's."""
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and os.path.isfile(value):
            return value
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        return "/etc/ssl/certs/ca-certificates.crt"
    import certifi

    return certifi.where()


def _read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise MalformedManifestError(f"{what} is {length} bytes, over the {limit} byte limit")
    buf = bytearray()
    try:
        for chunk in resp.raw.stream(65536, decode_content=True):
            buf += chunk
            if len(buf) > limit:
                raise MalformedManifestError(f"{what} is over the {limit} byte limit")
    except _NETWORK_ERRORS as exc:
        raise RegistryUnavailableError(f"connection dropped while reading {what}") from exc
    return bytes(buf)


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, on one short line."""
    reason: BaseException = exc
    for _ in range(6):
        inner = getattr(reason, "reason", None)
        if not isinstance(inner, BaseException) and reason.args:
            inner = reason.args[0] if isinstance(reason.args[0], BaseException) else None
        if not isinstance(inner, BaseException) or inner is reason:
            break
        reason = inner
    text = str(reason) or type(reason).__name__
    text = re.sub(r"^<[^>]*>: ", "", text.splitlines()[0] if text else "")
    text = re.sub(r"^HTTPS?ConnectionPool\([^)]*\): ", "", text)
    return text[:160]


# -- parallel downloads


def download_blobs(
    client: RegistryClient,
    repo: str,
    descriptors: Sequence[dict],
    dest_dir: str | os.PathLike[str],
    *,
    jobs: int = 3,
    progress: ProgressFn | None = None,
) -> dict[str, Path]:
    """Download several blobs at once into ``dest_dir`` (named by hex digest).

    Files already there with the right size are reused (they were verified when written).
    Returns ``{digest: path}``. The first failure cancels the rest and is raised.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    unique: dict[str, dict] = {}
    for d in descriptors:
        unique.setdefault(d["digest"], d)

    def one(desc: dict) -> tuple[str, Path]:
        digest = desc["digest"]
        path = dest_dir / digest.split(":", 1)[1]
        if path.exists() and path.stat().st_size == desc.get("size"):
            if progress:
                progress(digest, desc["size"], desc["size"])
            return digest, path
        client.get_blob(repo, digest, path, size=desc.get("size"), progress=progress)
        return digest, path

    out: dict[str, Path] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, d) for d in unique.values()]
        try:
            for fut in futures:
                digest, path = fut.result()
                out[digest] = path
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out
