"""The pre-pull ``podman`` wrapper (hooks/podman) against the real podman 4.3.1.

The wrapper is put first on PATH in a temp dir together with a stub ``podman-delta`` (it stands in
for our own tool, not for podman) that records its arguments, environment and stdin as JSON lines.
Every command is also run with the real podman directly, and exit code, stdout and stderr must be
the same: the wrapper may add a pre-pull, never change podman's behaviour.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.registry import Registry

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "hooks" / "podman"
REAL_PODMAN = "/usr/bin/podman"
# What the wrapper itself needs from PATH (GNU timeout is optional: see test_hang_without_timeout).
TOOLS = ("dd", "grep", "sleep", "timeout")

STUB = f"""#!{sys.executable}
import json, os, subprocess, sys, time
rec = {{
    "argv": sys.argv[1:],
    "pid": os.getpid(),
    "disable": os.environ.get("PODMAN_DELTA_DISABLE"),
    "real": os.environ.get("PODMAN_DELTA_REAL_PODMAN"),
    "stdin": sys.stdin.read() if os.environ.get("STUB_READ_STDIN") else None,
}}
if os.environ.get("STUB_CHILD"):
    rec["child"] = subprocess.Popen(["sleep", "60"]).pid
if os.environ.get("STUB_CHECK"):
    # A nested podman call through PATH, as podman-delta makes at the end of a pull.
    cmd = ["podman", *json.loads(os.environ["STUB_CHECK"])]
    rec["check_rc"] = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     timeout=60).returncode
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
print("stub: noise on stdout")
print("stub: noise on stderr", file=sys.stderr)
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_RC", "0")))
"""

_TIME = re.compile(r'time="[^"]*"')


def normalize(text: bytes) -> str:
    """podman's log lines carry timestamps; everything else must match byte for byte."""
    return _TIME.sub('time="T"', text.decode("utf-8", "replace"))


def state(pid: int) -> str:
    """``pid``'s scheduler state letter (R, S, Z...), or "" once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not count: nothing may reap it in a container)."""
    return state(pid) not in ("", "Z")


