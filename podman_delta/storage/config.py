"""Where the containers-storage store is: storage.conf discovery and podman-style options.

podman-delta must look at the same store podman uses, so it follows c/storage's lookup order
(``$CONTAINERS_STORAGE_CONF``, the user file when rootless, ``/etc/containers/storage.conf``,
``/usr/share/containers/storage.conf``) and accepts podman's ``--root``, ``--runroot``,
``--storage-driver`` and ``--storage-opt`` options, which it passes on to every podman it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podman_delta.errors import StorageError

log = logging.getLogger(__name__)

SYSTEM_CONFS = (Path("/etc/containers/storage.conf"), Path("/usr/share/containers/storage.conf"))
#: Drivers whose on-disk layout podman-delta understands.
KNOWN_DRIVERS = ("overlay", "vfs")


def is_rootless(env: dict[str, str] | None = None) -> bool:
    """True for an unprivileged user, including inside ``podman unshare`` (uid 0 there)."""
    env = dict(os.environ) if env is None else env
    return os.geteuid() != 0 or bool(env.get("_CONTAINERS_ROOTLESS_UID"))


def find_storage_conf(
    env: dict[str, str] | None = None, rootless: bool | None = None
) -> Path | None:
    """The storage.conf c/storage would read, or None when there is none (Debian 12 ships none)."""
    env = dict(os.environ) if env is None else env
    rootless = is_rootless(env) if rootless is None else rootless
    if env.get("CONTAINERS_STORAGE_CONF"):
        return Path(env["CONTAINERS_STORAGE_CONF"])
    candidates: list[Path] = []
    if rootless:
        xdg = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
        candidates.append(Path(xdg) / "containers" / "storage.conf")
    candidates.extend(SYSTEM_CONFS)
    for path in candidates:
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class StoreOptions:
    """The store podman-delta works on, and the flags that make podman use the same one."""

    graph_root: Path
    run_root: Path
    driver: str
    driver_options: tuple[str, ...] = ()
    rootless: bool = False
    conf: Path | None = None
    #: Which of root/runroot/driver were given on the command line.
    explicit: tuple[str, ...] = field(default=())
    #: True when ``driver_options`` come from storage.conf: podman reads them there itself, and
    #: passing any ``--storage-opt`` would make it ignore all of the file's options.
    options_from_conf: bool = False

    @property
    def mount_program(self) -> str | None:
        for opt in self.driver_options:
            key, _, value = opt.partition("=")
            if key.split(".")[-1] == "mount_program" and value:
                return value
        return None

    def podman_args(self) -> list[str]:
        """Global podman options selecting this store (always explicit: no guessing twice)."""
        args = ["--root", str(self.graph_root), "--runroot", str(self.run_root)]
        args += ["--storage-driver", self.driver]
        if not self.options_from_conf:
            for opt in self.driver_options:
                args += ["--storage-opt", opt]
        return args

    def skopeo_ref(self, name: str) -> str:
        """The ``containers-storage:`` transport reference of ``name`` in this store."""
        return f"containers-storage:[{self.driver}@{self.graph_root}+{self.run_root}]{name}"


def _read_conf(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("storage", {}) or {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StorageError(f"cannot read {path}: {exc}; fix the file or set --root") from exc


def _conf_driver_options(storage: dict[str, Any], driver: str) -> list[str]:
    """Driver options from ``[storage.options]`` / ``[storage.options.<driver>]``."""
    options = storage.get("options", {}) or {}
    out: list[str] = []
    section = options.get(driver, {}) if isinstance(options, dict) else {}
    for key in ("mount_program", "mountopt", "ignore_chown_errors", "force_mask"):
        value = section.get(key) or (options.get(key) if key == "mount_program" else None)
        if value:
            out.append(f"{driver}.{key}={value}")
    return out


def _probe_driver(graph_root: Path, env: dict[str, str]) -> str:
    """The driver c/storage would pick for an existing store, else ``$STORAGE_DRIVER``/overlay."""
    if env.get("STORAGE_DRIVER"):
        return env["STORAGE_DRIVER"]
    for driver in KNOWN_DRIVERS:
        if (graph_root / f"{driver}-layers").is_dir():
            return driver
    return "overlay"


def load_options(
    *,
    root: str | os.PathLike[str] | None = None,
    runroot: str | os.PathLike[str] | None = None,
    driver: str | None = None,
    storage_opts: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> StoreOptions:
    """Resolve the store as podman would, command-line values overriding storage.conf."""
    env = dict(os.environ) if env is None else env
    rootless = is_rootless(env)
    conf = find_storage_conf(env, rootless)
    storage = _read_conf(conf)
    home = env.get("HOME", os.path.expanduser("~"))
    explicit = tuple(n for n, v in (("root", root), ("runroot", runroot), ("driver", driver)) if v)
    if rootless:
        data = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
        default_graph = storage.get("rootless_storage_path") or os.path.join(
            data, "containers", "storage"
        )
        xdg_run = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        default_run = os.path.join(xdg_run, "containers")
        graph = root or default_graph
        run = runroot or default_run
    else:
        graph = root or storage.get("graphroot") or "/var/lib/containers/storage"
        run = runroot or storage.get("runroot") or "/run/containers/storage"
    graph_root = Path(os.path.expanduser(str(graph)))
    chosen = driver or storage.get("driver") or _probe_driver(graph_root, env)
    if chosen not in KNOWN_DRIVERS:
        raise StorageError(
            f"storage driver {chosen!r} is not supported; use --storage-driver overlay or vfs"
        )
    opts = list(storage_opts) or _conf_driver_options(storage, chosen)
    return StoreOptions(
        graph_root=graph_root,
        run_root=Path(os.path.expanduser(str(run))),
        driver=chosen,
        driver_options=tuple(opts),
        rootless=rootless,
        conf=conf,
        explicit=explicit,
        options_from_conf=not storage_opts,
    )


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add podman's store options to a command's parser."""
    group = parser.add_argument_group("storage (as podman)")
    group.add_argument("--root", help="containers-storage graph root (podman --root)")
    group.add_argument("--runroot", help="containers-storage run root (podman --runroot)")
    group.add_argument("--storage-driver", help="storage driver: overlay or vfs")
    group.add_argument(
        "--storage-opt", action="append", default=[], help="storage driver option (repeatable)"
    )


def options_from_args(args: argparse.Namespace) -> StoreOptions:
    """StoreOptions from the arguments added by :func:`add_storage_arguments`."""
    return load_options(
        root=getattr(args, "root", None),
        runroot=getattr(args, "runroot", None),
        driver=getattr(args, "storage_driver", None),
        storage_opts=getattr(args, "storage_opt", None) or (),
    )
