#!/usr/bin/env python3
"""Delta benchmark: podman-delta against whole-tar delta tools, on the shared layer corpus.

Every measurement runs one child process and takes its wall time, CPU time (user + sys) and
peak RSS from ``os.wait4`` (the kernel's figure for the largest process of the child's tree),
plus a sampled peak of the whole tree's summed RSS, because a differ that uses worker processes
would otherwise look smaller than it is. Peers do not depend on our code, so their results are
cached in ``OUT/peers.json`` keyed by the pair's tar checksums; an ``--ours-only`` re-run merges
them and the table says which run every number came from. Optional Go peers (``--go-tar-diff``,
``--go-tar-patch``: binaries built by ``bench/go_compat.sh --build-only``) are cached the same way
in ``OUT/go.json``, keyed also by the binaries' sha256.

Usage: see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CORPUS = Path("/var/cache/podman-delta/corpus")
DEFAULT_OUT = HERE / "out"
README = HERE / "README.md"
MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"

PAIRS = {
    "A": "A-os-security-update",
    "B": "B-os-major-update",
    "C": "C-python-app-update",
    "E": "E-tiny-config-change",
}
#: Peer tools, in table order. "gzip" and "zstd" are the no-delta baselines.
PEERS = ("bsdiff", "zstd-patch", "xdelta3", "gzip", "zstd")
DELTA_PEERS = ("bsdiff", "zstd-patch", "xdelta3")
TOOL_LABELS = {
    "ours": "podman-delta diff",
    "bsdiff": "bsdiff4 (whole tar)",
    "zstd-patch": "zstd -19 --long=31 --patch-from",
    "xdelta3": "xdelta3 -9",
    "gzip": "new.tar.gz (gzip -6, no delta)",
    "zstd": "zstd -19 --long (no delta)",
    "ours-tardf1": "podman-delta diff --format tardf1, applied by podman-delta patch --digest",
    "ours-go-patch": "podman-delta diff --format tardf1, applied by Go tar-patch",
    "go-tar-diff": "Go tar-diff",
}
#: Optional Go rows, in table order, right after ours.
GO_TOOLS = ("ours-tardf1", "ours-go-patch", "go-tar-diff")
#: Go tar-diff v0.1.2 and the best whole-tar tool, as quoted in issue 2 (bytes), when the corpus
#: was first made: kept to show the drift of the Debian pairs against the measured Go row.
REFERENCE = {
    "A": ("48,569,938", "1,063,287", "799,026 (bsdiff, 2.1 GB RAM, 105 s)"),
    "B": ("49,496,373", "29,632,173", "23,897,594 (`zstd --patch-from`)"),
    "C": ("60,230,236", "5,042,484", "2,244,093 (bsdiff, 3.7 GB RAM, 224 s)"),
}
#: bsdiff4 needs about this many times the old tar in RAM (suffix array + both files).
BSDIFF_RAM_FACTOR = 18
MiB = 1 << 20
#: GNU time, for the peak RSS of the measured command alone.
TIME = shutil.which("time", path="/usr/bin:/bin")


# --------------------------------------------------------------------------- measuring


def _tree_rss(root: int) -> int:
    """Summed RSS in bytes of ``root`` and all its descendants (one /proc scan)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/statm", "rb") as f:
                statm = f.read().split()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        rss[pid] = int(statm[1]) * page
    total, todo, seen = 0, [root], set()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


