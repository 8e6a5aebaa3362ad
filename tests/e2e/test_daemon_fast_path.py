"""The fast path, live: what never reaches Python, and what the kernel decides on its own.

Real kernel, the real daemon on the shipped policy (with the changes each test names), real
peers in the lab's inet namespace. "Never reaches the queue" is read from the kernel's own
counters: the NFQUEUE rules' hit counters (``netfilter.queue_hits``), which count every
packet sent to the queue whether or not a listener took it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import DNS_V4, POOL_V4, PREFIX, PY, adv_lab, live, need, write_policy
from egressd_lab.netns import SERVICES, Lab

pytestmark = live

TLS4 = SERVICES["tls"][0]
PORT = 9100  # the echo server below, on TLS4 and POOL_V4

# Accepts connections for ``life`` seconds; each gets up to 64 bytes read, 64 bytes back, close.
ECHO = r"""
import socket, sys, time
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128); s.settimeout(0.5)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except OSError:
        continue
    c.settimeout(2)
    try:
        if c.recv(64):
            c.sendall(b"r" * 64)
    except OSError:
        pass
    c.close()
"""

# ``count`` connections to host:port; each sends ``size`` bytes (0: none), reads the reply, closes.
# Prints "ok N" (connections that completed) or the first error.
CLIENT = r"""
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok = 0
for _ in range(count):
    try:
        c = socket.create_connection((host, port), timeout=3)
    except OSError as e:
        print("error", type(e).__name__); sys.exit(0)
    if size:
        c.sendall(b"q" * size)
        c.recv(64)
    c.close(); ok += 1
