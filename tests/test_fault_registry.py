"""Registry faults through tests/support/faultproxy.py, against RegistryClient and the real
docker-registry: dropped and stalled connections, 500s, 429 + Retry-After, wrong bytes, blob
redirects to another host:port, and size bombs (gigabyte manifests/configs, a million entries).

Each fault ends in the right bytes on disk or one clear RegistryError/DigestMismatchError with no
partial file left. Timeouts and backoff are kept short through ClientOptions.
(tests/test_registry_client.py covers the canned 401/403/404 statuses and a first resume test.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from podman_delta.errors import DigestMismatchError
from podman_delta.registry.client import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    ClientOptions,
    MalformedManifestError,
    RateLimitedError,
    RegistryClient,
    RegistryServerError,
    RegistryUnavailableError,
)
from podman_delta.registry.discovery import fallback_tag, find_referrers
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.podman import PushedImage, push_image, tar_bytes
from tests.support.registry import Registry

REPO = "fault/app"


def _opts(**kw: object) -> ClientOptions:
    base: dict[str, object] = {"tls_verify": False, "backoff": 0.01, "max_retry_wait": 0.5}
    base.update(kw)
    return ClientOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, PushedImage]]:
    """One image whose layer blob is ~600 KB of incompressible bytes."""
    with Registry(tmp_path_factory.mktemp("faultreg")) as reg:
        big = tar_bytes({"data/big.bin": os.urandom(600_000), "etc/conf": b"x\n"})
        yield reg, push_image(reg.host, REPO, "v1", [big])


@pytest.fixture
def proxy(image: tuple[Registry, PushedImage]) -> Iterator[FaultProxy]:
    with FaultProxy(image[0].host) as p:
        yield p


def _layer(img: PushedImage) -> tuple[str, int]:
    manifest = json.loads(img.manifest)
    return manifest["layers"][0]["digest"], manifest["layers"][0]["size"]


def _fetch(host: str, img: PushedImage, dest: Path, **kw: object) -> Path:
    digest, size = _layer(img)
    with RegistryClient(host, _opts(**kw)) as c:
        return c.get_blob(REPO, digest, dest, size=size)


def _ok(path: Path, img: PushedImage) -> bool:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == _layer(img)[0]


# --------------------------------------------------------------------------- connections


def test_dropped_twice_mid_blob_resumes_with_range(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    img = image[1]
    rule = proxy.add(Rule("GET", "/blobs/", action="drop", after=150_000, times=2))
    assert _ok(_fetch(proxy.host, img, tmp_path / "blob"), img)
    gets = proxy.seen("GET", _layer(img)[0])
    assert [g.headers.get("Range") for g in gets] == [None, "bytes=150000-", "bytes=300000-"]
    assert rule.sent == 300_000


def test_stalled_blob_times_out_and_resumes(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    img = image[1]
    proxy.add(Rule("GET", "/blobs/", action="stall", after=200_000, seconds=60))
    start = time.monotonic()
    assert _ok(_fetch(proxy.host, img, tmp_path / "blob", timeout=1.0), img)
    assert time.monotonic() - start < 15  # one short timeout, not the 60 s stall
    gets = proxy.seen("GET", _layer(img)[0])
    # The client reads 1 MiB chunks: bytes of a chunk cut short by the timeout are fetched again
    # (here the whole 600 KB blob is one chunk, so the retry starts at 0).
    assert len(gets) == 2 and gets[1].headers.get("Range") in (None, "bytes=0-")


def test_stalled_forever_gives_up_cleanly(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Rule("GET", "/blobs/", action="stall", after=1000, seconds=60, times=None))
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="kept failing") as info:
        _fetch(proxy.host, image[1], tmp_path / "blob", timeout=0.5)
    assert time.monotonic() - start < 30
    assert "\n" not in str(info.value)
    assert not (tmp_path / "blob").exists()


def test_connection_refused_is_one_clear_error(tmp_path: Path) -> None:
    from tests.support.registry import free_port

    host = f"127.0.0.1:{free_port()}"
    with (
        RegistryClient(host, _opts(retries=1)) as c,
        pytest.raises(RegistryUnavailableError, match="cannot reach") as info,
    ):
        c.get_manifest(REPO, "v1")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- statuses


def test_500s_are_retried_then_succeed(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Rule("GET", "/blobs/", status=500, times=2))
    assert _ok(_fetch(proxy.host, image[1], tmp_path / "blob", retries=3), image[1])
    assert [s.rule for s in proxy.seen("GET", "/blobs/")] == ["status", "status", None]


def test_persistent_500_is_one_clear_error(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    body = b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}'
    proxy.add(Rule("GET", "/blobs/", status=503, body=body, times=None))
    with pytest.raises(RegistryServerError, match=r"HTTP 503.*disk on fire") as info:
        _fetch(proxy.host, image[1], tmp_path / "blob", retries=2)
    assert "\n" not in str(info.value) and not (tmp_path / "blob").exists()
    assert len(proxy.seen("GET", "/blobs/")) == 3


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_waits_for_retry_after(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path, form: str
) -> None:
    value = "2" if form == "seconds" else formatdate(time.time() + 3, usegmt=True)
    proxy.add(Rule("GET", "/blobs/", status=429, headers={"Retry-After": value}))
    start = time.monotonic()
    assert _ok(_fetch(proxy.host, image[1], tmp_path / "b", max_retry_wait=10), image[1])
    waited = time.monotonic() - start
    assert 1.0 <= waited < 8, waited  # honoured (not the 10 ms backoff), http-date to the second


def test_429_retry_after_is_capped_and_finally_reported(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Rule("GET", "/blobs/", status=429, headers={"Retry-After": "86400"}, times=None))
    start = time.monotonic()
    with pytest.raises(RateLimitedError, match="rate-limiting") as info:
        _fetch(proxy.host, image[1], tmp_path / "b", retries=2, max_retry_wait=0.3)
    assert time.monotonic() - start < 10  # a day-long Retry-After is capped, not obeyed
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- wrong bytes


def test_wrong_bytes_are_a_digest_mismatch_and_removed(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Rule("GET", "/blobs/", action="corrupt", after=123_456))
    with pytest.raises(DigestMismatchError, match="wrong content"):
        _fetch(proxy.host, image[1], tmp_path / "blob")
    assert not (tmp_path / "blob").exists()


def test_wrong_config_and_manifest_bytes(
    image: tuple[Registry, PushedImage], proxy: FaultProxy
) -> None:
    img = image[1]
    proxy.add(Rule("GET", "/blobs/", action="corrupt", after=10))
    proxy.add(Rule("GET", "/manifests/sha256:", action="corrupt", after=30))
    with RegistryClient(proxy.host, _opts()) as c:
        with pytest.raises(DigestMismatchError, match="corrupt download"):
            c.get_blob_bytes(REPO, img.config_digest)
        with pytest.raises(DigestMismatchError, match="wrong content"):
            c.get_manifest(REPO, img.manifest_digest)
        # the faults were one-shot: the same calls now succeed
        assert c.get_manifest(REPO, img.manifest_digest).data == img.manifest


def test_blob_longer_than_its_descriptor_is_cut_off(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    rule = proxy.add(Rule("GET", "/blobs/", action="endless", filler=b"\0"))
    with pytest.raises(DigestMismatchError, match="larger than"):
        _fetch(proxy.host, image[1], tmp_path / "blob")
    assert not (tmp_path / "blob").exists()
    assert rule.sent < 64 << 20  # stopped reading right after the declared size


# --------------------------------------------------------------------------- redirects


def test_blob_redirect_to_another_host(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    with FaultProxy(image[0].host) as storage:
        proxy.add(Rule("GET", "/blobs/", action="redirect", to=storage.host, times=None))
        storage.add(Rule("GET", "/blobs/", action="drop", after=100_000))
        assert _ok(_fetch(proxy.host, image[1], tmp_path / "blob"), image[1])
        got = storage.seen("GET", "/blobs/")
    # the first GET dropped at the storage host; the resume went through the redirect again
    assert len(got) == 2 and got[1].headers.get("Range") == "bytes=100000-"
    assert all(s.rule == "redirect" for s in proxy.seen("GET", "/blobs/"))


def test_redirect_to_a_dead_host_is_one_clear_error(
    image: tuple[Registry, PushedImage], proxy: FaultProxy, tmp_path: Path
) -> None:
    from tests.support.registry import free_port

    proxy.add(Rule("GET", "/blobs/", action="redirect", to=f"127.0.0.1:{free_port()}", times=None))
    with pytest.raises(RegistryUnavailableError) as info:
        _fetch(proxy.host, image[1], tmp_path / "blob", retries=1)
    assert "\n" not in str(info.value) and not (tmp_path / "blob").exists()


# --------------------------------------------------------------------------- size bombs


@pytest.mark.parametrize("length", [None, 8 << 30], ids=["chunked", "lying-length"])
def test_gigabyte_manifest_is_not_read(proxy: FaultProxy, length: int | None) -> None:
    rule = proxy.add(
        Rule(
            "GET",
            "/manifests/v1",
            action="endless",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            body=b'{"schemaVersion":2,"layers":[',
            length=length,
        )
    )
    start = time.monotonic()
    with (
        RegistryClient(proxy.host, _opts()) as c,
        pytest.raises(MalformedManifestError, match="limit") as info,
    ):
        c.get_manifest(REPO, "v1")
    assert time.monotonic() - start < 20
    assert "\n" not in str(info.value)
    # 4 GiB on offer; the client stopped at its 4 MiB bound (plus what socket buffers held)
    assert rule.sent < MAX_MANIFEST_SIZE + (32 << 20)


def test_gigabyte_config_blob_is_not_read(
    image: tuple[Registry, PushedImage], proxy: FaultProxy
) -> None:
    rule = proxy.add(Rule("GET", "/blobs/", action="endless"))
    with (
        RegistryClient(proxy.host, _opts()) as c,
        pytest.raises(MalformedManifestError, match="limit"),
    ):
        c.get_blob_bytes(REPO, image[1].config_digest)
    assert rule.sent < MAX_CONFIG_SIZE + (32 << 20)


def test_gigabyte_referrers_index_means_no_deltas(
    image: tuple[Registry, PushedImage], proxy: FaultProxy
) -> None:
    """An artifact list (the referrers fallback tag) of gigabytes: ignored, not read."""
    img = image[1]
    rule = proxy.add(
        Rule("GET", f"/manifests/{fallback_tag(img.manifest_digest)}", action="endless")
    )
    proxy.add(Rule("GET", "/referrers/", status=404, times=None))
    with RegistryClient(proxy.host, _opts()) as c:
        assert find_referrers(c, REPO, img.manifest_digest) == []
    assert rule.hits == 1 and rule.sent < MAX_MANIFEST_SIZE + (32 << 20)


def test_index_with_a_million_entries(
    image: tuple[Registry, PushedImage], proxy: FaultProxy
) -> None:
    img = image[1]
    body = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['
    body += b",".join([b"{}"] * 1_000_000) + b"]}"
    assert len(body) < MAX_MANIFEST_SIZE  # under the size bound: the entry bound must catch it
    headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
    proxy.add(Rule("GET", "/manifests/v1", status=200, headers=headers, body=body))
    tag = fallback_tag(img.manifest_digest)
    proxy.add(Rule("GET", f"/manifests/{tag}", status=200, headers=headers, body=body))
    proxy.add(Rule("GET", "/referrers/", status=404, times=None))
    start = time.monotonic()
    with RegistryClient(proxy.host, _opts()) as c:
        with pytest.raises(MalformedManifestError, match="entries"):
            c.get_manifest(REPO, "v1")
        assert find_referrers(c, REPO, img.manifest_digest) == []
    assert time.monotonic() - start < 20
