"""Host faults during ``podman-delta pull``: SIGINT/SIGTERM/SIGKILL at each step, a full disk,
and concurrent pulls, prunes and plain podman pulls.

After every fault ``podman images`` / ``podman image inspect`` show the store as it was before or
as it should be after (never a half image, never a staging image), the scratch directory is gone
(except after SIGKILL, where the next run's cleanup is what counts), and the next pull succeeds.

The steps are reached with a small wrapper (``_CHILD``) that runs the real CLI in a child
process after wrapping one function: it writes a marker file and sleeps at that step, so the test
knows exactly where the signal lands ("download": after the first chunk of a delta blob was
received, before the blob is complete and verified).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podman_delta.storage.importer import staging_images
from podman_delta.storage.store import Store
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.podman import Podman, isolated_blob_cache
from tests.support.registry import Registry
from tests.test_pull_e2e import Pair, delta_pull, publish, pull_argv, push_pair

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
# As in a terminal: a test runner started in the background may have SIGINT ignored, and
# Python then never turns it into KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
import faulthandler
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps stacks on a hang
step, marker = os.environ.get("PD_TEST_PAUSE_AT", ""), os.environ.get("PD_TEST_MARKER", "")

def pause():
    # Stay in this step until the test has sent its signal and says "go" (a real step would
    # go on by itself; worker threads are joined at exit, so they must be able to finish).
    open(marker, "w").close()
    end = time.monotonic() + 120
    while time.monotonic() < end and not os.path.exists(marker + ".go"):
        time.sleep(0.05)

def wrap(owner, name, before=True):
    orig = getattr(owner, name)
    def wrapper(*a, **kw):
        if before:
            pause()
            return orig(*a, **kw)
        out = orig(*a, **kw)
        pause()
        return out
    setattr(owner, name, wrapper)

import podman_delta.pull as pull
import podman_delta.storage.importer as importer
import podman_delta.storage.blobcache as blobcache
import podman_delta.tardiff.patcher as patcher

if step == "download":  # pause after the first chunk of a blob, before it is verified
    from podman_delta.registry.client import RegistryClient
    orig_get_blob = RegistryClient.get_blob
    def get_blob(self, repo, digest, dest, *, progress=None, **kw):
        def prog(d, done, size):
            if progress:
                progress(d, done, size)
            pause()
        return orig_get_blob(self, repo, digest, dest, progress=prog, **kw)
    RegistryClient.get_blob = get_blob
elif step == "apply":  # pause after the first bytes of the rebuilt layer are written
    orig_apply = patcher.apply
    def apply(delta, source, out, **kw):
        class Out:
            n = 0
            def write(self, data):
                r = out.write(data)
                Out.n += 1
                if Out.n == 1:
                    out.flush()
                    pause()
                return r
        return orig_apply(delta, source, Out(), **kw)
    patcher.apply = apply
elif step == "load":  # the staging image exists, nothing else yet
    wrap(importer, "_stage", before=False)
elif step == "cache":  # staging image and blob-info-cache rows written
    wrap(blobcache.BlobInfoCache, "record", before=False)
elif step == "final":  # just before the final `podman pull repo@digest`
    orig_run = importer._Podman.run
    def run(self, *more, **kw):
        if more and more[0] == "pull" and "@sha256:" in more[-1]:
            pause()
        return orig_run(self, *more, **kw)
    importer._Podman.run = run

from podman_delta.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class World:
    reg: Registry
    pair: Pair

    @property
    def v2_id(self) -> str:
        return self.pair.v2.config_digest.split(":")[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Registry(tmp_path_factory.mktemp("faultpull")) as reg:
        pair = push_pair(reg.host, "fault/pull", 41)
        publish(reg, pair)
        yield World(reg, pair)


@pytest.fixture
def cache() -> Iterator[Path]:
    with isolated_blob_cache() as path:
        yield path


def _store_with_v1(world: World, base: Path, driver: str = "vfs") -> Podman:
    p = Podman(base, driver=driver)
    p.pull(world.pair.v1.reference)
    return p


def _assert_before_or_after(
    world: World, p: Podman, before: list[str], killed: bool = False
) -> str:
    """The store shows exactly the old images, or those plus the complete target.

    After SIGKILL a complete staging image (``localhost/podman-delta-staging:…``) may remain:
    nothing can remove it then; the next podman-delta run does (checked by the caller)."""
    staged = {i for i, _ in staging_images(Store(p.options))}
    if not killed:
        assert staged == set()
        names = p.run("images", "--format", "{{.Repository}}").stdout
        assert "staging" not in names
    ids = sorted(set(p.image_ids()) - staged)
    assert ids in (before, sorted({*before, world.v2_id})), ids
    if world.v2_id in ids:
        info = p.inspect(world.pair.v2.reference)
        assert info["RootFS"]["Layers"] == world.pair.v2.diff_ids
        assert world.pair.v2.manifest_digest in " ".join(info["RepoDigests"])
        return "after"
    proc = p.run("image", "inspect", world.pair.v2.reference, check=False)
    assert proc.returncode != 0
    return "before"


def _next_pull_succeeds(world: World, p: Podman) -> None:
    result = json.loads(delta_pull(p, world.pair.v2.reference, "--json").stdout)
    assert result["status"] in ("pulled", "up-to-date"), result.get("reason")
    assert p.inspect(world.pair.v2.reference)["Id"] == world.v2_id
    run = p.run(
        "run", "--rm", world.pair.v2.reference, "/bin/sh", "-c", "read a </app/version; echo $a"
    )
    assert run.stdout == "2\n"


def _interrupt_at(
    world: World, tmp_path: Path, step: str, sig: signal.Signals, driver: str = "vfs"
) -> tuple[Podman, list[str], Path, int]:
    p = _store_with_v1(world, tmp_path / "s", driver)
    before = p.image_ids()
    marker, work = tmp_path / "paused", tmp_path / "work"
    env = p.environ() | {"PD_TEST_PAUSE_AT": step, "PD_TEST_MARKER": str(marker)}
    script = _CHILD.format(root=str(ROOT))
    extra = [f"--workdir={work}", "--no-fallback"]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *pull_argv(p, world.pair.v2.reference, *extra)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"never reached step {step} (rc {proc.returncode}): {err[-2000:]}")
    proc.send_signal(sig)
    signalled = time.monotonic()
    time.sleep(0.3)
    Path(f"{marker}.go").touch()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"podman-delta did not stop within 60 s of {sig.name} at {step}: {err}")
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err, err
        assert time.monotonic() - signalled < 30, "took too long to stop"
        leftovers = list(work.iterdir()) if work.exists() else []
        assert leftovers == [], leftovers  # scratch data removed
    return p, before, work, proc.returncode


CASES = [
    ("download", signal.SIGTERM),
    ("download", signal.SIGKILL),
    ("apply", signal.SIGINT),
    ("apply", signal.SIGKILL),
    ("load", signal.SIGTERM),
    ("load", signal.SIGKILL),
    ("cache", signal.SIGINT),
    ("cache", signal.SIGKILL),
    ("final", signal.SIGTERM),
    ("final", signal.SIGKILL),
]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "sig"), CASES, ids=[f"{s}-{g.name}" for s, g in CASES])
def test_signal_at_step(
    world: World, cache: Path, tmp_path: Path, step: str, sig: signal.Signals
) -> None:
    p, before, _work, _ = _interrupt_at(world, tmp_path, step, sig)
    state = _assert_before_or_after(world, p, before, killed=sig == signal.SIGKILL)
    assert state == "before"  # every step is before the final pull completes
    _next_pull_succeeds(world, p)
    assert staging_images(Store(p.options)) == []


OVERLAY_CASES = [
    ("apply", signal.SIGINT),
    ("load", signal.SIGTERM),
    ("load", signal.SIGKILL),
    ("final", signal.SIGKILL),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "sig"), OVERLAY_CASES, ids=[f"{s}-{g.name}" for s, g in OVERLAY_CASES]
)
def test_signal_at_step_on_overlay(
    world: World, cache: Path, tmp_path: Path, step: str, sig: signal.Signals
) -> None:
    """The same guarantees on the overlay driver, whose layers are diff/ directories."""
    p, before, _work, _ = _interrupt_at(world, tmp_path, step, sig, driver="overlay")
    assert p.run("info", "--format", "{{.Store.GraphDriverName}}").stdout.strip() == "overlay"
    state = _assert_before_or_after(world, p, before, killed=sig == signal.SIGKILL)
    assert state == "before"
    _next_pull_succeeds(world, p)
    assert staging_images(Store(p.options)) == []


# --------------------------------------------------------------------------- full disk


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_scratch_disk(world: World, cache: Path, tmp_path: Path) -> None:
    """A 64 KiB TMPDIR/--workdir: one clear error, nothing left behind, store unchanged."""
    p = _store_with_v1(world, tmp_path / "s")
    before = p.image_ids()
    small = tmp_path / "small"
    _tmpfs(small, "64k")
    try:
        p.env["TMPDIR"] = str(small)
        proc = delta_pull(
            p, world.pair.v2.reference, f"--workdir={small}", "--no-fallback", check=False
        )
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("podman-delta: error")]
        assert len(errors) == 1 and "No space left" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == errors[0]
        assert os.listdir(small) == []
    finally:
        _umount(small)
    assert _assert_before_or_after(world, p, before) == "before"
    del p.env["TMPDIR"]
    _next_pull_succeeds(world, p)


def test_full_store_disk(world: World, cache: Path, tmp_path: Path) -> None:
    """The store on a tmpfs that holds v1 but not v2: a clear error, no half image."""
    base = tmp_path / "s"
    _tmpfs(base, "48m")
    try:
        p = _store_with_v1(world, base)
        before = p.image_ids()
        free = os.statvfs(base)
        filler = base / "filler"
        with open(filler, "wb") as f:  # leave ~300 KB: less than v2's new layers
            f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 300_000))
        proc = delta_pull(p, world.pair.v2.reference, check=False)
        assert proc.returncode != 0, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("podman-delta: error:"), proc.stderr
        assert "Traceback" not in proc.stderr
        assert _assert_before_or_after(world, p, before) == "before"
        filler.unlink()
        _next_pull_succeeds(world, p)
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)


# --------------------------------------------------------------------------- concurrency


def _start_pull(p: Podman, ref: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "podman_delta", *pull_argv(p, ref, "--json", *extra)]
    return subprocess.Popen(
        cmd, env=p.environ(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_delta_pulls_at_once(world: World, cache: Path, tmp_path: Path) -> None:
    p = _store_with_v1(world, tmp_path / "s")
    before = p.image_ids()
    procs = [_start_pull(p, world.pair.v2.reference) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out)["status"])
    assert sorted(results) in (["pulled", "up-to-date"], ["pulled", "pulled"]), results
    assert _assert_before_or_after(world, p, before) == "after"
    assert p.inspect(world.pair.v2.reference)["Id"] == world.v2_id


@pytest.mark.slow
def test_pull_during_prune_all(world: World, cache: Path, tmp_path: Path) -> None:
    """``podman image prune -a`` racing a delta pull: the pull ends with the image, or (if the
    prune removed the source layers first) in a clean fallback; never a half image."""
    p = _store_with_v1(world, tmp_path / "s")
    pull = _start_pull(p, world.pair.v2.reference, "--limit-rate=300k")
    time.sleep(0.5)
    prune = p.run("image", "prune", "-a", "-f", check=False)
    out, err = pull.communicate(timeout=300)
    assert pull.returncode == 0, err
    assert prune.returncode == 0, prune.stderr
    assert json.loads(out)["status"] in ("pulled", "plain")
    assert staging_images(Store(p.options)) == []
    ids = p.image_ids()
    if world.v2_id in ids:
        assert p.inspect(world.pair.v2.reference)["RootFS"]["Layers"] == world.pair.v2.diff_ids
    _next_pull_succeeds(world, p)


@pytest.mark.slow
def test_pull_during_plain_podman_pull(world: World, cache: Path, tmp_path: Path) -> None:
    p = _store_with_v1(world, tmp_path / "s")
    before = p.image_ids()
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def plain() -> None:
        results["plain"] = p.run(
            "pull", "-q", "--tls-verify=false", world.pair.v2.reference, check=False
        )

    t = threading.Thread(target=plain)
    delta = _start_pull(p, world.pair.v2.reference)
    t.start()
    out, err = delta.communicate(timeout=300)
    t.join(300)
    assert delta.returncode == 0, err
    assert results["plain"].returncode == 0, results["plain"].stderr
    assert json.loads(out)["status"] in ("pulled", "up-to-date", "plain")
    assert _assert_before_or_after(world, p, before) == "after"
    assert staging_images(Store(p.options)) == []
    assert p.inspect(world.pair.v2.reference)["Id"] == world.v2_id


@pytest.mark.slow
def test_ctrl_c_during_a_slow_full_download_stops_promptly(
    world: World, cache: Path, tmp_path: Path
) -> None:
    """No source layers: whole layers at 50 kB/s; Ctrl-C must not wait for the download."""
    p = Podman(tmp_path / "s")
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD.format(root=str(ROOT)),
            *pull_argv(p, world.pair.v2.reference, f"--workdir={work}", "--limit-rate=50k"),
        ],
        env=p.environ(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(f.is_file() and f.stat().st_size > 100_000 for f in work.glob("*/*")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the download never started")
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert time.monotonic() - start < 10, f"Ctrl-C waited {time.monotonic() - start:.0f} s"
    assert not work.exists() or list(work.iterdir()) == []
    assert p.image_ids() == []


# --------------------------------------------------------------------------- registry faults


def test_registry_faults_during_a_pull(world: World, cache: Path, tmp_path: Path) -> None:
    """``podman-delta pull`` through the fault proxy: a 503 on the manifest, a 429 with
    Retry-After, delta blobs redirected to another host:port that drops them mid-way, and one
    delta served with wrong bytes. The pull still ends with the exact image, the corrupted
    layer fetched in full."""
    p = _store_with_v1(world, tmp_path / "s")
    with FaultProxy(world.reg.host) as proxy, FaultProxy(world.reg.host) as storage:
        ref = f"{proxy.host}/fault/pull:v2"
        plan = json.loads(delta_pull(p, ref, "--dry-run", "--json").stdout)
        d0, d1 = (la["delta"] for la in plan["layers"])
        proxy.clear()
        proxy.add(Rule("GET", "/manifests/v2", status=503))
        proxy.add(Rule("GET", f"/blobs/({d0}|{d1})", status=429, headers={"Retry-After": "1"}))
        proxy.add(Rule("GET", f"/blobs/{d1}", action="corrupt", after=100, times=None))
        proxy.add(Rule("GET", f"/blobs/{d0}", action="redirect", to=storage.host, times=None))
        storage.add(Rule("GET", f"/blobs/{d0}", action="drop", after=300, times=2))
        result = json.loads(delta_pull(p, ref, "--json").stdout)
        redirected = storage.seen("GET", d0)
    assert result["status"] == "pulled", result
    assert result["layers"] == {"delta": 1, "full": 1, "reused": 0}, result
    assert len(result["fallbacks"]) == 1 and "digest" in result["fallbacks"][0]
    assert [s.headers.get("Range") for s in redirected] == [None, "bytes=300-", "bytes=600-"]
    info = p.inspect(ref)
    assert info["Id"] == world.v2_id and info["RootFS"]["Layers"] == world.pair.v2.diff_ids
