#!/usr/bin/env python3
"""Whole-pull benchmark: plain ``podman pull`` vs ``podman-delta pull`` (vs zstd:chunked).

For each corpus pair (``/var/cache/podman-delta/corpus/<pair>/{old,new}.tar[.gz]``) it pushes
two single-layer images to a local docker-registry (the corpus's gzip blobs, as a registry
ships them today), publishes the old→new deltas, and then, for each link speed, measures the
update of a store holding ``old`` to ``new``:

* **plain**: ``podman pull new``;
* **delta**: ``podman-delta pull new`` (ends with the real podman pull);
* **zstd:chunked** (unless ``--no-chunked``): the images recompressed with
  ``skopeo copy --dest-compress-format zstd:chunked`` and pulled by podman with
  ``enable_partial_images`` on overlay (podman's own partial pull).

Every pull goes through a small asyncio TCP proxy on 127.0.0.1 whose registry→client direction
is shaped by one token bucket (the "link"); bytes are summed from the registry's access log
(every GET, manifests included), time is the client command's wall time. The ``old`` image is
pulled beforehand straight from the registry (unshaped), and every measurement starts with an
empty blob-info-cache (a fresh tmpfs in this process's private mount namespace), so nothing is
remembered between columns. Run as root; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from run import write_section  # noqa: E402

from tests.support.registry import Registry  # noqa: E402

DEFAULT_CORPUS = Path("/var/cache/podman-delta/corpus")
PAIRS = {
    "A": "A-os-security-update",
    "B": "B-os-major-update",
    "C": "C-python-app-update",
    "E": "E-tiny-config-change",
}
CACHE = Path("/var/lib/containers/cache")
MARK_START = "<!-- bench_pull:start -->"
MARK_END = "<!-- bench_pull:end -->"
INNER = "PODMAN_DELTA_BENCH_INNER"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# ----------------------------------------------------------------------------- the link


class Link:
    """A TCP proxy 127.0.0.1:port → upstream; downstream bytes pass one shared token bucket."""

    def __init__(self, upstream: str, mbit: float | None) -> None:
        self.up_host, up_port = upstream.rsplit(":", 1)
        self.up_port = int(up_port)
        self.rate = mbit * 1e6 / 8 if mbit else None
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Link:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _take(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self.tokens = min(self.rate * 0.05, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, shaped: bool) -> None:
        try:
            while True:
                data = await r.read(16384)
                if not data:
                    break
                if shaped:
                    await self._take(len(data))
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(self.up_host, self.up_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pipe(cr, uw, False), self._pipe(ur, cw, True))


# ----------------------------------------------------------------------------- images


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def upload(host: str, repo: str, path: Path | None, data: bytes | None = None) -> str:
    base = f"http://{host}/v2/{repo}"
    digest = sha256_file(path) if path else "sha256:" + hashlib.sha256(data or b"").hexdigest()
    if requests.head(f"{base}/blobs/{digest}", timeout=30).status_code == 200:
        return digest
    r = requests.post(f"{base}/blobs/uploads/", timeout=30)
    r.raise_for_status()
    loc = r.headers["Location"]
    loc = f"http://{host}{loc}" if loc.startswith("/") else loc
    sep = "&" if "?" in loc else "?"
    with open(path, "rb") if path else contextlib.nullcontext(data) as body:
        r = requests.put(f"{loc}{sep}digest={digest}", data=body, timeout=600)
    r.raise_for_status()
    return digest


def push_layer_image(host: str, repo: str, tag: str, tar: Path, tar_gz: Path) -> dict:
    """A one-layer OCI image whose layer is the corpus's gzip blob (pushed as is)."""
    if not tar_gz.exists():
        with open(tar, "rb") as src, gzip.open(tar_gz, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    diff_id = sha256_file(tar)
    layer = upload(host, repo, tar_gz)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"bench": tag}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    cdigest = upload(host, repo, None, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer,
                    "size": tar_gz.stat().st_size,
                }
            ],
        }
    ).encode()
    r = requests.put(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=60,
    )
    r.raise_for_status()
    return {"layer": layer, "diff_id": diff_id, "size": tar_gz.stat().st_size}