@dataclass
class Harness:
    """A temp PATH with the wrapper and the stub, and a private podman store."""

    tmp: Path
    bindir: Path
    sysbin: Path
    log: Path
    store: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def store_fwd(self) -> list[str]:
        """The store options as the wrapper forwards them to podman-delta."""
        return [f"--root={self.store[1]}", f"--runroot={self.store[3]}", "--storage-driver=vfs"]

    def base_env(self, path: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PODMAN_DELTA", "STUB_"))}
        env.update(PATH=path, STUB_LOG=str(self.log), **self.env)
        env.update(extra)
        return env

    def wrapped(
        self, *args: str, input: bytes | None = None, timeout: float = 120, **extra: str
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS`` found through PATH, i.e. through the wrapper."""
        env = self.base_env(f"{self.bindir}:{self.sysbin}", **extra)
        return subprocess.run(
            ["podman", *args], env=env, input=input, capture_output=True, timeout=timeout
        )

    def direct(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real podman with the same arguments and no wrapper."""
        env = self.base_env(str(self.sysbin))
        return subprocess.run(
            [REAL_PODMAN, *args], env=env, input=input, capture_output=True, timeout=timeout
        )

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


def short_dir() -> Path:
    """podman refuses a runroot longer than 50 characters: pytest's tmp_path is too long."""
    return Path(tempfile.mkdtemp(prefix="pdh-", dir="/tmp"))


def make_harness(tmp: Path, shell: str = "/bin/sh", tools: tuple[str, ...] = TOOLS) -> Harness:
    """The harness in ``tmp``, whose "run" entry must lead to a short directory."""
    bindir = tmp / "wrapper-bin"
    sysbin = tmp / "sys-bin"
    bindir.mkdir()
    sysbin.mkdir()
    text = WRAPPER.read_text()
    assert text.startswith("#!/bin/sh\n")
    (bindir / "podman").write_text(f"#!{shell}\n" + text.split("\n", 1)[1])
    (bindir / "podman").chmod(0o755)
    (bindir / "podman-delta").write_text(STUB)
    (bindir / "podman-delta").chmod(0o755)
    (sysbin / "podman").symlink_to(REAL_PODMAN)
    for tool in tools:
        (sysbin / tool).symlink_to(shutil.which(tool))
    store = [
        "--root", str(tmp / "root"),
        "--runroot", str((tmp / "run").resolve() / "runroot"),
        "--storage-driver", "vfs",
        "--events-backend=none",
    ]  # fmt: skip
    return Harness(tmp, bindir, sysbin, tmp / "stub.jsonl", store)


@pytest.fixture
def short_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, with "run" a symlink to a short directory (for podman's runroot)."""
    run = short_dir()
    (tmp_path / "run").symlink_to(run)
    yield tmp_path
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def h(short_tmp: Path) -> Harness:
    return make_harness(short_tmp)


@pytest.fixture(scope="module")
def hooks_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for the tests that only need fast, deterministic pull failures."""
    with Registry(tmp_path_factory.mktemp("hooks-registry")) as r:
        yield r


def assert_same_as_direct(h: Harness, args: list[str], **extra: str) -> subprocess.CompletedProcess:
    """Run through the wrapper and directly; exit code, stdout and stderr must be identical."""
    via = h.wrapped(*args, **extra)
    plain = h.direct(*args)
    assert via.returncode == plain.returncode, (via.stderr, plain.stderr)
    assert normalize(via.stdout) == normalize(plain.stdout)
    assert normalize(via.stderr) == normalize(plain.stderr)
    return via


# ---------------------------------------------------------------------------------------------
# Argument parsing: which commands pre-pull, and with which options.

# Shell-like words; STORE = the private store's global flags, FWD = the same as forwarded to
# podman-delta, IMG/IMG2 = images that the test registry does not have. Then the podman-delta
# calls expected, after "pull --quiet".
TLS = "--tls-verify=false"
PARSE_CASES = [
    ("STORE pull --tls-verify=false IMG", [f"{TLS} FWD IMG"]),
    ("pull STORE --tls-verify=false IMG", [f"{TLS} FWD IMG"]),
    ("STORE pull IMG --tls-verify=F", [f"{TLS} FWD IMG"]),
    ("STORE image pull -q --tls-verify=0 IMG", [f"{TLS} FWD IMG"]),
    ("STORE pull --tls-verify=false -- IMG", [f"{TLS} FWD IMG"]),
    ("STORE pull --tls-verify=false docker://IMG", [f"{TLS} FWD IMG"]),
    ("STORE pull --tls-verify=false IMG IMG2", [f"{TLS} FWD IMG", f"{TLS} FWD IMG2"]),
    ("STORE pull --platform linux/amd64 --tls-verify=false IMG",
     [f"{TLS} --platform=linux/amd64 FWD IMG"]),
    ("STORE pull --arch=amd64 --tls-verify=false IMG", [f"{TLS} --arch=amd64 FWD IMG"]),
    ("STORE --log-level=error pull --tls-verify=false IMG", [f"{TLS} FWD IMG"]),
    ("STORE run --pull=always --tls-verify=false --rm -it -e A=B IMG sh -c 'echo hi there'",
     [f"{TLS} FWD IMG"]),
    ("STORE container create --pull newer --tls-verify=false -p8080:80 -ie=X=Y --name 'a b' "
     "IMG --pull=never", [f"{TLS} FWD IMG"]),
    ("STORE create --pull=IfNewer --tls-verify=false -t -- IMG", [f"{TLS} FWD IMG"]),
    ("STORE run --tls-verify=false -d --pull always --pull=missing IMG", []),
    ("STORE run --tls-verify=false IMG", []),
    ("STORE run --pull=never IMG", []),
    ("STORE pull --all-tags --tls-verify=false REPO", []),
    ("STORE pull --os=linux --tls-verify=false IMG", []),
    ("STORE pull --no-such-flag IMG", []),
    ("STORE pull --tls-verify=false oci:/nonexistent/dir", []),
    ("STORE pull --tls-verify=false 'IMG IMG2'", []),
    ("STORE --storage-opt vfs.ignore_chown_errors=true pull --tls-verify=false IMG", []),
    ("STORE images", []),
    ("STORE image exists IMG", []),
    ("STORE version", []),
    ("--version", []),
    ("STORE pull", []),
]  # fmt: skip


def expand(words: str, h: Harness, hooks_registry: Registry) -> list[str]:
    out: list[str] = []
    for tok in shlex.split(words):
        if tok == "STORE":
            out += h.store
        elif tok == "FWD":
            out += h.store_fwd
        else:
            out.append(
                tok.replace("IMG2", f"{hooks_registry.host}/nope/two:1")
                .replace("IMG", f"{hooks_registry.host}/nope/one:1")
                .replace("REPO", f"{hooks_registry.host}/nope/one")
            )
    return out


@pytest.mark.parametrize(("args", "calls"), PARSE_CASES, ids=[a for a, _ in PARSE_CASES])
def test_parse(h: Harness, hooks_registry: Registry, args: str, calls: list[str]) -> None:
    argv = expand(args, h, hooks_registry)
    via = assert_same_as_direct(h, argv)
    if calls:  # the real podman did try to pull (from the test registry, which has no image)
        assert b"manifest unknown" in via.stderr
    want = [["pull", "--quiet", *expand(c, h, hooks_registry)] for c in calls]
    assert [c["argv"] for c in h.calls()] == want


def test_exact_args_with_spaces_and_quotes(h: Harness, hooks_registry: Registry) -> None:
    """Arguments with spaces and quotes reach podman-delta and podman unchanged."""
    authdir = h.tmp / "a dir 'with' \"quotes\""
    authdir.mkdir()
    auth = authdir / "auth file.json"
    auth.write_text('{"auths": {}}')
    creds = "us er:p a's\"s$HOME`x`"
    image = f"{hooks_registry.host}/nope/one:1"
    args = [
        *h.store,
        "pull",
        "--tls-verify=false",
        "--creds",
        creds,
        "--authfile",
        str(auth),
        image,
    ]
    via = assert_same_as_direct(h, args)
    assert via.returncode == 125
    assert [c["argv"] for c in h.calls()] == [
        ["pull", "--quiet", "--tls-verify=false", f"--creds={creds}", f"--authfile={auth}",
         *h.store_fwd, image]
    ]  # fmt: skip
    # podman echoes a Go template argument literally: stdout proves the argv is exact.
    fmt = '{{"a  b \'c\' \\"d\\" $HOME *"}}'
    out = h.wrapped("version", "--format", fmt)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"a  b 'c' \"d\" $HOME *\n"


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_pull_then_podman_in_order(short_tmp: Path, hooks_registry: Registry, shell: str) -> None:
    """podman-delta runs first (the image is not there yet), its nested podman call goes
    straight to the real podman, and it never sees the user's stdin."""
    h = make_harness(short_tmp, shell=shell)
    image = f"{hooks_registry.host}/nope/one:1"
    check = json.dumps([*h.store, "image", "exists", image])
    via = h.wrapped(
        *h.store, "pull", "--tls-verify=false", image,
        input=b"user input\n", STUB_CHECK=check, STUB_READ_STDIN="1",
    )  # fmt: skip
    plain = h.direct(*h.store, "pull", "--tls-verify=false", image)
    assert (via.returncode, normalize(via.stderr)) == (plain.returncode, normalize(plain.stderr))
    [call] = h.calls()
    assert call["check_rc"] == 1  # image absent when podman-delta ran; no recursion either
    assert call["stdin"] == ""
    assert call["disable"] == "1"
    assert call["real"] == str(h.sysbin / "podman")
    assert b"stub: noise" not in via.stdout + via.stderr


def test_verbose_sends_output_to_stderr(h: Harness, hooks_registry: Registry) -> None:
    image = f"{hooks_registry.host}/nope/one:1"
    via = h.wrapped(
        *h.store, "pull", "--tls-verify=false", image, PODMAN_DELTA_VERBOSE="1", STUB_RC="3"
    )
    assert via.returncode == 125
    assert b"stub: noise on stdout" in via.stderr
    assert b"stub: noise on stderr" in via.stderr
    assert b"exited 3" in via.stderr
    assert b"stub" not in via.stdout


def test_disable(h: Harness, hooks_registry: Registry) -> None:
    assert_same_as_direct(
        h,
        [*h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1"],
        PODMAN_DELTA_DISABLE="1",
    )
    assert h.calls() == []


# ---------------------------------------------------------------------------------------------
# Exit codes and failures of podman-delta


@pytest.mark.parametrize("stub_rc", ["0", "1"])
def test_unreachable_registry_exit_code_unchanged(h: Harness, stub_rc: str) -> None:
    """A failing pull (nothing listens on 127.0.0.1:1) fails the same way with the wrapper,
    whatever podman-delta returned."""
    args = [*h.store, "pull", "--tls-verify=false", "127.0.0.1:1/x:1"]
    via = assert_same_as_direct(h, args, STUB_RC=stub_rc)
    assert via.returncode == 125
    assert b"connection refused" in via.stderr
    assert [c["argv"][-1] for c in h.calls()] == ["127.0.0.1:1/x:1"]


def test_podman_delta_missing(short_tmp: Path, hooks_registry: Registry) -> None:
    h = make_harness(short_tmp)
    (h.bindir / "podman-delta").unlink()
    assert shutil.which("podman-delta", path=f"{h.bindir}:{h.sysbin}") is None
    via = assert_same_as_direct(
        h, [*h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1"]
    )
    assert via.returncode == 125
    # PODMAN_DELTA_BIN naming a missing file is no different.
    via = h.wrapped(
        *h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1",
        PODMAN_DELTA_BIN=str(short_tmp / "nope"),
    )  # fmt: skip
    assert via.returncode == 125


def test_podman_delta_bin_override(h: Harness, hooks_registry: Registry) -> None:
    other = h.tmp / "elsewhere"
    other.mkdir()
    (h.bindir / "podman-delta").rename(other / "pd")
    h.wrapped(
        *h.store,
        "pull",
        "--tls-verify=false",
        f"{hooks_registry.host}/x:1",
        PODMAN_DELTA_BIN=str(other / "pd"),
    )
    assert [c["argv"][-1] for c in h.calls()] == [f"{hooks_registry.host}/x:1"]


def test_hang_is_bounded(h: Harness, hooks_registry: Registry) -> None:
    """A hanging podman-delta is stopped after PODMAN_DELTA_TIMEOUT, with what it started."""
    args = [*h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1"]
    start = time.monotonic()
    via = h.wrapped(*args, PODMAN_DELTA_TIMEOUT="2", STUB_SLEEP="60", STUB_CHILD="1")
    elapsed = time.monotonic() - start
    plain = h.direct(*args)
    assert elapsed < 30
    assert (via.returncode, normalize(via.stderr)) == (plain.returncode, normalize(plain.stderr))
    [call] = h.calls()
    assert not alive(call["pid"])
    assert not alive(call["child"])


def test_hang_without_timeout(short_tmp: Path, hooks_registry: Registry) -> None:
    """Without GNU timeout on PATH the wrapper's own watchdog bounds podman-delta."""
    h = make_harness(short_tmp, tools=("dd", "grep", "sleep"))
    args = [*h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1"]
    start = time.monotonic()
    via = h.wrapped(*args, PODMAN_DELTA_TIMEOUT="2", STUB_SLEEP="60")
    assert time.monotonic() - start < 30
    assert via.returncode == h.direct(*args).returncode == 125
    [call] = h.calls()
    assert not alive(call["pid"])


def test_interrupt_stops_everything(h: Harness, hooks_registry: Registry) -> None:
    """Ctrl-C during the pre-pull ends podman-delta and the command, like Ctrl-C on podman."""
    env = h.base_env(f"{h.bindir}:{h.sysbin}", STUB_SLEEP="60", STUB_CHILD="1")
    proc = subprocess.Popen(
        ["podman", *h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (h.log.exists() and h.log.read_text().endswith("\n")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [call] = h.calls()
    # Signal the wrapper once it sleeps in `wait`, where a user's Ctrl-C during a pre-pull finds
    # it. Once, in a full run, a SIGINT sent the moment the stub's log line appeared left
    # the wrapper running past 20 s (not reproduced in 20 runs since, under CPU load too); if it
    # happens again, the failure shows the process tree.
    deadline = time.monotonic() + 10
    while state(proc.pid) != "S" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,args"], capture_output=True)
        pytest.fail(f"wrapper still running 20 s after SIGINT:\n{tree.stdout.decode()}")
    assert proc.returncode == -signal.SIGINT
    deadline = time.monotonic() + 10
    while (alive(call["pid"]) or alive(call["child"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(call["pid"])
    assert not alive(call["child"])
    assert not (h.tmp / "root").exists()  # the real podman never ran


# ---------------------------------------------------------------------------------------------
# Finding the real podman


def test_no_recursion_with_two_copies_on_path(h: Harness) -> None:
    second = h.tmp / "second-bin"
    second.mkdir()
    shutil.copy(h.bindir / "podman", second / "podman")
    third = h.tmp / "third-bin"
    third.mkdir()
    (third / "podman").symlink_to(h.bindir / "podman")
    env = h.base_env(f"{h.bindir}:{second}:{third}:{h.bindir}:{h.sysbin}")
    out = subprocess.run(["podman", "--version"], env=env, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"podman version 4.3.1\n"
    # Called through the symlink, and with PODMAN_DELTA_REAL_PODMAN naming a wrapper copy.
    env = h.base_env(
        f"{third}:{second}:{h.sysbin}", PODMAN_DELTA_REAL_PODMAN=str(second / "podman")
    )
    out = subprocess.run(["podman", "--version"], env=env, capture_output=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout == b"podman version 4.3.1\n"
    assert b"ignoring PODMAN_DELTA_REAL_PODMAN" in out.stderr


def test_real_podman_override(h: Harness, hooks_registry: Registry) -> None:
    """PODMAN_DELTA_REAL_PODMAN wins over PATH, which then needs no podman at all."""
    (h.sysbin / "podman").unlink()
    via = h.wrapped(
        *h.store, "pull", "--tls-verify=false", f"{hooks_registry.host}/x:1",
        PODMAN_DELTA_REAL_PODMAN=REAL_PODMAN,
    )  # fmt: skip
    assert via.returncode == 125
    assert b"manifest unknown" in via.stderr
    assert h.calls()[0]["real"] == REAL_PODMAN


def test_no_real_podman(h: Harness) -> None:
    (h.sysbin / "podman").unlink()
    out = h.wrapped("--version")
    assert out.returncode == 127
    assert b"found no other podman" in out.stderr
    assert h.calls() == []


# ---------------------------------------------------------------------------------------------
# A real pull from a real registry


def make_tar(path: Path) -> None:
    """A tiny rootfs with unique content (so no other test's layer can match it)."""
    src = path.parent / "rootfs"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello").write_bytes(os.urandom(4096))
    with tarfile.open(path, "w") as tar:
        tar.add(src / "etc", arcname="etc")


def test_real_pull_through_wrapper(h: Harness, registry: Registry) -> None:
    image = f"{registry.host}/hooks/tiny:1"
    tar = h.tmp / "tiny.tar"
    make_tar(tar)
    src = ["--root", str(h.tmp / "src-root"), "--runroot", str((h.tmp / "run").resolve() / "src"),
           "--storage-driver", "vfs", "--events-backend=none"]  # fmt: skip
    for cmd in (["import", "-q", str(tar), image], ["push", "-q", "--tls-verify=false", image]):
        out = h.direct(*src, *cmd)
        assert out.returncode == 0, out.stderr
    registry.clear_log()

    check = json.dumps([*h.store, "image", "exists", image])
    via = h.wrapped(*h.store, "pull", "-q", "--tls-verify=false", image, STUB_CHECK=check)
    assert via.returncode == 0, via.stderr
    [call] = h.calls()
    assert call["argv"] == ["pull", "--quiet", "--tls-verify=false", *h.store_fwd, image]
    assert call["check_rc"] == 1
    exists = h.direct(*h.store, "image", "exists", image)
    assert exists.returncode == 0
    image_id = h.direct(*h.store, "image", "inspect", "--format", "{{.Id}}", image)
    assert via.stdout == image_id.stdout  # podman's stdout untouched: just the ID
    assert len(registry.blob_gets("hooks/tiny")) == 2  # config and layer, by the real podman


def test_wrapper_is_clean_posix_sh() -> None:
    """The wrapper must run under any /bin/sh (dash, busybox ash): shellcheck in POSIX mode."""
    out = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(WRAPPER)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert os.access(WRAPPER, os.X_OK)
