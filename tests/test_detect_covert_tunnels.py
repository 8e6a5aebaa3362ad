"""Tunnels that are not SSH, from crafted bytes laid out as each protocol's source writes them.

One behaviour per test; the real-program captures are in tests/test_tunnels_golden.py.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR  # type: ignore[import-untyped]
from scapy.layers.inet import ICMP, IP, UDP  # type: ignore[import-untyped]

from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, StreamContext
from egressd.detect.dnstunnel import DnsTunnelTracker, detect_non_dns
from egressd.detect.http_tunnel import HttpTunnelDetector
from egressd.detect.icmp import EchoState, classify_data
from egressd.detect.reverse_http import detect_reverse_http
from egressd.detect.ssh import detect_ssh
from egressd.detect.stratum import detect_stratum
from egressd.detect.tor import detect_tor, tor_like_name
from egressd.detect.tunnels import detect_datagram, detect_stream
from egressd.detect.unknown_encrypted import detect_unknown_encrypted, looks_random
from egressd.detect.websocket import WebSocketDetector
from egressd.engine import PIN_ALLOW, PIN_DENY, Engine
from egressd.paths import default_policy
from egressd.policy import load_policy

CTX = StreamContext(40000, 8080)
WS = WebSocketDetector((("ssh", detect_ssh), ("stratum", detect_stratum)))
UPGRADE = (
    b"GET /tunnel HTTP/1.1\r\nHost: x.example.net\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def frame(data: bytes, op: int = 2, fin: bool = True, mask: bool = True, rsv1: bool = False) -> bytes:
    """An RFC 6455 frame, as a client (masked) or a server writes it."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | op
    n = len(data)
    if n < 126:
        hdr = bytes([b0, (0x80 if mask else 0) | n])
    elif n < 65536:
        hdr = bytes([b0, (0x80 if mask else 0) | 126]) + struct.pack("!H", n)
    else:
        hdr = bytes([b0, (0x80 if mask else 0) | 127]) + struct.pack("!Q", n)
    if not mask:
        return hdr + data
    key = os.urandom(4)
    return hdr + key + bytes(b ^ key[i % 4] for i, b in enumerate(data))


