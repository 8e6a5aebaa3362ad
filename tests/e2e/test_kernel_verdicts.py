"""What the kernel does with a verdict: pinning, sticky denies, fast failure, what is never queued.

Real kernel, real NFQUEUE, real sockets, inside the lab's namespaces; the test-only
consumer in conftest applies a verdict function, nothing of the daemon is involved.
"""

from __future__ import annotations

import struct
import subprocess
import time

import pytest
from conftest import (
    ALLOW,
    DENY,
    SEEN,
    Seen,
    consumer,
    node_python,
    server_output,
    start_tcp_server,
    svc,
    wait_listening,
)

from egressd import netfilter
from egressd_lab.netns import NODE_V4, NODE_V6, Lab

Q = 7
MAX_PACKETS = 8
NF_INET_LOCAL_IN = 1
NF_INET_LOCAL_OUT = 3

# Client: connect, optionally upload, read everything; prints "<bytes read> <seconds>".
TRANSFER = r"""
import socket, sys, time
host, port, up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.monotonic()
c = socket.create_connection((host, port), timeout=10)
if up:
    c.sendall(b"y" * up)
c.shutdown(socket.SHUT_WR)
got = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
print(got, f"{time.monotonic() - t:.4f}")
"""

# Client: one connect(); prints "<OK|errno name|timeout> <seconds>".
CONNECT = r"""
import errno, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
t = time.monotonic()
try:
    s.connect((host, port))
    res = "OK"
except socket.timeout:
    res = "timeout"
except OSError as e:
    res = errno.errorcode.get(e.errno or 0, str(e))
print(res, f"{time.monotonic() - t:.4f}")
"""

# Client: connect, send one message, wait, send another, then read; prints each outcome.
TWO_SENDS = r"""
import errno, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port), timeout=5)
out = []
for msg in (b"SECRET-1", b"SECRET-2"):
    try:
        c.sendall(msg)
        out.append("sent")
    except OSError as e:
        out.append(errno.errorcode.get(e.errno or 0, "?"))
    time.sleep(0.3)
try:
    out.append("read:" + repr(c.recv(100)))
except socket.timeout:
    out.append("timeout")
except OSError as e:
    out.append(errno.errorcode.get(e.errno or 0, "?"))
print(c.getsockname()[1], " ".join(out))
"""

# Client: one connected UDP socket, one datagram, wait for the echo; prints the outcome.
UDP_ONCE = r"""
import errno, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((host, port))
t = time.monotonic()
s.send(b"hello")
try:
    res = "echo:" + s.recv(100).decode()
except socket.timeout:
    res = "timeout"
except OSError as e:
    res = errno.errorcode.get(e.errno or 0, str(e))
print(res, f"{time.monotonic() - t:.4f}")
"""


def _install(lb: Lab, fail_open: bool = True) -> None:
    netfilter.install(Q, fail_open=fail_open, max_packets=MAX_PACKETS, netns=lb.node)


def _tcp_flags(p: Seen) -> int:
    ihl = 40 if p.payload[0] >> 4 == 6 else (p.payload[0] & 0x0F) * 4
    return p.payload[ihl + 13]


