"""systemd/egressd.service: valid for systemd, and hardened the way the daemon needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "egressd.service"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with egressd's path swapped for /bin/true, which exists on the test host."""
    p = tmp_path / "egressd.service"
    p.write_text(UNIT.read_text().replace("/usr/local/bin/egressd", "/bin/true"))
    return p


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    p = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_exposure_is_rated_ok_by_systemd(tmp_path: Path) -> None:
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in p.stderr and p.returncode != 0:
        pytest.skip("this systemd-analyze has no --offline")
    line = next(ln for ln in p.stdout.splitlines() if "Overall exposure level" in ln)
    level = float(line.split(":")[1].split()[0])
    assert level <= 3.0, line


def test_unit_is_notify_type_with_watchdog_and_reload() -> None:
    s = _settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"] and s["WatchdogSec"]


def test_unit_removes_the_rules_after_every_stop() -> None:
    assert _settings()["ExecStopPost"] == ["/usr/local/bin/egressd rules remove"]


def test_unit_runs_unprivileged_with_net_admin_and_the_two_read_only_attribution_capabilities() -> None:
    # Issue 8: naming the process behind a flow reads /proc/PID/exe (CAP_SYS_PTRACE) and lists
    # another user's /proc/PID/fd (CAP_DAC_READ_SEARCH); nothing else was added.
    s = _settings()
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH"]
    assert s["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH"]
    assert s["ProtectProc"] == ["ptraceable"]
    assert s["NoNewPrivileges"] == ["yes"] and s["DynamicUser"] == ["yes"]
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_sets_conntrack_accounting_with_full_privileges_despite_read_only_tunables() -> None:
    s = _settings()
    assert s["ProtectKernelTunables"] == ["yes"]
    pre = s["ExecStartPre"]
    assert any("nf_conntrack_acct=1" in c and c.startswith(("+-", "-+")) for c in pre), pre
