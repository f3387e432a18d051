#!/usr/bin/env python3
"""Make the demo's layer tars from files already on this Debian host (no internet needed).

Writes four deterministic tars into OUT_DIR:

* ``base1.tar``: a small Debian-like root filesystem: the files of a few installed packages
  (``dpkg -L``; libc, coreutils, bash, openssl, ...; no docs, man pages or locales) plus
  ``/etc`` basics. About 40 MB.
* ``base2.tar``: the same after a realistic "security update": the OpenSSL libraries and
  binary rebuilt (a few bytes changed in place and a section appended, as a patched rebuild
  looks to a binary diff), a changed config file, an added file (a new CA certificate
  bundle entry), a removed file, and a bumped ``/etc/debian_version``-style release file.
* ``app1.tar`` / ``app2.tar``: an application layer on top; v2 changes its version file and
  script and patches its binary slightly.
"""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGES = [
    "libc6",
    "coreutils",
    "bash",
    "dash",
    "grep",
    "sed",
    "tar",
    "gzip",
    "findutils",
    "zlib1g",
    "libzstd1",
    "liblzma5",
    "libacl1",
    "libattr1",
    "libselinux1",
    "libpcre2-8-0",
    "libgmp10",
    "libtinfo6",
    "libssl3",
    "openssl",
    "ca-certificates",
]
SKIP_PREFIXES = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/info/")
ETC_FILES = ("etc/passwd", "etc/group", "etc/os-release", "etc/debian_version", "etc/nsswitch.conf")
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
MTIME = 1_700_000_000


def canonical(path: str) -> str | None:
    """``/lib/x/libc.so.6`` → ``usr/lib/x/libc.so.6`` (merged /usr), without following the
    last component (symlinks stay symlinks)."""
    parent, name = os.path.split(path)
    real_parent = os.path.realpath(parent)
    full = os.path.join(real_parent, name)
    if not os.path.lexists(full):
        return None
    return full.lstrip("/")


def package_files() -> list[str]:
    names: set[str] = set()
    for pkg in PACKAGES:
        proc = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"make_images: package {pkg} not installed; skipped", file=sys.stderr)
            continue
        for line in proc.stdout.splitlines():
            rel = canonical(line.strip()) if line.startswith("/") else None
            if rel and not rel.startswith(SKIP_PREFIXES) and rel not in ("", "."):
                names.add(rel)
    names.update(f for f in ETC_FILES if os.path.lexists("/" + f))
    return sorted(names)


def read_tree(files: list[str]) -> dict[str, tuple[str, bytes | str, int]]:
    """name → (kind, data or link target, mode) for regular files, symlinks and dirs."""
    tree: dict[str, tuple[str, bytes | str, int]] = {}
    for rel in files:
        st = os.lstat("/" + rel)
        if stat.S_ISLNK(st.st_mode):
            tree[rel] = ("link", os.readlink("/" + rel), 0o777)
        elif stat.S_ISDIR(st.st_mode):
            tree[rel] = ("dir", b"", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            tree[rel] = ("file", Path("/" + rel).read_bytes(), stat.S_IMODE(st.st_mode))
    for link, target in MERGED.items():
        if os.path.islink("/" + link):
            tree[link] = ("link", target, 0o777)
    tree["tmp"] = ("dir", b"", 0o1777)
    return tree


def write_tar(path: Path, tree: dict[str, tuple[str, bytes | str, int]]) -> None:
    """A deterministic tar (sorted names, fixed times, root-owned), parents before children."""
    names = set(tree)
    for name in list(tree):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            names.add("/".join(parts[:i]))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            kind, data, mode = tree.get(name, ("dir", b"", 0o755))
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = MTIME, mode, 0, 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rebuild(data: bytes, rnd: random.Random, edits: int = 6) -> bytes:
    """What a patched rebuild looks like to a binary diff: scattered small changes (build ID,
    a fixed function, shifted addresses) and a slightly longer tail."""
    buf = bytearray(data)
    for _ in range(edits):
        at = rnd.randrange(0, max(1, len(buf) - 256))
        buf[at : at + rnd.randrange(8, 96)] = rnd.randbytes(rnd.randrange(8, 96))
    return bytes(buf) + b"\0.note.security-fix\0" + rnd.randbytes(2048)


def security_update(tree: dict, rnd: random.Random) -> dict:
    new = dict(tree)
    targets = [
        n
        for n, (kind, _d, _m) in tree.items()
        if kind == "file"
        and any(k in n for k in ("libssl.so.3", "libcrypto.so.3", "usr/bin/openssl"))
    ]
    if not targets:  # no OpenSSL here: patch compression libraries instead
        targets = [n for n, (k, _d, _m) in tree.items() if k == "file" and "libz" in n][:2]
    for name in targets:
        kind, data, mode = tree[name]
        new[name] = (kind, rebuild(data, rnd), mode)
    conf = "usr/lib/ssl/openssl.cnf"
    if conf in tree and tree[conf][0] == "file":
        kind, data, mode = tree[conf]
        new[conf] = (kind, data + b"\n[system_default_sect]\nMinProtocol = TLSv1.2\n", mode)
    new["etc/demo-release"] = ("file", b"demo-base 1.1 (security update DSA-0000-1)\n", 0o644)
    removed = sorted(n for n, (k, _d, _m) in tree.items() if k == "file" and "bin/" in n)
    if removed:
        new.pop(removed[len(removed) // 2])  # a tool dropped by the update
    new["usr/share/demo/CHANGES"] = ("file", b"1.1: fix CVE-0000-0000 in OpenSSL\n", 0o644)
    return new


def app_layer(version: int, binary: bytes, rnd: random.Random) -> dict:
    script = (
        "#!/bin/sh\n"
        f"# demo application, version {version}\n"
        'echo "demo app $(cat /opt/app/VERSION) on $(cat /etc/demo-release)"\n'
    )
    if version > 1:
        script += 'echo "now with the fix for issue #42"\n'
    data = random.Random(7).randbytes(1_000_000)  # the app's data, unchanged between versions
    return {
        "opt/app/bin/app": ("file", script.encode(), 0o755),
        "opt/app/bin/helper": ("file", binary, 0o755),
        "opt/app/VERSION": ("file", f"{version}.0\n".encode(), 0o644),
        "opt/app/data.bin": ("file", data, 0o644),
    }


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(20240501)
    base1 = read_tree(package_files())
    base1["etc/demo-release"] = ("file", b"demo-base 1.0\n", 0o644)
    base2 = security_update(base1, rnd)
    helper = Path(os.path.realpath("/usr/bin/tar")).read_bytes()
    app1 = app_layer(1, helper, rnd)
    app2 = app_layer(2, rebuild(helper, rnd, edits=3), rnd)
    for name, tree in (("base1", base1), ("base2", base2), ("app1", app1), ("app2", app2)):
        write_tar(out / f"{name}.tar", tree)
    size = sum((out / f"{n}.tar").stat().st_size for n in ("base1", "app1"))
    print(f"v1 root filesystem: {size / 1e6:.1f} MB in 2 layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