print("ok", ok)
"""


@pytest.fixture(scope="module")
def flab() -> Iterator[Lab]:
    with adv_lab(PREFIX + "f") as lb:
        for host in (TLS4, POOL_V4):
            lb.spawn("inet", [PY, "-c", ECHO, host, str(PORT), "240"])
        peers.wait_listening(lb, "inet", [(TLS4, PORT), (POOL_V4, PORT)])
        yield lb


@pytest.fixture
def daemon(flab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[peers.Egressd]:
    rules: list[dict[str, Any]] = getattr(request, "param", [])
    d = peers.start_egressd(flab, tmp_path, write_policy(tmp_path, prepend_rules=rules))
    try:
        yield d
    finally:
        d.stop()


def _client(lb: Lab, host: str, count: int, size: int) -> str:
    r = lb.run_node([PY, "-c", CLIENT, host, str(PORT), str(count), str(size)], timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _hits(lb: Lab) -> int:
    return netfilter.queue_hits(netns=lb.node)


def test_a_connection_without_data_costs_no_verdict(flab: Lab, daemon: peers.Egressd) -> None:
    h0, p0 = _hits(flab), daemon.status()["engine"]["packets"]
    assert _client(flab, TLS4, 20, 0) == "ok 20"
    time.sleep(0.3)
    assert (_hits(flab) - h0, daemon.status()["engine"]["packets"] - p0) == (0, 0)
    # Control: the same connections carrying 64 bytes each way do reach the daemon.
    assert _client(flab, TLS4, 3, 64) == "ok 3"
    time.sleep(0.3)
    assert _hits(flab) - h0 >= 3 and daemon.status()["engine"]["packets"] - p0 >= 3


TRUST = {
    "name": "trust-lab-service",
    "description": "a destination trusted by address and port",
    "match": {"dst": f"{TLS4}/32", "proto": "tcp", "dst_port": PORT},
    "action": "accept",
}


@pytest.mark.parametrize("daemon", [[TRUST]], indirect=True, ids=["trusted"])
def test_a_connection_trusted_by_address_never_reaches_the_queue(flab: Lab, daemon: peers.Egressd) -> None:
    st = daemon.status()["kernel_policy"]
    assert st["compiled"][:1] == ["trust-lab-service"] and not st["error"], st
    flab.run_node(["conntrack", "-D", "-p", "tcp", "--dport", str(PORT)])  # earlier tests' entries
    h0, p0 = _hits(flab), daemon.status()["engine"]["packets"]
    assert _client(flab, TLS4, 20, 64) == "ok 20"
    time.sleep(0.3)
    assert (_hits(flab) - h0, daemon.status()["engine"]["packets"] - p0) == (0, 0)
    entries = flab.run_node(["conntrack", "-L", "-p", "tcp", "--dport", str(PORT), "-d", TLS4]).stdout
    marks = {int(x.split()[0]) & netfilter.MARK_MASK for x in entries.split("mark=")[1:]}
    assert marks == {netfilter.MARK_ALLOW}, entries
    # Control: the same exchange with the pool's address is not trusted, and is judged.
    assert _client(flab, POOL_V4, 2, 64) == "ok 2"
    time.sleep(0.3)
    assert _hits(flab) - h0 >= 2


RESOLVER = {
    "name": "accept-lab-resolver",
    "description": "the site's resolver",
    "match": {"dst": f"{DNS_V4}/32"},
    "action": "accept",
}


@pytest.mark.parametrize("daemon", [[RESOLVER]], indirect=True, ids=["resolver-trusted"])
def test_a_pool_address_learned_over_dns_is_reset_at_its_syn_by_the_kernel(
    flab: Lab, daemon: peers.Egressd, tmp_path: Path
) -> None:
    need("dig", "dnsmasq")
    peers.start_dnsmasq(flab, tmp_path, peers.lab_dns_names(), [DNS_V4])
    # The lookup itself is the engine's (the resolver is trusted, DNS stays with the engine).
    r = flab.run_node(["dig", "+short", "+time=2", "+tries=1", f"@{DNS_V4}", "xmr.nanopool.org"], timeout=20)
    assert r.stdout.split() == [POOL_V4], r.stdout
    sets = flab.run_node(["ipset", "list"]).stdout
    entry = next((ln for ln in sets.splitlines() if ln.startswith(POOL_V4 + " ")), "")
    assert entry, sets  # in the kernel before the answer reached dig
    # The answer's TTL (dnsmasq says 0) plus the engine's grace: never longer than its own cache.
    assert 0 < int(entry.split("timeout ")[1].split()[0]) <= 60, entry
    h0, p0 = _hits(flab), daemon.status()["engine"]["packets"]
    t = time.monotonic()
    assert _client(flab, POOL_V4, 1, 64) == "error ConnectionRefusedError"
    took = time.monotonic() - t
    time.sleep(0.3)
    assert (_hits(flab) - h0, daemon.status()["engine"]["packets"] - p0) == (0, 0)  # the SYN never queued
    assert took < 2.0  # a reset, not a retransmitting SYN
    evs = [e for e in daemon.events() if e["dest_ip"] == POOL_V4 and e["dest_port"] == PORT]
    assert [(e["rule"], e["action"], e["domain"], e.get("kernel")) for e in evs] == [
        ("drop-mining-pool-names", "blocked", "xmr.nanopool.org", True)
    ], evs


def test_a_flows_end_is_learned_from_conntrack(flab: Lab, daemon: peers.Egressd) -> None:
    # The flow is pinned on its first data segment, so none of its FINs is queued: only
    # conntrack's destroy event can end it. The entry is deleted at once (conntrack -D), as
    # its expiry would (TIME_WAIT, then the kernel's lazy garbage collection, up to minutes).
    ct0 = daemon.status()["conntrack_events"]
    assert ct0["listening"], ct0
    e0 = daemon.status()["engine"]["ended"]
    assert _client(flab, POOL_V4, 1, 64) == "ok 1"
    time.sleep(0.2)
    st = daemon.status()
    assert st["engine"]["ended"] == e0 and st["flows_tracked"] == 1, st["engine"]  # closed, not yet ended
    flab.run_node(["conntrack", "-D", "-p", "tcp", "-d", POOL_V4, "--dport", str(PORT)], check=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and daemon.status()["engine"]["ended"] == e0:
        time.sleep(0.1)
    st = daemon.status()
    assert st["engine"]["ended"] == e0 + 1, (st["engine"], st["conntrack_events"], st["flows_tracked"])
    assert st["conntrack_events"]["destroyed"] > ct0["destroyed"]
    assert st["flows_tracked"] == 0, st  # forgotten now, not at the idle timeout (300 s)


def test_a_reload_swaps_the_compiled_policy_in_one_step(flab: Lab, tmp_path: Path) -> None:
    import signal

    pol = write_policy(tmp_path, prepend_rules=[TRUST])
    d = peers.start_egressd(flab, tmp_path, pol)
    try:
        st = d.status()["kernel_policy"]
        gen, sets0 = st["generation"], set(flab.run_node(["ipset", "list", "-n"]).stdout.split())
        assert gen > 0 and f"egd{gen}-0d4" in sets0, (st, sets0)
        moved = dict(TRUST, match={"dst": f"{POOL_V4}/32", "proto": "tcp", "dst_port": PORT})
        write_policy(tmp_path, prepend_rules=[moved])
        h0 = _hits(flab)
        d.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.status()["kernel_policy"]["generation"] == gen:
            time.sleep(0.1)
        st = d.status()["kernel_policy"]
        sets1 = set(flab.run_node(["ipset", "list", "-n"]).stdout.split())
        assert st["generation"] != gen and f"egd{st['generation']}-0d4" in sets1, (st, sets1)
        assert not {n for n in sets1 if n.startswith(f"egd{gen}-")}, sets1  # the old generation is gone
        # The trust moved: the pool's address is now decided in the kernel, the old one in Python.
        assert _client(flab, POOL_V4, 3, 64) == "ok 3"
        time.sleep(0.3)
        assert _hits(flab) == h0
        assert _client(flab, TLS4, 2, 64) == "ok 2"
        time.sleep(0.3)
        assert _hits(flab) > h0
    finally:
        d.stop()