def _deny_counter(lb: Lab, family: int = 4) -> int:
    """Packets the DENY chain has rejected or dropped so far (all three rules)."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    st = netfilter.parse_save(lb.run_node([tool, "-c", "-t", "filter"]).stdout)["filter"]
    return sum(
        int(cnt.strip("[]").split(":")[0])
        for (ch, _), cnt in zip(st.rules, st.counters, strict=True)
        if ch == netfilter.CHAIN_DENY
    )


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_pinned_allow_flow_stops_reaching_the_queue_after_the_head(klab: Lab, direction: str) -> None:
    _install(klab)
    host = svc("bulk")
    size = 1_000_000
    start_tcp_server(klab, "inet", host, 5001, send=size if direction == "download" else 0)
    # Allow (pin) on the third packet, whichever direction it travels.
    with consumer(klab.node, Q, lambda s: ALLOW if s.n >= 3 else SEEN, gso=True) as c:
        r = node_python(klab, TRANSFER, host, "5001", "0" if direction == "download" else str(size))
    got = int(r.stdout.split()[0])
    # The server ends with a line counting what it received.
    assert got == (size + len("0\n") if direction == "download" else len(f"{size}\n")), r.stderr
    # 3 judged packets + at most what was already queued before the pin took effect.
    assert 3 <= len(c.packets) <= MAX_PACKETS, [(p.hook, p.length) for p in c.packets]


# Client: connect, read exactly N bytes, close; prints the count.
READ_N = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
want, got = int(sys.argv[3]), 0
while got < want:
    b = c.recv(min(65536, want - got))
    if not b:
        break
    got += len(b)
c.close()
print(got)
"""


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_undecided_flow_is_queued_only_for_its_head_in_each_direction(klab: Lab, direction: str) -> None:
    _install(klab)
    host, size = svc("bulk"), 1_000_000
    start_tcp_server(klab, "inet", host, 5001, send=size if direction == "download" else 0)
    # 1 MB one way; the other way only dataless ACKs, which are never queued.
    with consumer(klab.node, Q, lambda s: SEEN, gso=True) as c:
        if direction == "upload":
            r = node_python(klab, TRANSFER, host, "5001", str(size))
            assert r.stdout and int(r.stdout.split()[0]) == len(f"{size}\n"), r.stderr
        else:
            r = node_python(klab, READ_N, host, "5001", str(size))
            assert r.stdout.strip() == str(size), r.stderr
    out = [p for p in c.packets if p.hook == NF_INET_LOCAL_OUT]
    back = [p for p in c.packets if p.hook == NF_INET_LOCAL_IN]
    # connbytes counts skbs (with the GSO flag one queued skb is one callback), queued or
    # not: the sender's first MAX_PACKETS include one dataless handshake packet (the ACK on
    # upload, the SYN-ACK on download) that takes a place in the head but is not queued.
    data, acks = (out, back) if direction == "upload" else (back, out)
    assert len(data) == MAX_PACKETS - 1
    assert len(acks) <= MAX_PACKETS
    assert all(netfilter.is_reply(p.mark) for p in back)
    assert not any(netfilter.is_reply(p.mark) for p in out)
    assert _tcp_flags(out[0]) & 0x02  # the SYN: judged whichever way the data flows


def test_deny_on_the_third_packet_sticks_and_kills_the_connection(klab: Lab) -> None:
    _install(klab)
    host = svc("ssh_evil")
    server = start_tcp_server(klab, "inet", host, 2222)
    # Count, on the far side, every segment that carries the secret.
    spy = ["-p", "tcp", "--dport", "2222", "-m", "string", "--string", "SECRET", "--algo", "bm"]
    klab.run_inet(["iptables", "-w", "-I", "INPUT", *spy, "-j", "ACCEPT"], check=True)
    denied: list[Seen] = []

    def verdict(s: Seen) -> str:
        outbound = [p for p in c.packets if p.hook == NF_INET_LOCAL_OUT]
        # SYN, first data: the handshake's dataless ACK between them is not queued.
        if s.hook == NF_INET_LOCAL_OUT and len(outbound) == 2:
            denied.append(s)
            return DENY
        return SEEN

    with consumer(klab.node, Q, verdict) as c:
        r = node_python(klab, TWO_SENDS, host, "2222")
        port_s, outcome = r.stdout.split(None, 1)
        # A retransmission of the denied segment (same tuple, same sequence number, valid
        # checksum), sent raw from the node: the pinned DENY must catch it in the kernel.
        before = _deny_counter(klab)
        queued_before = len(c.packets)
        node_python(klab, RAW_RESEND, denied[0].payload.hex(), host)
        time.sleep(0.3)
        after = _deny_counter(klab)
        queued_after = len(c.packets)
    got = server_output(klab, server)
    assert denied and b"SECRET-1" in denied[0].payload
    # The first send was accepted into the socket buffer, then the reset killed the connection.
    assert outcome.split()[0] == "sent", outcome
    assert "ECONNRESET" in outcome or "EPIPE" in outcome, outcome
    assert "SECRET" not in got, got
    assert after >= before + 1, (before, after)
    arrived = klab.run_inet(["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"], check=True).stdout
    assert [ln.split()[0] for ln in arrived.splitlines() if "SECRET" in ln] == ["0"], arrived
    assert queued_after == queued_before  # the kernel handled it alone
    assert int(port_s) > 0


