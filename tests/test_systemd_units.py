"""contrib/systemd: the prefetch service and timer, for the system and for user sessions.

``systemd-analyze verify`` exits 0 even for unknown keys and unparsable values (it only logs
them), so every check here asserts that it printed nothing about our units, and a broken copy
shows that the check does catch mistakes. Without systemd as PID 1 nothing can be started; the
user unit's ExecStart is run by hand with the unit's environment instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "contrib" / "systemd"
NAME = "podman-delta-prefetch"
VARIANTS = {"system": SYSTEMD, "user": SYSTEMD / "user"}


def verify(paths: list[Path], user: bool, runtime_dir: Path) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify``; return its exit code and every line it printed."""
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    cmd = ["systemd-analyze", *(["--user"] if user else []), "verify", *map(str, paths)]
    # The user manager needs a runtime directory even to verify.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), "SYSTEMD_PAGER": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    return out.returncode, [line for line in (out.stdout + out.stderr).splitlines() if line]


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def unit_paths(variant: str) -> list[Path]:
    return [VARIANTS[variant] / f"{NAME}.service", VARIANTS[variant] / f"{NAME}.timer"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_units_verify_clean(variant: str, tmp_path: Path) -> None:
    rc, lines = verify(unit_paths(variant), variant == "user", tmp_path / "xdg")
    assert rc == 0, lines
    assert lines == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_verify_catches_mistakes(variant: str, tmp_path: Path) -> None:
    """A typo, a bad value and a missing ExecStart binary all show up: the check can fail."""
    work = tmp_path / "units"
    work.mkdir()
    for path in unit_paths(variant):
        shutil.copy(path, work / path.name)
    service = work / f"{NAME}.service"
    text = service.read_text()
    text = text.replace("Nice=19", "Nicee=19").replace(
        "IOSchedulingClass=idle", "IOSchedulingClass=idel"
    )
    text = text.replace("ExecStart=/usr/bin/env", f"ExecStart={tmp_path}/no-such-binary")
    service.write_text(text)
    rc, lines = verify([service, work / f"{NAME}.timer"], variant == "user", tmp_path / "xdg")
    out = "\n".join(lines)
    assert rc != 0
    assert "Unknown key 'Nicee'" in out
    assert "idel" in out
    assert "no-such-binary is not executable" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoupdate_dropin_with_absolute_path(variant: str, tmp_path: Path) -> None:
    """The drop-in documented in the README (absolute path, --autoupdate) verifies, and verify
    does resolve its ExecStart binary."""
    work = tmp_path / "units"
    dropin = work / f"{NAME}.service.d"
    dropin.mkdir(parents=True)
    for path in unit_paths(variant):
        shutil.copy(path, work / path.name)
    binary = tmp_path / "bin" / "podman-delta"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    conf = dropin / "autoupdate.conf"
    conf.write_text(f"[Service]\nExecStart=\nExecStart={binary} prefetch --autoupdate\n")
    paths = [work / f"{NAME}.service", work / f"{NAME}.timer"]
    rc, lines = verify(paths, variant == "user", tmp_path / "xdg")
    assert (rc, lines) == (0, [])
    binary.unlink()
    rc, lines = verify(paths, variant == "user", tmp_path / "xdg")
    assert rc != 0
    assert any(f"{binary} is not executable" in line for line in lines)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unit_settings(variant: str) -> None:
    service = parse_unit(VARIANTS[variant] / f"{NAME}.service")
    timer = parse_unit(VARIANTS[variant] / f"{NAME}.timer")
    svc = service["Service"]
    assert svc["Type"] == ["oneshot"]
    assert svc["ExecStart"] == ["/usr/bin/env podman-delta prefetch"]
    assert svc["Nice"] == ["19"]
    assert svc["IOSchedulingClass"] == ["idle"]
    assert "PODMAN_DELTA_DISABLE=1" in svc["Environment"]
    assert service["Unit"]["Before"] == ["podman-auto-update.service"]
    assert "Install" not in service  # started by the timer only
    tim = timer["Timer"]
    assert tim["Persistent"] == ["true"]
    assert tim["RandomizedDelaySec"] == ["45min"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    cal = subprocess.run(
        ["systemd-analyze", "calendar", *tim["OnCalendar"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cal.returncode == 0, cal.stderr
    assert "Normalized form: *-*-* 23:00:00" in cal.stdout
    if variant == "system":
        assert svc["ProtectSystem"] == ["full"]
        assert svc["NoNewPrivileges"] == ["yes"]
        # Layers carry setuid files and device nodes: these would break extraction.
        for key in ("RestrictSUIDSGID", "PrivateDevices", "RestrictNamespaces", "SystemCallFilter"):
            assert key not in svc
    else:  # rootless podman needs newuidmap (setuid) and its own user namespace
        assert "NoNewPrivileges" not in svc
        assert "ProtectSystem" not in svc


def test_system_service_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score: our unit is below 8.0, an unhardened one is not."""
    cmd = ["systemd-analyze", "security", "--offline=true", "--threshold=80", "--no-pager"]
    ours = subprocess.run([*cmd, str(SYSTEMD / f"{NAME}.service")], capture_output=True, text=True)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", ours.stdout)
    assert score is not None
    assert float(score.group(1)) < 8.0
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nType=oneshot\nExecStart=/usr/bin/env podman-delta prefetch\n")
    assert subprocess.run([*cmd, str(bare)], capture_output=True).returncode != 0


def test_user_execstart_finds_pip_user_install(tmp_path: Path) -> None:
    """The user unit's PATH finds podman-delta in ~/.local/bin (pip --user, pipx), and the
    command gets exactly ``prefetch`` with PODMAN_DELTA_DISABLE=1."""
    svc = parse_unit(VARIANTS["user"] / f"{NAME}.service")["Service"]
    home = tmp_path / "home"
    stub = home / ".local" / "bin" / "podman-delta"
    stub.parent.mkdir(parents=True)
    record = tmp_path / "record.json"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'disable': os.environ.get('PODMAN_DELTA_DISABLE')}},"
        f" open({str(record)!r}, 'w'))\n"
    )
    stub.chmod(0o755)
    env = {"HOME": str(home)}
    for assignment in svc["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%h", str(home))
    [execstart] = svc["ExecStart"]
    out = subprocess.run(execstart.split(), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(record.read_text()) == {"argv": ["prefetch"], "disable": "1"}
