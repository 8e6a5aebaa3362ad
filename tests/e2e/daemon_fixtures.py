"""Helpers of the daemon end-to-end tests (the fixtures are in conftest_daemon.py).

Kept out of the fixture plugin so that test modules can import them without importing the
plugin before pytest does (pytest rewrites the asserts of a plugin only if it imports it first).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egressd_lab import peers
from egressd_lab.harness import WHY
from egressd_lab.netns import NODE_LOCAL_V4, SERVICES, Lab

# Every test module of the daemon suite sets ``pytestmark = NEEDS_KERNEL``.
NEEDS_KERNEL = [
    pytest.mark.netns,
    pytest.mark.skipif(WHY is not None, reason=WHY or ""),
    pytest.mark.timeout(60),
]

Event = dict[str, Any]


@dataclass
class DaemonLab:
    """The module's lab, its peers, and where per-test files go."""

    lab: Lab
    peers: peers.LabPeers
    tmp: Path

    def run(self, argv: list[str], timeout: float = 20.0) -> tuple[subprocess.CompletedProcess[str], float]:
        """Run ``argv`` in the node namespace; returns the result and its wall time in seconds."""
        t = time.monotonic()
        p = self.lab.run_node(argv, timeout=timeout)
        return p, time.monotonic() - t

    def stratum(self, target: str, variant: str, *extra: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """One miner handshake (``egressd_lab.stratum client``) from the node: (exit code, report)."""
        rc, rep = peers.stratum_client(self.lab, target, variant, *extra, timeout=timeout)
        assert not rep.get("no_report"), rep["error"]
        return rc, rep

    def curl_tls(self, name: str, addr: str, max_time: float = 5.0) -> tuple[subprocess.CompletedProcess[str], float]:
        """HTTPS GET of ``https://name/`` at ``addr`` (certificate not checked: it is the lab's)."""
        pin = f"{name}:443:[{addr}]" if ":" in addr else f"{name}:443:{addr}"
        argv = ["curl", "-sS", "-k", "--noproxy", "*", "--max-time", str(max_time), "--resolve", pin]
        return self.run([*argv, "-o", "/dev/null", "-w", "%{http_code}", f"https://{name}/"], timeout=max_time + 10)

    def dig(self, name: str, rtype: str = "A") -> tuple[subprocess.CompletedProcess[str], float]:
        """A lookup at the lab's resolver, one try of one second (a dropped query fails fast)."""
        return self.run(["dig", f"@{SERVICES['dns'][0]}", name, rtype, "+time=1", "+tries=1"], timeout=10)

    def egressd(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """The ``egressd`` command in the node namespace (``rules remove``, ``status``...)."""
        return self.lab.run_node([*peers.egressd_argv(), *args], timeout=timeout)

    def saves(self) -> str:
        """iptables-save and ip6tables-save of the node namespace, one after the other."""
        return "".join(self.lab.run_node([t], timeout=10).stdout for t in ("iptables-save", "ip6tables-save"))


def events_to(d: peers.Egressd, addr: str, port: int, timeout: float = 3.0, count: int = 1) -> list[Event]:
    """The daemon's events for flows to ``addr:port``, waiting (bounded) until ``count`` exist."""
    return d.wait_events(lambda e: e["dest_ip"] == addr and e["dest_port"] == port, timeout, count=count)


def one_event(d: peers.Egressd, addr: str, port: int, timeout: float = 3.0) -> Event:
    """The one event for the flow to ``addr:port`` (this test's daemon sees exactly one such flow)."""
    evs = events_to(d, addr, port, timeout)
    assert len(evs) == 1, f"{len(evs)} events to {peers.hostport(addr, port)}; all events: {d.events()}"
    return evs[0]


def local_hop_events(d: peers.Egressd) -> list[Event]:
    """Events naming the node's own service address: there must be none.

    A hop to ``NODE_LOCAL_V4`` (the lab's stand-in for 127.0.0.1) leaves on lo, which
    egressd's rules never judge, as they never judge loopback; an event for one would mean a
    test now judges a local hop it did not judge when that hop went to 127.0.0.1.
    """
    return [e for e in d.events() if NODE_LOCAL_V4 in (e["dest_ip"], e["src_ip"])]


def wait_pool_open(pool: peers.Pool, since: int, timeout: float = 3.0) -> list[Event]:
    """The pool's events after ``since`` once a connection was opened (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        evs = pool.events(since)
        if any(e["event"] == "open" for e in evs) or time.monotonic() > deadline:
            return evs
        time.sleep(0.05)


def wait_pool_close(pool: peers.Pool, since: int, timeout: float = 8.0) -> list[Event]:
    """``close`` events of the pool's connections opened after ``since``, once all closed (bounded).

    A connection egressd reset is reset on the node's side only; the pool closes it after
    its idle timeout (3 s in the lab) and only then logs what it received.
    """
    deadline = time.monotonic() + timeout
    while True:
        evs = pool.events(since)
        opened = {e["conn"] for e in evs if e["event"] == "open"}
        closes = [e for e in evs if e["event"] == "close" and e["conn"] in opened]
        if (opened and len(closes) == len(opened)) or time.monotonic() > deadline:
            return closes
        time.sleep(0.1)


def wait_until(pred: Callable[[], object], timeout: float) -> bool:
    """Poll ``pred`` every 0.1 s until it is true or ``timeout`` passed: whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def need_tools(*tools: str) -> None:
    """Skip the test, saying what is missing, unless every program is installed (a name on
    PATH, or a path that exists: localtunnel's client lives in build/lab-npm)."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        pytest.skip(f"not installed: {missing} (make lab-deps installs them)")


def add_inet_addresses(dlab: DaemonLab, *addrs: str) -> None:
    """Extra service addresses of one test module, on the inet namespace's loopback."""
    for a in addrs:
        dlab.lab.run_inet(["ip", "addr", "add", f"{a}/32", "dev", "lo"], check=True)
