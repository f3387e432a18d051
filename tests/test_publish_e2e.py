"""``podman-delta publish``/``create``/``apply`` end to end against a real docker-registry.

Images are built in Python and pushed with skopeo; every published delta is fetched back
through discovery, applied to the old layers it names and checked against the new DiffID.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podman_delta.cli import main
from podman_delta.registry.artifact import ANN_SOURCE, DeltaArtifact, parse_artifact
from podman_delta.registry.client import ClientOptions, RegistryClient
from podman_delta.registry.discovery import fallback_tag, find_referrers
from podman_delta.registry.image import open_image_source
from podman_delta.registry.publish import plan_layers
from podman_delta.tardiff.patcher import apply
from podman_delta.tardiff.sources import open_source
from tests.support.ocibuild import Layer, make_layer, sha, skopeo_push, write_archive, write_layout
from tests.support.referrers_stub import ReferrersProxy
from tests.support.registry import Registry

REPO = "p/app"


@dataclass
class Version:
    layers: list[Layer]
    manifest: bytes
    layout: Path

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def _versions(tmp: Path) -> dict[str, Version]:
    rnd = random.Random(42)
    libs = {f"usr/lib/lib{i}.so": rnd.randbytes(40_000) for i in range(3)}
    base = make_layer(libs)
    binary = bytearray(rnd.randbytes(150_000))
    out = {}
    for n, tag in enumerate(("v0", "v1", "v2")):
        binary[1000 * n : 1000 * n + 64] = bytes([n + 1]) * 64  # a small edit per version
        files = {"app/bin": bytes(binary), "app/version": f"{tag}\n".encode()}
        if tag == "v2":  # v2 also patches a base file: its delta needs both old layers
            files["usr/lib/lib0.so"] = libs["usr/lib/lib0.so"][:-100] + b"patched"
        app = make_layer(files)
        data = make_layer({"data/blob": rnd.randbytes(30_000)}, "zstd")  # unrelated: no delta
        layers = [base, app, data]
        created = f"2024-0{n + 1}-01T00:00:00Z"
        manifest = write_layout(tmp / tag, layers, created=created)
        out[tag] = Version(layers, manifest, tmp / tag)
    return out


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, dict[str, Version]]]:
    tmp = tmp_path_factory.mktemp("publish")
    versions = _versions(tmp)
    with Registry(tmp / "reg") as reg:
        for tag, v in versions.items():
            skopeo_push(v.layout, reg.host, f"{REPO}:{tag}")
        yield reg, versions


def _artifacts(c: RegistryClient, repo: str, target: str) -> list[DeltaArtifact]:
    out = []
    for desc in find_referrers(c, repo, target):
        m = c.get_manifest(repo, desc["digest"])
        art = parse_artifact(m.data, desc["digest"])
        out.append(art.resolve(lambda d: c.get_blob_bytes(repo, d["digest"])))
    return out


def _check_artifact(
    c: RegistryClient, repo: str, art: DeltaArtifact, old: Version, new: Version, tmp: Path
) -> int:
    """Apply every delta of ``art`` to the old layers it names; return the number of deltas."""
    assert art.target == new.digest and art.source == old.digest
    changed, reused = plan_layers(_info(old), _info(new))
    assert art.reused == reused
    assert sorted(lay.to_digest for lay in art.layers) == sorted(
        new.layers[i].digest for i in changed
    )
    old_tars = {}
    for lay in old.layers:
        path = tmp / f"old-{lay.diff_id[7:19]}.tar"
        path.write_bytes(lay.tar)
        old_tars[lay.diff_id] = path
    deltas = 0
    for lay in art.layers:
        if not lay.is_delta:
            assert lay.descriptor["digest"] == lay.to_digest  # the original blob
            continue
        deltas += 1
        blob = c.get_blob(repo, lay.descriptor["digest"], tmp / "delta", size=lay.size)
        ids = lay.source_diff_ids or tuple(old_tars)
        source = open_source([old_tars[i] for i in ids])
        try:
            with open(blob, "rb") as f:
                sink = _Hash()
                result = apply(f, source, sink, expected_digest=lay.to_diff_id)  # type: ignore[arg-type]
        finally:
            source.close()
        assert result.digest == lay.to_diff_id == "sha256:" + sink.h.hexdigest()
    return deltas


class _Hash:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)


def _info(v: Version):
    return open_image_source(f"oci:{v.layout}").image()


def _writes(reg: Registry) -> list:
    return [a for a in reg.accesses() if a.method in ("PUT", "POST", "PATCH")]


def test_dry_run_publish_fetch_apply_idempotent(
    setup: tuple[Registry, dict[str, Version]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, v = setup
    old, new = f"{reg.host}/{REPO}:v1", f"{reg.host}/{REPO}:v2"
    reg.clear_log()
    assert main(["publish", "--tls-verify=false", "--dry-run", old, new]) == 0
    out = capsys.readouterr().out
    assert "original layer" in out and "delta" in out and "2 changed layer(s), 1 reused" in out
    assert _writes(reg) == []

    assert main(["publish", "--tls-verify=false", "-q", old, new]) == 0
    assert "sha256:" in capsys.readouterr().out
    with RegistryClient(reg.host, ClientOptions(tls_verify=False)) as c:
        arts = _artifacts(c, REPO, v["v2"].digest)
        assert len(arts) == 1
        assert _check_artifact(c, REPO, arts[0], v["v1"], v["v2"], tmp_path) == 1
        assert c.head_manifest(REPO, fallback_tag(v["v2"].digest)) is not None
        delta_layer = next(lay for lay in arts[0].layers if lay.is_delta)
        assert delta_layer.size < len(v["v2"].layers[1].blob) // 10
        # made against the stacked old layers (lowest first), as the extension annotation says
        assert delta_layer.source_diff_ids == tuple(lay.diff_id for lay in v["v1"].layers)

    reg.clear_log()
    assert main(["publish", "--tls-verify=false", old, new]) == 0
    assert "already published" in capsys.readouterr().out
    assert _writes(reg) == []
    # found through discovery before downloading any layer: only the two configs were read
    configs = {json.loads(v[t].manifest)["config"]["digest"] for t in ("v1", "v2")}
    assert {a.path.rsplit("/", 1)[1] for a in reg.blob_gets()} == configs


def test_previous_tags(
    setup: tuple[Registry, dict[str, Version]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, v = setup
    assert main(["publish", "--tls-verify=false", "--previous", "2", f"{reg.host}/{REPO}:v2"]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}:v1 ->" in out and f"{REPO}:v0 ->" in out
    with RegistryClient(reg.host, ClientOptions(tls_verify=False)) as c:
        arts = {a.source: a for a in _artifacts(c, REPO, v["v2"].digest)}
        assert set(arts) == {v["v0"].digest, v["v1"].digest}
        assert _check_artifact(c, REPO, arts[v["v0"].digest], v["v0"], v["v2"], tmp_path) == 1
        # v0 has no earlier tag: nothing to do
    assert main(["publish", "--tls-verify=false", "--previous", "1", f"{reg.host}/{REPO}:v0"]) == 0
    assert "no other tags" in capsys.readouterr().out


def test_publish_through_referrers_api(
    setup: tuple[Registry, dict[str, Version]], tmp_path: Path
) -> None:
    reg, v = setup
    with ReferrersProxy(reg.host) as proxy:
        rc = main(
            [
                "publish",
                "--tls-verify=false",
                "-q",
                f"{proxy.host}/{REPO}:v0",
                f"{proxy.host}/{REPO}:v1",
            ]
        )
        assert rc == 0
        assert proxy.requests("PUT", "/manifests/sha256-") == []  # OCI-Subject: no tag needed
        with RegistryClient(proxy.host, ClientOptions(tls_verify=False)) as c:
            arts = _artifacts(c, REPO, v["v1"].digest)
            assert c.referrers_supported is True  # type: ignore[attr-defined]
            assert [a.source for a in arts] == [v["v0"].digest]
            assert _check_artifact(c, REPO, arts[0], v["v0"], v["v1"], tmp_path) == 1
            # v1's app layer only changes files of v0's app layer: a single-layer delta
            delta_layer = next(lay for lay in arts[0].layers if lay.is_delta)
            assert delta_layer.source_diff_ids == (v["v0"].layers[1].diff_id,)


def test_publish_with_basic_auth(
    htpasswd_registry: Registry, setup: tuple[Registry, dict[str, Version]], tmp_path: Path
) -> None:
    reg = htpasswd_registry
    _, v = setup
    for tag in ("v1", "v2"):
        skopeo_push(v[tag].layout, reg.host, f"{REPO}:{tag}", creds="user:pass")
    args = [f"{reg.host}/{REPO}:v1", f"{reg.host}/{REPO}:v2"]
    assert main(["publish", "--tls-verify=false", "-q", *args]) == 7  # no credentials
    assert main(["publish", "--tls-verify=false", "-q", "--creds", "user:pass", *args]) == 0
    with RegistryClient(reg.host, ClientOptions(tls_verify=False, creds=_creds())) as c:
        arts = _artifacts(c, REPO, v["v2"].digest)
        assert [json.loads(json.dumps(a.source)) for a in arts] == [v["v1"].digest]


def _creds():
    from podman_delta.registry.auth import Credentials

    return Credentials("user", "pass")


def test_create_and_apply_offline(
    setup: tuple[Registry, dict[str, Version]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, v = setup
    delta = tmp_path / "delta.tar"
    rc = main(
        [
            "create",
            "-q",
            f"oci:{v['v1'].layout}",
            f"docker://{reg.host}/{REPO}:v2",
            str(delta),
            "--tls-verify=false",
        ]
    )
    assert rc == 0
    # the file is a valid OCI archive for skopeo, holding the artifact manifest
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{delta}"], check=True, capture_output=True
    ).stdout
    doc = json.loads(raw)
    assert doc["artifactType"] == "application/vnd.io.github.containers.oci-delta.v1"
    assert doc["annotations"][ANN_SOURCE] == v["v1"].digest
    write_archive(v["v1"].layout, tmp_path / "v1.tar")
    out = tmp_path / "v2.tar"
    rc = main(
        ["apply", "-q", "--source", f"oci-archive:{tmp_path / 'v1.tar'}", str(delta), str(out)]
    )
    assert rc == 0
    # skopeo reads the result and checks every blob digest while copying it
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci-archive:{out}", f"oci:{tmp_path / 'copy'}"],
        check=True,
        capture_output=True,
    )
    img = open_image_source(f"oci-archive:{out}").image()
    assert img.diff_ids == tuple(lay.diff_id for lay in v["v2"].layers)
    assert img.config_digest == json.loads(v["v2"].manifest)["config"]["digest"]
    src = open_image_source(f"oci-archive:{out}")
    for desc, diff_id in zip(img.layers, img.diff_ids, strict=True):
        blob = src.fetch_blob(desc, tmp_path / "layer")
        data = blob.read_bytes()
        if desc["mediaType"].endswith("+gzip"):
            import gzip

            data = gzip.decompress(data)
        elif desc["mediaType"].endswith("+zstd"):
            import zstandard

            data = zstandard.ZstdDecompressor().stream_reader(data).read()
        assert sha(data) == diff_id
    src.close()
    # a wrong source image is refused with a clear message
    write_archive(v["v0"].layout, tmp_path / "v0.tar")
    rc = main(
        [
            "apply",
            "-q",
            "--source",
            f"oci-archive:{tmp_path / 'v0.tar'}",
            str(delta),
            str(tmp_path / "bad.tar"),
        ]
    )
    assert rc in (4, 5)
    assert not (tmp_path / "bad.tar").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_concurrent_publishers_to_one_target(
    registry: Registry, setup: tuple[Registry, dict[str, Version]], tmp_path: Path
) -> None:
    """v0 -> v2 and v1 -> v2 published at once: the fallback tag lists both artifacts."""
    import threading

    from podman_delta.registry.image import ClientPool
    from podman_delta.registry.publish import PublishOptions, publish

    _, v = setup
    for tag in ("v0", "v1", "v2"):
        skopeo_push(v[tag].layout, registry.host, f"{REPO}:{tag}")
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(old: str) -> None:
        try:
            pool = ClientPool(ClientOptions(tls_verify=False))
            barrier.wait()
            publish(
                f"{registry.host}/{REPO}:{old}",
                f"{registry.host}/{REPO}:v2",
                pool,
                PublishOptions(jobs=1),
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("v0", "v1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    with RegistryClient(registry.host, ClientOptions(tls_verify=False)) as c:
        sources = {a.source for a in _artifacts(c, REPO, v["v2"].digest)}
    assert sources == {v["v0"].digest, v["v1"].digest}


def test_inconsistent_image_is_refused(tmp_path: Path) -> None:
    """A layer blob that does not decompress to the config's DiffID stops publishing."""
    from podman_delta.errors import DigestMismatchError
    from podman_delta.registry.publish import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    lay = make_layer({"a": b"x"})
    blob = tmp_path / "blob"
    blob.write_bytes(lay.blob)
    with pytest.raises(DigestMismatchError, match="DiffID"):
        ws.untar(blob, "sha256:" + "0" * 64)
    assert ws.untar(blob, lay.diff_id).read_bytes() == lay.tar
    assert list((tmp_path / "ws" / "tars").iterdir()) == [ws.tar(lay.diff_id)]


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "--platform", "linux", "quay.io/a/b:1", "quay.io/a/b:2"]) == 7
    assert "invalid --platform" in capsys.readouterr().err
    assert main(["publish", "quay.io/a/b:1"]) == 1
    assert "OLD_REF NEW_REF" in capsys.readouterr().err
    assert main(["publish", "--previous", "0", "quay.io/a/b:1"]) == 1
    assert main(["publish", "BAD/Ref", "quay.io/a/b:2"]) == 2
    assert "lower-case" in capsys.readouterr().err
    missing = tmp_path / "missing.tar"
    assert main(["apply", "--source", f"oci:{tmp_path}", str(missing), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
