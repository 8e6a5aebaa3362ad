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

# Accepts connections for ``life`` seconds; each gets up to 64 bytes read and an answer, then
# the connection ends. argv[4] "echo": 64 bytes back, close. "close": an HTTP answer, then
# wait for the client's close before closing (text both ways keeps the SSH detector waiting
# for a close: a line may precede a banner). "reset": an HTTP answer, then a reset right behind it.
ECHO = r"""
import socket, struct, sys, time
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end_by = sys.argv[4] if len(sys.argv) > 4 else "echo"
answer = b"r" * 64 if end_by == "echo" else b"HTTP/1.0 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n"
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
            c.sendall(answer)
            if end_by == "close":
                c.recv(1)
    except OSError:
        pass
    if end_by == "reset":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
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


HTTPISH_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall(b"GET /x HTTP/1.0\r\nHost: lab\r\n\r\n")
print(c.recv(64).split(b"\r\n")[0].decode(), c.getsockname()[1]); c.close()
"""


def test_the_close_of_a_connection_being_judged_is_logged_not_queued(flab: Lab, daemon: peers.Egressd) -> None:
    # A request and a reply are queued (data); the two FINs are not: they reach the engine
    # through NFLOG, and the engine concludes the flow at the close, seconds before conntrack
    # would end it (TIME_WAIT: 120 s). Before, each FIN cost a queue verdict.
    port = PORT + 1
    flab.spawn("inet", [PY, "-c", ECHO, TLS4, str(port), "30", "close"])
    peers.wait_listening(flab, "inet", [(TLS4, port)])
    h0, st0 = _hits(flab), daemon.status()
    r = flab.run_node([PY, "-c", HTTPISH_CLIENT, TLS4, str(port)], timeout=15)
    assert r.returncode == 0 and r.stdout.startswith("HTTP/1.0 200 OK"), (r.stdout, r.stderr)
    sport = int(r.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and daemon.status()["closes_logged"] < st0["closes_logged"] + 2:
        time.sleep(0.1)
    st = daemon.status()
    assert st["closes_logged"] - st0["closes_logged"] == 2, st
    assert _hits(flab) - h0 == 2  # the request and the reply, nothing else
    assert st["engine"]["packets"] - st0["engine"]["packets"] == 4  # the engine read all four
    evs = [e for e in daemon.events() if e["src_port"] == sport and e["dest_port"] == port]
    assert [(e["action"], e["reason"]) for e in evs] == [("allowed", "classified")], evs


def test_a_reset_right_behind_an_answer_does_not_overtake_it(flab: Lab, daemon: peers.Egressd) -> None:
    # The answer waits in the queue for its verdict; a reset that passed it (as a logged FIN
    # may) would make the client throw the answer away. Resets stay queued, behind it.
    port = PORT + 2
    flab.spawn("inet", [PY, "-c", ECHO, TLS4, str(port), "30", "reset"])
    peers.wait_listening(flab, "inet", [(TLS4, port)])
    for _ in range(10):
        r = flab.run_node([PY, "-c", HTTPISH_CLIENT, TLS4, str(port)], timeout=15)
        assert r.returncode == 0 and r.stdout.startswith("HTTP/1.0 200 OK"), (r.stdout, r.stderr)


# Two connections on one 4-tuple. The first sends 64 harmless bytes, reads the answer and the
# server's close, then closes: both FINs are in, so the engine pins it ALLOW; the server closed
# first, so it holds the TIME_WAIT and the client's port is free at once. The second, from the
# same port to the same server (Linux accepts a SYN on a TIME_WAIT socket), sends a Stratum
# subscribe. Prints the port and how each one ended.
REUSE_CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def conn(lport, payload):
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("", lport)); c.settimeout(2); c.connect((host, port))
    try:
        c.sendall(payload); got = "reply" if c.recv(64) else "eof"
        while c.recv(64):
            pass
    except OSError as e:
        got = type(e).__name__
    lport = c.getsockname()[1]; c.close()
    return lport, got
lport, first = conn(0, b"q" * 64)
time.sleep(0.3)  # the last ACK is through; the engine has both FINs
_, second = conn(lport, b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
print(lport, first, second)
"""


def test_a_reused_four_tuple_is_judged_again_not_answered_from_the_old_flow(flab: Lab, daemon: peers.Egressd) -> None:
    # The first connection is pinned ALLOW on its first segment. The second reuses its 4-tuple
    # at once: its first data segment must be judged as a new flow (Stratum: dropped), never
    # answered from the first flow's pinned verdict. Conntrack destroys the old entry when the
    # new SYN arrives; the daemon reads that event before the queued segment.
    for _attempt in range(3):  # the port may be taken by the time it is reused (another client)
        r = flab.run_node([PY, "-c", REUSE_CLIENT, POOL_V4, str(PORT)], timeout=20)
        if r.returncode == 0:
            break
        assert "Address already in use" in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    lport, first, second = r.stdout.split()
    assert first == "reply" and second != "reply", r.stdout
    deadline = time.monotonic() + 5
    evs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        evs = [e for e in daemon.events() if e["src_port"] == int(lport) and e["dest_port"] == PORT]
        if any(e["action"] == "blocked" for e in evs):
            break
        time.sleep(0.1)
    blocked = [e for e in evs if e["action"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["detection"]["kind"].startswith("mining."), evs


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
