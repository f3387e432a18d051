"""registries.conf (v2 and v1), drop-ins, short names, certs.d and auth files."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from podman_delta.registry import auth
from podman_delta.registry.config import (
    BlockedRegistryError,
    ConfigError,
    ShortNameError,
    default_paths,
    load_registries_conf,
    resolve_short_name,
    tls_files,
)
from podman_delta.registry.reference import parse_reference

MAIN = """
unqualified-search-registries = ["registry.fedoraproject.org", "quay.io", "docker.io"]
short-name-mode = "enforcing"

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
"ubi" = "registry.access.redhat.com/ubi9:latest"

[[registry]]
prefix = "example.com/foo"
location = "internal.example.com/mirror/foo"
insecure = true

[[registry.mirror]]
location = "mirror1.example.com/foo"

[[registry.mirror]]
location = "mirror2.example.com/foo"
pull-from-mirror = "digest-only"

[[registry]]
location = "blocked.example.com"
blocked = true

[[registry]]
prefix = "*.wild.example"
insecure = true
"""

DROPIN = """
unqualified-search-registries = ["localhost:5000"]

[aliases]
"app" = "localhost:5000/team/app"

[[registry]]
location = "blocked.example.com"
blocked = false
"""


@pytest.fixture
def conf_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    main = tmp_path / "registries.conf"
    main.write_text(MAIN)
    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(main))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return main, dropins


def test_env_selects_the_main_file(conf_files: tuple[Path, Path]) -> None:
    main, _ = conf_files
    assert default_paths()[0] == main


def test_main_file(conf_files: tuple[Path, Path]) -> None:
    _, dropins = conf_files
    conf = load_registries_conf(dropin_dirs=[dropins])
    assert conf.search == ["registry.fedoraproject.org", "quay.io", "docker.io"]
    assert conf.short_name_mode == "enforcing"
    cands = resolve_short_name(parse_reference("fedora:40"), conf)
    assert [str(c) for c in cands] == ["registry.fedoraproject.org/fedora:40"]
    cands = resolve_short_name(parse_reference("ubi"), conf)
    assert [str(c) for c in cands] == ["registry.access.redhat.com/ubi9:latest"]
    cands = resolve_short_name(parse_reference("busybox"), conf)
    assert [str(c) for c in cands] == [
        "registry.fedoraproject.org/busybox",
        "quay.io/busybox",
        "docker.io/library/busybox",
    ]
    with pytest.raises(BlockedRegistryError):
        conf.pull_endpoints(parse_reference("blocked.example.com/x/y"))


def test_mirrors_and_location_rewrite(conf_files: tuple[Path, Path]) -> None:
    _, dropins = conf_files
    conf = load_registries_conf(dropin_dirs=[dropins])
    by_tag = conf.pull_endpoints(parse_reference("example.com/foo/bar:1"))
    assert [str(r) for _, r in by_tag] == [
        "mirror1.example.com/foo/bar:1",
        "internal.example.com/mirror/foo/bar:1",
    ]
    assert by_tag[-1][0].insecure
    digest = "sha256:" + "0" * 64
    by_digest = conf.pull_endpoints(parse_reference(f"example.com/foo/bar@{digest}"))
    assert [r.registry for _, r in by_digest] == [
        "mirror1.example.com",
        "mirror2.example.com",
        "internal.example.com",
    ]
    # the prefix matches at a path boundary only
    other = conf.pull_endpoints(parse_reference("example.com/foobar/x"))
    assert [str(r) for _, r in other] == ["example.com/foobar/x"]
    wild = conf.pull_endpoints(parse_reference("a.wild.example/x:1"))
    assert [(e.insecure, str(r)) for e, r in wild] == [(True, "a.wild.example/x:1")]
    endpoint, ref = conf.push_endpoint(parse_reference("example.com/foo/bar:1"))
    assert str(ref) == "internal.example.com/mirror/foo/bar:1" and endpoint.insecure


def test_dropins_override(conf_files: tuple[Path, Path]) -> None:
    _, dropins = conf_files
    (dropins / "50-local.conf").write_text(DROPIN)
    (dropins / "ignored.txt").write_text("not toml [")
    conf = load_registries_conf(dropin_dirs=[dropins])
    assert conf.search == ["localhost:5000"]
    assert conf.aliases["fedora"] == "registry.fedoraproject.org/fedora"  # merged
    assert [str(c) for c in resolve_short_name(parse_reference("app:2"), conf)] == [
        "localhost:5000/team/app:2"
    ]
    # the drop-in's entry for the same prefix replaces the main file's
    assert conf.pull_endpoints(parse_reference("blocked.example.com/x"))[0][1].registry == (
        "blocked.example.com"
    )
    assert len(conf.files) == 2


def test_v1_format(tmp_path: Path) -> None:
    path = tmp_path / "v1.conf"
    path.write_text(
        "[registries.search]\nregistries = ['a.io', 'b.io']\n"
        "[registries.insecure]\nregistries = ['insecure.io:5000']\n"
        "[registries.block]\nregistries = ['bad.io']\n"
    )
    conf = load_registries_conf(path, [])
    assert conf.search == ["a.io", "b.io"]
    assert conf.is_insecure("insecure.io:5000") and not conf.is_insecure("a.io")
    with pytest.raises(BlockedRegistryError):
        conf.pull_endpoints(parse_reference("bad.io/x"))


def test_no_search_registries_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.conf"
    path.write_text("")
    conf = load_registries_conf(path, [])
    with pytest.raises(ShortNameError, match="fully qualified"):
        resolve_short_name(parse_reference("busybox"), conf)


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("unqualified-search-registries = [")
    with pytest.raises(ConfigError, match=r"bad\.conf"):
        load_registries_conf(path, [])


def test_certs_d(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    (d / "ca.crt").write_text("CA")
    (d / "client.cert").write_text("C")
    (d / "client.key").write_text("K")
    files = tls_files("reg:5000", d)
    assert files.ca_files == (d / "ca.crt",)
    assert files.client_cert == (d / "client.cert", d / "client.key")
    (d / "client.key").unlink()
    with pytest.raises(ConfigError, match=r"client\.key"):
        tls_files("reg:5000", d)


# -- auth files


def _auth_json(path: Path, entries: dict[str, tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    auths = {
        k: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for k, (u, p) in entries.items()
    }
    path.write_text(json.dumps({"auths": auths}))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return h


def test_auth_lookup_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _auth_json(home / ".docker/config.json", {"https://index.docker.io/v1/": ("hub", "h")})
    _auth_json(home / ".config/containers/auth.json", {"reg.io": ("cfg", "c")})
    assert auth.lookup_credentials("docker.io", "library/x").username == "hub"
    assert auth.lookup_credentials("reg.io", "a/b").username == "cfg"
    runtime = tmp_path / "run"
    _auth_json(runtime / "containers/auth.json", {"reg.io": ("run", "r")})
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert auth.lookup_credentials("reg.io", "a/b").username == "run"
    explicit = tmp_path / "explicit.json"
    _auth_json(explicit, {"other.io": ("x", "y")})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert auth.lookup_credentials("reg.io", "a/b") is None  # only the explicit file counts
    assert auth.lookup_credentials("other.io").password == "y"


def test_auth_most_specific_key_wins(home: Path) -> None:
    _auth_json(
        home / ".config/containers/auth.json",
        {"reg.io": ("host", "1"), "reg.io/team": ("team", "2"), "reg.io/team/app": ("app", "3")},
    )
    assert auth.lookup_credentials("reg.io", "team/app").username == "app"
    assert auth.lookup_credentials("reg.io", "team/other").username == "team"
    assert auth.lookup_credentials("reg.io", "solo").username == "host"
    assert auth.lookup_credentials("nothere.io", "x") is None


def test_authfile_flag_missing_and_malformed(home: Path, tmp_path: Path) -> None:
    with pytest.raises(auth.AuthFileError, match="does not exist"):
        auth.lookup_credentials("reg.io", authfile=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(auth.AuthFileError, match="cannot read"):
        auth.lookup_credentials("reg.io", authfile=bad)


def test_cred_helper(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text(
        '#!/bin/sh\nread host\necho "{\\"Username\\":\\"h-$host\\",\\"Secret\\":\\"s\\"}"\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cfg = home / ".docker/config.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"credHelpers": {"reg.io": "fake"}}))
    creds = auth.lookup_credentials("reg.io", "x")
    assert creds is not None and creds.username == "h-reg.io" and creds.password == "s"


def test_creds_flag_and_challenge() -> None:
    c = auth.parse_creds("user:pa:ss")
    assert (c.username, c.password) == ("user", "pa:ss")
    assert "pa:ss" not in repr(c)
    with pytest.raises(auth.AuthFileError):
        auth.parse_creds(":x")
    ch = auth.parse_challenge(
        'Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull,push"'
    )
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.io/token",
        "service": "registry.io",
        "scope": "repository:a/b:pull,push",
    }
    basic = auth.parse_challenge('Basic realm="test"')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == "test"