class _Sampler(threading.Thread):
    """Sample the summed RSS of a process tree until stopped; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, _tree_rss(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure(
    cmd: list[str],
    *,
    stdout_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
) -> dict:
    """Run ``cmd`` once; return wall/CPU seconds, peak RSS and exit code."""
    log(" ".join(cmd) + (f" > {stdout_path}" if stdout_path else ""))
    stderr_buf = bytearray()
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
    # GNU time forks the command from a small process, so its %M is the command's own peak;
    # ru_maxrss from our wait4 would include this Python process's RSS copied at fork.
    timefile = Path(f"/tmp/bench-time.{os.getpid()}.{time.monotonic_ns()}")
    full = [TIME, "-f", "%e %U %S %M", "-o", str(timefile), *cmd] if TIME else cmd
    t0 = time.monotonic()
    proc = subprocess.Popen(
        full, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd, env=env
    )
    sampler = _Sampler(proc.pid)
    sampler.start()
    reader = threading.Thread(target=lambda: stderr_buf.extend(proc.stderr.read()), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    reader.join()
    if stdout_path:
        out.close()
    maxrss_kb = ru.ru_maxrss
    if TIME:
        with contextlib.suppress(OSError, ValueError, IndexError):
            last = timefile.read_text().strip().splitlines()[-1].split()
            maxrss_kb = int(last[3])
        with contextlib.suppress(OSError):
            timefile.unlink()
        if proc.returncode != 0:
            # GNU time prints "Command exited with non-zero status N" on stderr.
            stderr_buf[:] = re.sub(rb"Command exited with non-zero status \d+\n?", b"", stderr_buf)
    result = {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "user_s": round(ru.ru_utime, 3),
        "sys_s": round(ru.ru_stime, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "maxrss_mb": round(maxrss_kb / 1024, 1),
        "tree_rss_peak_mb": round(sampler.peak / MiB, 1),
    }
    if proc.returncode != 0:
        result["stderr"] = stderr_buf.decode(errors="replace")[-2000:]
        log(f"  exit {proc.returncode}: {result['stderr'].strip()[-400:]}")
    else:
        log(f"  {wall:.1f} s wall, {result['cpu_s']:.1f} s CPU, {result['maxrss_mb']:.0f} MB RSS")
    return result


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def warm(*paths: Path) -> None:
    """Read files once so every tool starts from a warm page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MiB):
                pass


# --------------------------------------------------------------------------- the pair


class Pair:
    """One corpus pair and its scratch directory."""

    def __init__(self, key: str, corpus: Path, out: Path) -> None:
        self.key, self.name = key, PAIRS[key]
        self.dir = corpus / self.name
        self.old, self.new = self.dir / "old.tar", self.dir / "new.tar"
        self.new_gz = self.dir / "new.tar.gz"
        self.work = out / "work" / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        sums = {}
        sumfile = self.dir / "SHA256SUMS"
        for line in sumfile.read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
        self.old_sha, self.new_sha = sums["old.tar"], sums["new.tar"]

    def facts(self) -> dict:
        return {
            "pair": self.name,
            "old_tar_bytes": self.old.stat().st_size,
            "new_tar_bytes": self.new.stat().st_size,
            "new_tar_gz_bytes": self.new_gz.stat().st_size,
            "old_sha256": self.old_sha,
            "new_sha256": self.new_sha,
        }

    def check_output(self, path: Path) -> bool:
        ok = path.exists() and sha256_file(path) == self.new_sha
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return ok


def _delta_row(pair: Pair, diff: dict, delta: Path, patch: dict | None, out: Path) -> dict:
    row = {"diff": diff}
    if diff["rc"] in (0, 6) and delta.exists():
        row["delta_bytes"] = delta.stat().st_size
    if patch is not None:
        row["patch"] = patch
        row["sha256_ok"] = patch["rc"] == 0 and pair.check_output(out)
    return row


# --------------------------------------------------------------------------- peers


def run_bsdiff(pair: Pair, args: argparse.Namespace) -> dict:
    old_mb = pair.old.stat().st_size / MiB
    avail_mb = _mem_available() / MiB
    limit = args.bsdiff_max_mb
    if limit is None:
        limit = avail_mb / BSDIFF_RAM_FACTOR
    if old_mb > limit:
        return {"skipped": f"old.tar {old_mb:.0f} MB > limit {limit:.0f} MB (--bsdiff-max-mb)"}
    delta, out = pair.work / "bsdiff.patch", pair.work / "bsdiff.out.tar"
    py = sys.executable
    diff = measure(
        [
            py,
            "-c",
            "import sys,bsdiff4; bsdiff4.file_diff(*sys.argv[1:4])",
            str(pair.old),
            str(pair.new),
            str(delta),
        ]
    )
    patch = None
    if diff["rc"] == 0:
        patch = measure(
            [
                py,
                "-c",
                "import sys,bsdiff4; bsdiff4.file_patch(*sys.argv[1:4])",
                str(pair.old),
                str(out),
                str(delta),
            ]
        )
    return _delta_row(pair, diff, delta, patch, out)


