"""Image reference parsing follows podman's rules (docker/reference normalisation)."""

from __future__ import annotations

import pytest

from podman_delta.registry.reference import (
    ImageReference,
    ReferenceError,
    parse_qualified,
    parse_reference,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fedora", ImageReference(None, "fedora")),
        ("fedora:33", ImageReference(None, "fedora", "33")),
        ("ns/app:1.0", ImageReference(None, "ns/app", "1.0")),
        ("docker.io/busybox", ImageReference("docker.io", "library/busybox")),
        ("index.docker.io/busybox:1", ImageReference("docker.io", "library/busybox", "1")),
        ("docker.io/user/app", ImageReference("docker.io", "user/app")),
        ("quay.io/ns/name:tag", ImageReference("quay.io", "ns/name", "tag")),
        ("localhost/app", ImageReference("localhost", "app")),
        ("localhost:5000/app:v2", ImageReference("localhost:5000", "app", "v2")),
        ("127.0.0.1:5001/fx/deb:v1", ImageReference("127.0.0.1:5001", "fx/deb", "v1")),
        ("Registry/app", ImageReference("Registry", "app")),
        (f"app@{D}", ImageReference(None, "app", None, D)),
        (f"quay.io/a/b:t@{D}", ImageReference("quay.io", "a/b", "t", D)),
        ("docker://quay.io/a/b", ImageReference("quay.io", "a/b")),
        ("[::1]:5000/app", ImageReference("[::1]:5000", "app")),
        ("a/b__c/d-e.f:TAG_1.x", ImageReference(None, "a/b__c/d-e.f", "TAG_1.x")),
    ],
)
def test_parse(text: str, expected: ImageReference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER",
        "app:",
        "app:-bad",
        "app@sha256:abc",
        "app@md5:" + "a" * 32,
        "a//b",
        "-app",
        "quay.io/",
        "quay.io/App",
        "app:" + "t" * 129,
    ],
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(ReferenceError):
        parse_reference(text)


def test_ref_str_and_defaults() -> None:
    r = parse_reference("quay.io/a/b")
    assert r.ref == "latest" and r.tag is None and not r.is_short
    assert str(r) == "quay.io/a/b"
    assert str(parse_reference(f"quay.io/a/b:t@{D}")) == f"quay.io/a/b:t@{D}"
    assert parse_reference(f"a@{D}").ref == D
    assert parse_reference("fedora").with_registry("docker.io").repository == "library/fedora"
    assert parse_reference("fedora").with_registry("quay.io").repository == "fedora"


def test_parse_qualified_refuses_short_names() -> None:
    with pytest.raises(ReferenceError, match="short name"):
        parse_qualified("fedora:33")
    assert parse_qualified("localhost/x").registry == "localhost"
