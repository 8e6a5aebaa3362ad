"""The engine as the daemon and `egressd test` drive it: packets in, verdicts and events out."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from egressd.engine import (
    DIR_FRESH,
    DIR_ORIGINAL,
    DIR_REPLY,
    DROP_PACKET,
    PASS,
    PASS_MARK_SEEN,
    PIN_ALLOW,
    PIN_DENY,
    Engine,
)
from egressd.paths import default_policy
from egressd.policy import Policy, load_policy

NODE = "198.51.100.2"
POOL = "203.0.113.30"
SSHD = "203.0.113.20"
ALLOWED = "203.0.113.10"

SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'
CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
SERVER_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def write_policy(tmp_path: Path, body: str) -> Policy:
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(body))
    return load_policy(p)


@pytest.fixture(scope="module")
def default() -> Policy:
    return load_policy(default_policy())


class Conn:
    """A TCP connection's packets, built with scapy (tests only; never on the hot path)."""

    def __init__(self, dst: str, dport: int, sport: int = 40000, src: str = NODE, v6: bool = False) -> None:
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.cseq, self.sseq = 1000, 5000
        self.ip = IPv6 if v6 else IP

    def syn(self) -> bytes:
        return bytes(
            self.ip(src=self.src, dst=self.dst) / TCP(sport=self.sport, dport=self.dport, flags="S", seq=self.cseq - 1)
        )

    def synack(self) -> bytes:
        return bytes(
            self.ip(src=self.dst, dst=self.src)
            / TCP(sport=self.dport, dport=self.sport, flags="SA", seq=self.sseq - 1, ack=self.cseq)
        )

    def c(self, data: bytes, off: int | None = None, flags: str = "PA") -> bytes:
        seq = self.cseq + (off if off is not None else 0)
        return bytes(
            self.ip(src=self.src, dst=self.dst) / TCP(sport=self.sport, dport=self.dport, flags=flags, seq=seq) / data
        )

    def s(self, data: bytes, off: int = 0) -> bytes:
        return bytes(
            self.ip(src=self.dst, dst=self.src)
            / TCP(sport=self.dport, dport=self.sport, flags="PA", seq=self.sseq + off)
            / data
        )


def feed_all(eng: Engine, pkts: list[bytes]) -> list[int]:
    return [eng.feed(p, 1000.0 + i * 0.001) for i, p in enumerate(pkts)]