# ----------------------------------------------------------------------------- stores


def fresh_cache() -> None:
    """An empty blob-info-cache: nothing learnt by earlier steps helps the next one."""
    subprocess.run(["umount", "-l", str(CACHE)], check=False, capture_output=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(CACHE)], check=True)


class Store:
    def __init__(self, base: Path, driver: str, partial: bool = False) -> None:
        self.root = base / "root"
        self.run = Path(tempfile.mkdtemp(prefix="pdb-", dir="/tmp"))
        self.driver = driver
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = base / "storage.conf"
        text = (
            f'[storage]\ndriver = "{driver}"\ngraphroot = "{self.root}"\nrunroot = "{self.run}"\n'
        )
        if partial:
            text += (
                '[storage.options]\npull_options = {enable_partial_images = "true", '
                'use_hard_links = "false", ostree_repos = ""}\n'
            )
        self.conf.write_text(text)

    def env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_STORAGE_CONF=str(self.conf), PODMAN_DELTA_DISABLE="1")

    def args(self) -> list[str]:
        return [
            "--root",
            str(self.root),
            "--runroot",
            str(self.run),
            "--storage-driver",
            self.driver,
        ]

    def podman(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", *self.args(), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env())
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
        return proc

    def destroy(self) -> None:
        subprocess.run(
            ["podman", *self.args(), "rmi", "-a", "-f"], capture_output=True, env=self.env()
        )
        shutil.rmtree(self.root.parent, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)


def get_bytes(reg: Registry) -> int:
    return sum(a.size for a in reg.accesses() if a.method == "GET" and a.status in (200, 206))


def timed(
    cmd: list[str], env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run ``cmd``; (wall s, user+sys CPU s of it and all its descendants, the process)."""
    before = os.times()
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    took = time.monotonic() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
    return took, cpu, proc


#: ``podman-delta --log-level info`` lines that time the steps of a delta pull.
STEP_PATTERNS = {
    "plan": re.compile(r"timing: planned in ([0-9.]+) s"),
    "rebuild": re.compile(r"timing: \d+ layer\(s\) downloaded and rebuilt in ([0-9.]+) s"),
    "staging": re.compile(r"timing: staging pull ([0-9.]+) s"),
    "final": re.compile(r"cache rows, final pull and tag ([0-9.]+) s"),
    "import": re.compile(r"timing: imported in ([0-9.]+) s"),
}


def steps_of(stderr: str) -> dict[str, float]:
    out = {}
    for key, pattern in STEP_PATTERNS.items():
        m = pattern.search(stderr)
        if m:
            out[key] = float(m.group(1))
    return out


def measure(
    kind: str,
    reg: Registry,
    link: Link,
    repo: str,
    work: Path,
    driver: str,
    keep: list[Store] | None,
) -> dict:
    """Update a store holding ``repo:old`` to ``repo:new`` through ``link``.

    The store is appended to ``keep`` when given (destroyed later), else destroyed at once.
    """
    base = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    store = Store(base, "overlay" if kind == "chunked" else driver, kind == "chunked")
    try:
        fresh_cache()
        store.podman("pull", "-q", "--tls-verify=false", f"{reg.host}/{repo}:old")
        # Start from a quiet disk, as a store whose image was pulled long ago: otherwise the
        # old image's just-written files are written back while the timed pull creates its
        # own, which slows whichever tool creates files soonest (the delta pull).
        os.sync()
        fresh_cache()
        reg.clear_log()
        ref = f"{link.host}/{repo}:new"
        if kind == "delta":
            cmd = [
                sys.executable, "-m", "podman_delta", "--log-level", "info", "pull", "--json",
                "--tls-verify=false",
                *[f"--{k}={v}" for k, v in zip(("root", "runroot", "storage-driver"),
                                                 store.args()[1::2], strict=True)],
                ref,
            ]  # fmt: skip
        else:
            cmd = ["podman", *store.args(), "pull", "-q", "--tls-verify=false", ref]
        took, cpu, proc = timed(cmd, store.env())
        row = {
            "kind": kind,
            "seconds": round(took, 2),
            "cpu_s": round(cpu, 2),
            "bytes": get_bytes(reg),
        }
        if kind == "delta":
            row["result"] = json.loads(proc.stdout)
            row["steps"] = steps_of(proc.stderr)
        row["image_id"] = store.podman(
            "image", "inspect", "--format", "{{.Id}}", ref
        ).stdout.strip()
        return row
    finally:
        if keep is None:
            store.destroy()
        else:
            keep.append(store)


def chunked_copy(reg: Registry, repo: str, tag: str) -> None:
    fresh_cache()  # or skopeo silently reuses the gzip blob
    subprocess.run(
        [
            "skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
            "--dest-compress-format", "zstd:chunked",
            f"docker://{reg.host}/{repo}:{tag}", f"docker://{reg.host}/{repo}-chunked:{tag}",
        ],
        check=True, capture_output=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------- main


def run_pair(
    args: argparse.Namespace, key: str, reg: Registry, work: Path, stores: list[Store]
) -> list[dict]:
    """Measure one pair; with ``--cleanup end`` its stores are appended to ``stores``."""
    pair = args.corpus / PAIRS[key]
    repo = f"bench/{key.lower()}"
    print(f"[{key}] pushing old and new ({PAIRS[key]})", file=sys.stderr)
    push_layer_image(reg.host, repo, "old", pair / "old.tar", pair / "old.tar.gz")
    new = push_layer_image(reg.host, repo, "new", pair / "new.tar", pair / "new.tar.gz")
    print(f"[{key}] publishing the delta", file=sys.stderr)
    fresh_cache()
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "podman_delta", "publish", "--tls-verify=false", "-q",
         f"{reg.host}/{repo}:old", f"{reg.host}/{repo}:new"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    publish_s = time.monotonic() - start
    chunked = not args.no_chunked
    if chunked:
        print(f"[{key}] recompressing to zstd:chunked", file=sys.stderr)
        try:
            chunked_copy(reg, repo, "old")
            chunked_copy(reg, repo, "new")
        except subprocess.CalledProcessError as exc:
            print(f"[{key}] zstd:chunked unavailable: {exc.stderr[-300:]}", file=sys.stderr)
            chunked = False
    rows = []
    kinds = ("plain", "delta", *(["chunked"] if chunked else []))
    # Interleave the tools and repeat: other work on the machine (and any mass deletion of
    # files, see main()) changes the kernel's cost of creating a layer's files over minutes.
    plan = [(mbit, rep, kind) for mbit in args.mbit for rep in range(args.repeat) for kind in kinds]
    keep = stores if args.cleanup == "end" else None
    for mbit in args.mbit:
        with Link(reg.host, mbit) as link:
            for _, rep, kind in [p for p in plan if p[0] == mbit]:
                print(f"[{key}] {mbit} Mbit/s: {kind} (run {rep + 1})", file=sys.stderr)
                r = repo + "-chunked" if kind == "chunked" else repo
                try:
                    row = measure(kind, reg, link, r, work, args.driver, keep)
                except RuntimeError as exc:
                    row = {"kind": kind, "error": str(exc)[-400:]}
                row.update(
                    pair=key,
                    mbit=mbit,
                    layer_bytes=new["size"],
                    publish_s=publish_s,
                    cleanup=args.cleanup,
                )
                rows.append(row)
                steps = row.get("steps") or {}
                print(
                    f"    {row.get('bytes')} bytes, {row.get('seconds')} s, "
                    f"CPU {row.get('cpu_s')} s {steps or ''}",
                    file=sys.stderr,
                )
    return rows


def _medians(rows: list[dict]) -> dict[tuple, dict]:
    """One row per (pair, link, tool): the median time over the repeated runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pair"], r["mbit"], r["kind"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out[key] = runs[0]
            continue
        times = sorted(r["seconds"] for r in ok)
        row = {**ok[0], "seconds": statistics.median(times), "all_seconds": times}
        cpus = [r["cpu_s"] for r in ok if "cpu_s" in r]
        row["cpu_s"] = statistics.median(cpus) if cpus else None
        steps: dict[str, list[float]] = {}
        for r in ok:
            for name, value in (r.get("steps") or {}).items():
                steps.setdefault(name, []).append(value)
        row["steps"] = {name: statistics.median(v) for name, v in steps.items()}
        out[key] = row
    return out


def table(rows: list[dict], driver: str) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"Generated {when} by `bench/bench_pull.py` ({os.cpu_count()} CPUs, {driver} store "
        "for plain and delta, overlay for zstd:chunked). Bytes: every GET the registry "
        "served for the update (manifests included); time: median wall time of the pull command "
        "over the repeated, interleaved runs (range in brackets).",
        "",
        "| pair | link | plain pull | podman-delta pull | bytes vs plain | speed-up | "
        "zstd:chunked partial pull |",
        "|---|---|---|---|---|---|---|",
    ]
    by = _medians(rows)
    for pair, mbit in sorted({(r["pair"], r["mbit"]) for r in rows}):
        p, d, c = (by.get((pair, mbit, k)) for k in ("plain", "delta", "chunked"))

        def cell(r: dict | None) -> str:
            if r is None:
                return "n/a"
            if "error" in r:
                return "failed"
            spread = ""
            if len(r["all_seconds"]) > 1:
                spread = f" ({min(r['all_seconds']):.1f}–{max(r['all_seconds']):.1f})"
            cpu = f", CPU {r['cpu_s']:.1f} s" if r.get("cpu_s") is not None else ""
            return f"{r['bytes'] / 1e6:,.2f} MB, {r['seconds']:.1f} s{spread}{cpu}"

        ratio = speed = ""
        if p and d and "bytes" in p and "bytes" in d:
            ratio = f"{100 * d['bytes'] / p['bytes']:.2f} %"
            speed = f"{p['seconds'] / d['seconds']:.1f}×"
        out.append(
            f"| {pair} | {mbit:g} Mbit/s | {cell(p)} | {cell(d)} | {ratio} | {speed} | {cell(c)} |"
        )
    notes = []
    for pair, mbit in sorted({(r["pair"], r["mbit"]) for r in rows}):
        d = by.get((pair, mbit, "delta"))
        if d and d.get("steps"):
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in d["steps"].items())
            notes.append(f"- {pair}, {mbit:g} Mbit/s: {parts}")
    if notes:
        out += [
            "",
            "podman-delta pull's steps (median of its `--log-level info` timings; the rest of "
            "the wall time is Python start-up and the staging image's removal):",
            "",
            *notes,
        ]
    cleanups = sorted({r.get("cleanup", "each") for r in rows})
    out += ["", f"Stores destroyed: {', '.join(cleanups)} (see `--cleanup`)."]
    return "\n".join(out)