def run_zstd_patch(pair: Pair, args: argparse.Namespace) -> dict:
    delta, out = pair.work / "zstd-patch.zst", pair.work / "zstd-patch.out.tar"
    diff = measure(
        [
            "zstd",
            "-q",
            "-f",
            "-19",
            "--long=31",
            f"--patch-from={pair.old}",
            str(pair.new),
            "-o",
            str(delta),
        ]
    )
    patch = None
    if diff["rc"] == 0:
        patch = measure(
            [
                "zstd",
                "-q",
                "-f",
                "-d",
                "--long=31",
                f"--patch-from={pair.old}",
                str(delta),
                "-o",
                str(out),
            ]
        )
    return _delta_row(pair, diff, delta, patch, out)


def run_xdelta3(pair: Pair, args: argparse.Namespace) -> dict:
    delta, out = pair.work / "xdelta3.vcdiff", pair.work / "xdelta3.out.tar"
    diff = measure(["xdelta3", "-f", "-9", "-e", "-s", str(pair.old), str(pair.new), str(delta)])
    patch = None
    if diff["rc"] == 0:
        patch = measure(["xdelta3", "-f", "-d", "-s", str(pair.old), str(delta), str(out)])
    return _delta_row(pair, diff, delta, patch, out)


def run_gzip(pair: Pair, args: argparse.Namespace) -> dict:
    """The layer as registries ship it today: the corpus's new.tar.gz (gzip -6 -n)."""
    out = pair.work / "gzip.out.tar"
    patch = measure(["gzip", "-d", "-c", str(pair.new_gz)], stdout_path=out)
    return {
        "delta_bytes": pair.new_gz.stat().st_size,
        "diff": None,
        "patch": patch,
        "sha256_ok": patch["rc"] == 0 and pair.check_output(out),
        "note": "size of the corpus's new.tar.gz; compress time not measured",
    }


def run_zstd(pair: Pair, args: argparse.Namespace) -> dict:
    delta, out = pair.work / "new.tar.zst", pair.work / "zstd.out.tar"
    diff = measure(["zstd", "-q", "-f", "-19", "--long", str(pair.new), "-o", str(delta)])
    patch = None
    if diff["rc"] == 0:
        patch = measure(["zstd", "-q", "-f", "-d", "--long", str(delta), "-o", str(out)])
    return _delta_row(pair, diff, delta, patch, out)


PEER_RUNNERS = {
    "bsdiff": run_bsdiff,
    "zstd-patch": run_zstd_patch,
    "xdelta3": run_xdelta3,
    "gzip": run_gzip,
    "zstd": run_zstd,
}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- ours


def ours_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def ours_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "podman_delta", *args]


def ours_commands() -> dict[str, str | None]:
    """The --help text of our diff and patch commands, None where a command is missing."""
    helps: dict[str, str | None] = {}
    for sub in ("diff", "patch"):
        r = subprocess.run(
            ours_cmd(sub, "--help"), capture_output=True, text=True, env=ours_env(), cwd=REPO
        )
        helps[sub] = r.stdout if r.returncode == 0 else None
    return helps


def old_root(pair: Pair) -> Path:
    """old.tar extracted once (as root: owners, modes, xattrs) for `podman-delta patch`."""
    root = pair.work / "old-root"
    stamp = pair.work / "old-root.sha256"
    if stamp.exists() and stamp.read_text().strip() == pair.old_sha and root.is_dir():
        return root
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    log(f"extract {pair.old} -> {root}")
    subprocess.run(
        [
            "tar",
            "-xpf",
            str(pair.old),
            "-C",
            str(root),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--no-same-permissions" if os.geteuid() else "--same-permissions",
        ],
        check=True,
    )
    stamp.write_text(pair.old_sha + "\n")
    return root


