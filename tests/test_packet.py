"""The decoder: every header per its RFC; truncated or inconsistent input is a result, never an exception."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from egressd.packet import PROTO_TCP, PROTO_UDP, TCP_SYN, Malformed, Packet, decode


def _ok(buf: bytes) -> Packet:
    p = decode(buf)
    assert isinstance(p, Packet), p
    return p


def test_ipv4_tcp_fields() -> None:
    raw = bytes(IP(src="198.51.100.2", dst="203.0.113.20") / TCP(sport=40000, dport=22, flags="S", seq=7) / b"hi")
    p = _ok(raw)
    assert (p.version, p.proto, p.sport, p.dport, p.seq) == (4, PROTO_TCP, 40000, 22, 7)
    assert p.src == bytes([198, 51, 100, 2]) and p.dst == bytes([203, 0, 113, 20])
    assert p.tcp_flags & TCP_SYN
    assert p.payload == b"hi"
    assert not p.truncated


def test_ipv4_options_are_skipped_by_ihl() -> None:
    raw = bytes(IP(src="198.51.100.2", dst="203.0.113.20", options=b"\x01\x01\x01\x00") / UDP(sport=5, dport=53) / b"q")
    p = _ok(raw)
    assert p.proto == PROTO_UDP and p.payload == b"q"


def test_tcp_options_are_skipped_by_data_offset() -> None:
    raw = bytes(IP() / TCP(options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b"")]) / b"payload")
    assert _ok(raw).payload == b"payload"


def test_capture_shorter_than_total_length_is_marked_truncated() -> None:
    raw = bytes(IP() / TCP() / (b"x" * 3000))
    p = _ok(raw[:1500])
    assert p.truncated
    assert p.payload == b"x" * (1500 - 40)
    assert p.ip_len == len(raw)


def test_ethernet_padding_after_total_length_is_not_payload() -> None:
    raw = bytes(IP() / TCP() / b"ab") + b"\x00" * 6
    assert _ok(raw).payload == b"ab"


def test_ipv6_extension_header_chain_is_walked() -> None:
    raw = bytes(
        IPv6(src="2001:db8:1::2", dst="2001:db8:2::30")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting()
        / TCP(sport=1234, dport=3333)
        / b"{}"
    )
    p = _ok(raw)
    assert (p.version, p.proto, p.dport, p.payload) == (6, PROTO_TCP, 3333, b"{}")


def test_ipv6_first_fragment_has_ports_later_fragment_has_offset() -> None:
    first = bytes(IPv6() / IPv6ExtHdrFragment(offset=0, m=1, id=9) / UDP(sport=1, dport=53) / b"abcd")
    p = _ok(first)
    assert p.more_frags and p.frag_offset == 0 and p.dport == 53 and p.frag_id == 9
    later = bytes(IPv6() / IPv6ExtHdrFragment(offset=2, m=0, id=9, nh=17) / b"rest")
    q = _ok(later)
    assert q.frag_offset == 16 and q.sport == 0 and q.payload == b"rest"


def test_ipv4_later_fragment_carries_no_ports() -> None:
    raw = bytearray(bytes(IP(proto=6, flags=0, frag=3) / b"0123456789abcdefghij"))
    p = _ok(bytes(raw))
    assert p.frag_offset == 24 and p.sport == 0 and p.payload.startswith(b"0123")


def test_tiny_first_fragment_is_handed_over_for_reassembly() -> None:
    raw = bytes(IP(proto=6, flags="MF") / (b"\x01\x02\x03\x04" + b"\x00" * 4))
    p = _ok(raw)
    assert p.more_frags and p.frag_offset == 0 and (p.sport, p.dport) == (0x0102, 0x0304)


def test_short_tcp_header_without_fragmentation_is_malformed() -> None:
    m = decode(bytes(IP(proto=6) / (b"\x00" * 8)))
    assert isinstance(m, Malformed) and "TCP header" in m.reason


def test_icmp_echo_id_used_as_port() -> None:
    p = _ok(bytes(IP() / ICMP(type=8, id=4242)))
    assert p.icmp_type == 8 and p.sport == 4242


def test_too_many_ipv6_extension_headers_is_malformed() -> None:
    hdr = IPv6ExtHdrDestOpt()
    pkt = IPv6()
    for _ in range(40):
        pkt = pkt / hdr
    m = decode(bytes(pkt / UDP()))
    assert isinstance(m, Malformed) and "extension" in m.reason


def test_garbage_and_short_input_are_malformed() -> None:
    assert isinstance(decode(b""), Malformed)
    assert isinstance(decode(b"\x45"), Malformed)
    assert isinstance(decode(b"\x75" + b"\x00" * 30), Malformed)
    bad_ihl = bytearray(bytes(IP() / TCP()))
    bad_ihl[0] = 0x42
    assert isinstance(decode(bytes(bad_ihl)), Malformed)
    bad_doff = bytearray(bytes(IP() / TCP()))
    bad_doff[20 + 12] = 0x10
    assert isinstance(decode(bytes(bad_doff)), Malformed)


def test_udp_length_shorter_than_header_is_malformed() -> None:
    raw = bytearray(bytes(IP() / UDP() / b"abc"))
    struct.pack_into("!H", raw, 24, 3)
    assert isinstance(decode(bytes(raw)), Malformed)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(buf: bytes) -> None:
    assert isinstance(decode(buf), Packet | Malformed)


@settings(max_examples=1500, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 119))
def test_mutated_real_packets_never_raise(noise: bytes, at: int) -> None:
    base = bytearray(bytes(IP(src="198.51.100.2", dst="203.0.113.1") / TCP(options=[("MSS", 1460)]) / b"SSH-2.0-x\r\n"))
    for i, b in enumerate(noise):
        base[(at + i) % len(base)] = b
    assert isinstance(decode(bytes(base)), Packet | Malformed)
    for cut in range(0, len(base), 7):
        assert isinstance(decode(bytes(base[:cut])), Packet | Malformed)
