"""What still reaches the queue: the SYN, anything with data, FIN/RST; never a dataless ACK.

Real kernel, egressd's real rules, the test-only consumer (conftest) answering SEEN + repeat
as the daemon does. "Exactly zero payload" is decided by u32 rules (netfilter.nodata_u32);
these tests check the kernel agrees with that reading on crafted packets, and that real
connections cost the verdicts the engine needs and no more.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

import pytest
from conftest import ACCEPT, PY, SEEN, Consumer, Container, Seen, consumer, in_netns, svc, wait_listening

from egressd import netfilter
from egressd_lab.netns import NODE_V4, NODE_V6, Lab

Q = 17
MAX_PACKETS = 8
PORT = 9100
NF_INET_FORWARD = 2
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
SYN_RST_FIN = SYN | RST | FIN

# Server: accepts up to ``count`` connections, reads each to EOF, closes it. Sends no data.
CLOSER = r"""
import socket, sys, time
host, port, count, life = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(64); s.settimeout(life)
end = time.monotonic() + life
for _ in range(count):
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.settimeout(max(0.1, end - time.monotonic()))
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()
"""

# Client: one connection, shaped by argv[3]; prints its local port.
#   plain    connect, close: no data either way
#   onebyte  connect, wait (the handshake's ACK leaves alone), send one byte, close
#   defer    TCP_DEFER_ACCEPT on the client holds the handshake's ACK back, so the first
#            data segment is the third packet of the handshake; says "sent", waits for a line
#   ipopts   plain, every packet with IPv4 options (NOP NOP NOP EOL: IHL 6)
#   dstopts  plain, every packet behind an IPv6 destination options header
#   rst      connect, close with a reset (SO_LINGER 0)
CLIENT = r"""
import socket, struct, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
if mode == "defer":
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
elif mode == "ipopts":
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 0]))
elif mode == "dstopts":
    s.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0]))  # IPV6_DSTOPTS, PadN
s.settimeout(5)
s.connect((host, port))
print(s.getsockname()[1], flush=True)
if mode == "onebyte":
    time.sleep(0.1)
if mode in ("onebyte", "defer"):
    s.send(b"x")
if mode == "defer":
    print("sent", flush=True)
    sys.stdin.readline()  # the test counts what went on the wire so far
time.sleep(0.2)
if mode == "rst":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""

# A raw "server" in the inet namespace: answers each SYN to ``port`` with a SYN-ACK carrying
# ``data`` (hex, may be empty) and nothing else. The namespace's own resets are dropped by
# the test. Bounded by ``life`` seconds.
RAW_SYNACK = r"""
import socket, struct, sys, time
host, port, data, life = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
v6 = ":" in host
fam = socket.AF_INET6 if v6 else socket.AF_INET
rx = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP); rx.settimeout(0.1)
tx = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP); tx.bind((host, 0))
def csum(b):
    b += b"\0" * (len(b) & 1)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
print("ready", flush=True)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        pkt, addr = rx.recvfrom(65535)
    except socket.timeout:
        continue
    seg = pkt if v6 else pkt[(pkt[0] & 15) * 4:]
    sport, dport, seq = struct.unpack_from("!HHI", seg)
    if dport != port or seg[13] & 0x12 != 0x02:
        continue
    peer = addr[0]
    hdr = struct.pack("!HHIIBBHHH", port, sport, 0x1000, seq + 1, 5 << 4, 0x12, 65535, 0, 0) + data
    fa = socket.AF_INET6 if v6 else socket.AF_INET
    src, dst = socket.inet_pton(fa, host), socket.inet_pton(fa, peer)
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", len(hdr), 6)
    else:
        pseudo = src + dst + struct.pack("!xBH", 6, len(hdr))
    hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
    tx.sendto(hdr, (peer, 0))
    print("answered", sport, flush=True)
"""


@dataclass(frozen=True)
class Seg:
    """One queued TCP segment, as far as these tests care."""

    reply: bool
    flags: int
    data: int  # payload bytes
    l3: int  # IP header plus extension header bytes
    sport: int
    dport: int
    seq: int
    hook: int = field(compare=False)


def _seg(p: Seen) -> Seg:
    b = p.payload
    l3 = (b[0] & 15) * 4 if b[0] >> 4 == 4 else 40
    if b[0] >> 4 == 6 and b[6] != 6:
        l3 += (b[41] + 1) * 8  # one extension header at most, in these tests
    sport, dport, seq = struct.unpack_from("!HHI", b, l3)
    doff = (b[l3 + 12] >> 4) * 4
    return Seg(netfilter.is_reply(p.mark), b[l3 + 13], p.ip_len - l3 - doff, l3, sport, dport, seq, p.hook)