RAW_RESEND = r"""
import socket, struct, sys
pkt = bytearray(bytes.fromhex(sys.argv[1])); dst = sys.argv[2]
ihl = (pkt[0] & 15) * 4
total = struct.unpack_from("!H", pkt, 2)[0]
pkt = pkt[:total]
seg = pkt[ihl:]
seg[16:18] = b"\0\0"
pseudo = bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, len(seg))
data = pseudo + bytes(seg) + (b"\0" if len(seg) % 2 else b"")
s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
while s >> 16:
    s = (s & 0xFFFF) + (s >> 16)
struct.pack_into("!H", seg, 16, ~s & 0xFFFF)
pkt[ihl:] = seg
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
r.sendto(bytes(pkt), (dst, 0))
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_syn_time_deny_fails_connect_fast(klab: Lab, v6: bool) -> None:
    _install(klab)
    host = svc("ssh_evil", v6)
    start_tcp_server(klab, "inet", host, 2222)
    with consumer(klab.node, Q, lambda s: DENY) as c:
        r = node_python(klab, CONNECT, host, "2222")
    res, secs = r.stdout.split()
    assert res == "ECONNREFUSED", r.stdout + r.stderr
    assert float(secs) < 1.0
    assert len(c.packets) == 1 and _tcp_flags(c.packets[0]) & 0x02  # only the SYN was asked about


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_deny_is_rejected_and_never_delivered(klab: Lab, v6: bool) -> None:
    from conftest import start_udp_echo

    _install(klab)
    host = svc("dns", v6)
    start_udp_echo(klab, "inet", host, 5353)
    r0 = node_python(klab, UDP_ONCE, host, "5353")
    assert r0.stdout.startswith("echo:hello"), r0.stdout  # control: the echo works without a consumer (bypass)
    with consumer(klab.node, Q, lambda s: DENY) as c:
        r = node_python(klab, UDP_ONCE, host, "5353")
    res, secs = r.stdout.split()
    # IPv4: icmp-port-unreachable -> ECONNREFUSED; IPv6: icmp6-adm-prohibited -> EACCES.
    assert res == ("EACCES" if v6 else "ECONNREFUSED"), r.stdout + r.stderr
    assert float(secs) < 1.0
    assert len(c.packets) == 1


def test_replies_to_an_inbound_connection_are_never_queued(klab: Lab) -> None:
    _install(klab)
    # A server on the node, a client in the "internet": 200 KB each way.
    start_tcp_server(klab, "node", NODE_V4, 8080, send=200_000)
    start_tcp_server(klab, "node", NODE_V6, 8081, send=200_000)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        for host, port in ((NODE_V4, "8080"), (NODE_V6, "8081")):
            r = klab.run_inet([_py(), "-c", TRANSFER, host, port, "200000"], timeout=30)
            assert int(r.stdout.split()[0]) == 200_000 + len("200000\n"), r.stderr
        inbound = len(c.packets)
        # Control: an outbound connection in the same run is queued.
        start_tcp_server(klab, "inet", svc("tls"), 8443)
        node_python(klab, TRANSFER, svc("tls"), "8443", "10")
    assert inbound == 0
    assert len(c.packets) > 0


def _track_connections_already(klab: Lab) -> None:
    """What any stateful host (Docker, kube-proxy, a firewall) has: conntrack running before us.

    Without a conntrack user in the namespace there is no entry for an older connection at
    all, and the first packet after install decides its direction (see netfilter.py).
    """
    for tool in ("iptables", "ip6tables"):
        klab.run_node([tool, "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"], check=True)


def test_connection_open_before_install_without_accounting_is_judged(klab: Lab) -> None:
    # Accounting off, as on a host where nothing turned it on: the entry has no counters,
    # so connbytes matches neither way round.
    klab.run_node(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0"], check=True)
    _track_connections_already(klab)
    entry = _pre_existing_connection_is_judged(klab, client_first=True)
    assert "packets=" not in entry, entry


def test_long_connection_open_before_install_with_accounting_on_is_judged(klab: Lab) -> None:
    # Accounting already on (a previous daemon set it): the entry is far beyond the head.
    _track_connections_already(klab)
    entry = _pre_existing_connection_is_judged(klab, client_first=True)
    assert "packets=2" in entry or "packets=3" in entry, entry  # 20+ packets: beyond max_packets


def test_connection_open_before_install_where_the_remote_talks_first_is_judged(klab: Lab) -> None:
    _track_connections_already(klab)
    _pre_existing_connection_is_judged(klab, client_first=False)


# Client: connect; either send 20 messages or read 20 ticks; say "ready", wait for "go",
# then send (or read) up to 30 more. Prints how it ended.
LONG_CLIENT = r"""
import errno, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
talk = sys.argv[3] == "client"
def step(i, tag):
    if talk:
        c.sendall(b"%s-%d;" % (tag, i)); time.sleep(0.01 if tag == b"before" else 0.05)
    else:
        n = 0
        while n < 1:
            b = c.recv(64)
            if not b:
                raise ConnectionResetError(errno.ECONNRESET, "eof")
            n += b.count(b";")
