"""``podman-delta pull`` end to end: real docker-registry, real podman 4.3.1 (vfs), real deltas.

Each test pushes v1 and v2 of a small two-layer image (a runnable base: the host's dash and
libc; an app layer) under its own repository, with its own random content, so that corrupting
a blob in one test cannot touch another's. v2 patches a library in the base and a binary in
the app layer, changes a file, adds one and removes one: both layers come back as deltas.
Every podman/podman-delta runs with a fresh tmpfs blob-info-cache (tests/support/podman.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from podman_delta.cli import main
from tests.support.podman import (
    Podman,
    PushedImage,
    isolated_blob_cache,
    push_image,
    tar_bytes,
)
from tests.support.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _host_files() -> dict[str, bytes]:
    """dash and the libraries it needs, read from the host (paths without the leading /)."""
    sh = os.path.realpath("/bin/sh")
    out = subprocess.run(["ldd", sh], capture_output=True, text=True, check=True).stdout
    files = {"bin/sh": Path(sh).read_bytes()}
    for line in out.splitlines():
        path = next((p for p in line.split() if p.startswith("/")), None)
        if path and os.path.exists(path):
            files[path.lstrip("/")] = Path(os.path.realpath(path)).read_bytes()
    return files


def _patch(data: bytes, rnd: random.Random, edits: int = 3) -> bytes:
    """A "security update": a few bytes changed in place and a small section appended."""
    buf = bytearray(data)
    for _ in range(edits):
        at = rnd.randrange(len(buf) - 64)
        buf[at : at + 32] = rnd.randbytes(32)
    return bytes(buf) + rnd.randbytes(512)


def _layer(files: dict[str, bytes], execs: set[str]) -> bytes:
    return tar_bytes(
        {k: (v, 0o755 if k in execs else 0o644) for k, v in files.items()} | {"tmp": None}
    )


@dataclass
class Pair:
    v1: PushedImage
    v2: PushedImage

    @property
    def repo(self) -> str:
        return self.v1.repo.split("/", 1)[1]


def push_pair(host: str, repo: str, seed: int) -> Pair:
    rnd = random.Random(seed)
    host_files = _host_files()
    execs = {"bin/sh", "app/bin", *host_files}  # the dynamic loader must be executable
    base1 = dict(host_files) | {"etc/hostname": b"base\n", "etc/seed": str(seed).encode()}
    libc = next(k for k in base1 if "libc.so" in k)
    base2 = dict(base1) | {libc: _patch(base1[libc], rnd)}
    app = rnd.randbytes(400_000)
    app1 = {"app/bin": app, "app/version": b"1\n", "app/gone": b"removed in v2\n"}
    app2 = {"app/bin": _patch(app, rnd), "app/version": b"2\n", "app/new": b"added in v2\n"}
    v1 = push_image(host, repo, "v1", [_layer(base1, execs), _layer(app1, execs)])
    v2 = push_image(host, repo, "v2", [_layer(base2, execs), _layer(app2, execs)])
    return Pair(v1, v2)


def publish(reg: Registry, pair: Pair) -> None:
    rc = main(["publish", "--tls-verify=false", "-q", pair.v1.reference, pair.v2.reference])
    assert rc == 0


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("pullreg")) as r:
        yield r


@pytest.fixture
def cache() -> Iterator[Path]:
    with isolated_blob_cache() as path:
        yield path


def pull_argv(p: Podman, ref: str, *extra: str) -> list[str]:
    """``podman-delta`` arguments that pull ``ref`` into ``p``'s store (podman's store flags)."""
    return [
        "pull",
        "--tls-verify=false",
        f"--root={p.root}",
        f"--runroot={p.runroot}",
        f"--storage-driver={p.driver}",
        *extra,
        ref,
    ]


def delta_pull(
    p: Podman, ref: str, *extra: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``podman-delta pull`` as the user would (a separate process, podman's store flags)."""
    cmd = [sys.executable, "-m", "podman_delta", *pull_argv(p, ref, *extra)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=p.environ(), timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def blob_digests(reg: Registry, repo: str) -> list[str]:
    return [a.path.rsplit("/", 1)[1] for a in reg.blob_gets(repo)]


def test_delta_pull_matches_plain_pull(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair = push_pair(reg.host, "e2e/app", 1)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)

    reg.clear_log()
    out = delta_pull(p, pair.v2.reference, "--json")
    result = json.loads(out.stdout)
    fetched = blob_digests(reg, pair.repo)
    # only deltas and the config came from the registry: no layer blob of v2
    assert not set(fetched) & set(pair.v2.compressed_digests)
    assert pair.v2.config_digest in fetched
    assert result["status"] == "pulled"
    assert result["layers"] == {"delta": 2, "full": 0, "reused": 0}
    assert result["fallbacks"] == []
    manifest = json.loads(pair.v2.manifest)
    plain = len(pair.v2.config) + sum(la["size"] for la in manifest["layers"])
    assert result["plain_bytes"] == plain
    served = sum(a.size for a in reg.blob_gets(pair.repo) if "/blobs/" in a.path)
    assert result["fetched_bytes"] < plain / 4
    assert served < plain / 4
    assert result["image_id"] == pair.v2.config_digest.split(":")[1]

    # the same image as a plain pull into a fresh store
    fresh = Podman(tmp_path / "b")
    fresh.pull(pair.v2.reference)
    mine, theirs = p.inspect(pair.v2.reference), fresh.inspect(pair.v2.reference)
    assert mine["Id"] == theirs["Id"]
    assert mine["RepoDigests"] == theirs["RepoDigests"]
    assert mine["RootFS"] == theirs["RootFS"]
    assert f"{pair.v2.repo}@{pair.v2.manifest_digest}" in mine["RepoDigests"]

    # a following plain pull fetches no layer blob
    reg.clear_log()
    p.pull(pair.v2.reference)
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)

    # and the image runs
    run = p.run(
        "run",
        "--rm",
        pair.v2.reference,
        "/bin/sh",
        "-c",
        "read a </app/version; read b </app/new; echo $a $b",
    )
    assert run.stdout == "2 added in v2\n"
    gone = p.run(
        "run", "--rm", pair.v2.reference, "/bin/sh", "-c", "test -e /app/gone", check=False
    )
    assert gone.returncode == 1

    # a second run finds it up to date and fetches nothing but the manifest
    reg.clear_log()
    again = json.loads(delta_pull(p, pair.v2.reference, "--json").stdout)
    assert again["status"] == "up-to-date" and again["fetched_bytes"] == 0
    assert blob_digests(reg, pair.repo) == [pair.v2.config_digest]


