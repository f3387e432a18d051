"""``podman-delta prefetch``: fetch newer versions of local images as deltas, ahead of time.

For every tagged image in the store (or only those that ``podman auto-update`` would update, or
a list from a file) it asks the registry for the tag's current manifest digest (HEAD). When the
store does not hold that manifest, it delta-pulls the tag with the same code as ``pull``,
ending with the real ``podman pull``, so that a later ``podman pull`` or ``podman auto-update``
finds every layer local and downloads only manifest and config.

It is meant to run unattended (systemd timer): low CPU and I/O priority, an optional bandwidth
cap, one image's failure does not stop the others, a second run does nothing when the first
finished, and an interrupted run leaves at most complete downloads behind in its cache
directory, which the next run reuses.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podman_delta.errors import DeltaError, RegistryError, StorageError
from podman_delta.progress import NullProgress, human
from podman_delta.pull import PullOptions, PullPlan, PullResult, plan_pull, pull
from podman_delta.registry.image import ClientPool
from podman_delta.registry.reference import parse_reference
from podman_delta.storage.importer import STAGING_REPO
from podman_delta.storage.store import Store

log = logging.getLogger(__name__)

AUTOUPDATE_LABEL = "io.containers.autoupdate"
#: ioprio_set(2) syscall numbers (no libc wrapper exists).
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "ppc64le": 273, "s390x": 282}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def lower_priority() -> list[str]:
    """nice 10 and the idle I/O class for this process; return what was applied.

    Both are best effort: the systemd unit already sets ``Nice=`` and ``IOSchedulingClass=``,
    and an unprivileged process may not be allowed to change either.
    """
    done = []
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < 10:
            os.nice(10 - os.getpriority(os.PRIO_PROCESS, 0))
        done.append("nice")
    except OSError as exc:
        log.debug("cannot lower the CPU priority: %s", exc)
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            prio = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
            if libc.syscall(nr, _IOPRIO_WHO_PROCESS, 0, prio) == 0:
                done.append("ioprio-idle")
            else:
                log.debug("ioprio_set failed: %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            log.debug("ioprio_set unavailable: %s", exc)
    return done


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """podman-delta's cache: $CACHE_DIRECTORY (systemd), else $XDG_CACHE_HOME/podman-delta."""
    env = dict(os.environ) if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or "/root", ".cache")
    return Path(base) / "podman-delta"


# ----------------------------------------------------------------------------- which images


def _pullable(name: str) -> bool:
    """A name pointing at a registry: not a staging image, not a local build (localhost/x)."""
    if name.startswith(STAGING_REPO + ":") or "@" in name:
        return False
    first = name.split("/", 1)[0]
    return first != "localhost" and "/" in name


def store_images(store: Store) -> list[str]:
    """Every tagged image name in the store that a registry could have a newer version of."""
    store.refresh()
    names: list[str] = []
    for img in store.images():
        for name in img.names:
            if _pullable(name) and name not in names:
                names.append(name)
    return names


def autoupdate_images(podman: str, store: Store) -> list[str]:
    """Images of containers labelled io.containers.autoupdate=registry (as auto-update sees)."""
    cmd = [
        podman,
        *store.options.podman_args(),
        "ps",
        "-a",
        "--filter",
        f"label={AUTOUPDATE_LABEL}=registry",
        "--format",
        "json",
    ]
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise StorageError(f"cannot run `{podman} ps`: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise StorageError(f"`podman ps` failed: {detail[-1] if detail else proc.returncode}")
    try:
        containers = json.loads(proc.stdout or "[]")
    except ValueError as exc:
        raise StorageError(f"`podman ps --format json` printed no JSON: {exc}") from exc
    names: list[str] = []
    for c in containers or []:
        name = c.get("Image") or ""
        if name and name not in names:
            names.append(name)
    return names


def images_from_file(path: str | os.PathLike[str]) -> list[str]:
    """One image reference per line; blank lines and ``#`` comments are ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DeltaError(f"cannot read the image list {path}: {exc.strerror}") from exc
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line not in out:
            out.append(line)
    return out


# ----------------------------------------------------------------------------- checking


def local_digests(store: Store, name: str) -> set[str]:
    """Manifest digests the store holds for the image named ``name`` (empty if none)."""
    img = store.image(name)
    if img is None:
        return set()
    return set(img.raw.get("digests") or []) | ({img.digest} if img.digest else set())


def remote_digest(pool: ClientPool, name: str) -> str | None:
    """The tag's current manifest digest (HEAD), or None when it cannot be asked cheaply."""
    ref = parse_reference(name)
    if ref.is_short or ref.registry is None:
        return None
    client = pool.client(ref.registry, pool.conf.is_insecure(ref.registry))
    return client.head_manifest(ref.repository, ref.ref)


@dataclass
class PrefetchItem:
    """What prefetch did for one image."""

    reference: str
    status: str  # up-to-date | pulled | plain | planned | failed
    detail: str = ""
    fetched_bytes: int = 0
    plain_bytes: int = 0

    def line(self) -> str:
        if self.status == "failed":
            return f"{self.reference}: failed: {self.detail}"
        if self.detail.startswith(self.reference):
            return self.detail
        return f"{self.reference}: {self.detail or self.status}"

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "status": self.status,
            "detail": self.detail,
            "fetched_bytes": self.fetched_bytes,
            "plain_bytes": self.plain_bytes,
        }