def run_ours(pair: Pair, helps: dict[str, str | None], args: argparse.Namespace) -> dict:
    """Diff, then patch against old.tar extracted (when `patch` exists), verify the output."""
    delta, out = pair.work / "ours.tardiff", pair.work / "ours.out.tar"
    with contextlib.suppress(FileNotFoundError):
        delta.unlink()
    diff = measure(
        ours_cmd(*args.ours_diff_args, "diff", str(pair.old), str(pair.new), str(delta)),
        env=ours_env(),
        cwd=REPO,
    )
    if diff["rc"] == 6 and not delta.exists() and "--no-size-check" in (helps["diff"] or ""):
        # The differ refuses a delta that does not beat the compressed layer and leaves no
        # file; run it again without that check so the table still shows the size.
        log("  exit 6 (delta not smaller than the layer): again with --no-size-check for its size")
        again = measure(
            ours_cmd(
                *args.ours_diff_args,
                "diff",
                "--no-size-check",
                str(pair.old),
                str(pair.new),
                str(delta),
            ),
            env=ours_env(),
            cwd=REPO,
        )
        diff["rerun_without_size_check"] = again
    if diff["rc"] == 6:
        diff["note"] = "exit 6: delta not smaller than the compressed layer"
    patch = None
    digest_flag = "--digest" in (helps["patch"] or "")
    if delta.exists() and diff["rc"] in (0, 6) and helps["patch"] is not None:
        patch = ours_patch(pair, delta, out, digest=digest_flag)
    row = _delta_row(pair, diff, delta, patch, out)
    if delta.exists() and "delta_bytes" not in row:
        row["delta_bytes"] = delta.stat().st_size
    row["patch_verified_with_digest"] = digest_flag
    if helps["patch"] is None:
        row["patch_na"] = "`podman-delta patch` not available yet"
    return row


# --------------------------------------------------------------------------- Go peers


