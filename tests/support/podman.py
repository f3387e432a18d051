"""Real podman/skopeo in tests: private stores, runc config, an isolated blob-info-cache.

podman's blob-info-cache (``/var/lib/containers/cache``) is shared by every store and by skopeo,
and podman has no flag to move it. Tests therefore run in a private mount namespace (entered
once by the test process with ``unshare(CLONE_NEWNS)``) and mount a fresh tmpfs over the cache
directory per test, so no test sees another's pairs and the host's cache is never touched.

Test images are built without internet: small layer tars made here (the host's ``/bin/sh`` and
its libraries make a runnable base), pushed straight to the test registry over HTTP.
"""

from __future__ import annotations

import atexit
import ctypes
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import requests

from podman_delta.storage.config import StoreOptions

CLONE_NEWNS = 0x00020000
CACHE_DIR = Path("/var/lib/containers/cache")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
"""

_in_private_ns = False
_RUNROOTS: list[Path] = []


@atexit.register
def _remove_runroots() -> None:
    for path in _RUNROOTS:
        shutil.rmtree(path, ignore_errors=True)


def enter_private_mount_namespace() -> None:
    """Move this process (and its future children) into a private mount namespace, once."""
    global _in_private_ns
    if _in_private_ns:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS) failed: {os.strerror(err)} (run as root)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    _in_private_ns = True


@contextmanager
def isolated_blob_cache(directory: Path = CACHE_DIR) -> Iterator[Path]:
    """A fresh, empty tmpfs over the blob-info-cache directory for the duration."""
    enter_private_mount_namespace()
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def clear_blob_cache(directory: Path = CACHE_DIR) -> None:
    """Forget every recorded pair (e.g. after pushing test images)."""
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@dataclass
class Podman:
    """podman with a private store under ``base`` and the runc containers.conf."""

    base: Path
    driver: str = "vfs"
    storage_opts: tuple[str, ...] = ()
    binary: str = "podman"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.root = self.base / "store"
        # podman refuses a runroot longer than 50 characters: keep it short, remove at exit.
        self.runroot = Path(tempfile.mkdtemp(prefix="pd-run-", dir="/tmp"))
        _RUNROOTS.append(self.runroot)
        self.root.mkdir(parents=True, exist_ok=True)
        self.runroot.mkdir(parents=True, exist_ok=True)
        self.conf = self.base / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        # Our own storage.conf so a host file cannot change the test store.
        self.storage_conf = self.base / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "{self.driver}"\n'
            f'graphroot = "{self.root}"\nrunroot = "{self.runroot}"\n'
        )

    @property
    def options(self) -> StoreOptions:
        return StoreOptions(
            graph_root=self.root,
            run_root=self.runroot,
            driver=self.driver,
            driver_options=self.storage_opts,
        )

    def global_args(self) -> list[str]:
        return self.options.podman_args()

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.conf)
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        env.update(self.env)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, *self.global_args(), *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=self.environ(), timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def inspect(self, ref: str) -> dict:
        return json.loads(self.run("image", "inspect", ref).stdout)[0]

    def image_ids(self) -> list[str]:
        out = self.run("images", "-q", "--no-trunc").stdout.split()
        return sorted({x.removeprefix("sha256:") for x in out})

    def pull(self, ref: str) -> str:
        return self.run("pull", "-q", "--tls-verify=false", ref).stdout.strip()


# ------------------------------------------------------------------------------ test images


def tar_bytes(
    files: dict[str, bytes | str | tuple[bytes, int] | None],
    *,
    host_files: dict[str, str] | None = None,
) -> bytes:
    """A deterministic tar: ``None`` = directory, ``str`` = symlink, ``(data, mode)`` = file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries: dict[str, tuple[str, object]] = {}
        for name, value in files.items():
            entries[name] = ("data", value)
        for name, src in (host_files or {}).items():
            entries[name] = ("host", src)
        dirs: set[str] = set()
        for name in entries:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for name in sorted(dirs | set(entries)):
            kind, value = entries.get(name, ("data", None))
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "host":
                data = Path(str(value)).read_bytes()
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
            elif value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(value, tuple):
                data, mode = value
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
            elif isinstance(value, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, value, 0o777
                tar.addfile(info)
            else:
                assert isinstance(value, bytes)
                info.size, info.mode = len(value), 0o644
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def shell_rootfs_tar() -> bytes:
    """A runnable base layer: the host's ``/bin/sh`` (dash) and the libraries it needs."""
    sh = os.path.realpath("/bin/sh")
    out = subprocess.run(["ldd", sh], capture_output=True, text=True, check=True).stdout
    host: dict[str, str] = {"bin/sh": sh}
    for line in out.splitlines():
        parts = line.split()
        path = next((p for p in parts if p.startswith("/")), None)
        if path and os.path.exists(path):
            host[path.lstrip("/")] = os.path.realpath(path)
    return tar_bytes({"etc/hostname": b"base\n", "tmp": None}, host_files=host)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class PushedImage:
    """What a test needs to know about an image it pushed."""

    reference: str  # host:port/repo:tag
    repo: str  # host:port/repo
    manifest_digest: str
    manifest: bytes
    config: bytes
    layer_tars: list[bytes]
    diff_ids: list[str]
    compressed_digests: list[str]

    @property
    def config_digest(self) -> str:
        return sha256(self.config)


def push_image(
    host: str, repo: str, tag: str, layer_tars: list[bytes], label: str = ""
) -> PushedImage:
    """Push an OCI image with gzip layers to a v2 registry over plain HTTP."""
    base = f"http://{host}/v2/{repo}"
    blobs = [gzip.compress(t, mtime=0) for t in layer_tars]
    diff_ids = [sha256(t) for t in layer_tars]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"test": label or tag}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"test layer {i}"} for i in range(len(layer_tars))],
        },
        sort_keys=True,
    ).encode()
    for blob in [*blobs, config]:
        digest = sha256(blob)
        if requests.head(f"{base}/blobs/{digest}", timeout=30).status_code == 200:
            continue
        r = requests.post(f"{base}/blobs/uploads/", timeout=30)
        r.raise_for_status()
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = f"http://{host}{loc}"
        sep = "&" if "?" in loc else "?"
        r = requests.put(
            f"{loc}{sep}digest={digest}",
            data=blob,
            timeout=60,
            headers={"Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(b),
                    "size": len(b),
                }
                for b in blobs
            ],
        },
        indent=2,
    ).encode()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    r = requests.put(f"{base}/manifests/{tag}", data=manifest, timeout=30, headers=headers)
    r.raise_for_status()
    return PushedImage(
        reference=f"{host}/{repo}:{tag}",
        repo=f"{host}/{repo}",
        manifest_digest=sha256(manifest),
        manifest=manifest,
        config=config,
        layer_tars=layer_tars,
        diff_ids=diff_ids,
        compressed_digests=[sha256(b) for b in blobs],
    )


