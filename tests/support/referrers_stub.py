"""A small stdlib proxy in front of a real docker-registry, adding only what it lacks.

* The OCI 1.1 **referrers API**: manifest PUTs that pass through with a ``subject`` are
  recorded, answered with ``OCI-Subject``, and listed by ``GET /v2/<name>/referrers/<digest>``
  (``artifactType`` filter applied, ``OCI-Filters-Applied`` sent). Off with ``referrers=False``.
* **Faults** for client tests: canned statuses (401/403/404/429/500 with headers), a connection
  dropped after N bytes of a blob, corrupted blob bytes, replaced bodies.
* **HTTPS** with a given certificate (``tls=(cert, key)``), for TLS and ``certs.d`` tests.
* A **Bearer token** flow (``bearer_users``): every ``/v2/`` request needs a token from
  ``/token``, issued for Basic credentials (or anonymously when ``anonymous`` is set).

Everything else is forwarded unchanged to the real registry, so blobs and manifests are stored
by docker-registry itself. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from tests.support.httpserver import LocalServer, QuietHandler

_REFERRERS = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PUT = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


@dataclass
class Fault:
    """Answer matching requests differently, ``times`` times (None: forever).

    ``action``: ``"status"`` (send ``status``/``headers``/``body``), ``"drop"`` (forward, then
    close the connection after ``after`` body bytes), ``"corrupt"`` (forward with one byte
    flipped), ``"body"`` (forward status/headers, replace the body).
    """

    method: str
    path: str  # regex searched in the request path
    action: str = "status"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    after: int = 0
    times: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return self.method in (method, "*") and re.search(self.path, path) is not None


class ReferrersProxy(LocalServer):
    """Start with ``with ReferrersProxy(registry.host) as proxy: …``; use ``proxy.host``."""

    def __init__(
        self,
        upstream: str,
        *,
        referrers: bool = True,
        bearer_users: dict[str, str] | None = None,
        anonymous: bool = False,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.referrers_enabled = referrers
        self.bearer_users = bearer_users
        self.anonymous = anonymous
        self.tls = tls  # (certificate file, key file): serve HTTPS
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.referrers: dict[tuple[str, str], list[dict]] = {}
        self.tokens: set[str] = set()
        self.token_requests: list[dict[str, list[str]]] = []
        self._lock = threading.Lock()

    def add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str | None = None, pattern: str = "") -> list[tuple]:
        return [
            r for r in self.log if (method is None or r[0] == method) and re.search(pattern, r[1])
        ]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    return f
        return None


class _Handler(QuietHandler):
    owner: ReferrersProxy

    def _handle(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        owner.log.append((self.command, self.path, dict(self.headers.items())))
        if path == "/token":
            return self._token()
        if owner.bearer_users is not None and not self._bearer_ok(path):
            return None
        fault = owner._take_fault(self.command, self.path)
        if fault and fault.action == "status":
            return self.send_answer(fault.status, fault.headers, fault.body)
        m = _REFERRERS.match(path)
        if m and owner.referrers_enabled and self.command == "GET":
            return self._referrers(m["name"], m["digest"])
        status, headers, rbody = self._forward(body)
        if fault and fault.action == "corrupt" and rbody:
            rbody = bytes([rbody[0] ^ 0xFF]) + rbody[1:]
        if fault and fault.action == "body":
            rbody = fault.body
            headers.pop("Docker-Content-Digest", None)
        mp = _MANIFEST_PUT.match(path)
        if mp and self.command == "PUT" and status == 201 and owner.referrers_enabled:
            self._record(mp["name"], body, headers)
        if fault and fault.action == "drop":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(rbody)))
            self.end_headers()
            self.wfile.write(rbody[: fault.after])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self.send_answer(status, headers, rbody)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if self.owner.bearer_users is not None:
                headers.pop("Authorization", None)
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            out.pop("Content-Length", None)
            return resp.status, out, data
        finally:
            conn.close()

    def _record(self, name: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            return
        subject = doc.get("subject")
        if not isinstance(subject, dict):
            return
        desc = {
            "mediaType": doc.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
            "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
            "size": len(body),
            "artifactType": doc.get("artifactType") or doc.get("config", {}).get("mediaType"),
        }
        if doc.get("annotations"):
            desc["annotations"] = doc["annotations"]
        key = (name, subject["digest"])
        with self.owner._lock:
            entries = self.owner.referrers.setdefault(key, [])
            if all(e["digest"] != desc["digest"] for e in entries):
                entries.append(desc)
        headers["OCI-Subject"] = subject["digest"]

    def _referrers(self, name: str, digest: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        entries = list(self.owner.referrers.get((name, digest), []))
        headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
        if "artifactType" in query:
            entries = [e for e in entries if e.get("artifactType") in query["artifactType"]]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
        self.send_answer(200, headers, json.dumps(index).encode())

    # -- bearer

    def _bearer_ok(self, path: str) -> bool:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.owner.tokens:
            return True
        scope = ""
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags|referrers)/", path)
        if m:
            action = "pull" if self.command in ("GET", "HEAD") else "pull,push"
            scope = f',scope="repository:{m[1]}:{action}"'
        scheme = "https" if self.owner.tls else "http"
        challenge = f'Bearer realm="{scheme}://{self.owner.host}/token",service="stub"{scope}'
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "token"}]}).encode()
        self.send_answer(401, {"WWW-Authenticate": challenge}, body)
        return False

    def _token(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        self.owner.token_requests.append(query)
        auth = self.headers.get("Authorization", "")
        ok = self.owner.anonymous and not auth
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            ok = (self.owner.bearer_users or {}).get(user) == pw
        if not ok:
            return self.send_answer(401, {}, b'{"details":"bad credentials"}')
        token = secrets.token_hex(16)
        self.owner.tokens.add(token)
        body = json.dumps({"token": token}).encode()
        self.send_answer(200, {"Content-Type": "application/json"}, body)


ReferrersProxy.handler = _Handler