def _install(lb: Lab) -> None:
    netfilter.install(Q, fail_open=True, max_packets=MAX_PACKETS, netns=lb.node)


def _closer(lb: Lab, host: str, count: int = 1) -> None:
    lb.spawn("inet", [PY, "-c", CLOSER, host, str(PORT), str(count), "15"])
    wait_listening(lb, "inet", PORT)


def _settle(c: Consumer, at_least: int, timeout: float = 3.0) -> list[Seg]:
    """The distinct segments queued once ``at_least`` arrived and nothing more came for a moment.

    A retransmission (same direction, flags, sequence number and length) is the same
    question asked twice, not another kind of packet reaching the queue, so it is counted
    once. The peer's FIN is sometimes sent twice: a dataless ACK that passes can overtake
    it while it waits for its verdict (see netfilter.py, "Reordering").
    """
    deadline = time.monotonic() + timeout
    while len(c.packets) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # anything late (a stray ACK) would show up now
    return list(dict.fromkeys(_seg(p) for p in c.packets))


def _client(lb: Lab, host: str, mode: str) -> int:
    r = lb.run_node([PY, "-c", CLIENT, host, str(PORT), mode], timeout=20)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[0])


def _kinds(segs: list[Seg]) -> list[tuple[bool, int, int]]:
    """(reply, SYN/RST/FIN flags, payload bytes) per segment."""
    return [(s.reply, s.flags & SYN_RST_FIN, s.data) for s in segs]


# -- real connections ------------------------------------------------------------------------
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_dataless_connection_queues_only_the_syn_and_the_two_fins(klab: Lab, v6: bool) -> None:
    _install(klab)
    host = svc("tls", v6)
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        _client(klab, host, "plain")
        segs = _settle(c, 3)
    # Before the skip rules (measured): SYN, SYN-ACK, the handshake's ACK, FIN, sometimes the
    # server's ACK of it, FIN, the last ACK: 6-7 verdicts.
    assert _kinds(segs) == [(False, SYN, 0), (False, FIN, 0), (True, FIN, 0)], segs


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_forwarded_dataless_connection_queues_only_the_syn_and_the_two_fins(
    klab: Lab, container: Container, v6: bool
) -> None:
    _install(klab)
    host = svc("tls", v6)
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        r = container.run([PY, "-c", CLIENT, host, str(PORT), "plain"])
        assert r.returncode == 0, r.stderr
        segs = _settle(c, 3)
    assert _kinds(segs) == [(False, SYN, 0), (False, FIN, 0), (True, FIN, 0)], segs
    assert {s.hook for s in segs} == {NF_INET_FORWARD}


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_first_data_segment_of_one_byte_is_queued(klab: Lab, v6: bool) -> None:
    _install(klab)
    host = svc("tls", v6)
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        _client(klab, host, "onebyte")
        segs = _settle(c, 4)
    assert _kinds(segs) == [(False, SYN, 0), (False, 0, 1), (False, FIN, 0), (True, FIN, 0)], segs