@dataclass
class AppImages:
    """v1 and v2 of a two-layer image sharing the base layer; v2 changes the top layer."""

    v1: PushedImage
    v2: PushedImage
    new_tar: bytes  # v2's top layer, uncompressed (what a delta would reconstruct)


def push_app_images(host: str, repo: str = "t/app") -> AppImages:
    base = shell_rootfs_tar()
    top1 = tar_bytes({"app/a": os.urandom(200_000), "app/version": b"1\n", "app/gone": b"x\n"})
    top2 = tar_bytes({"app/a": os.urandom(200_000), "app/version": b"2\n", "app/new": b"n\n"})
    v1 = push_image(host, repo, "v1", [base, top1])
    v2 = push_image(host, repo, "v2", [base, top2])
    return AppImages(v1, v2, top2)


# ------------------------------------------------------------------------------ rootless


class RootlessUser:
    """An unprivileged user with subordinate IDs, without touching the host's /etc.

    Every command runs in its own private mount namespace in which a copy of /etc (with the
    user, /etc/subuid and /etc/subgid added) is bind-mounted over /etc, and /root is replaced by
    a traversable view holding only ``.pyenv`` (so the test's Python is usable by the user).
    Nothing is mounted in the test process's own namespace, so removing the work directory can
    never reach through a mount.
    """

    def __init__(self, uid: int = 1500, name: str = "pdtest") -> None:
        self.uid = uid
        self.name = name
        self.work = Path(tempfile.mkdtemp(prefix="pd-rl-", dir="/tmp"))
        self.work.chmod(0o755)
        self.home = self.work / "home"
        self.runtime = self.home / "run"
        etc = self.work / "etc"
        subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
        with open(etc / "passwd", "a") as f:
            f.write(f"{name}:x:{uid}:{uid}::{self.home}:/bin/sh\n")
        with open(etc / "group", "a") as f:
            f.write(f"{name}:x:{uid}:\n")
        (etc / "subuid").write_text(f"{name}:200000:65536\n")
        (etc / "subgid").write_text(f"{name}:200000:65536\n")
        self.runtime.mkdir(parents=True)
        self.runtime.chmod(0o700)
        subprocess.run(["chown", "-R", f"{uid}:{uid}", str(self.home)], check=True)
        view = self.work / "rootview"
        (view / ".pyenv").mkdir(parents=True)
        view.chmod(0o711)

    def environ(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }

    def run(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user (a fresh private mount namespace each time)."""
        w = self.work
        script = (
            f"mount --bind {w}/etc /etc && "
            f"if [ -d /root/.pyenv ]; then mount --bind /root/.pyenv {w}/rootview/.pyenv && "
            f"mount --rbind {w}/rootview /root; fi && "
            f'exec runuser -u {self.name} -- env -i "$@"'
        )
        env_args = [f"{k}={v}" for k, v in self.environ().items()]
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        return subprocess.run(
            [*cmd, *env_args, *argv], capture_output=True, text=True, timeout=timeout, cwd="/"
        )

    def close(self) -> None:
        """Stop the user's podman pause process (started by these tests) and remove files."""
        pid_file = self.runtime / "libpod" / "tmp" / "pause.pid"
        with suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), 9)
        shutil.rmtree(self.work, ignore_errors=True)


def pull_layout_leftover(pm: Podman, imgs: AppImages, tmp_path: Path) -> str:
    """Leave what a run killed right after podman 4's ``pull oci:DIR`` leaves: an image named
    ``localhost/<layout path>:latest`` (v2 with an extra label, so its ID is new); its name."""
    from podman_delta.storage.importer import LAYOUT_DIR, write_oci_layout

    config = json.loads(imgs.v2.config)
    config["config"]["Labels"] = {"left": "over"}
    cfg = json.dumps(config).encode()
    layout = tmp_path / "podman-delta-import-0123456789ab" / LAYOUT_DIR
    new_tar = tmp_path / "new.tar"
    new_tar.write_bytes(imgs.new_tar)
    rows = [
        (imgs.v2.diff_ids[0], None, 0),
        (imgs.v2.diff_ids[1], str(new_tar), new_tar.stat().st_size),
    ]
    write_oci_layout(layout, cfg, rows, "whatever")
    pm.run("pull", "-q", f"oci:{layout}:whatever")
    return f"localhost{layout}:latest"
