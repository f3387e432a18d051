"""Build small OCI images in Python (tarfile + gzip) and push them with real skopeo.

No podman and no network: a layer is a dict ``{path: bytes}`` turned into a deterministic tar,
gzip-compressed; an image is an OCI layout directory that ``skopeo copy oci:DIR docker://…``
pushes unchanged (same blobs, same manifest digest).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of regular files (parents added as directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = 1_700_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


@dataclass
class Layer:
    blob: bytes
    diff_id: str
    tar: bytes
    media_type: str = LAYER_GZIP

    @property
    def digest(self) -> str:
        return sha(self.blob)


def make_layer(files: dict[str, bytes], compression: str = "gzip") -> Layer:
    """A layer blob: gzip (level 6, like podman push) or zstd (level 19)."""
    tar = make_tar(files)
    if compression == "zstd":
        blob = zstandard.ZstdCompressor(level=19).compress(tar)
        return Layer(blob, sha(tar), tar, LAYER_ZSTD)
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    return Layer(blob, sha(tar), tar)


def _write_blob(root: Path, data: bytes) -> dict:
    d = sha(data)
    p = root / "blobs" / "sha256" / d[7:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": d, "size": len(data)}


def image_manifest(
    root: Path, layers: list[Layer], *, created: str = "2024-01-01T00:00:00Z", arch: str = "amd64"
) -> tuple[bytes, bytes]:
    """Write config + layers into ``root``; return (manifest bytes, config bytes)."""
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "created": created,
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in layers]},
        },
        sort_keys=True,
    ).encode()
    cdesc = _write_blob(root, config)
    ldescs = []
    for lay in layers:
        ldescs.append({"mediaType": lay.media_type, **_write_blob(root, lay.blob)})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
            "layers": ldescs,
        }
    ).encode()
    _write_blob(root, manifest)
    return manifest, config


def write_layout(root: Path, layers: list[Layer], **kw: str) -> bytes:
    """An OCI layout directory holding one image; returns its manifest bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    manifest, _ = image_manifest(root, layers, **kw)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest)}],
    }
    (root / "index.json").write_text(json.dumps(index))
    return manifest


def write_archive(layout: Path, archive: Path) -> None:
    """Tar an OCI layout directory into an oci-archive."""
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)


def skopeo_push(layout: Path, host: str, name: str, *, creds: str | None = None) -> None:
    """``skopeo copy oci:LAYOUT docker://HOST/NAME`` (plain HTTP, blobs kept as they are)."""
    cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    cmd += [f"oci:{layout}", f"docker://{host}/{name}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