@dataclass
class PrefetchReport:
    items: list[PrefetchItem] = field(default_factory=list)

    @property
    def failed(self) -> list[PrefetchItem]:
        return [i for i in self.items if i.status == "failed"]

    def summary(self) -> str:
        pulled = [i for i in self.items if i.status in ("pulled", "plain")]
        fetched = sum(i.fetched_bytes for i in self.items)
        plain = sum(i.plain_bytes for i in self.items)
        verb = "would fetch" if any(i.status == "planned" for i in self.items) else "fetched"
        return (
            f"prefetch: {len(self.items)} image(s) checked, {len(pulled)} updated, "
            f"{len(self.failed)} failed; {verb} {human(fetched)} instead of {human(plain)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [i.to_json() for i in self.items],
            "fetched_bytes": sum(i.fetched_bytes for i in self.items),
            "plain_bytes": sum(i.plain_bytes for i in self.items),
            "failed": len(self.failed),
        }


def prefetch(
    store: Store,
    names: Sequence[str],
    options: PullOptions,
    *,
    dry_run: bool = False,
    progress: NullProgress | None = None,
    notify: Callable[[str], None] | None = None,
) -> PrefetchReport:
    """Check every name and delta-pull the ones the registry has a newer manifest for."""
    notify = notify or (lambda _m: None)
    report = PrefetchReport()
    pool = ClientPool(options.client_options())
    try:
        for name in names:
            item = _one(store, name, options, pool, dry_run, progress, notify)
            report.items.append(item)
            notify(item.line())
    finally:
        pool.close()
    return report


def _one(
    store: Store,
    name: str,
    options: PullOptions,
    pool: ClientPool,
    dry_run: bool,
    progress: NullProgress | None,
    notify: Callable[[str], None],
) -> PrefetchItem:
    try:
        have = local_digests(store, name)
        try:
            remote = remote_digest(pool, name)
        except RegistryError as exc:
            log.info("%s: HEAD failed (%s); resolving in full", name, exc)
            remote = None
        if remote is not None and remote in have:
            return PrefetchItem(name, "up-to-date", "up to date")
        if dry_run:
            plan = plan_pull(name, store, pool, options)
            if plan.image_present:
                return PrefetchItem(name, "up-to-date", "up to date")
            return PrefetchItem(
                name,
                "planned",
                f"newer manifest {plan.manifest_digest[:19]}: would fetch "
                f"{human(plan.planned_bytes)} instead of {human(plan.plain_bytes)}",
                plan.planned_bytes,
                plan.plain_bytes,
            )
        out = pull(name, store, options, progress=progress, quiet=True, notify=notify)
        assert not isinstance(out, PullPlan)
        return _item(name, out)
    except DeltaError as exc:
        return PrefetchItem(name, "failed", str(exc).splitlines()[0] if str(exc) else repr(exc))


def _item(name: str, res: PullResult) -> PrefetchItem:
    if res.status == "up-to-date":
        return PrefetchItem(name, "up-to-date", "up to date")
    return PrefetchItem(name, res.status, res.summary(), res.fetched_bytes, res.plain_bytes)


def clean_workdir(path: Path) -> None:
    """Remove downloads kept for resuming, once every image is done."""
    shutil.rmtree(path, ignore_errors=True)