def test_corrupt_delta_is_fetched_in_full(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair = push_pair(reg.host, "e2e/corrupt", 2)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    plan = json.loads(delta_pull(p, pair.v2.reference, "--dry-run", "--json").stdout)
    app = plan["layers"][1]
    assert app["how"] == "delta"
    # flip bytes of the app layer's delta in the registry's storage
    hexd = app["delta"].split(":")[1]
    blob = reg.workdir / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    reg.clear_log()
    result = json.loads(delta_pull(p, pair.v2.reference, "--json").stdout)
    assert result["status"] == "pulled"
    assert result["layers"] == {"delta": 1, "full": 1, "reused": 0}
    assert len(result["fallbacks"]) == 1 and app["diff_id"] in result["fallbacks"][0]
    fetched = blob_digests(reg, pair.repo)
    assert pair.v2.compressed_digests[1] in fetched  # the app layer in full
    assert pair.v2.compressed_digests[0] not in fetched  # the base still by delta
    assert p.inspect(pair.v2.reference)["Id"] == pair.v2.config_digest.split(":")[1]
    run = p.run("run", "--rm", pair.v2.reference, "/bin/sh", "-c", "read a </app/version; echo $a")
    assert run.stdout == "2\n"


def test_no_deltas_gives_a_plain_pull(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair = push_pair(reg.host, "e2e/nodelta", 3)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    reg.clear_log()
    proc = delta_pull(p, pair.v2.reference)
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1 and "0.0% saved" in line, line
    assert set(pair.v2.compressed_digests) <= set(blob_digests(reg, pair.repo))
    assert p.inspect(pair.v2.reference)["Id"] == pair.v2.config_digest.split(":")[1]
    reg.clear_log()
    p.pull(pair.v2.reference)
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)


def test_dry_run_fetches_no_layer_and_changes_nothing(
    reg: Registry, cache: Path, tmp_path: Path
) -> None:
    pair = push_pair(reg.host, "e2e/dry", 4)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    before = p.image_ids()
    reg.clear_log()
    text = delta_pull(p, pair.v2.reference, "--dry-run").stdout
    assert "layer 1/2" in text and "layer 2/2" in text and text.count("delta from") == 2, text
    assert "would fetch" in text
    plan = json.loads(delta_pull(p, pair.v2.reference, "--dry-run", "--json").stdout)
    assert [la["how"] for la in plan["layers"]] == ["delta", "delta"]
    assert plan["planned_bytes"] < plan["plain_bytes"] / 4
    assert blob_digests(reg, pair.repo) == [pair.v2.config_digest] * 2
    assert p.image_ids() == before

    # a short name resolves through registries.conf, as podman resolves it
    conf = tmp_path / "registries.conf"
    conf.write_text(f'unqualified-search-registries = ["{reg.host}"]\n')
    p.env["CONTAINERS_REGISTRIES_CONF"] = str(conf)
    short = json.loads(delta_pull(p, "e2e/dry:v2", "--dry-run", "--json").stdout)
    assert short["reference"] == pair.v2.reference
    assert short["manifest_digest"] == pair.v2.manifest_digest


def test_unknown_image_fails_with_registry_exit_code(
    reg: Registry, cache: Path, tmp_path: Path
) -> None:
    p = Podman(tmp_path / "a")
    proc = delta_pull(p, f"{reg.host}/e2e/absent:v9", check=False)
    assert proc.returncode == 7
    assert proc.stderr.startswith("podman-delta: error:") and "not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_broken_import_falls_back_to_plain_pull(reg: Registry, cache: Path, tmp_path: Path) -> None:
    """Anything but a layer failing (here: a podman that cannot load) means a plain pull."""
    pair = push_pair(reg.host, "e2e/fallback", 5)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    fake = tmp_path / "podman"
    fake.write_text(
        # The importer stages with `pull oci:DIR`, falling back to `load`: break both.
        '#!/bin/sh\nfor a in "$@"; do case "$a" in load|oci:*) echo "load: broken" >&2; '
        'exit 125;; esac\ndone\nexec podman "$@"\n'
    )
    fake.chmod(0o755)
    p.env["PODMAN_DELTA_REAL_PODMAN"] = str(fake)
    reg.clear_log()
    proc = delta_pull(p, pair.v2.reference)
    assert "running a plain podman pull" in proc.stderr
    assert "plain podman pull" in proc.stdout
    assert set(pair.v2.compressed_digests) <= set(blob_digests(reg, pair.repo))
    assert p.inspect(pair.v2.reference)["Id"] == pair.v2.config_digest.split(":")[1]


@pytest.mark.slow
def test_concurrent_pulls_are_serialized(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair = push_pair(reg.host, "e2e/lock", 6)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    lock = p.runroot / "podman-delta.lock"
    slow = tmp_path / "slow-podman"  # the first run holds the lock for a few seconds
    slow.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = load ] && sleep 4; done\nexec podman "$@"\n'
    )
    slow.chmod(0o755)
    cmd_env = p.environ() | {"PODMAN_DELTA_REAL_PODMAN": str(slow)}
    args = [
        sys.executable,
        "-m",
        "podman_delta",
        "pull",
        "--json",
        "--tls-verify=false",
        f"--root={p.root}",
        f"--runroot={p.runroot}",
        f"--storage-driver={p.driver}",
        pair.v2.reference,
    ]
    first = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cmd_env, cwd=ROOT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lock.exists() and f"pid {first.pid}" in lock.read_text():
            break
        time.sleep(0.05)
    else:
        first.kill()
        pytest.fail("the first pull never took the lock")
    second = delta_pull(p, pair.v2.reference, "--json")
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert f"waiting for another podman-delta run (pid {first.pid}" in second.stderr
    r1, r2 = json.loads(out1), json.loads(second.stdout)
    assert r1["status"] == "pulled"
    assert r2["status"] == "up-to-date"  # it waited, then found the image complete
    assert len(reg.blob_gets(pair.repo)) > 0


