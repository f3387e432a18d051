"""``podman-delta prefetch`` against a real docker-registry and podman 4.3.1 (vfs).

The user has ``repo:stable`` (v1) locally; the registry then moves ``stable`` to v2 and has
v1→v2 deltas. prefetch must delta-pull v2 under ``stable`` ahead of time, so that the next
``podman pull`` fetches no layer; a second run must do nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from podman_delta.pull import RateLimiter
from tests.support.podman import Podman, isolated_blob_cache
from tests.support.registry import Registry
from tests.test_pull_e2e import ROOT, Pair, blob_digests, publish, push_pair


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("prefetchreg")) as r:
        yield r


@pytest.fixture
def cache() -> Iterator[Path]:
    with isolated_blob_cache() as path:
        yield path


def tag(reg: Registry, repo: str, manifest: bytes, name: str) -> None:
    r = requests.put(
        f"http://{reg.host}/v2/{repo}/manifests/{name}",
        data=manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    r.raise_for_status()


def prefetch(
    p: Podman, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "podman_delta",
        "prefetch",
        "--tls-verify=false",
        f"--root={p.root}",
        f"--runroot={p.runroot}",
        f"--storage-driver={p.driver}",
        f"--workdir={p.base / 'prefetch-cache'}",
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=p.environ() | (env or {}), cwd=ROOT, timeout=300
    )
    return proc


def _stable(reg: Registry, repo: str, seed: int, tmp: Path) -> tuple[Pair, Podman, str]:
    pair = push_pair(reg.host, repo, seed)
    publish(reg, pair)
    stable = f"{reg.host}/{repo}:stable"
    tag(reg, repo, pair.v1.manifest, "stable")
    p = Podman(tmp / "store")
    p.pull(stable)
    tag(reg, repo, pair.v2.manifest, "stable")  # the registry moves on
    return pair, p, stable


def test_prefetch_pulls_newer_tag_by_delta(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair, p, stable = _stable(reg, "pf/app", 11, tmp_path)

    reg.clear_log()
    dry = prefetch(p, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert [i["status"] for i in planned["images"]] == ["planned"]
    assert planned["fetched_bytes"] < planned["plain_bytes"] / 4
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)
    assert p.inspect(stable)["Id"] == pair.v1.config_digest.split(":")[1]

    reg.clear_log()
    run = prefetch(p)
    assert run.returncode == 0, run.stderr
    assert "1 image(s) checked, 1 updated, 0 failed" in run.stdout
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)
    assert p.inspect(stable)["Id"] == pair.v2.config_digest.split(":")[1]
    assert not (p.base / "prefetch-cache").exists()  # downloads removed after success

    # podman pull (and so auto-update) now finds every layer local
    reg.clear_log()
    p.pull(stable)
    assert not set(blob_digests(reg, pair.repo)) & set(pair.v2.compressed_digests)

    # idempotent: the second run only asks for the tag's digest
    reg.clear_log()
    again = prefetch(p, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert {i["status"] for i in report["images"]} == {"up-to-date"}
    assert reg.blob_gets() == []
    assert all(a.method == "HEAD" for a in reg.accesses() if "/manifests/" in a.path)


def test_prefetch_autoupdate_and_image_list(reg: Registry, cache: Path, tmp_path: Path) -> None:
    _pair, p, stable = _stable(reg, "pf/auto", 12, tmp_path)
    other = push_pair(reg.host, "pf/other", 13)
    p.pull(other.v1.reference)  # no container uses it: --autoupdate leaves it alone
    tag(reg, "pf/other", other.v2.manifest, "v1")
    p.run("create", "--label", "io.containers.autoupdate=registry", "--name", "c1", stable)

    reg.clear_log()
    run = prefetch(p, "--autoupdate", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [i["reference"] for i in report["images"]] == [stable]
    assert report["images"][0]["status"] == "pulled"
    assert blob_digests(reg, "pf/other") == []

    listing = tmp_path / "images.txt"
    listing.write_text(f"# watched images\n{other.v1.reference}\n\n")
    run = prefetch(p, "--images", str(listing), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [i["reference"] for i in report["images"]] == [other.v1.reference]
    assert report["images"][0]["status"] == "pulled"  # no deltas: whole layers
    assert p.inspect(other.v1.reference)["Id"] == other.v2.config_digest.split(":")[1]


def test_prefetch_reports_a_failing_image_and_goes_on(
    reg: Registry, cache: Path, tmp_path: Path
) -> None:
    pair, p, stable = _stable(reg, "pf/fail", 14, tmp_path)
    listing = tmp_path / "images.txt"
    listing.write_text(f"{reg.host}/pf/absent:latest\n{stable}\n")
    run = prefetch(p, "--images", str(listing))
    assert run.returncode == 1
    assert "pf/absent:latest: failed:" in run.stderr
    assert "2 image(s) checked, 1 updated, 1 failed" in run.stdout
    assert p.inspect(stable)["Id"] == pair.v2.config_digest.split(":")[1]


def test_limit_rate_caps_downloads(reg: Registry, cache: Path, tmp_path: Path) -> None:
    pair = push_pair(reg.host, "pf/slow", 15)  # no deltas: ~1.4 MB of layers
    p = Podman(tmp_path / "store")
    listing = tmp_path / "images.txt"
    listing.write_text(pair.v2.reference + "\n")
    start = time.monotonic()
    run = prefetch(p, "--images", str(listing), "--limit-rate=1M", "--json")
    took = time.monotonic() - start
    assert run.returncode == 0, run.stderr
    fetched = json.loads(run.stdout)["fetched_bytes"]
    assert fetched > 1_300_000
    assert took >= (fetched - (1 << 20)) / (1 << 20)  # the bucket starts with one second


def test_rate_limiter_token_bucket() -> None:
    bucket = RateLimiter(400_000, burst=100_000)
    start = time.monotonic()
    for _ in range(10):
        bucket.consume(50_000)  # 500 kB: 100 kB burst, then 400 kB at 400 kB/s
    assert 0.9 <= time.monotonic() - start < 3
