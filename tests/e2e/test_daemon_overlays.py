"""The live daemon against a real peer-to-peer overlay: n2n 1.3 (Debian's ``edge`` and
``supernode``).

The node's edge registers with a supernode in the inet namespace and pings a second edge
there across the n2n virtual LAN, with ``egressd run`` on the shipped default policy. The
policy alerts on VPNs (it does not drop them), so the test checks both sides of that: the
registration flow is alerted and named ``tunnel.n2n`` with its evidence, and the overlay
still carries the ping.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, events_to

from egressd_lab import peers
from egressd_lab.netns import NODE_V4

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

N2N = "203.0.113.96"  # the supernode (and, behind the same address, the far edge)
N2N_NET = ("203.0.113.225", "203.0.113.226")  # the edges' virtual LAN: documentation addresses
N2N_MASK = str(ipaddress.ip_network("203.0.113.224/28").netmask)  # edge -s wants a dotted mask


@pytest.fixture
def n2n_addr(dlab: DaemonLab) -> Iterator[None]:
    for tool in ("edge", "supernode"):
        if shutil.which(tool) is None:
            pytest.skip(f"not installed: {tool} (make lab-deps installs n2n)")
    dlab.lab.run_inet(["ip", "addr", "replace", f"{N2N}/32", "dev", "lo"], check=True)
    # The supernode answers from an unbound socket: its replies leave from its own address.
    route = [f"{NODE_V4}/32", "dev", f"{dlab.lab.prefix[:6]}i0", "src", N2N]
    dlab.lab.run_inet(["ip", "route", "replace", *route], check=True)
    try:
        yield
    finally:
        dlab.lab.run_inet(["ip", "route", "del", f"{NODE_V4}/32"])


def test_n2n_edge_is_alerted_as_n2n_and_its_overlay_still_works(
    dlab: DaemonLab, daemon: peers.Egressd, n2n_addr: None
) -> None:
    procs = [dlab.lab.spawn("inet", ["supernode", "-l", "7654"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not peers.listening(dlab.lab, "inet", 7654, udp=True):
            assert time.monotonic() < deadline, "supernode did not listen on 7654/udp"
            time.sleep(0.1)
        for ns, dev, addr, mac in (("inet", "n2ni", N2N_NET[1], "02:00:5e:00:53:02"),
                                   ("node", "n2nn", N2N_NET[0], "02:00:5e:00:53:01")):  # fmt: skip
            procs.append(dlab.lab.spawn(ns, ["edge", "-d", dev, "-a", addr, "-s", N2N_MASK, "-c", "labnet",
                                             "-k", "lab-secret", "-m", mac, "-l", f"{N2N}:7654"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        evs = events_to(daemon, N2N, 7654, timeout=10)
        assert evs, f"no event for the edge's registration; events: {daemon.events()}"
        alert = evs[0]
        assert (alert["event_type"], alert["verdict"], alert["rule"]) == ("alert", "alert", "alert-vpn-tunnels"), alert
        assert alert["detection"]["kind"] == "tunnel.n2n", alert
        assert "n2n v1 REGISTER" in alert["detection"]["evidence"], alert
        assert "community 'labnet'" in alert["detection"]["evidence"], alert
        time.sleep(2.0)  # the edges learn each other through the supernode
        p, _ = dlab.run(["ping", "-c", "3", "-W", "3", N2N_NET[1]], timeout=30)
        assert " 100% packet loss" not in p.stdout and "packet loss" in p.stdout, p.stdout + p.stderr
    finally:
        for proc in reversed(procs):
            dlab.lab.stop(proc)