SECTION = """\
## Whole pulls: `bench/bench_pull.py`

What a user waits for: updating a store that holds `old` to `new`, for a plain `podman pull`,
for `podman-delta pull` (discovery, download, patch, verify, import and the final real
`podman pull`), and for podman's own zstd:chunked partial pull (overlay with
`enable_partial_images`, images recompressed by `skopeo copy --dest-compress-format
zstd:chunked`). Each image is one layer: the corpus's `old.tar.gz` / `new.tar.gz` pushed as
is to a local docker-registry, with the deltas published by `podman-delta publish`. Pulls go
through an asyncio TCP proxy on 127.0.0.1 whose registry→client direction is one token bucket
(the link speed); bytes come from the registry's access log (every GET, manifests included);
every measurement starts from a fresh store holding `old` (pulled unshaped beforehand) and an
empty blob-info-cache (tmpfs in a private mount namespace).

```sh
sudo .venv/bin/python bench/bench_pull.py                 # pair A, 20 and 100 Mbit/s (~5 min)
sudo .venv/bin/python bench/bench_pull.py --pairs A,E,C --mbit 20 100 --driver vfs
```

Options: `--pairs` (A,B,C,E), `--mbit` (link speeds), `--driver overlay|vfs` (plain and
delta stores), `--repeat N` (runs of each tool per link, interleaved; the table shows the
median and the range), `--cleanup end|each` (when stores are destroyed, see below),
`--no-chunked`, `--out DIR` (`pull-results.json`), `--no-readme`,
`--render-only` (rebuild the table from `OUT/pull-results.json`). The table below is rewritten
between the `bench_pull` markers by each run.

Where a delta pull's time goes (pair A, overlay; the table's last lines give each run's medians
from podman-delta's `--log-level info` timings): Python start-up and imports 0.3 s; resolution,
config, discovery and the artifact 0.05-0.1 s; the 0.9 MB delta download plus patching and
sha256 0.5-1.2 s; then the import's staging `podman pull oci:DIR` (the rebuilt tar hard-linked
into an OCI layout), 1.7-3 s; cache rows, the final `podman pull repo@digest` and the tag
0.1-0.2 s, the staging image's removal overlapping the tag. The staging pull is podman's CPU,
not the disk: c/image copies the uncompressed blob into a temporary file under /var/tmp while
hashing it, c/storage hashes it again while building the tar-split and untarring through a
re-exec'd storage-untar (several sha256 passes over 120 MB; podman 4.3.1 is built with Go 1.19,
whose sha256 does not use SHA-NI). Giving podman a tmpfs TMPDIR for that copy, or a zstd -1
staged blob (fewer bytes to hash, two decompressions more), did not change its time in
interleaved strace timelines. Each measurement starts after `sync`, and stores are destroyed at
the end of the run (`--cleanup end`): destroying each store right after its measurement (the
old behaviour, `--cleanup each`) frees ~13,000 inodes, and on this VM's journal-less ext4 every
inode created in the next minutes first scans past the recently freed ones (ext4's
`recently_deleted()`, top of `perf`), which made the next pull's file creation drift between
1.8 and 7 s. Byte counts are exact.

"""


