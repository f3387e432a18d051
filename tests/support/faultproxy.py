"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real docker-registry.

Everything is forwarded to the registry unchanged (bodies streamed both ways, ``Range`` passed
through) unless a :class:`Rule` matches the request; then the proxy misbehaves the way real
registries, CDNs and networks do:

``status``    answer ``status`` with ``headers`` and ``body`` (500s, 429 + ``Retry-After``)
``drop``      forward the answer but close the connection after ``after`` body bytes
``stall``     forward ``after`` body bytes, then send nothing for ``seconds`` and close
``corrupt``   forward the answer with the body byte at ``after`` flipped (same length)
``redirect``  answer ``307`` to the same path on another proxy (``to``, a host:port on
              127.0.0.1), as registries redirect blob GETs to their blob storage
``endless``   answer 200 with ``headers`` and a body of ``size`` filler bytes (default 4 GiB)
              generated on the fly; ``Content-Length`` is sent only when ``length`` is set
              (it may lie). Counts what it managed to send before the client hung up

Each rule fires ``times`` times (None: forever) and counts the body bytes it sent, so tests can
assert that a client stopped reading at its bound. ``log`` records every request.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.support.httpserver import LocalServer, QuietHandler

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}
_CHUNK = 64 << 10


@dataclass
class Rule:
    """One way to misbehave for requests whose method matches and whose path matches ``path``."""

    method: str  # "GET", "HEAD", … or "*"
    path: str  # regex searched in the request path (query included)
    action: str = "status"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    after: int = 0
    seconds: float = 0.0
    to: str = ""
    size: int = 4 << 30
    length: int | None = None
    filler: bytes = b" "
    times: int | None = 1
    hits: int = 0
    sent: int = 0  # body bytes this rule sent (endless, drop, stall)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return self.method in (method, "*") and re.search(self.path, path) is not None


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str
    headers: dict[str, str]
    rule: str | None  # the action applied, None when forwarded untouched


class FaultProxy(LocalServer):
    """``with FaultProxy(registry.host) as proxy:`` then talk to ``proxy.host``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def seen(self, method: str | None = None, pattern: str = "") -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.log
                if (method is None or s.method == method) and re.search(pattern, s.path)
            ]

    def stopping(self) -> None:
        self._stop.set()  # wakes stalled handlers

    def _take(self, method: str, path: str, headers: dict[str, str]) -> Rule | None:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is not None:
                rule.hits += 1
            self.log.append(Seen(method, path, headers, rule.action if rule else None))
            return rule


class _Handler(QuietHandler):
    owner: FaultProxy

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

    # -- dispatch

    def _handle(self) -> None:
        headers = {k: v for k, v in self.headers.items()}
        rule = self.owner._take(self.command, self.path, headers)
        body = self._request_body()
        if rule is None:
            self._forward(body, None)
        elif rule.action == "status":
            self.send_answer(rule.status, rule.headers, rule.body)
        elif rule.action == "redirect":
            self.send_answer(307, {"Location": f"http://{rule.to}{self.path}"}, b"")
        elif rule.action == "endless":
            self._endless(rule)
        else:  # drop, stall, corrupt: forward, then misbehave in the body
            self._forward(body, rule)

    def _request_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return None

    # -- forwarding

    def _forward(self, body: bytes | None, rule: Rule | None) -> None:
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=60)
        try:
            # putheader, not a dict: podman sends several Accept lines, all must pass
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.owner.upstream)
            for k, v in self.headers.items():
                if k.lower() not in _HOP | {"host", "content-length"}:
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in _HOP or k.lower() == "content-length":
                    continue
                if k.lower() == "location" and self.owner.upstream in v:
                    v = v.replace(self.owner.upstream, self.owner.host)
                self.send_header(k, v)
            data = resp.read() if self.command != "HEAD" else b""
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if self.command == "HEAD":
                return
            if rule is None or resp.status >= 300:
                self.wfile.write(data)
            else:
                self._misbehave(rule, data)
        finally:
            conn.close()

    def _misbehave(self, rule: Rule, data: bytes) -> None:
        if rule.action == "corrupt":
            at = min(rule.after, len(data) - 1)
            self.wfile.write(data[:at] + bytes((data[at] ^ 0xFF,)) + data[at + 1 :])
            return
        part = data[: rule.after]
        self.wfile.write(part)
        self.wfile.flush()
        with self.owner._lock:
            rule.sent += len(part)
        if rule.action == "stall":
            self.owner._stop.wait(rule.seconds)
        self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- bombs

    def _endless(self, rule: Rule) -> None:
        self.send_response(rule.status if rule.status != 500 else 200)
        for k, v in rule.headers.items():
            self.send_header(k, v)
        if rule.length is not None:
            self.send_header("Content-Length", str(rule.length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        block = (rule.filler * (_CHUNK // len(rule.filler) + 1))[:_CHUNK]
        left = rule.size
        start = time.monotonic()
        try:
            if rule.body:
                self.wfile.write(rule.body)
                left -= len(rule.body)
            while left > 0 and not self.owner._stop.is_set():
                piece = block[: min(left, _CHUNK)]
                self.wfile.write(piece)
                left -= len(piece)
                with self.owner._lock:
                    rule.sent += len(piece)
                if time.monotonic() - start > 120:  # never outlive a test
                    break
        except OSError:  # the client hung up: what we wanted
            pass
        self._hang_up()


FaultProxy.handler = _Handler