def _pure_acks_sent(lb: Lab, family: int) -> int:
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    st = netfilter.parse_save(lb.run_node([tool, "-c", "-t", "mangle"]).stdout)["mangle"]
    return sum(
        int(cnt.strip("[]").split(":")[0])
        for (ch, rest), cnt in zip(st.rules, st.counters, strict=True)
        if ch == "POSTROUTING" and "--tcp-flags" in rest
    )


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_data_riding_on_the_handshakes_third_packet_is_queued(klab: Lab, v6: bool) -> None:
    _install(klab)
    host, family = svc("tls", v6), 6 if v6 else 4
    # Count the client's ACK-only packets on the wire (after our filter rules).
    tool = "ip6tables" if v6 else "iptables"
    count = ["-p", "tcp", "--dport", str(PORT), "--tcp-flags", "ALL", "ACK", "-j", "RETURN"]
    klab.run_node([tool, "-w", "-t", "mangle", "-A", "POSTROUTING", *count], check=True)
    _closer(klab, host)
    client = klab.spawn(
        "node",
        [PY, "-c", CLIENT, host, str(PORT), "defer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        client.stdout.readline()  # the port
        assert client.stdout.readline().strip() == b"sent"
        time.sleep(0.1)
        acks_before_close = _pure_acks_sent(klab, family)
        client.stdin.write(b"close\n")
        client.stdin.flush()
        segs = _settle(c, 4)
    assert _kinds(segs) == [(False, SYN, 0), (False, 0, 1), (False, FIN, 0), (True, FIN, 0)], segs
    syn, data = segs[0], segs[1]
    assert data.seq == (syn.seq + 1) & 0xFFFFFFFF and data.flags & ACK  # the handshake's ACK...
    assert acks_before_close == 0  # ...never left on its own


@pytest.mark.parametrize("data", [b"", b"hello"], ids=["dataless", "5-bytes"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_syn_ack_is_queued_only_when_it_carries_data(klab: Lab, v6: bool, data: bytes) -> None:
    _install(klab)
    host = svc("tls", v6)
    tool = "ip6tables" if v6 else "iptables"
    mute = ["-p", "tcp", "--sport", str(PORT), "--tcp-flags", "RST", "RST", "-j", "DROP"]
    klab.run_inet([tool, "-w", "-A", "OUTPUT", *mute], check=True)  # the raw server answers alone
    raw = klab.spawn("inet", [PY, "-c", RAW_SYNACK, host, str(PORT), data.hex(), "10"], stdout=subprocess.PIPE)
    assert raw.stdout is not None and raw.stdout.readline().strip() == b"ready"
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        _client(klab, host, "rst")
        segs = _settle(c, 3 if data else 2)
    expected = [(False, SYN, 0), *([(True, SYN, len(data))] if data else []), (False, RST, 0)]
    assert _kinds(segs) == expected, segs
    assert all(s.flags & ACK for s in segs if s.reply)


def _assert_handshake_ack_queued_with_options(segs: list[Seg], l3: int) -> None:
    """The handshake's dataless ACK (sent by the socket, with its options) is queued.

    The last ACK may come from the TIME_WAIT socket, which has no options: that one is a
    plain dataless ACK and passes. Every dataless ACK that was queued has the options.
    """
    acks = [s for s in segs if not s.reply and s.flags & SYN_RST_FIN == 0 and s.data == 0]
    syn = segs[0]
    assert syn.flags & SYN and not syn.reply, segs
    assert any(s.seq == (syn.seq + 1) & 0xFFFFFFFF and s.flags & ACK for s in acks), segs
    assert {s.l3 for s in acks} == {l3}, segs


def test_dataless_acks_with_ipv4_options_stay_queued(klab: Lab) -> None:
    _install(klab)
    host = svc("tls")
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        _client(klab, host, "ipopts")
        segs = _settle(c, 4)
    _assert_handshake_ack_queued_with_options(segs, 24)


def test_dataless_acks_behind_an_ipv6_extension_header_stay_queued(klab: Lab) -> None:
    _install(klab)
    host = svc("tls", v6=True)
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        _client(klab, host, "dstopts")
        segs = _settle(c, 4)
    _assert_handshake_ack_queued_with_options(segs, 48)


def test_skipped_acks_leave_an_unseen_connection_unseen(klab: Lab) -> None:
    # Plain accept() ("keep watching"): nothing is saved, every later packet with something
    # to read keeps coming; the dataless ones in between must not have changed that.
    _install(klab)
    host = svc("tls")
    _closer(klab, host)
    with consumer(klab.node, Q, lambda s: ACCEPT) as c:
        sport = _client(klab, host, "onebyte")
        segs = _settle(c, 4)
    entry = klab.run_node(["conntrack", "-L", "-p", "tcp", "--sport", str(sport)]).stdout
    assert _kinds(segs) == [(False, SYN, 0), (False, 0, 1), (False, FIN, 0), (True, FIN, 0)], segs
    assert "mark=0 " in entry, entry


# -- the u32 reading, in the kernel -----------------------------------------------------------
def _tcp(doff: int, payload: bytes = b"", flags: int = ACK) -> bytes:
    head = struct.pack("!HHIIBBHHH", 40000, PORT, 1000, 2000, doff << 4, flags, 502, 0, 0)
    return head + b"\x01" * (4 * doff - 20) + payload


def _v4(seg: bytes, ihl: int = 5, frag: int = 0x4000) -> bytes:
    head = struct.pack("!BBHHHBBH", 0x40 | ihl, 0, 4 * ihl + len(seg), 7, frag, 64, 6, 0)
    src, dst = socket.inet_aton(NODE_V4), socket.inet_aton(svc("tls"))
    return head + src + dst + b"\x01" * (4 * ihl - 20) + seg


def _v6(seg: bytes, ext: bytes = b"", first: int = 6) -> bytes:
    head = struct.pack("!IHBB", 0x60000000, len(ext) + len(seg), first, 64)
    src, dst = socket.inet_pton(socket.AF_INET6, NODE_V6), socket.inet_pton(socket.AF_INET6, svc("tls", True))
    return head + src + dst + ext + seg


# (name, packet, skipped in the original direction, skipped in the reply direction)
Case = tuple[str, bytes, bool, bool]


def _cases(family: int) -> list[Case]:
    ip = _v4 if family == 4 else _v6
    out: list[Case] = []
    for d in netfilter.TCP_DATA_OFFSETS:
        out += [
            (f"ack doff={d}", ip(_tcp(d)), True, True),
            (f"ack doff={d} 1 byte", ip(_tcp(d, b"x", ACK | PSH)), False, False),
            (f"ack doff={d} 4 bytes", ip(_tcp(d, b"abcd", ACK | PSH)), False, False),
            (f"syn-ack doff={d}", ip(_tcp(d, b"", SYN | ACK)), False, True),
            (f"fin doff={d}", ip(_tcp(d, b"", FIN | ACK)), False, False),
        ]
    out += [
        ("syn-ack 1 byte", ip(_tcp(8, b"x", SYN | ACK)), False, False),
        ("rst", ip(_tcp(5, b"", RST)), False, False),
    ]
    if family == 4:
        out += [
            ("ip options", _v4(_tcp(5), ihl=6), False, False),
            ("first fragment (MF)", _v4(_tcp(5), frag=0x2000), False, False),
            ("later fragment", _v4(_tcp(5), frag=0x0003), False, False),
        ]
    else:
        dstopts, frag = bytes([6, 0, 1, 4, 0, 0, 0, 0]), bytes([6, 0, 0, 0, 0, 0, 0, 9])
        out += [
            ("destination options", _v6(_tcp(5), dstopts, 60), False, False),
            ("fragment header", _v6(_tcp(5), frag, 44), False, False),
        ]
    return out


def _counters(lb: Lab, family: int, chain: str) -> tuple[int, int]:
    """Packets (matched by a skip rule, that fell through to the end) in our copy of ``chain``."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    st = netfilter.parse_save(lb.run_node([tool, "-c", "-t", "filter"]).stdout)["filter"]
    hit = rest = 0
    for (ch, rule), cnt in zip(st.rules, st.counters, strict=True):
        if ch == chain:
            n = int(cnt.strip("[]").split(":")[0])
            hit, rest = (hit + n, rest) if "u32" in rule else (hit, rest + n)
    return hit, rest


@pytest.mark.parametrize("family", [4, 6])
def test_the_kernel_skips_exactly_the_dataless_segments(klab: Lab, family: int) -> None:
    # The rendered skip rules, copied into two test chains that every packet to the
    # destination walks (no conntrack, so no reassembly: fragments reach them as they are).
    text = netfilter.render(netfilter.RuleConfig(queue_num=Q, fail_open=True, max_packets=8), family)
    chains = {netfilter.CHAIN_ENQ_ORIG: "EGU32-ORIG", netfilter.CHAIN_ENQ_REPLY: "EGU32-REPLY"}
    dst = svc("tls", family == 6)
    rules = ["*filter", *(f":{c} - [0:0]" for c in chains.values())]
    for ours, test in chains.items():
        rules += [ln.replace(f"-A {ours} ", f"-A {test} ") for ln in text.splitlines() if ln.startswith(f"-A {ours} ")]
        rules[-1] = f"-A {test} -j RETURN"  # instead of the queue: count what fell through
        rules += [f"-A OUTPUT -d {dst} -j {test}"]
    restore = "iptables-restore" if family == 4 else "ip6tables-restore"
    script = "\n".join([*rules, "COMMIT"]) + "\n"
    p = subprocess.run(klab.node_cmd([restore, "--noflush"]), input=script, text=True, capture_output=True, check=False)
    assert p.returncode == 0, p.stderr

    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    sock = in_netns(klab.node, lambda: socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW))
    wrong: list[str] = []
    try:
        before = {c: _counters(klab, family, c) for c in chains.values()}
        for name, pkt, skip_orig, skip_reply in _cases(family):
            sock.sendto(pkt, (dst, 0))
            after = {c: _counters(klab, family, c) for c in chains.values()}
            for chain, want in (("EGU32-ORIG", skip_orig), ("EGU32-REPLY", skip_reply)):
                (h0, r0), (h1, r1) = before[chain], after[chain]
                got = (h1 - h0, r1 - r0)
                if got != ((1, 0) if want else (0, 1)):
                    wrong.append(f"{name} in {chain}: (matched, fell through) = {got}")
            before = after
    finally:
        sock.close()
    assert not wrong, "\n".join(wrong)