def test_prepull_wrapper_runs_delta_pull(reg: Registry, cache: Path, tmp_path: Path) -> None:
    """hooks/podman → ``podman-delta pull --quiet …`` → the real podman pull: no layer blob."""
    pair = push_pair(reg.host, "e2e/wrapper", 7)
    publish(reg, pair)
    p = Podman(tmp_path / "a")
    p.pull(pair.v1.reference)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "podman-delta"
    shim.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m podman_delta "$@"\n')
    shim.chmod(0o755)
    env = p.environ() | {
        "PODMAN_DELTA_BIN": str(shim),
        "PODMAN_DELTA_REAL_PODMAN": "/usr/bin/podman",
        "PODMAN_DELTA_VERBOSE": "1",
    }
    reg.clear_log()
    cmd = [str(ROOT / "hooks/podman"), *p.global_args(), "pull", "--tls-verify=false"]
    proc = subprocess.run(
        [*cmd, pair.v2.reference], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == pair.v2.config_digest.split(":")[1]  # podman's own output
    fetched = blob_digests(reg, pair.repo)
    assert not set(fetched) & set(pair.v2.compressed_digests), proc.stderr
    assert any(d not in pair.v2.compressed_digests for d in fetched)  # the deltas


def test_every_layer_present_under_another_tag(reg: Registry, cache: Path, tmp_path: Path) -> None:
    """Nothing to download: the image is only named (no blob but the config is fetched)."""
    pair = push_pair(reg.host, "e2e/retag", 8)
    p = Podman(tmp_path / "a")
    p.pull(pair.v2.reference)
    latest = f"{pair.v2.repo}:latest"
    r = requests.put(
        f"http://{reg.host}/v2/{pair.repo}/manifests/latest",
        data=pair.v2.manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    r.raise_for_status()
    reg.clear_log()
    result = json.loads(delta_pull(p, latest, "--json").stdout)
    assert result["status"] == "pulled" and result["layers"]["reused"] == 2
    assert result["plain_bytes"] == len(pair.v2.config)
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)
    assert latest in p.inspect(latest)["RepoTags"]