def update_readme(text: str) -> None:
    """Rewrite only our marked section; append it when the markers are missing."""
    write_section(HERE / "README.md", MARK_START, MARK_END, SECTION + text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--pairs", default="A", help="comma-separated pairs (A,B,C,E); default A")
    ap.add_argument("--mbit", type=float, nargs="+", default=[20.0, 100.0])
    ap.add_argument("--driver", default="overlay", choices=["overlay", "vfs"])
    ap.add_argument("--no-chunked", action="store_true", help="skip the zstd:chunked column")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each tool per link, interleaved (3)"
    )
    ap.add_argument(
        "--cleanup",
        choices=["end", "each"],
        default="end",
        help="destroy the stores after the pair (default) or after each measurement",
    )
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument(
        "--render-only", action="store_true", help="rebuild the table from OUT/pull-results.json"
    )
    args = ap.parse_args()
    if args.render_only:
        text = table(json.loads((args.out / "pull-results.json").read_text()), args.driver)
        print(text)
        if not args.no_readme:
            update_readme(text)
        return 0
    if os.geteuid() != 0:
        print("bench_pull: run as root", file=sys.stderr)
        return 1
    if not os.environ.get(INNER):  # a private mount namespace for the tmpfs caches
        CACHE.mkdir(parents=True, exist_ok=True)
        os.environ[INNER] = "1"
        os.execvp(
            "unshare",
            ["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
        )
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir="/var/tmp"))
    rows: list[dict] = []
    # With --cleanup end (the default) stores are destroyed after the whole run, not after
    # each measurement: deleting a store frees ~13,000 inodes, and on a journal-less ext4 (this
    # VM's root file system) every inode allocated within the next one to six minutes first
    # scans past the recently freed ones (ext4's recently_deleted(); perf shows it and
    # find_get_block_common as the top kernel symbols), which made the next pull's file
    # creation 2-5x slower, whichever tool it was. That was the "drift" seen before.
    stores: list[Store] = []
    try:
        with Registry(work / "registry") as reg:
            for key in args.pairs.split(","):
                rows += run_pair(args, key.strip().upper(), reg, work, stores)
    finally:
        for store in stores:
            store.destroy()
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "pull-results.json").write_text(json.dumps(rows, indent=2))
    text = table(rows, args.driver)
    print(text)
    if not args.no_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