def test_stratum_subscribe_is_dropped_on_the_packet_that_completes_it(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    # The first packet marks the flow SEEN in the kernel; later ones need no mark of their own.
    assert feed_all(eng, [c.syn(), c.synack()]) == [PASS_MARK_SEEN, PASS]
    verdicts = [eng.feed(c.c(SUBSCRIBE[i : i + 1], i), 2000.0 + i) for i in range(len(SUBSCRIBE))]
    assert verdicts[-1] == PIN_DENY
    assert PIN_DENY not in verdicts[:-20], "decided before the method name could be known"
    ev = eng.events[-1]
    assert ev.verdict == "drop" and ev.action == "blocked" and ev.rule == "drop-mining"
    assert ev.detection is not None and ev.detection["kind"] == "mining.stratum"
    assert "mining.subscribe" in ev.detection["evidence"]


def test_stratum_on_443_out_of_order_is_still_stratum(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 443)
    pkts = [c.syn(), c.synack(), c.c(SUBSCRIBE[20:], 20), c.c(SUBSCRIBE[:20], 0)]
    assert feed_all(eng, pkts)[-1] == PIN_DENY


def test_later_packets_of_a_dropped_flow_stay_dropped(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    feed_all(eng, [c.syn(), c.synack(), c.c(SUBSCRIBE)])
    assert eng.feed(c.c(SUBSCRIBE), 2.0) == PIN_DENY  # retransmission
    assert eng.feed(c.s(b'{"id":1,"result":true}\n'), 2.0) == PIN_DENY


def test_ssh_to_unlisted_destination_is_dropped_at_the_client_banner(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(SSHD, 2222)
    v = feed_all(eng, [c.syn(), c.synack(), c.c(CLIENT_BANNER[:10]), c.c(CLIENT_BANNER[10:], 10)])
    assert v[:3] == [PASS_MARK_SEEN, PASS, PASS]
    assert v[3] == PIN_DENY
    ev = eng.events[-1]
    assert ev.detection is not None and ev.detection["kind"].startswith("ssh")
    assert ev.rule == "drop-ssh-unlisted"


def test_ssh_to_allowed_destination_is_accepted_and_reported_once(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(ALLOWED, 22)
    v = feed_all(eng, [c.syn(), c.synack(), c.s(SERVER_BANNER), c.c(CLIENT_BANNER)])
    assert PIN_DENY not in v
    more = [eng.feed(c.c(b"\x00" * 100, len(CLIENT_BANNER) + i * 100), 3.0) for i in range(150)]
    assert more[-1] == PIN_ALLOW, "the verdict must be pinned after the head"
    finals = [e for e in eng.events if e.flow_id == 1]
    assert len(finals) == 1 and finals[0].verdict == "accept"


def test_tls_flow_is_pinned_once_classified(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: accept\nrules: []\n")
    eng = Engine(pol)
    c = Conn("203.0.113.40", 443)
    hello = _client_hello("tls.example.net")
    server_hello_start = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03" + b"\x11" * 32
    v = feed_all(eng, [c.syn(), c.synack(), c.c(hello), c.s(server_hello_start)])
    assert v[-2] == PASS, "an SSH server could still speak first on the reply side"
    assert v[-1] == PIN_ALLOW
    assert eng.events[-1].domain == "tls.example.net"


def test_tls_sni_of_a_pool_domain_is_dropped(default: Policy) -> None:
    eng = Engine(default)
    c = Conn("203.0.113.41", 443)
    v = feed_all(eng, [c.syn(), c.synack(), c.c(_client_hello("xmr-eu1.nanopool.org"))])
    assert v[-1] == PIN_DENY
    assert "mining.pool-domain" in eng.events[-1].detections


def test_dns_answer_names_the_later_flow(tmp_path: Path) -> None:
    pol = write_policy(
        tmp_path,
        """
        default: accept
        lists:
          blocked: {type: domain, items: ["*.blocked.example"]}
        rules:
          - name: no-blocked
            description: names we never talk to
            match: {dst_domain: $blocked}
            action: drop
        """,
    )
    eng = Engine(pol)
    q = IP(src=NODE, dst="203.0.113.53") / UDP(sport=5555, dport=53) / DNS(rd=1, qd=DNSQR(qname="x.blocked.example"))
    a = (
        IP(src="203.0.113.53", dst=NODE)
        / UDP(sport=53, dport=5555)
        / DNS(
            qr=1,
            qd=DNSQR(qname="x.blocked.example"),
            an=DNSRR(rrname="x.blocked.example", rdata="203.0.113.99", ttl=30),
        )
    )
    assert eng.feed(bytes(q), 10.0) == PIN_DENY  # the lookup itself names a blocked domain
    eng2 = Engine(pol)
    eng2.feed(bytes(a), 10.0)  # an answer whose query was not seen (capture started late) still teaches
    c = Conn("203.0.113.99", 8080)
    assert eng2.feed(c.syn(), 11.0) == PIN_DENY
    assert eng2.events[-1].domain == "x.blocked.example"


def test_dns_learned_name_expires_with_its_ttl(tmp_path: Path) -> None:
    pol = write_policy(
        tmp_path,
        """
        default: accept
        rules:
          - {name: no-x, description: x, match: {dst_domain: x.example, dst_port: 80}, action: drop}
        """,
    )
    eng = Engine(pol)
    a = (
        IP(src="203.0.113.53", dst=NODE)
        / UDP(sport=53, dport=5555)
        / DNS(qr=1, qd=DNSQR(qname="x.example"), an=DNSRR(rrname="x.example", rdata="203.0.113.98", ttl=10))
    )
    eng.feed(
        bytes(IP(src=NODE, dst="203.0.113.53") / UDP(sport=5555, dport=53) / DNS(qd=DNSQR(qname="x.example"))),
        0.0,
    )
    eng.feed(bytes(a), 0.0)
    assert eng.feed(Conn("203.0.113.98", 80, sport=1).syn(), 5.0) == PIN_DENY
    assert eng.feed(Conn("203.0.113.98", 80, sport=2).syn(), 5000.0) != PIN_DENY


def test_monitor_mode_records_but_never_drops(tmp_path: Path) -> None:
    pol = write_policy(
        tmp_path,
        """
        mode: monitor
        default: accept
        rules:
          - {name: no-mining, description: m, match: {detection: mining}, action: drop}
        """,
    )
    eng = Engine(pol)
    c = Conn(POOL, 3333)
    v = feed_all(eng, [c.syn(), c.synack(), c.c(SUBSCRIBE)])
    assert PIN_DENY not in v
    ev = eng.events[-1]
    assert ev.verdict == "drop" and ev.action == "allowed" and ev.to_dict().get("would_drop") is True


def test_malformed_packet_gets_the_on_error_verdict_and_is_counted(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: accept\non_error: drop\nrules: []\n")
    eng = Engine(pol)
    # on_error: drop drops the packet, never the connection (nothing to pin it on).
    assert eng.feed(b"\x45\x00", 1.0) == DROP_PACKET
    assert eng.feed(b"", 1.0) == DROP_PACKET
    assert eng.counters.malformed == 2


def test_on_error_accept_passes_the_packet_without_marking_the_connection(tmp_path: Path) -> None:
    eng = Engine(write_policy(tmp_path, "default: accept\non_error: accept\nrules: []\n"))
    assert eng.feed(b"\x45\x00", 1.0) == PASS  # not PASS_MARK_SEEN: a mid-stream flow must stay unseen


def test_an_internal_error_drops_only_that_packet_under_on_error_drop(tmp_path: Path) -> None:
    eng = Engine(write_policy(tmp_path, "default: accept\non_error: drop\nrules: []\n"))
    c = Conn(POOL, 8080)
    assert eng.feed(c.syn(), 1.0) == PASS_MARK_SEEN
    broken = eng._inspect
    eng._inspect = lambda *a: 1 // 0  # type: ignore[method-assign,assignment]
    assert eng.feed(c.c(b"GET / HTTP/1.1\r\n\r\n"), 2.0) == DROP_PACKET
    assert eng.counters.errors == 1
    eng._inspect = broken  # type: ignore[method-assign]
    # The connection was not condemned: its retransmission is judged like any packet.
    assert eng.feed(c.c(b"GET / HTTP/1.1\r\n\r\n"), 3.0) in (PASS, PIN_ALLOW)


def test_syn_time_drop_by_destination(tmp_path: Path) -> None:
    pol = write_policy(
        tmp_path,
        """
        default: drop
        lists:
          ok: {type: cidr, items: [203.0.113.0/28]}
        rules:
          - {name: allow-ok, description: ok, match: {dst: $ok}, action: accept}
        """,
    )
    eng = Engine(pol)
    assert eng.feed(Conn("203.0.113.200", 443).syn(), 1.0) == PIN_DENY
    assert eng.events[-1].rule == "default" and eng.events[-1].reason == "first-packet"
    assert eng.feed(Conn("203.0.113.5", 443).syn(), 1.0) == PASS_MARK_SEEN


def test_reply_direction_hint_marks_midstream_pickup(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    eng.feed(c.s(b'{"id":null,"method":"mining.notify","params":["a","b"]}\n'), 1.0, DIR_REPLY)
    ev = eng.events[-1]
    assert ev.midstream and ev.src_ip == NODE and ev.dest_port == 3333
    assert ev.verdict == "drop"


def test_ipv6_stratum_is_dropped(default: Policy) -> None:
    eng = Engine(default)
    c = Conn("2001:db8:2::30", 3333, src="2001:db8:1::2", v6=True)
    assert feed_all(eng, [c.syn(), c.synack(), c.c(SUBSCRIBE)])[-1] == PIN_DENY


def test_ssh_inside_http_connect_is_still_ssh(default: Policy) -> None:
    eng = Engine(default)
    c = Conn("203.0.113.50", 3128)
    req = b"CONNECT 203.0.113.20:22 HTTP/1.1\r\nHost: 203.0.113.20:22\r\n\r\n"
    rep = b"HTTP/1.1 200 Connection established\r\n\r\n"
    v = feed_all(
        eng,
        [c.syn(), c.synack(), c.c(req), c.s(rep), c.s(SERVER_BANNER, len(rep)), c.c(CLIENT_BANNER, len(req))],
    )
    assert PIN_DENY in v
    ev = eng.events[-1]
    assert "ssh" in ev.detections and "proxy.http-connect" in ev.detections


def test_inconsistent_retransmission_is_reported(tmp_path: Path) -> None:
    pol = write_policy(
        tmp_path,
        "default: accept\nrules:\n  - {name: ev, description: e, match: {detection: evasion}, action: drop}\n",
    )
    eng = Engine(pol)
    c = Conn("203.0.113.77", 80)
    v = feed_all(eng, [c.syn(), c.synack(), c.c(b"GET / HTTP/1.1\r\n"), c.c(b"XXXXXXXXXXXXXXXX")])
    assert v[-1] == PIN_DENY
    assert "evasion.inconsistent-retransmission" in eng.events[-1].detections


def test_flow_table_is_bounded_and_overload_applies_on_overload(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: accept\non_overload: drop\nsettings: {max_flows: 64}\nrules: []\n")
    eng = Engine(pol)
    verdicts = [eng.feed(Conn(POOL, 3333, sport=10000 + i).syn(), 1.0) for i in range(200)]
    assert len(eng.table) <= 64
    assert verdicts.count(PIN_DENY) == 200 - 64
    assert eng.counters.overload == 200 - 64


def test_pinned_flows_make_room_before_overload(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: accept\non_overload: drop\nsettings: {max_flows: 16}\nrules: []\n")
    eng = Engine(pol)
    for i in range(100):  # UDP flows are pinned at their first packet
        pkt = IP(src=NODE, dst="203.0.113.9") / UDP(sport=20000 + i, dport=9999) / b"x"
        assert eng.feed(bytes(pkt), 1.0) == PIN_ALLOW
    assert len(eng.table) <= 16
    assert eng.counters.overload == 0


def test_idle_flows_expire(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    feed_all(eng, [c.syn(), c.synack()])
    assert len(eng.table.active) == 1
    eng.sweep(1_000_000.0)
    assert len(eng.table) == 0
    assert eng.events and eng.events[-1].reason == "end"


def test_original_direction_hint_is_respected(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    assert eng.feed(c.c(SUBSCRIBE), 1.0, DIR_ORIGINAL) == PIN_DENY
    assert eng.events[-1].midstream


def _client_hello(sni: str) -> bytes:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- properties: nothing escapes, memory stays bounded -----------------------------------------

_pkt_bytes = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda sp, dp, fl, seq, data: bytes(IP(src=NODE, dst=POOL) / TCP(sport=sp, dport=dp, flags=fl, seq=seq) / data),
        st.integers(1, 65535),
        st.sampled_from([22, 53, 443, 3333]),
        st.sampled_from(["S", "SA", "A", "PA", "F", "R", "FA"]),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda sp, data: bytes(IP(src=NODE, dst="203.0.113.53") / UDP(sport=sp, dport=53) / data),
        st.integers(1, 65535),
        st.binary(max_size=200),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pkt_bytes, max_size=60))
def test_arbitrary_packet_sequences_never_raise_and_stay_bounded(pkts: list[bytes]) -> None:
    pol = load_policy(default_policy())
    eng = Engine(pol)
    eng.table.max_flows = 8
    for i, p in enumerate(pkts):
        assert eng.feed(p, float(i)) in (PASS_MARK_SEEN, PIN_ALLOW, PIN_DENY, PASS)
    assert eng.counters.errors == 0
    assert len(eng.table) <= 8
    for f in eng.table.active.values():
        for h in (f.fwd, f.rev):
            if h is not None:
                assert len(h.data) <= pol.settings.head_bytes
                assert h.pending_bytes <= pol.settings.head_bytes


def test_midstream_flow_stays_unmarked_until_pinned(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(ALLOWED, 443)
    assert eng.feed(c.c(b"\x17\x03\x03\x00\x10" + b"x" * 16), 1.0, DIR_ORIGINAL) == PASS


def test_reused_four_tuple_with_a_new_syn_is_judged_again(default: Policy) -> None:
    # A finished (pinned ALLOW) connection must not answer for a new one on the same ports.
    eng = Engine(default)
    c = Conn(SSHD, 2222)
    fin = bytes(IP(src=NODE, dst=SSHD) / TCP(sport=c.sport, dport=2222, flags="FA", seq=c.cseq))
    sfin = bytes(IP(src=SSHD, dst=NODE) / TCP(sport=2222, dport=c.sport, flags="FA", seq=c.sseq))
    assert feed_all(eng, [c.syn(), c.synack(), fin, sfin])[-1] == PIN_ALLOW
    c2 = Conn(SSHD, 2222)
    c2.cseq += 77777
    assert eng.feed(c2.syn(), 2.0) == PASS_MARK_SEEN
    assert eng.feed(c2.c(CLIENT_BANNER), 2.1) == PIN_DENY


def test_lost_conntrack_ends_forget_allowed_pins_so_a_reused_tuple_is_judged(default: Policy) -> None:
    # Live, the SYN is not queued: a reused 4-tuple shows up as a FRESH first data segment,
    # and only the old connection's end event says the old pin no longer holds. When end
    # events were lost, every allowed pin is forgotten; drop pins stay.
    eng = Engine(default)
    old = Conn(SSHD, 2222)
    fin = bytes(IP(src=NODE, dst=SSHD) / TCP(sport=old.sport, dport=2222, flags="FA", seq=old.cseq))
    sfin = bytes(IP(src=SSHD, dst=NODE) / TCP(sport=2222, dport=old.sport, flags="FA", seq=old.sseq))
    assert eng.feed(old.c(b"q" * 64), 1.0, DIR_ORIGINAL | DIR_FRESH) == PASS_MARK_SEEN
    assert eng.feed(sfin, 1.1, DIR_REPLY) == PASS
    assert eng.feed(fin, 1.2, DIR_ORIGINAL) == PIN_ALLOW
    again = old.c(CLIENT_BANNER)
    assert eng.feed(again, 1.5, DIR_ORIGINAL | DIR_FRESH) == PIN_ALLOW  # the old pin answers
    bad = Conn(POOL, 3333)
    assert eng.feed(bad.c(b'{"id": 1, "method": "mining.subscribe", "params": []}\n'), 1.6, DIR_FRESH) == PIN_DENY
    assert eng.forget_allowed() == 1
    assert eng.feed(again, 2.0, DIR_ORIGINAL | DIR_FRESH) == PIN_DENY  # judged: an SSH banner
    assert eng.feed(bad.c(b"x"), 2.1, DIR_ORIGINAL) == PIN_DENY  # the drop pin was kept


def test_syn_retransmission_of_a_dropped_flow_stays_dropped(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: drop\nrules: []\n")
    eng = Engine(pol)
    c = Conn(POOL, 3333)
    assert eng.feed(c.syn(), 1.0) == PIN_DENY
    assert eng.feed(c.syn(), 2.0) == PIN_DENY
    assert eng.counters.flows == 1


def test_rst_ends_the_flow_for_both_sides(tmp_path: Path) -> None:
    pol = write_policy(tmp_path, "default: accept\nrules: []\n")
    eng = Engine(pol)
    c = Conn(POOL, 3333)
    rst = bytes(IP(src=POOL, dst=NODE) / TCP(sport=3333, dport=c.sport, flags="RA", seq=c.sseq))
    assert feed_all(eng, [c.syn(), rst])[-1] == PIN_ALLOW
    assert not eng.table.active


def test_reply_isn_is_taken_from_the_ack_when_the_syn_ack_is_not_queued(default: Policy) -> None:
    eng = Engine(default)
    c = Conn(POOL, 3333)
    ack = bytes(IP(src=NODE, dst=POOL) / TCP(sport=c.sport, dport=3333, flags="A", seq=c.cseq, ack=c.sseq))
    notify = b'{"id":null,"method":"mining.notify","params":["1","2"]}\n'
    assert feed_all(eng, [c.syn(), ack, c.s(notify)])[-1] == PIN_DENY
    assert "mining.pool" in eng.events[-1].detections
