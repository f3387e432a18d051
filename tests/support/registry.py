"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1.

Each :class:`Registry` runs its own server on a free loopback port with storage in a temporary
directory, and exposes its access log so that tests can assert which blobs were fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Access:
    """One request line from the registry's access log."""

    method: str
    path: str
    status: int
    size: int


class Registry:
    """Start, query and stop a ``docker-registry`` (distribution 2.8) on 127.0.0.1.

    ``htpasswd`` may be a path to an htpasswd file (bcrypt) to require Basic auth.
    """

    def __init__(self, workdir: Path, htpasswd: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = self.workdir / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._htpasswd = htpasswd

    def start(self) -> Registry:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self._htpasswd:
            auth = f"auth: {{htpasswd: {{realm: test, path: {self._htpasswd}}}}}\n"
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {data}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.host}', secret: test-only-secret}}\n" + auth
        )
        # Append mode: truncating the log later keeps it clean (no NUL-filled gap).
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "serve", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return self
            except urllib.error.HTTPError as exc:  # 401 with auth: it is up
                if exc.code == 401:
                    return self
            except OSError:
                pass
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("docker-registry did not become ready in 15 s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access log

    def clear_log(self) -> None:
        """Empty the access log (the server appends, so this stays clean)."""
        os.truncate(self.log_path, 0)

    def accesses(self) -> list[Access]:
        """Every request line logged since the last :meth:`clear_log`."""
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        out = []
        for m in _ACCESS.finditer(text):
            size = 0 if m["size"] == "-" else int(m["size"])
            out.append(Access(m["method"], m["path"], int(m["status"]), size))
        return out

    def blob_gets(self, repo: str | None = None) -> list[Access]:
        """Successful blob GETs (optionally of one repository)."""
        prefix = f"/v2/{repo}/blobs/" if repo else None
        return [
            a
            for a in self.accesses()
            if a.method == "GET"
            and "/blobs/sha256:" in a.path
            and a.status in (200, 206)
            and (prefix is None or a.path.startswith(prefix))
        ]
