"""The registry client against a real docker-registry, and faults through a proxy stub."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from podman_delta.cli import main
from podman_delta.errors import DigestMismatchError
from podman_delta.registry.auth import Credentials
from podman_delta.registry.client import (
    OCI_INDEX,
    AuthDeniedError,
    AuthRequiredError,
    BlobNotFoundError,
    ClientOptions,
    ImageNotFoundError,
    MalformedManifestError,
    Platform,
    RateLimitedError,
    RegistryClient,
    RegistryServerError,
    RegistryUnavailableError,
    choose_platform,
    download_blobs,
    parse_platform,
)
from podman_delta.registry.config import load_registries_conf
from podman_delta.registry.image import ClientPool, RegistryImageSource, open_image_source
from tests.support.ocibuild import make_layer, sha, skopeo_push, write_archive, write_layout
from tests.support.referrers_stub import Fault, ReferrersProxy
from tests.support.registry import Registry, free_port

REPO = "t/app"


def _opts(**kw: object) -> ClientOptions:
    return ClientOptions(tls_verify=False, backoff=0.01, max_retry_wait=0.2, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict]]:
    """A registry holding t/app:v1 (two layers, one of 300 KB) pushed by skopeo."""
    tmp = tmp_path_factory.mktemp("client")
    rnd = random.Random(7)
    big = make_layer({"data/big.bin": rnd.randbytes(300_000)})
    small = make_layer({"etc/conf": b"hello\n"})
    manifest = write_layout(tmp / "v1", [small, big])
    with Registry(tmp / "reg") as reg:
        skopeo_push(tmp / "v1", reg.host, f"{REPO}:v1")
        yield reg, {"manifest": manifest, "layers": [small, big], "layout": tmp / "v1"}


@pytest.fixture
def proxy(image: tuple[Registry, dict]) -> Iterator[ReferrersProxy]:
    with ReferrersProxy(image[0].host) as p:
        yield p


def test_manifest_blob_and_tags(image: tuple[Registry, dict], tmp_path: Path) -> None:
    reg, info = image
    with RegistryClient(reg.host, _opts()) as c:
        c.ping()
        assert c.base_url() == f"http://{reg.host}"  # TLS off: falls back to http
        m = c.get_manifest(REPO, "v1")
        assert m.data == info["manifest"] and m.digest == sha(info["manifest"])
        assert c.get_manifest(REPO, m.digest).data == m.data
        assert c.head_manifest(REPO, "v1") == m.digest
        assert c.head_manifest(REPO, "nope") is None
        big = info["layers"][1]
        out = c.get_blob(REPO, big.digest, tmp_path / "big", size=len(big.blob))
        assert out.read_bytes() == big.blob
        assert c.blob_exists(REPO, big.digest)
        assert not c.blob_exists(REPO, sha(b"absent"))
        assert c.list_tags(REPO) == ["v1"]
        with pytest.raises(ImageNotFoundError, match="not found"):
            c.get_manifest(REPO, "missing")
        with pytest.raises(ImageNotFoundError):
            c.list_tags("no/such")
        with pytest.raises(BlobNotFoundError):
            c.get_blob(REPO, sha(b"absent"), tmp_path / "absent")
        assert not (tmp_path / "absent").exists()


def test_parallel_download_with_progress(image: tuple[Registry, dict], tmp_path: Path) -> None:
    reg, info = image
    seen: dict[str, int] = {}

    def progress(digest: str, done: int, total: int | None) -> None:
        seen[digest] = done

    descs = [{"digest": lay.digest, "size": len(lay.blob)} for lay in info["layers"]]
    with RegistryClient(reg.host, _opts()) as c:
        paths = download_blobs(c, REPO, descs * 2, tmp_path, jobs=2, progress=progress)
    assert {d: p.read_bytes() for d, p in paths.items()} == {
        lay.digest: lay.blob for lay in info["layers"]
    }
    assert seen == {lay.digest: len(lay.blob) for lay in info["layers"]}


def test_upload_monolithic_chunked_and_mount(image: tuple[Registry, dict], tmp_path: Path) -> None:
    reg, _ = image
    data = random.Random(3).randbytes(250_000)
    digest = sha(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with RegistryClient(reg.host, _opts()) as c:
        assert c.upload_blob("up/mono", path, digest)
        assert not c.upload_blob("up/mono", path, digest)  # already there: nothing sent
        assert c.upload_blob("up/chunked", data, digest, chunk_size=64 * 1024)
        assert c.get_blob_bytes("up/chunked", digest, 1 << 20) == data
        assert not c.upload_blob("up/mounted", path, digest, mount_from="up/mono")
        assert c.blob_exists("up/mounted", digest)
        with pytest.raises(DigestMismatchError):
            c.upload_blob("up/bad", b"content", sha(b"other content"))


def _push_variant(c: RegistryClient, info: dict, arch: str) -> bytes:
    """Push a copy of v1 whose config names another architecture; return its manifest."""
    doc = json.loads(info["manifest"])
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in info["layers"]]},
        }
    ).encode()
    c.upload_blob(REPO, config, sha(config))
    doc["config"] = {**doc["config"], "digest": sha(config), "size": len(config)}
    manifest = json.dumps(doc).encode()
    c.put_manifest(REPO, sha(manifest), manifest, doc["mediaType"])
    return manifest


def _index(entries: list[tuple[bytes, dict]]) -> bytes:
    mt = "application/vnd.oci.image.manifest.v1+json"
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": mt, "digest": sha(m), "size": len(m), "platform": p}
                for m, p in entries
            ],
        }
    ).encode()


def test_platform_choice_from_index(image: tuple[Registry, dict]) -> None:
    reg, info = image
    with RegistryClient(reg.host, _opts()) as c:
        arm64 = _push_variant(c, info, "arm64")
        arm7 = _push_variant(c, info, "arm")
        index = _index(
            [
                (arm64, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                (info["manifest"], {"os": "linux", "architecture": "amd64"}),
                (arm7, {"os": "linux", "architecture": "arm", "variant": "v7"}),
            ]
        )
        put = c.put_manifest(REPO, "multi", index, OCI_INDEX)
        assert put.digest == sha(index) and put.subject is None
        m = c.get_manifest(REPO, "multi")
        assert m.is_index and m.digest == sha(index)
        doc = m.json()
    assert choose_platform(doc, Platform("linux", "amd64"))["digest"] == sha(info["manifest"])
    assert choose_platform(doc, parse_platform("linux/arm64"))["digest"] == sha(arm64)
    assert choose_platform(doc, parse_platform(None, arch="aarch64"))["digest"] == sha(arm64)
    assert choose_platform(doc, parse_platform("linux/arm/v7"))["digest"] == sha(arm7)
    with pytest.raises(ImageNotFoundError, match="linux/s390x"):
        choose_platform(doc, parse_platform("linux/s390x"))
    with pytest.raises(ImageNotFoundError, match=r"linux/arm/v6"):
        choose_platform(doc, parse_platform("linux/arm/v6"))
    # a source resolves the index to the amd64 image and its config
    src = RegistryImageSource(
        f"{reg.host}/{REPO}:multi", ClientPool(_opts()), Platform("linux", "amd64")
    )
    img = src.image()
    assert img.digest == sha(info["manifest"]) and img.index_digest == sha(index)
    assert img.diff_ids == tuple(lay.diff_id for lay in info["layers"])


def test_short_name_through_registries_conf(image: tuple[Registry, dict], tmp_path: Path) -> None:
    reg, info = image
    conf_path = tmp_path / "registries.conf"
    conf_path.write_text(
        f'unqualified-search-registries = ["127.0.0.1:{free_port()}", "{reg.host}"]\n'
        f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n'
    )
    conf = load_registries_conf(conf_path, [])
    pool = ClientPool(ClientOptions(registries_conf=conf, retries=0))
    src = RegistryImageSource("t/app:v1", pool)
    assert src.image().digest == sha(info["manifest"])  # the first registry is down: next one
    assert src.resolved is not None and src.resolved.registry == reg.host


def test_layout_and_archive_sources(image: tuple[Registry, dict], tmp_path: Path) -> None:
    _, info = image
    write_archive(info["layout"], tmp_path / "img.tar")
    for text in (f"oci:{info['layout']}", f"oci-archive:{tmp_path / 'img.tar'}"):
        src = open_image_source(text)
        img = src.image()
        assert img.digest == sha(info["manifest"])
        big = info["layers"][1]
        src.fetch_blob(img.layers[1], tmp_path / "b")
        assert (tmp_path / "b").read_bytes() == big.blob
        src.close()


# -- auth


def test_htpasswd_basic_auth(htpasswd_registry: Registry, tmp_path: Path) -> None:
    reg = htpasswd_registry
    layout = tmp_path / "img"
    manifest = write_layout(layout, [make_layer({"a": b"a"})])
    skopeo_push(layout, reg.host, "auth/app:v1", creds="user:pass")
    with RegistryClient(reg.host, _opts(creds=Credentials("user", "pass"))) as c:
        assert c.get_manifest("auth/app", "v1").digest == sha(manifest)
        assert c.upload_blob("auth/app", b"x", sha(b"x"))
    authfile = tmp_path / "auth.json"
    import base64

    authfile.write_text(
        json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"user:pass").decode()}}})
    )
    with RegistryClient(reg.host, _opts(authfile=str(authfile))) as c:
        assert c.get_manifest("auth/app", "v1").digest == sha(manifest)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with (
        RegistryClient(reg.host, _opts(authfile=str(empty))) as c,
        pytest.raises(AuthRequiredError, match="podman login"),
    ):
        c.get_manifest("auth/app", "v1")
    with (
        RegistryClient(reg.host, _opts(creds=Credentials("user", "wrong"))) as c,
        pytest.raises(AuthDeniedError, match="denied"),
    ):
        c.get_manifest("auth/app", "v1")


def test_bearer_token_flow(image: tuple[Registry, dict]) -> None:
    reg, info = image
    with ReferrersProxy(reg.host, bearer_users={"alice": "secret"}) as p:
        with RegistryClient(p.host, _opts(creds=Credentials("alice", "secret"))) as c:
            assert c.get_manifest(REPO, "v1").digest == sha(info["manifest"])
            assert c.blob_exists(REPO, info["layers"][0].digest)
        scopes = [q.get("scope") for q in p.token_requests]
        assert ["repository:t/app:pull"] in scopes
        assert all(q.get("service") == ["stub"] for q in p.token_requests)
        with (
            RegistryClient(p.host, _opts(creds=Credentials("alice", "bad"))) as c,
            pytest.raises(AuthDeniedError),
        ):
            c.get_manifest(REPO, "v1")
        with RegistryClient(p.host, _opts(authfile="/dev/null/none")) as c:
            c._creds_loaded = True  # no auth files at all
            with pytest.raises(AuthRequiredError):
                c.get_manifest(REPO, "v1")
    with (
        ReferrersProxy(reg.host, bearer_users={}, anonymous=True) as p,
        RegistryClient(p.host, _opts()) as c,
    ):
        c._creds_loaded = True
        assert c.get_manifest(REPO, "v1").digest == sha(info["manifest"])


# -- faults


def test_resume_after_dropped_connection(
    image: tuple[Registry, dict], proxy: ReferrersProxy, tmp_path: Path
) -> None:
    big = image[1]["layers"][1]
    proxy.add_fault(Fault("GET", f"/blobs/{big.digest}", action="drop", after=100_000, times=2))
    with RegistryClient(proxy.host, _opts()) as c:
        out = c.get_blob(REPO, big.digest, tmp_path / "big", size=len(big.blob))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == big.digest[7:]
    gets = proxy.requests("GET", f"/blobs/{big.digest}")
    ranges = [h.get("Range") for _, _, h in gets]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert len(gets) == 3


def test_wrong_blob_is_a_digest_mismatch(
    image: tuple[Registry, dict], proxy: ReferrersProxy, tmp_path: Path
) -> None:
    big = image[1]["layers"][1]
    proxy.add_fault(Fault("GET", f"/blobs/{big.digest}", action="corrupt"))
    with (
        RegistryClient(proxy.host, _opts()) as c,
        pytest.raises(DigestMismatchError, match="wrong content"),
    ):
        c.get_blob(REPO, big.digest, tmp_path / "big", size=len(big.blob))
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (401, AuthRequiredError, "podman login"),
        (403, AuthDeniedError, "denied"),
        (404, ImageNotFoundError, "not found"),
        (429, RateLimitedError, "rate-limiting"),
        (500, RegistryServerError, "HTTP 500"),
    ],
)
def test_error_statuses(
    proxy: ReferrersProxy, status: int, error: type[Exception], text: str
) -> None:
    headers = {"Retry-After": "0"} if status == 429 else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="x"'
    proxy.add_fault(Fault("GET", "/manifests/v1", status=status, headers=headers, times=None))
    with RegistryClient(proxy.host, _opts(retries=2)) as c:
        c._creds_loaded = True
        with pytest.raises(error, match=text) as exc:
            c.get_manifest(REPO, "v1")
    assert "\n" not in str(exc.value)
    expected = 3 if status in (429, 500) else 1
    assert len(proxy.requests("GET", "/manifests/v1")) == expected


def test_transient_429_and_500_are_retried(
    image: tuple[Registry, dict], proxy: ReferrersProxy
) -> None:
    proxy.add_fault(Fault("GET", "/manifests/v1", status=429, headers={"Retry-After": "0"}))
    proxy.add_fault(Fault("GET", "/manifests/v1", status=503))
    with RegistryClient(proxy.host, _opts(retries=3)) as c:
        assert c.get_manifest(REPO, "v1").digest == sha(image[1]["manifest"])
    assert len(proxy.requests("GET", "/manifests/v1")) == 3


def test_malformed_manifests(proxy: ReferrersProxy) -> None:
    proxy.add_fault(Fault("GET", "/manifests/v1", action="body", body=b"{not json"))
    proxy.add_fault(
        Fault("GET", "/manifests/v2", status=200, body=b'{"schemaVersion":2,"layers":[{}]}')
    )
    with RegistryClient(proxy.host, _opts()) as c:
        with pytest.raises(MalformedManifestError, match="JSON"):
            c.get_manifest(REPO, "v1")
        with pytest.raises(MalformedManifestError, match="digest"):
            c.get_manifest(REPO, "v2")
    big = {"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "0" * 64, "size": 1}] * 10_001}
    proxy.add_fault(Fault("GET", "/manifests/v1", action="body", body=json.dumps(big).encode()))
    with (
        RegistryClient(proxy.host, _opts()) as c,
        pytest.raises(MalformedManifestError, match="entries"),
    ):
        c.get_manifest(REPO, "v1")


def test_registry_down_and_cli_message(capsys: pytest.CaptureFixture[str]) -> None:
    host = f"127.0.0.1:{free_port()}"
    with (
        RegistryClient(host, _opts(retries=1)) as c,
        pytest.raises(RegistryUnavailableError, match="cannot reach"),
    ):
        c.ping()
    rc = main(["publish", "--tls-verify=false", f"{host}/a:1", f"{host}/a:2"])
    err = capsys.readouterr().err
    assert rc == 7
    assert err.startswith("podman-delta: error: cannot reach registry") and "Traceback" not in err
    assert err.count("\n") == 1


def test_tls_failure_is_reported(image: tuple[Registry, dict]) -> None:
    reg, _ = image
    with (
        RegistryClient(reg.host, ClientOptions(tls_verify=True, retries=0)) as c,
        pytest.raises(Exception, match="TLS failure") as exc,
    ):
        c.ping()
    assert type(exc.value).__name__ == "TLSFailureError"


def test_https_with_certs_dir(image: tuple[Registry, dict], tmp_path: Path) -> None:
    """A self-signed registry: refused by default, trusted through a certs.d-style CA file."""
    import subprocess

    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    certs = tmp_path / "certs.d"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(cert.read_bytes())
    reg, info = image
    with ReferrersProxy(reg.host, tls=(str(cert), str(key))) as p:
        with (
            RegistryClient(p.host, ClientOptions(tls_verify=True, retries=0)) as c,
            pytest.raises(Exception, match="TLS failure") as exc,
        ):
            c.ping()
        assert type(exc.value).__name__ == "TLSFailureError"
        with RegistryClient(p.host, ClientOptions(certs_dir=str(certs))) as c:
            assert c.get_manifest(REPO, "v1").digest == sha(info["manifest"])
            assert c.base_url() == f"https://{p.host}"
        with RegistryClient(p.host, _opts()) as c:  # --tls-verify=false keeps HTTPS when served
            assert c.get_manifest(REPO, "v1").digest == sha(info["manifest"])
            assert c.base_url() == f"https://{p.host}"
