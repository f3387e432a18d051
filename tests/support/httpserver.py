"""The threaded HTTP server both test proxies run on: 127.0.0.1, an ephemeral port, optional TLS.

A subclass sets ``handler`` to its :class:`QuietHandler` subclass; each request's handler finds
the running server object as ``self.owner`` (bound per instance, so several servers of the same
class can run side by side).
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar, Self


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, no access log on stderr (pytest output stays clean), and one
    way to send a complete answer."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Status, headers, Content-Length and (except for HEAD) the body."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class LocalServer:
    """``with Server(…) as server:`` serves in a daemon thread; ``server.host`` is host:port."""

    handler: ClassVar[type[QuietHandler]]
    tls: tuple[str, str] | None = None  # (certificate file, key file): serve HTTPS

    _server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server is not None, "the server is not running"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        bound = type("Handler", (self.handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
        self._server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def stopping(self) -> None:
        """Called before shutdown: wake handlers that wait on something (stalls, long polls)."""