for i in range(20):
    step(i, b"before")
print("ready", c.getsockname()[1], flush=True)
sys.stdin.readline()
res = "all-done"
for i in range(30):
    try:
        step(i, b"after")
    except socket.timeout:
        res = "stalled@" + str(i)
        break
    except OSError as e:
        res = errno.errorcode.get(e.errno or 0, "?") + "@" + str(i)
        break
print(res, flush=True)
"""

# Server for the remote-talks-first case: a tick every 50 ms, for at most 100 ticks.
TICKER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(10)
c, _ = s.accept()
for i in range(100):
    try:
        c.sendall(b"tick-%d;" % i)
    except OSError:
        break
    print("sent", i, flush=True)
    time.sleep(0.05)
"""


def _pre_existing_connection_is_judged(klab: Lab, client_first: bool) -> str:
    """Open a connection, install the rules, deny everything: it must reach the queue and die.

    Returns the conntrack entry as it was just before the rules went in.
    """
    host = svc("tls")
    if client_first:
        server = start_tcp_server(klab, "inet", host, 8443, life=30)
    else:
        server = klab.spawn("inet", [_py(), "-c", TICKER, host, "8443"], stdout=subprocess.PIPE)
        wait_listening(klab, "inet", 8443)
    client = klab.spawn(
        "node",
        [_py(), "-c", LONG_CLIENT, host, "8443", "client" if client_first else "server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stdin is not None
    ready = client.stdout.readline().decode().split()
    assert ready[:1] == ["ready"], ready
    sport = int(ready[1])
    entry = klab.run_node(["conntrack", "-L", "-p", "tcp", "--sport", str(sport)]).stdout.strip()
    assert f"src={NODE_V4}" in entry.split("dport=")[0], entry  # tracked, in the right direction
    _install(klab)
    with consumer(klab.node, Q, lambda s: DENY) as c:
        client.stdin.write(b"go\n")
        client.stdin.flush()
        res = client.stdout.readline().decode().strip()
    got = server_output(klab, server)
    judged = [p for p in c.packets if sport in _ports(p)]
    assert judged, "the pre-existing connection never reached the queue"
    assert res.startswith(("ECONNRESET", "EPIPE", "stalled")), res
    if client_first:
        assert "before-19" in got and "after-" not in got, got
    else:
        # At most the tick in flight when the rules went in reached the client.
        assert int(res.split("@")[1]) <= 1, res
    return entry


def _ports(p: Seen) -> tuple[int, int]:
    off = (p.payload[0] & 15) * 4
    sport, dport = struct.unpack_from("!HH", p.payload, off)
    return sport, dport


def _py() -> str:
    from conftest import PY

    return PY