def binary_info(path: Path) -> dict:
    """A Go binary's path, sha256 and ``-version`` line: its rows are cached by the sha256."""
    try:
        r = subprocess.run([str(path), "-version"], capture_output=True, text=True, timeout=20)
        version = (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        version = "?"
    return {"path": str(path), "sha256": sha256_file(path), "version": version}


def ours_patch(pair: Pair, delta: Path, out: Path, *, digest: bool) -> dict:
    """podman-delta patch [--digest] DELTA OLD_TREE OUT, on the extracted old.tar."""
    root = old_root(pair)
    warm(delta)
    extra = ["--digest", f"sha256:{pair.new_sha}"] if digest else []
    return measure(
        ours_cmd("patch", *extra, str(delta), str(root), str(out)), env=ours_env(), cwd=REPO
    )


def go_patch(pair: Pair, tar_patch: dict, delta: Path, out: Path) -> dict:
    """Go tar-patch DELTA OLD_TREE OUT, on the same extracted old.tar as `podman-delta patch`."""
    root = old_root(pair)
    warm(delta)
    return measure([tar_patch["path"], str(delta), str(root), str(out)])


def run_go_tar_diff(pair: Pair, tar_diff: dict, tar_patch: dict | None) -> dict:
    """Go tar-diff on the uncompressed tars (as ours), applied by Go tar-patch or by ours."""
    delta, out = pair.work / "go-tar-diff.tardiff", pair.work / "go-tar-diff.out.tar"
    with contextlib.suppress(FileNotFoundError):
        delta.unlink()
    diff = measure([tar_diff["path"], str(pair.old), str(pair.new), str(delta)])
    patch = None
    if diff["rc"] == 0 and delta.exists():
        if tar_patch:
            patch = go_patch(pair, tar_patch, delta, out)
        else:
            patch = ours_patch(pair, delta, out, digest=False)
    row = _delta_row(pair, diff, delta, patch, out)
    row["tar_diff"] = tar_diff
    row["patched_by"] = "Go tar-patch" if tar_patch else "podman-delta patch"
    if tar_patch:
        row["tar_patch"] = tar_patch
    return row


def run_ours_go_patch(pair: Pair, tar_patch: dict, args: argparse.Namespace) -> dict:
    """Our tardf1 delta applied by Go tar-patch: patch speed against Go's, in the same run.

    The delta of the ours row is reused when it is tardf1 already ('auto' writes tardf1 when no
    file gains from op 5); otherwise the pair is diffed again with --format tardf1.
    """
    delta, out = pair.work / "ours.tardiff", pair.work / "ours-go-patch.out.tar"
    diff: dict | None = None
    if not (delta.exists() and delta.read_bytes()[:6] == b"tardf1"):
        delta = pair.work / "ours-tardf1.tardiff"
        with contextlib.suppress(FileNotFoundError):
            delta.unlink()
        cmd = ["diff", "--format", "tardf1", "--no-size-check", str(pair.old), str(pair.new)]
        diff = measure(ours_cmd(*args.ours_diff_args, *cmd, str(delta)), env=ours_env(), cwd=REPO)
        if diff["rc"] != 0 or not delta.exists():
            return {"diff": diff, "tar_patch": tar_patch}
    patch = go_patch(pair, tar_patch, delta, out)
    row = {
        "diff": diff,
        "delta_bytes": delta.stat().st_size,
        "delta_sha256": sha256_file(delta),
        "patch": patch,
        "sha256_ok": patch["rc"] == 0 and pair.check_output(out),
        "tar_patch": tar_patch,
    }
    if diff is None:
        row["note"] = "same delta as the podman-delta diff row (auto wrote tardf1)"
    # The same delta through our patcher, right after Go's: the two appliers on equal input.
    ours_out = pair.work / "ours-tardf1.out.tar"
    ours = ours_patch(pair, delta, ours_out, digest=True)
    row["ours_row"] = {
        "diff": None,
        "delta_bytes": row["delta_bytes"],
        "delta_sha256": row["delta_sha256"],
        "patch": ours,
        "sha256_ok": ours["rc"] == 0 and pair.check_output(ours_out),
        "note": "the delta of the row below, applied by podman-delta patch --digest",
    }
    return row


def go_tools_for(args: argparse.Namespace) -> tuple[dict | None, dict | None]:
    """Identify the --go-tar-diff / --go-tar-patch binaries (None where not given)."""
    found = [
        None if p is None else binary_info(p.resolve())
        for p in (args.go_tar_diff, args.go_tar_patch)
    ]
    return found[0], found[1]


def go_tar_diff_key(cache_key: str, tar_diff: dict, tar_patch: dict | None) -> str:
    """The Go tar-diff row depends on the tars, the tar-diff binary and who applies it."""
    patcher = tar_patch["sha256"][:16] if tar_patch else "ours"
    return f"{cache_key}-{tar_diff['sha256'][:16]}-{patcher}"


# --------------------------------------------------------------------------- results


def machine_facts() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_versions() -> dict:
    def first(cmd: list[str], pattern: str = "") -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except OSError:
            return "missing"
        text = (r.stdout + r.stderr).strip()
        if pattern:
            m = re.search(pattern, text)
            return m.group(1) if m else text.splitlines()[0] if text else "?"
        return text.splitlines()[0] if text else "?"

    import bsdiff4

    vers = {
        "bsdiff4": bsdiff4.__version__,
        "zstd": first(["zstd", "--version"], r"v(\d+\.\d+\.\d+)"),
        "xdelta3": first(["xdelta3", "-V"], r"version ([^\s,]+)"),
        "gzip": first(["gzip", "--version"], r"gzip (\S+)"),
        "tar": first(["tar", "--version"], r"\) (\S+)"),
    }
    r = subprocess.run(
        [*ours_cmd("--version")], capture_output=True, text=True, env=ours_env(), cwd=REPO
    )
    vers["podman-delta"] = r.stdout.strip().removeprefix("podman-delta ") or "?"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "podman_delta"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        vers["podman-delta"] += f" (git {head}{' + uncommitted changes' if dirty else ''})"
    except OSError:
        pass
    return vers


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def _s(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def render_table(results: dict) -> str:
    """The Markdown that goes between the README markers."""
    runs = results["runs"]
    lines = []
    lines.append(f"Generated {results['generated']} by `bench/run.py`.")
    lines.append("")
    m = results["machine"]
    lines.append(
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}. Shared with other work, so times are indicative (±10-20%)."
    )
    lines.append("")
    v = results["versions"]
    lines.append("Tools: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + ".")
    lines.append("")
    lines.append("Runs (the `run` column says which run each row comes from):")
    lines.append("")
    for rid, info in sorted(runs.items()):
        lines.append(f"- `{rid}`: {info}")
    lines.append("")
    head = (
        "| pair | tool | delta bytes | % of new.tar.gz | × best whole-tar | diff wall s | "
        "diff CPU s | diff peak RSS MB | patch wall s | patch CPU s | patch peak RSS MB | "
        "sha256 | run |"
    )
    lines.append(head)
    lines.append("|" + "|".join(["---"] * 13) + "|")
    for key in PAIRS:
        p = results["pairs"].get(key)
        if not p:
            continue
        facts = p["facts"]
        gz = facts["new_tar_gz_bytes"]
        best = None
        for tool in DELTA_PEERS:
            r = p["tools"].get(tool, {})
            b = r.get("delta_bytes")
            if b and r.get("sha256_ok"):
                best = b if best is None else min(best, b)
        first = True
        for tool in ("ours", *GO_TOOLS, *PEERS):
            r = p["tools"].get(tool)
            if r is None:
                continue
            label = TOOL_LABELS[tool]
            if r.get("patched_by"):
                label += f", applied by {r['patched_by']}"
            pair_cell = (
                f"**{key}** old {facts['old_tar_bytes'] / MiB:,.0f} MiB → new "
                f"{facts['new_tar_bytes'] / MiB:,.0f} MiB"
                if first
                else key
            )
            first = False
            if "skipped" in r or "na" in r:
                why = r.get("skipped") or r.get("na")
                empty = " |" * 9
                lines.append(
                    f"| {pair_cell} | {label} | n/a: {why} |{empty} `{r.get('run', '')}` |"
                )
                continue
            size = r.get("delta_bytes")
            d, pa = r.get("diff") or {}, r.get("patch") or {}
            size_cell = f"{size:,}" if size else "failed"
            if tool == "ours" and d.get("rc") == 6:
                size_cell += " (exit 6)"
            pct = f"{100 * size / gz:.2f}%" if size else ""
            ratio = f"{size / best:.2f}" if size and best else ""
            ok = r.get("sha256_ok")
            sha = "" if ok is None else ("ok" if ok else "**MISMATCH**")
            if pa and pa.get("rc") not in (0, None):
                sha = f"patch exit {pa['rc']}"
            if r.get("patch_na"):
                sha = "patch n/a"
            lines.append(
                f"| {pair_cell} | {label} | {size_cell} | {pct} | {ratio} | "
                f"{_s(d.get('wall_s'))} | {_s(d.get('cpu_s'))} | "
                f"{_mb(_peak(d))} | {_s(pa.get('wall_s'))} | {_s(pa.get('cpu_s'))} | "
                f"{_mb(_peak(pa))} | {sha} | `{r.get('run', '')}` |"
            )
    lines.append("")
    lines.append(
        "Reference (not measured in this run): the bytes quoted in issue 2, measured when the "
        "corpus was first made (the Debian pairs drift with the archive, so compare them only "
        "loosely with the rows above; the Go tar-diff rows above, where present, are measured):"
    )
    lines.append("")
    lines.append("| pair | new.tar.gz | Go tar-diff v0.1.2 | best whole-tar tool then |")
    lines.append("|---|---|---|---|")
    for key, (gz, go, best) in REFERENCE.items():
        lines.append(f"| {key} {PAIRS[key]} | {gz} | {go} | {best} |")
    lines.append("")
    lines.append(
        "Go tar-patch reference (issue 2, same machine, warm cache): 0.34 s for A (120 MB), "
        "1.35 s for C (213 MB); Go tar-diff about 12 s CPU for A, 32 s for C. The Go rows above "
        "(`--go-tar-diff`, `--go-tar-patch`) measure binaries built by "
        "`bench/go_compat.sh --build-only`; Go tar-diff reads the same uncompressed tars as ours."
    )
    return "\n".join(lines)


def _peak(m: dict) -> float | None:
    """Peak RSS of a measurement: the larger of the kernel's maxrss and the sampled tree sum."""
    if not m:
        return None
    return max(m.get("maxrss_mb") or 0, m.get("tree_rss_peak_mb") or 0)


def write_section(readme: Path, start: str, end: str, content: str, heading: str = "") -> None:
    """Replace what lies between the ``start`` and ``end`` markers of ``readme`` with
    ``content``; append the marked block (after ``heading``) when the markers are missing.
    Every benchmark script owns one such section of bench/README.md."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{start}\n{content}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + heading + block + "\n"
    readme.write_text(text)


def write_readme(table: str, readme: Path) -> None:
    write_section(readme, MARK_START, MARK_END, table, heading="## Results\n\n")


def go_versions(pairs: dict) -> dict[str, str]:
    """Version and sha256 of every Go binary behind a row in the table."""
    seen: dict[str, set[str]] = {}
    for p in pairs.values():
        for r in p["tools"].values():
            for field, name in (("tar_diff", "Go tar-diff"), ("tar_patch", "Go tar-patch")):
                info = r.get(field)
                if info:
                    version = info["version"].split()[-1]
                    seen.setdefault(name, set()).add(f"{version} (sha256 {info['sha256'][:12]})")
    return {name: " / ".join(sorted(v)) for name, v in seen.items()}


def run_go_rows(
    pair: Pair,
    cache_key: str,
    go_cache: dict,
    binaries: tuple[dict | None, dict | None],
    args: argparse.Namespace,
    run_id: str,
    with_ours: bool,
) -> None:
    """Measure the Go rows of one pair into ``go_cache``.

    Go tar-diff does not depend on our code: --ours-only reuses its cached row while the tars
    and both binaries are unchanged. Our delta applied by Go tar-patch is measured whenever ours
    is, since the delta changes with our code.
    """
    tar_diff, tar_patch = binaries
    entry = go_cache.setdefault(pair.key, {})
    if entry.get("cache_key") != cache_key:
        entry.clear()
        entry["cache_key"] = cache_key
    tools = entry.setdefault("tools", {})
    if tar_diff:
        go_key = go_tar_diff_key(cache_key, tar_diff, tar_patch)
        cached = tools.get("go-tar-diff")
        if args.ours_only and cached and cached.get("go_key") == go_key:
            log(f"  Go tar-diff: cached row from run {cached.get('run')}")
        else:
            row = run_go_tar_diff(pair, tar_diff, tar_patch)
            row["go_key"], row["run"] = go_key, run_id
            tools["go-tar-diff"] = row
    if tar_patch and with_ours:
        row = run_ours_go_patch(pair, tar_patch, args)
        row["run"] = run_id
        ours_row = row.pop("ours_row", None)
        if ours_row is not None:
            ours_row["run"] = run_id
            tools["ours-tardf1"] = ours_row
        tools["ours-go-patch"] = row


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus dir")
    ap.add_argument("--pairs", default="A,B,C,E", help="comma list of A,B,C,E")
    ap.add_argument(
        "--skip-peer",
        action="append",
        default=[],
        choices=PEERS,
        metavar="NAME",
        help=f"do not run this peer (repeatable): {', '.join(PEERS)}",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir (bench/out)")
    ap.add_argument(
        "--ours-only",
        action="store_true",
        help="run only podman-delta; merge cached peer results from OUT/peers.json",
    )
    ap.add_argument("--peers-only", action="store_true", help="run only the peers (cache them)")
    ap.add_argument(
        "--bsdiff-max-mb",
        type=float,
        default=None,
        help=f"skip bsdiff where old.tar is larger (default: MemAvailable/{BSDIFF_RAM_FACTOR})",
    )
    ap.add_argument(
        "--ours-diff-args",
        default="",
        help="extra global args placed before `diff`, e.g. '--log-level info'",
    )
    ap.add_argument(
        "--render-only", action="store_true", help="measure nothing; rebuild the table from OUT"
    )
    ap.add_argument(
        "--go-tar-diff",
        type=Path,
        default=None,
        metavar="PATH",
        help="also measure this Go tar-diff binary (bench/go_compat.sh --build-only)",
    )
    ap.add_argument(
        "--go-tar-patch",
        type=Path,
        default=None,
        metavar="PATH",
        help="apply Go tar-diff's deltas and our tardf1 delta with this Go tar-patch binary",
    )
    ap.add_argument("--readme", type=Path, default=README, help="README to update")
    ap.add_argument("--no-readme", action="store_true", help="do not touch the README")
    args = ap.parse_args(argv)
    args.pairs = [p.strip().upper() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in args.pairs if p not in PAIRS]
    if bad:
        ap.error(f"unknown pair(s) {bad}; choose from {','.join(PAIRS)}")
    args.ours_diff_args = args.ours_diff_args.split()
    for path in (args.go_tar_diff, args.go_tar_patch):
        if path is not None and not (path.is_file() and os.access(path, os.X_OK)):
            ap.error(
                f"{path} is not an executable file (build it: bench/go_compat.sh --build-only)"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    run_id = now.strftime("%Y%m%dT%H%MZ")
    peers_cache = load_json(out / "peers.json")
    ours_cache = load_json(out / "ours.json")
    runs = load_json(out / "runs.json")
    go_cache = load_json(out / "go.json")

    run_ours_flag = not args.peers_only and not args.render_only
    run_peers = not args.ours_only and not args.render_only
    helps = ours_commands() if run_ours_flag else {"diff": None, "patch": None}
    ours_ok = helps["diff"] is not None
    why = "`podman-delta diff` not available yet"
    if run_ours_flag:
        log(
            f"podman-delta: diff {'yes' if ours_ok else 'missing'}, patch "
            f"{'yes' if helps['patch'] is not None else 'missing'}"
        )
    what = []
    if run_peers:
        what.append("peers " + ",".join(p for p in PEERS if p not in args.skip_peer))
    if run_ours_flag:
        what.append("podman-delta" if ours_ok else "podman-delta (n/a)")
    tar_diff, tar_patch = (None, None) if args.render_only else go_tools_for(args)
    if tar_diff:
        what.append(f"Go tar-diff {tar_diff['sha256'][:12]}")
    if tar_patch:
        what.append(f"Go tar-patch {tar_patch['sha256'][:12]}")
    runs[run_id] = f"{now:%Y-%m-%d %H:%M} UTC, pairs {','.join(args.pairs)}: {'; '.join(what)}"

    for key in [] if args.render_only else args.pairs:
        pair = Pair(key, args.corpus, out)
        warm(pair.old, pair.new)
        log(f"== {pair.name}")
        cache_key = f"{pair.old_sha[:16]}-{pair.new_sha[:16]}"
        if run_peers:
            entry = peers_cache.setdefault(key, {})
            if entry.get("cache_key") != cache_key:
                entry.clear()
                entry["cache_key"] = cache_key
            entry.setdefault("tools", {})
            for peer in PEERS:
                if peer in args.skip_peer:
                    continue
                row = PEER_RUNNERS[peer](pair, args)
                row["run"] = run_id
                entry["tools"][peer] = row
                save_json(out / "peers.json", peers_cache)
        if run_ours_flag:
            row = run_ours(pair, helps, args) if ours_ok else {"na": why}
            row["run"] = run_id
            ours_cache[key] = {"cache_key": cache_key, "row": row}
            save_json(out / "ours.json", ours_cache)
        with_ours = run_ours_flag and ours_ok
        if tar_diff or (tar_patch and with_ours):
            binaries = (tar_diff, tar_patch)
            run_go_rows(pair, cache_key, go_cache, binaries, args, run_id, with_ours)
            save_json(out / "go.json", go_cache)
        for f in pair.work.glob("*.out.tar"):  # patch outputs left by a failed check
            f.unlink()
    # Another run may have finished meanwhile: merge into what is on disk now.
    on_disk = load_json(out / "runs.json")
    if run_id in runs and not args.render_only:
        on_disk[run_id] = runs[run_id]
    runs = on_disk
    save_json(out / "runs.json", runs)

    # Merge every cached row whose pair still has the same tars.
    results = {
        "generated": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_facts(),
        "versions": tool_versions(),
        "corpus": str(args.corpus),
        "pairs": {},
    }
    used_runs = set()
    for key in PAIRS:
        pdir = args.corpus / PAIRS[key]
        if not (pdir / "SHA256SUMS").exists():
            continue
        pair = Pair(key, args.corpus, out)
        cache_key = f"{pair.old_sha[:16]}-{pair.new_sha[:16]}"
        tools = {}
        ours = ours_cache.get(key)
        if ours and ours.get("cache_key") == cache_key:
            tools["ours"] = ours["row"]
        peers = peers_cache.get(key)
        if peers and peers.get("cache_key") == cache_key:
            tools.update(peers["tools"])
        go = go_cache.get(key)
        if go and go.get("cache_key") == cache_key:
            tools.update(go["tools"])
        if tools:
            results["pairs"][key] = {"facts": pair.facts(), "tools": tools}
            used_runs.update(r.get("run") for r in tools.values())
    results["runs"] = {r: runs.get(r, "?") for r in used_runs if r}
    results["versions"].update(go_versions(results["pairs"]))
    save_json(out / "results.json", results)
    table = render_table(results)
    (out / "table.md").write_text(table + "\n")
    if not args.no_readme:
        write_readme(table, args.readme)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
