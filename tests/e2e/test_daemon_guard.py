"""The daemon's link guard: installed on the way out, kept or removed with the rest of its
rules as the fail mode says, and following a default route that moves to a new interface.

What the guard does to frames is tested in test_kernel_guard.py (and, against the daemon with a
real miner's request, in test_adversarial_evasion.py); here: its life cycle.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import mac_of, policy_copy, send_frames, set_key
from egressd_lab.netns import INET_V4, INET_V6, NODE_V4, SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]


def _veth(dlab: DaemonLab) -> str:
    links = json.loads(dlab.lab.run_node(["ip", "-j", "link", "show", "type", "veth"], check=True).stdout)
    names = [x["ifname"] for x in links]
    assert len(names) == 1, names
    return str(names[0])


def test_the_daemon_guards_the_default_route_interface_and_fail_open_removes_it(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    up = _veth(dlab)
    assert daemon.status()["link_guard"] == {"ifaces": [up], "error": "", "dropped": 0}
    assert netfilter.guard_installed(netns=dlab.lab.node) == [up]
    shown = dlab.egressd("status", "--socket", str(daemon.socket)).stdout
    assert f"link guard on {up}: 0 frames from below the IP layer dropped" in shown, shown
    assert daemon.stop(signal.SIGTERM) == 0
    assert netfilter.guard_installed(netns=dlab.lab.node) == []
    assert "egressd" not in dlab.lab.run_node(["nft", "list", "tables"]).stdout


def test_the_daemon_reports_what_the_guard_dropped(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    up = _veth(dlab)
    rep = send_frames(dlab.lab, up, mac_of(dlab.lab, "inet"), NODE_V4, SERVICES["bulk"][0], "udp", 40000, 9, "x",
                      "count=3")  # fmt: skip
    assert rep["errors"] == ["No buffer space available"] * 3, rep
    deadline = time.monotonic() + 8  # read every 5 s
    while daemon.status()["link_guard"]["dropped"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.status()["link_guard"]["dropped"] == 3


def test_fail_closed_keeps_the_guard_with_the_rules_and_rules_remove_takes_it(
    dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd], tmp_path: Path
) -> None:
    d = start_daemon(policy_copy(tmp_path, lambda t: set_key(t, "fail", "closed")))
    up = _veth(dlab)
    assert d.stop(signal.SIGTERM) == 0
    assert netfilter.installed(netns=dlab.lab.node) and netfilter.guard_installed(netns=dlab.lab.node) == [up]
    p = dlab.egressd("rules", "remove")
    assert p.returncode == 0, p.stderr
    assert netfilter.guard_installed(netns=dlab.lab.node) == [] and not netfilter.installed(netns=dlab.lab.node)


def test_a_killed_daemon_leaves_the_guard_for_exec_stop_post(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    up = _veth(dlab)
    daemon.stop(signal.SIGKILL)
    assert netfilter.guard_installed(netns=dlab.lab.node) == [up]  # as the iptables rules: until rules remove
    assert dlab.egressd("rules", "remove").returncode == 0
    assert netfilter.guard_installed(netns=dlab.lab.node) == []


def test_no_guard_installs_none(dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd]) -> None:
    d = start_daemon(extra=["--no-guard"])
    assert d.status()["link_guard"] == {"ifaces": [], "error": "", "dropped": 0}
    assert netfilter.guard_installed(netns=dlab.lab.node) == []


def test_a_bad_guard_interface_name_is_refused_before_anything_is_installed(
    dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd]
) -> None:
    refused = r"exited \(2\): egressd run: --guard-iface: bad interface name 'bad/name'"
    with pytest.raises(peers.PeerError, match=refused):
        start_daemon(extra=["--guard-iface", "bad/name"])
    assert not netfilter.installed(netns=dlab.lab.node)


def _path_without_nft(tmp: Path) -> list[str]:
    """A wrapper that runs egressd with a PATH holding the iptables tools and not nft."""
    bin_dir = tmp / "bin-without-nft"
    bin_dir.mkdir()
    for tool in ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return ["env", f"PATH={bin_dir}"]


def test_without_nft_a_named_guard_stops_the_daemon_and_leaves_no_rules(dlab: DaemonLab, tmp_path: Path) -> None:
    wrapper = _path_without_nft(tmp_path)
    with pytest.raises(peers.PeerError, match=r"exited \(1\): egressd run: nft not found \(apt install nftables\)"):
        peers.start_egressd(dlab.lab, tmp_path, extra=["--guard-iface", _veth(dlab)], wrapper=wrapper)
    assert not netfilter.installed(netns=dlab.lab.node)


def test_without_nft_the_daemon_following_the_routes_warns_and_runs(dlab: DaemonLab, tmp_path: Path) -> None:
    d = peers.start_egressd(dlab.lab, tmp_path, wrapper=_path_without_nft(tmp_path))
    try:
        assert d.wait_stderr("egressd: warning: no link guard (nft not found")
        st = d.status()["link_guard"]
        assert st["ifaces"] == [] and st["error"].startswith("nft not found"), st
        assert netfilter.installed(netns=dlab.lab.node)
    finally:
        d.stop()
        netfilter.remove(netns=dlab.lab.node)


@pytest.fixture
def second_uplink(dlab: DaemonLab) -> Iterator[str]:
    """A second veth pair node <-> inet; the default routes moved to it by the test, put back after."""
    lb = dlab.lab
    dev_n, dev_i = f"{lb.prefix[:6]}u0", f"{lb.prefix[:6]}u1"
    subprocess.run(
        ["ip", "link", "add", dev_n, "netns", lb.node, "type", "veth", "peer", dev_i, "netns", lb.inet],
        check=True,
        capture_output=True,
    )
    for run, dev, v4, v6 in ((lb.run_node, dev_n, "192.0.2.1/30", "2001:db8:9::1/64"),
                             (lb.run_inet, dev_i, "192.0.2.2/30", "2001:db8:9::2/64")):  # fmt: skip
        run(["ip", "addr", "add", v4, "dev", dev], check=True)
        run(["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"], check=True)
        run(["ip", "link", "set", dev, "up"], check=True)
    try:
        yield dev_n
    finally:
        lb.run_node(["ip", "link", "del", dev_n])  # and every route through it
        lb.run_node(["ip", "route", "replace", "default", "via", INET_V4], check=True)
        lb.run_node(["ip", "-6", "route", "replace", "default", "via", INET_V6], check=True)


def test_the_guard_follows_a_default_route_to_a_new_interface(
    dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd], second_uplink: str
) -> None:
    d = start_daemon()
    first = d.status()["link_guard"]["ifaces"]
    assert second_uplink not in first
    dlab.lab.run_node(["ip", "route", "replace", "default", "via", "192.0.2.2", "dev", second_uplink], check=True)
    deadline = time.monotonic() + 10  # the daemon looks every 5 s
    while second_uplink not in d.status()["link_guard"]["ifaces"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.status()["link_guard"]["ifaces"] == sorted([*first, second_uplink])
    assert netfilter.guard_installed(netns=dlab.lab.node) == sorted([*first, second_uplink])
    assert d.wait_stderr(f"egressd: link guard now on {', '.join(sorted([*first, second_uplink]))}")