# -- WebSocket -----------------------------------------------------------------------------------
def test_ssh_inside_masked_websocket_frames_is_a_websocket_tunnel_naming_ssh() -> None:
    d = WS(UPGRADE + frame(BANNER), SWITCH + frame(BANNER, mask=False), CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.websocket"
    assert d.info["inner_kind"] == "ssh" and "OpenSSH_9.2p1" in d.evidence and d.info["path"] == "/tunnel"


def test_a_fragmented_message_with_a_ping_between_fragments_is_reassembled() -> None:
    fwd = UPGRADE + frame(BANNER[:5], fin=False) + frame(b"hi", op=9) + frame(BANNER[5:12], op=0, fin=False)
    fwd += frame(BANNER[12:], op=0)
    d = WS(fwd, SWITCH, CTX)
    assert isinstance(d, Detection) and d.info["inner_kind"] == "ssh"


def test_a_banner_split_over_frames_and_segments_waits_then_detects() -> None:
    whole = UPGRADE + frame(BANNER[:10]) + frame(BANNER[10:])
    assert WS(whole[: len(UPGRADE) + 8], SWITCH, CTX) is NEED_MORE
    assert isinstance(WS(whole, SWITCH, CTX), Detection)


def test_stratum_inside_a_permessage_deflate_websocket_is_seen_after_inflating() -> None:
    msg = b'{"id":1,"method":"mining.subscribe","params":["cpuminer/2.5"]}\n'
    c = zlib.compressobj(wbits=-15)
    body = c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    rev = SWITCH[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    d = WS(UPGRADE + frame(body[:-4], op=1, rsv1=True), rev, CTX)
    assert isinstance(d, Detection) and d.info["inner_kind"] == "mining.stratum"


def test_a_chat_app_over_websocket_is_not_a_tunnel() -> None:
    fwd = UPGRADE + frame(b'{"type":"message","room":"ml","text":"loss is 1.93"}', op=1)
    rev = SWITCH + frame(b'{"type":"message","from":"bob","text":"nice"}', op=1, mask=False)
    assert WS(fwd, rev, StreamContext(40000, 8080, fwd_closed=True, rev_closed=True)) is NOT_THIS


def test_unmasked_client_frames_are_not_websocket() -> None:
    assert WS(UPGRADE + frame(BANNER, mask=False), SWITCH, CTX) is NOT_THIS


def test_a_refused_upgrade_is_not_a_websocket() -> None:
    assert WS(UPGRADE + frame(BANNER), b"HTTP/1.1 403 Forbidden\r\n\r\n", CTX) is NOT_THIS


def test_a_handshake_get_with_a_body_is_a_fake_upgrade() -> None:
    fake = UPGRADE.replace(b"Sec-WebSocket-Version: 13\r\n", b"Content-Length: 183\r\n") + os.urandom(183)
    d = WS(fake, b"", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.http" and "183-byte body" in d.evidence


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_websocket_decoder_never_raises_on_hostile_frames(junk: bytes) -> None:
    r = WS(UPGRADE + junk, SWITCH + junk, CTX)
    assert r is NEED_MORE or r is NOT_THIS or isinstance(r, Detection)


# -- reverse HTTP --------------------------------------------------------------------------------
def test_the_responder_sending_a_request_is_reverse_http() -> None:
    d = detect_reverse_http(b"", b"GET /visitor HTTP/1.1\r\nHost: a.lt.example\r\n\r\n", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.reverse-http" and d.info["method"] == "GET"


def test_the_node_answering_the_relayed_request_is_in_the_evidence() -> None:
    d = detect_reverse_http(b"HTTP/1.1 200 OK\r\n\r\nhi", b"POST /hook HTTP/1.1\r\n\r\n", CTX)
    assert isinstance(d, Detection) and "node answered HTTP/1.1 200 OK" in d.evidence


def test_ordinary_http_is_not_reverse() -> None:
    assert detect_reverse_http(b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", CTX) is NOT_THIS


def test_a_server_banner_is_not_reverse_http() -> None:
    assert detect_reverse_http(b"", b"220 smtp.example ESMTP\r\n", CTX) is NOT_THIS
    assert detect_reverse_http(b"", b"GETTING READY\r\n", CTX) is NOT_THIS


def test_a_partial_request_line_waits() -> None:
    assert detect_reverse_http(b"", b"GET /visitor HT", CTX) is NEED_MORE


def test_http2_preface_from_the_responder_is_reverse_http() -> None:
    d = detect_reverse_http(b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.reverse-http"


# -- httptunnel ------------------------------------------------------------------------------------
def test_httptunnel_request_and_its_framed_ssh_are_named() -> None:
    det = HttpTunnelDetector((("ssh", detect_ssh),))
    fwd = b"GET /index.html?crap=1796455874 HTTP/1.1\r\nHost: h:8888\r\nConnection: close\r\n\r\n"
    rev = b"HTTP/1.1 200 OK\r\nContent-Length: 102400\r\n\r\n" + b"\x02" + struct.pack("!H", len(BANNER)) + BANNER
    d = det(fwd, rev, CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.http" and d.info["inner_kind"] == "ssh"
    assert det(b"GET /index.html?page=2 HTTP/1.1\r\n\r\n", b"", CTX) is NOT_THIS


# -- DNS tunnels -----------------------------------------------------------------------------------
def b32(n: int) -> str:
    return "".join("abcdefghijklmnopqrstuvwxyz234567"[b % 32] for b in os.urandom(n))


def test_many_distinct_data_names_under_one_zone_are_a_dns_tunnel_and_the_zone_stays_one() -> None:
    t = DnsTunnelTracker()
    got = [t.query(f"{b32(60)}.{b32(60)}.t.tun.example.net", 10, 1.0 + i) for i in range(4)]
    assert got[:3] == [None, None, None] and isinstance(got[3], Detection) and got[3].kind == "tunnel.dns"
    later = t.query("short.t.tun.example.net", 1, 10.0)
    assert later is not None and "already seen" in later.evidence


def test_long_legitimate_names_are_not_a_tunnel() -> None:
    t = DnsTunnelTracker()
    names = [
        ("selector1._domainkey.example.com", 16), ("_acme-challenge.www.example.com", 16),
        ("e1234.dscb.akamaiedge.net", 1), ("my-internal-load-balancer-1234567890.us-west-2.elb.amazonaws.com", 1),
        ("prod-eu-west-1-starscream-s3-bucket-artifacts.s3.eu-west-1.amazonaws.com", 28),
        ("r3---sn-4g5e6nze.googlevideo.com", 1), ("_spf.google.com", 16),
        ("d41d8cd98f00b204e9800998ecf8427e.hashbl.example.org", 1),
    ]  # fmt: skip
    for rep in range(5):
        for i, (n, qt) in enumerate(names):
            assert t.query(n, qt, rep * 10.0 + i) is None, n


def test_random_looking_but_legitimate_name_families_are_not_a_tunnel() -> None:
    import hashlib

    t = DnsTunnelTracker()
    for i in range(12):
        h = hashlib.sha1(str(i).encode()).hexdigest()
        for name, qtype in (
            (f"{b32(32)}._domainkey.amazonses.com", 16),  # SES DKIM selectors: 32 random characters
            (f"{h}.malware.hash.cymru.com", 16),  # a hash reputation lookup (SHA-1)
            (f"{h[:32]}.malware.hash.cymru.com", 16),  # (MD5-sized)
            (f"printer\\032{i}\\032(abc123)._ipp._tcp.example.com", 16),  # unicast DNS-SD, spaces escaped
            (f"{b32(20)}.cdn.example.net", 1),  # a CDN's per-node names
        ):
            assert t.query(name, qtype, float(i)) is None, name


def test_the_same_data_name_retransmitted_counts_once() -> None:
    t = DnsTunnelTracker()
    name = f"{b32(60)}.{b32(60)}.t.tun.example.net"
    assert all(t.query(name, 10, float(i)) is None for i in range(10))


def test_dnscat2_without_a_domain_is_named_on_its_first_query() -> None:
    d = DnsTunnelTracker().query("dnscat.546b03f50000000000a6023ed4df184d6ac5c2628b47714fdee584fed739", 16, 0.0)
    assert d is not None and d.info["tool"] == "dnscat2"


def test_dns2tcp_control_label_is_named_on_its_first_query() -> None:
    d = DnsTunnelTracker().query("aaaaah07aa.=auth.d2t.example.net", 16, 0.0)
    assert d is not None and d.info["tool"] == "dns2tcp"


def test_iodine_raw_mode_on_port_53_is_named() -> None:
    d = detect_non_dns(b"\x10\xd1\x9e\x20" + os.urandom(40))
    assert d is not None and "raw-mode data" in d.evidence
    assert detect_non_dns(b"\x10\xd1\x9e\x90" + os.urandom(40)) is None


def test_engine_drops_a_dns_tunnel_on_one_socket_and_a_later_socket_at_once() -> None:
    eng = Engine(load_policy(default_policy()))
    verdicts = []
    for i in range(5):
        q = IP(src="198.51.100.2", dst="203.0.113.53") / UDP(sport=41000, dport=53)
        q /= DNS(id=i, qd=DNSQR(qname=f"{b32(60)}.{b32(50)}.t.tun.example.net", qtype=10))
        verdicts.append(eng.feed(bytes(q), 1.0 + i))
    assert verdicts[-1] == PIN_DENY or PIN_DENY in verdicts
    q = IP(src="198.51.100.2", dst="203.0.113.53") / UDP(sport=41001, dport=53)
    q /= DNS(id=9, qd=DNSQR(qname="v.t.tun.example.net", qtype=1))
    assert eng.feed(bytes(q), 9.0) == PIN_DENY


# -- ICMP ------------------------------------------------------------------------------------------
PING_DATA = struct.pack("<QQ", 1796455000, 123456) + bytes(range(0x10, 0x38))


def echo(t: int, ident: int, seq: int, data: bytes) -> bytes:
    return struct.pack("!HH", ident, seq) + data


def test_a_ping_whose_replies_echo_is_clean_and_settles() -> None:
    e = EchoState()
    for seq in range(4):
        assert e.feed(8, echo(8, 7, seq, PING_DATA), True) is None
        assert e.feed(0, echo(0, 7, seq, PING_DATA), False) is None
    assert e.settled


def test_a_reply_that_does_not_echo_its_request_is_a_tunnel() -> None:
    e = EchoState()
    e.feed(8, echo(8, 7, 1, PING_DATA), True)
    d = e.feed(0, echo(0, 7, 1, os.urandom(64)), False)
    assert d is not None and d.kind == "tunnel.icmp" and d.info["tool"] == "echo-mismatch"


def test_a_truncated_echo_is_still_an_echo() -> None:
    e = EchoState()
    e.feed(8, echo(8, 7, 1, PING_DATA), True)
    assert e.feed(0, echo(0, 7, 1, PING_DATA[:20]), False) is None


def test_ptunnel_header_is_recognised_whatever_its_magic() -> None:
    for magic in (0xD5200880, 0xDEADC0DE, 0x12345678):
        hdr = struct.pack("!IIIIIIHH", magic, 0xCB007114, 22, (1 << 30) | 2, 0, 5, 1, 77)
        d = classify_data(hdr + b"hello")
        assert d is not None and d.kind == "tunnel.icmp", hex(magic)


def test_ping_with_a_zero_pattern_is_not_ptunnel() -> None:
    # ping -s 28 -p 00: a 16-byte timeval then zeros, so data_len (0) == len - 28 (0);
    # the state word has no kUser/kProxy flag, so it is not ptunnel.
    assert classify_data(struct.pack("<QQ", 1796455000, 123456) + bytes(12)) is None
    assert classify_data(PING_DATA) is None


def test_hans_and_ip_in_icmp_are_recognised() -> None:
    assert (d := classify_data(b"hanc\x02" + os.urandom(10))) is not None and d.info["tool"] == "hans"
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"data")
    assert (d := classify_data(inner)) is not None and d.info["tool"] == "ip-over-icmp"


def test_engine_pins_a_ping_and_drops_a_ptunnel_flow() -> None:
    eng = Engine(load_policy(default_policy()))
    v = []
    for seq in range(4):
        v.append(eng.feed(bytes(IP(src="198.51.100.2", dst="203.0.113.74") / ICMP(id=5, seq=seq) / PING_DATA), seq))
        v.append(
            eng.feed(bytes(IP(src="203.0.113.74", dst="198.51.100.2") / ICMP(type=0, id=5, seq=seq) / PING_DATA), seq)
        )
    assert v[-1] == PIN_ALLOW and PIN_DENY not in v
    hdr = struct.pack("!IIIIIIHH", 0xDEADC0DE, 0xCB007114, 22, 1 << 30, 0, 0, 0, 9)
    assert eng.feed(bytes(IP(src="198.51.100.2", dst="203.0.113.74") / ICMP(id=6) / hdr), 9.0) == PIN_DENY


# -- VPNs, Tor, fully encrypted ------------------------------------------------------------------
SID = b"\x8f\xdd\x2b\x9e\x41\xd8\xab\xea"


def test_openvpn_udp_reset_without_control_channel_protection() -> None:
    d = detect_datagram(b"\x38" + SID + bytes(5), True, 40000, 1194)
    assert d is not None and d.kind == "tunnel.openvpn" and d.info["mode"] == "none"
    assert detect_datagram(b"\x38" + SID + bytes(4) + b"\x01", True, 40000, 1194) is None


def test_openvpn_udp_reset_with_tls_auth_and_tls_crypt() -> None:
    auth = b"\x38" + SID + os.urandom(20) + b"\x00\x00\x00\x01" + os.urandom(4) + bytes(5)
    assert (d := detect_datagram(auth, True, 1, 443)) is not None and d.info["mode"] == "tls-auth"
    crypt = b"\x38" + SID + b"\x00\x00\x00\x01" + os.urandom(4 + 32 + 5)
    assert (d := detect_datagram(crypt, True, 1, 1194)) is not None and d.info["mode"] == "tls-crypt"
    wkc = os.urandom(297)
    v2 = b"\x50" + SID + os.urandom(8 + 32 + 5) + wkc + struct.pack("!H", 299)
    assert (d := detect_datagram(v2, True, 1, 1194)) is not None and d.info["mode"] == "tls-crypt-v2"


def test_a_quic_initial_is_not_openvpn() -> None:
    assert detect_datagram(b"\xc3\x00\x00\x00\x01" + os.urandom(1195), True, 1, 443) is None


def test_nebula_first_handshake_packet() -> None:
    p = b"\x10\x00\x00\x00" + bytes(4) + struct.pack("!Q", 1) + os.urandom(200)
    d = detect_datagram(p, True, 40000, 4242)
    assert d is not None and d.kind == "tunnel.nebula"
    assert detect_datagram(p[:8] + struct.pack("!Q", 2) + p[16:], True, 1, 4242) is None


def test_tinc_id_line_and_what_is_not_one() -> None:
    assert isinstance(d := detect_stream(b"0 node1 17\n", b"", CTX), Detection) and d.kind == "tunnel.tinc"
    assert isinstance(detect_stream(b"0 hub_2 17.7\n", b"", CTX), Detection)
    assert detect_stream(b"0 node1 17", b"", CTX) is NEED_MORE
    assert detect_stream(b"0 node-1 17\n", b"", CTX) is NOT_THIS
    assert detect_stream(b"0 OK 200\n", b"", CTX) is NOT_THIS


def test_tor_like_names() -> None:
    assert tor_like_name("www.n734jxm4nebh4u3ixgwguhm.com") and tor_like_name("www.ct7ctrgb6cr7.com")
    assert tor_like_name("www.ttwgdyf.com")  # random labels need not hold a digit
    for name in ("www.my-site.com", "www.example.org", "api.n734jxm4nebh4u3i.com", "www.ab.com", "www.x1.com"):
        assert not tor_like_name(name), name


def _client_stream(pcap: str, dport: int) -> bytes:
    from egressd.packet import Packet, decode
    from egressd.pcapio import Reader

    out = b""
    for _ts, raw in Reader(Path(__file__).resolve().parents[1] / "pcaps" / "tunnels" / pcap):
        p = decode(raw)
        if isinstance(p, Packet) and p.dport == dport and p.payload:
            out += p.payload
    return out


def test_tor_needs_its_name_no_alpn_and_a_versions_cell_sized_first_record() -> None:
    fwd = _client_stream("tor-bridge.pcap", 9001)  # Tor 0.4.9's ClientHello, Finished, VERSIONS
    d = detect_tor(fwd, b"", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.tor" and "28 bytes" in d.evidence
    at = fwd.index(b"\x17\x03\x03\x00\x1c")  # the VERSIONS record (11 + 17 bytes)
    bigger = fwd[:at] + b"\x17\x03\x03\x01\x00" + os.urandom(256)  # an HTTP request would be larger
    assert detect_tor(bigger, b"", CTX) is NOT_THIS
    # The smallest HTTP request a no-ALPN client can send, "GET / HTTP/1.0\r\n\r\n": 18 + 17 bytes.
    tiny = fwd[:at] + b"\x17\x03\x03\x00\x23" + os.urandom(35)
    assert detect_tor(tiny, b"", CTX) is NOT_THIS
    assert detect_tor(fwd[:at], b"", CTX) is NEED_MORE


def test_shadowsocks_like_stream_is_unknown_encrypted_and_ordinary_binary_is_not() -> None:
    # Fixed bytes: about 0.6 % of random first packets fall under an exemption (a first byte
    # 0x04, six printable bytes ...), which costs recall, never a false positive.
    rnd = random.Random(7)
    up, down = rnd.randbytes(183), rnd.randbytes(600)
    assert looks_random(up) and looks_random(down)
    d = detect_unknown_encrypted(up, down, CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.unknown-encrypted" and d.info["unnamed_only"] == "1"
    framed = struct.pack("!H", 181) + rnd.randbytes(181)  # a length-prefixed binary protocol
    assert detect_unknown_encrypted(framed, down, CTX) is NOT_THIS
    ident = b"\x9a\x01\xf3\x88\x10\xc4\x7e\x05\xd2\x31"  # an id repeated per message: structure
    header = b"\x25\x00\x45" + ident * 3 + rnd.randbytes(100)
    assert detect_unknown_encrypted(header, down, CTX) is NOT_THIS
    assert detect_unknown_encrypted(b"GET / HTTP/1.1\r\n" + rnd.randbytes(100), down, CTX) is NOT_THIS
    assert detect_unknown_encrypted(b"", b"220 ready\r\n" + rnd.randbytes(60), CTX) is NOT_THIS


def test_pptp_start_control_connection_request() -> None:
    sccrq = b"\x00\x9c\x00\x01\x1a\x2b\x3c\x4d\x00\x01\x00\x00\x01\x00" + bytes(142)
    assert isinstance(d := detect_stream(sccrq, b"", CTX), Detection) and d.kind == "tunnel.pptp"
    assert detect_stream(sccrq[:6], b"", CTX) is NEED_MORE
    assert detect_stream(sccrq[:8] + b"\x00\x05" + sccrq[10:], b"", CTX) is NOT_THIS


def test_teredo_qualification_with_an_authentication_indicator() -> None:
    from scapy.layers.inet6 import ICMPv6ND_RS, IPv6  # type: ignore[import-untyped]

    rs = bytes(IPv6(src="fe80::ffff:ffff:fffe", dst="ff02::2") / ICMPv6ND_RS())
    auth = b"\x00\x01\x00\x00" + os.urandom(8) + b"\x00"
    d = detect_datagram(auth + rs, True, 52513, 3544)
    assert d is not None and d.kind == "tunnel.teredo" and "authentication indicator" in d.evidence
    # The same bytes on another port without an indicator: an IPv6 packet, but not called Teredo.
    assert detect_datagram(rs, True, 40000, 32900) is None


def test_ip_protocols_that_are_tunnels() -> None:
    from egressd.detect.tunnels import detect_ip_protocol

    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"x")
    assert (d := detect_ip_protocol(4, inner)) is not None and d.kind == "tunnel.ip-in-ip"
    assert (d := detect_ip_protocol(47, b"\x00\x00\x08\x00" + inner)) is not None and d.info["carries"] == "IPv4"
    assert (d := detect_ip_protocol(50, struct.pack("!II", 0x1234, 1) + os.urandom(40))) is not None
    assert d.kind == "tunnel.ipsec"
    assert detect_ip_protocol(50, struct.pack("!II", 7, 1) + os.urandom(40)) is None  # reserved SPI
    assert detect_ip_protocol(47, b"\x00\x07\x08\x00" + inner) is None  # GRE version 7 does not exist
    assert detect_ip_protocol(132, os.urandom(40)) is None  # SCTP is not a tunnel


def test_tinc_udp_data_is_named_after_its_meta_connection() -> None:
    from scapy.layers.inet import TCP

    eng = Engine(load_policy(default_policy()))
    udp = bytes(IP(src="198.51.100.2", dst="203.0.113.76") / UDP(sport=655, dport=655) / os.urandom(120))
    assert eng.feed(udp, 0.0) == PIN_ALLOW  # before any meta connection: nothing to tell
    syn = IP(src="198.51.100.2", dst="203.0.113.76") / TCP(sport=40000, dport=655, flags="S", seq=100)
    eng.feed(bytes(syn), 1.0)
    idl = IP(src="198.51.100.2", dst="203.0.113.76") / TCP(sport=40000, dport=655, flags="PA", seq=101, ack=1)
    eng.feed(bytes(idl / b"0 node1 17\n"), 1.1)
    udp2 = bytes(IP(src="198.51.100.2", dst="203.0.113.76") / UDP(sport=656, dport=655) / os.urandom(120))
    eng.feed(udp2, 2.0)
    evs = [e for e in eng.events if e.proto == "UDP" and e.src_port == 656]
    assert evs and evs[0].detection is not None and evs[0].detection["kind"] == "tunnel.tinc", evs


def test_a_short_hello_before_tls_is_not_unknown_encrypted() -> None:
    """PostgreSQL: an 8-byte SSLRequest, a 1-byte 'S', then TLS, to an address nobody named."""
    from scapy.layers.inet import TCP

    eng = Engine(load_policy(default_policy()))
    c, srv = "198.51.100.2", "203.0.113.90"
    rnd = random.Random(3)

    def seg(src: str, dst: str, sp: int, dp: int, seq: int, ack: int, data: bytes, flags: str = "PA") -> bytes:
        return bytes(IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / data)

    eng.feed(seg(c, srv, 40000, 5432, 100, 0, b"", "S"), 0.0)
    eng.feed(seg(srv, c, 5432, 40000, 900, 101, b"", "SA"), 0.0)
    eng.feed(seg(c, srv, 40000, 5432, 101, 901, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), 0.1)
    eng.feed(seg(srv, c, 5432, 40000, 901, 109, b"S"), 0.2)
    eng.feed(seg(c, srv, 40000, 5432, 109, 902, rnd.randbytes(300)), 0.3)  # stands in for TLS
    eng.feed(seg(srv, c, 5432, 40000, 902, 409, rnd.randbytes(800)), 0.4)
    eng.finish(1.0)
    assert all("tunnel.unknown-encrypted" not in (e.detections or []) for e in eng.events), list(eng.events)
    assert detect_unknown_encrypted(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"", CTX) is NOT_THIS


def _jwt(claims: dict[str, object]) -> bytes:
    import base64
    import json

    def enc(b: bytes) -> bytes:
        return base64.urlsafe_b64encode(b).rstrip(b"=")

    return b".".join([enc(b'{"typ":"JWT","alg":"HS256"}'), enc(json.dumps(claims).encode()), enc(os.urandom(32))])


def test_wstunnel_upgrade_names_its_target_from_the_jwt_claims() -> None:
    claims = {"id": "0191c2f5-0000-7000-8000-000000000000", "p": {"Tcp": {"proxy_protocol": False}},
              "r": "10.0.0.5", "rp": 22}  # fmt: skip
    proto = b"Sec-WebSocket-Protocol: v1, authorization.bearer." + _jwt(claims) + b"\r\n"
    req = UPGRADE.replace(b"Sec-WebSocket-Version: 13\r\n", b"Sec-WebSocket-Version: 13\r\n" + proto)
    d = WS(req.replace(b"GET /tunnel", b"GET /v1/events"), b"", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.websocket" and d.info["target"] == "10.0.0.5:22"


def test_a_bearer_token_subprotocol_of_an_ordinary_app_is_not_wstunnel() -> None:
    req = UPGRADE.replace(b"Sec-WebSocket-Version: 13\r\n",
                          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime, authorization.bearer."
                          + _jwt({"sub": "user-1", "exp": 1796455000}) + b"\r\n")  # fmt: skip
    assert WS(req, b"", CTX) is NEED_MORE  # waits for the 101 and the frames, like any WebSocket


def test_a_multiplexing_header_before_each_message_is_looked_behind() -> None:
    # aiowstunnel's Data packet: type 4, a 2-byte connection id, then the stream's bytes.
    fwd = UPGRADE + frame(b"\x04\x00\x01" + BANNER[:20]) + frame(b"\x04\x00\x01" + BANNER[20:])
    d = WS(fwd, SWITCH + frame(b"\x04\x00\x01" + BANNER, mask=False), CTX)
    assert isinstance(d, Detection) and d.info["inner_kind"] == "ssh" and d.info["message_header"] == "3/3"


def test_the_first_fragment_of_an_unfinished_message_is_already_inner_data() -> None:
    d = WS(UPGRADE + frame(BANNER, fin=False), SWITCH, CTX)
    assert isinstance(d, Detection) and d.info["inner_kind"] == "ssh"


def test_pings_that_carry_a_file_are_a_channel_even_when_echoed() -> None:
    e = EchoState()
    chunks = [os.urandom(48) for _ in range(3)]
    got = [
        e.feed(8, echo(8, 9, i, struct.pack("<QQ", 1796455000 + i, i) + b"\0" * 8 + c), True)
        for i, c in enumerate(chunks)
    ]
    assert got[:2] == [None, None] and got[2] is not None and got[2].info["tool"] == "changing-payload"


def test_a_ping_with_a_changing_time_stamp_is_not_a_channel() -> None:
    e = EchoState()
    for seq in range(20):
        data = struct.pack("<QQ", 1796455000 + seq, seq * 1000) + bytes(range(0x10, 0x38))
        assert e.feed(8, echo(8, 9, seq, data), True) is None


def test_localtunnel_registration_names_the_tunnel_and_its_port_is_dropped_on_syn() -> None:
    from scapy.layers.inet import TCP

    body = b'{"id":"node","ip":"203.0.113.70","port":7000,"max_conn_count":10,"url":"https://node.lt.example"}'
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(body)
    d = detect_reverse_http(b"GET /?new HTTP/1.1\r\nHost: lt.example\r\n\r\n", resp + body, CTX)
    assert isinstance(d, Detection) and d.info["tunnel_port"] == "7000" and d.info["tool"] == "localtunnel"
    assert detect_reverse_http(b"GET /?new HTTP/1.1\r\n\r\n", resp + body[:20], CTX) is NEED_MORE
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"port": 8080, "status": "ok"}'
    assert detect_reverse_http(b"GET /api HTTP/1.1\r\n\r\n", plain, CTX) is NOT_THIS

    eng = Engine(load_policy(default_policy()))
    c, srv = "198.51.100.2", "203.0.113.70"

    def seg(sp: int, dp: int, seq: int, ack: int, data: bytes, flags: str = "PA", rev: bool = False) -> bytes:
        a, b = (srv, c) if rev else (c, srv)
        return bytes(IP(src=a, dst=b) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / data)

    req = b"GET /?new HTTP/1.1\r\nHost: lt.example\r\n\r\n"
    eng.feed(seg(40000, 80, 1, 0, b"", "S"), 0.0)
    eng.feed(seg(40000, 80, 2, 1, req), 0.1)
    assert eng.feed(seg(80, 40000, 1, 2 + len(req), resp + body, rev=True), 0.2) == PIN_DENY
    assert eng.feed(seg(40001, 7000, 1, 0, b"", "S"), 0.3) == PIN_DENY  # the announced port, idle or not


def test_ptunnel_udp_mode_on_port_53_is_not_dns_but_a_tunnel() -> None:
    hdr = struct.pack("!IIIIIIHH", 0xDEADC0DE, 0xCB007114, 22, 1 << 30, 0xFFFF, 0, 0, 0xD9D4)
    d = detect_non_dns(b"\x08\x00\x28\x9e\xd9\xd4\x00\x00" + hdr)  # ICMP echo header kept inside UDP
    assert d is not None and d.kind == "tunnel.dns" and d.info["mode"] == "udp"
    assert detect_non_dns(b"\x12\x34\x01\x00\x00\x01\x00\x00" + bytes(28)) is None  # a DNS-like header: no


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.binary(max_size=700), st.booleans(), st.booleans())
def test_new_stream_detectors_never_raise_and_keep_the_three_way_contract(
    fwd: bytes, rev: bytes, fclosed: bool, rclosed: bool
) -> None:
    ctx = StreamContext(40000, 443, fwd_closed=fclosed, rev_closed=rclosed)
    det = HttpTunnelDetector((("ssh", detect_ssh),))
    for fn in (detect_reverse_http, WS, det, detect_tor, detect_unknown_encrypted, detect_stream):
        for a, b in ((fwd, rev), (b"GET / HTTP/1.1\r\n\r\n" + fwd, b"HTTP/1.1 101 OK\r\n\r\n" + rev)):
            r = fn(a, b, ctx)
            assert r is NEED_MORE or r is NOT_THIS or isinstance(r, Detection)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 255), st.booleans())
def test_new_datagram_and_echo_parsers_never_raise(payload: bytes, icmp_type: int, orig: bool) -> None:
    from egressd.detect.tunnels import detect_ip_protocol

    for proto in (4, 41, 47, 50, 51):
        detect_ip_protocol(proto, payload)
    detect_datagram(payload, orig, 3544, 1194)
    detect_non_dns(payload)
    classify_data(payload)
    EchoState().feed(icmp_type, payload, orig)
    name = payload.decode("latin-1").replace(".", "")[:60] + ".t.example.net"
    DnsTunnelTracker().query(name, icmp_type, 0.0)


def test_pagekite_backend_tunnel_is_named_before_the_proxy_detector_sees_a_connect() -> None:
    from egressd.detect.reverse_http import detect_pagekite

    req = b"CONNECT PageKite:1 HTTP/1.0\r\nX-PageKite-Features: AddKites\r\n"
    req += b"X-PageKite: http:node.kite.example:abc:def\r\n\r\n"
    d = detect_pagekite(req, b"", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.reverse-http" and "http:node.kite.example" in d.evidence
    assert detect_pagekite(req[:20], b"", CTX) is NEED_MORE
    assert detect_pagekite(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"", CTX) is NOT_THIS


# -- the per-query score (moved here from detect/dns.py with the tracker that uses it) -----------
def test_tunnel_score_ranks_encoded_names_above_ordinary_ones() -> None:
    from egressd.detect.dns import TYPE_A, TYPE_NULL
    from egressd.detect.dnstunnel import tunnel_score

    iodine_like = "0rbvhmkqf3xujy5dt2cvn7aiqzg8pwlre4ko1sbx6mhn9tdyu2vjcqa5fiw3.lpx7r2k.t.example.org"
    dnscat_like = "dnscat.9f2c01f500b5e6a4c7d00219ab3e44f01c6d7a8e9b2f3041.5c6d7e8f90a1b2c3d4e5f6a7b8c9d0e1f2a3b4.x.com"
    assert tunnel_score(iodine_like, TYPE_NULL) > 0.8
    for ordinary in ("www.example.com", "a1234.dscb.akamaiedge.net", "login.microsoftonline.com", "example.com"):
        assert tunnel_score(ordinary, TYPE_A) < 0.2, ordinary
    assert tunnel_score(dnscat_like, TYPE_A) > tunnel_score("api.github.com", TYPE_A) + 0.4
