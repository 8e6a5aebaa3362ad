"""Encapsulations in UDP (detect/encap.py): L2TP, VXLAN, GENEVE, IP and Ethernet directly in UDP.

Each positive is built field by field from its specification (the inner packets with scapy, an
independent implementation of IPv4/IPv6/ARP); each negative breaks exactly one thing the
detector relies on, so a check that stops being made fails here. The benign datagrams that
share ports or first bytes with these (DNS, QUIC, NTP, SSDP, STUN, mDNS) go through the whole
UDP path (tunnels.detect_datagram) and must not be called anything.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    ARP,
    DNS,
    DNSQR,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    Ether,
    ICMPv6EchoRequest,
    ICMPv6ND_RS,
    IPv6,
    raw,
)

from egressd.detect.base import Detection
from egressd.detect.encap import detect_encap
from egressd.detect.tunnels import detect_datagram
from egressd.packet import PROTO_UDP, Packet, decode
from egressd.pcapio import Reader

MAC_A = "02:00:5e:00:53:01"
MAC_B = "02:00:5e:00:53:02"


def avp(attr: int, value: bytes, mandatory: bool = True, hidden: bool = False, vendor: int = 0) -> bytes:
    """An L2TP AVP (RFC 2661 §4.1): M, H, 4 reserved bits, 10-bit length, vendor, attribute."""
    word = (0x8000 if mandatory else 0) | (0x4000 if hidden else 0) | (6 + len(value))
    return struct.pack("!HHH", word, vendor, attr) + value


def l2tp2_control(mtype: int, avps: bytes = b"", tunnel: int = 0, session: int = 0, flags: int = 0xC802) -> bytes:
    body = avp(0, struct.pack("!H", mtype)) + avps if mtype else avps
    return struct.pack("!HHHHHH", flags, 12 + len(body), tunnel, session, 0, 0) + body


SCCRQ_AVPS = (
    avp(2, b"\x01\x00")  # Protocol Version 1.0
    + avp(3, b"\x00\x00\x00\x03")  # Framing Capabilities
    + avp(7, b"lab-lac")  # Host Name
    + avp(8, b"xelerance.com", mandatory=False)  # Vendor Name
    + avp(9, b"\x3e\x5d")  # Assigned Tunnel ID
    + avp(10, b"\x00\x04")  # Receive Window Size
)


def l2tp3_control(mtype: int, avps: bytes = b"", ccid: int = 0, flags: int = 0xC803) -> bytes:
    body = avp(0, struct.pack("!H", mtype)) + avps
    return struct.pack("!HHIHH", flags, 12 + len(body), ccid, 0, 0) + body


def l2tp2_data(ppp: bytes, tunnel: int = 4711, session: int = 815, length: bool = False) -> bytes:
    if length:
        return struct.pack("!HHHH", 0x4002, 8 + len(ppp), tunnel, session) + ppp
    return struct.pack("!HHH", 0x0002, tunnel, session) + ppp


LCP_CONFREQ = b"\xff\x03\xc0\x21" + b"\x01\x01\x00\x0e\x05\x06\x12\x34\x56\x78\x07\x02\x08\x02"


def frame_ipv4(size: int = 20) -> bytes:
    return raw(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.93.0.2", dst="10.93.0.1") / ICMP() / (b"p" * size))


def frame_arp() -> bytes:
    return raw(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=MAC_A, psrc="10.93.0.2", pdst="10.93.0.1"))


def frame_ipv6() -> bytes:
    return raw(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::2", dst="2001:db8::1") / ICMPv6EchoRequest())


def vxlan(inner: bytes, vni: int = 42, flags: int = 0x08, rsv: bytes = b"\x00\x00\x00", last: int = 0) -> bytes:
    return bytes([flags]) + rsv + struct.pack("!I", vni << 8 | last) + inner


def geneve(inner: bytes, ptype: int = 0x6558, options: bytes = b"", vni: int = 7, b1: int = 0, ver: int = 0) -> bytes:
    assert len(options) % 4 == 0
    return bytes([ver << 6 | len(options) // 4, b1]) + struct.pack("!HI", ptype, vni << 8) + options + inner


def ipv4_packet(payload: bytes = b"q" * 24) -> bytes:
    return raw(IP(src="10.92.0.2", dst="10.92.0.1") / UDP(sport=5000, dport=6000) / payload)


def ipv6_packet() -> bytes:
    return raw(IPv6(src="2001:db8:5::2", dst="2001:db8:5::1") / TCP(sport=40000, dport=22, flags="S"))


def ip6_ext(nh: int, rest: bytes) -> bytes:
    return raw(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=nh) / rest)


def bad_checksum(pkt: bytes, off: int = 0) -> bytes:
    b = bytearray(pkt)
    b[off + 10] ^= 0x01
    return bytes(b)


def kind(d: Detection | None) -> str | None:
    return None if d is None else d.kind


# -- L2TP ------------------------------------------------------------------------------------------
def test_l2tpv2_sccrq_is_named_with_its_host_and_vendor() -> None:
    d = detect_encap(l2tp2_control(1, SCCRQ_AVPS))
    assert d is not None and d.kind == "tunnel.l2tp"
    assert d.info["version"] == "2" and d.info["message"] == "SCCRQ"
    assert d.info["host"] == "lab-lac" and d.info["vendor"] == "xelerance.com"
    assert "SCCRQ" in d.evidence and "tunnel id 0" in d.evidence


@pytest.mark.parametrize(("mtype", "name"), [(2, "SCCRP"), (3, "SCCCN"), (6, "HELLO"), (10, "ICRQ"), (14, "CDN")])
def test_l2tpv2_other_control_messages_in_a_tunnel(mtype: int, name: str) -> None:
    d = detect_encap(l2tp2_control(mtype, avp(14, b"\x03\xa8"), tunnel=56246))
    assert d is not None and d.kind == "tunnel.l2tp" and d.info["message"] == name


def test_l2tpv2_zlb_ack_only_inside_a_tunnel() -> None:
    zlb = l2tp2_control(0, tunnel=15965)
    assert len(zlb) == 12
    d = detect_encap(zlb)
    assert d is not None and d.kind == "tunnel.l2tp" and d.confidence < 1.0
    assert detect_encap(l2tp2_control(0, tunnel=0)) is None


def test_l2tpv3_sccrq_over_udp() -> None:
    d = detect_encap(l2tp3_control(1, avp(7, b"lac3") + avp(61, b"\x00\x00\x12\x34")))
    assert d is not None and d.kind == "tunnel.l2tp" and d.info["version"] == "3"
    assert "control connection id 0" in d.evidence
    ack = detect_encap(l2tp3_control(20, ccid=0x1234))
    assert ack is not None and ack.info["message"] == "ACK"
    assert detect_encap(l2tp2_control(20, tunnel=5)) is None  # ACK (20) is v3's only


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0xC801), id="version-1"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0xC804), id="version-4"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0xCA02), id="offset-bit-on-control"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0xC902), id="priority-bit-on-control"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0xC822), id="reserved-bit"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS, flags=0x8802), id="no-length-bit"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS)[:-1], id="truncated"),
        pytest.param(l2tp2_control(1, SCCRQ_AVPS) + b"\x00", id="trailing-byte"),
        pytest.param(l2tp2_control(5, SCCRQ_AVPS), id="reserved-message-type"),
        pytest.param(l2tp2_control(0, avp(0, b"\x00\x01", hidden=True) + SCCRQ_AVPS), id="hidden-message-type"),
        pytest.param(l2tp2_control(0, avp(0, b"\x00\x01", mandatory=False) + SCCRQ_AVPS), id="message-type-not-M"),
        pytest.param(l2tp2_control(0, avp(2, b"\x01\x00") + avp(0, b"\x00\x01")), id="message-type-not-first"),
        pytest.param(l2tp2_control(1, b"\x80\x20\x00\x00\x00\x07lab"), id="avp-longer-than-message"),
        pytest.param(l2tp2_control(1, b"\x80\x04\x00\x00"), id="avp-shorter-than-its-header"),
        pytest.param(l2tp2_control(1, b"\x84\x09\x00\x00\x00\x07lab"), id="avp-reserved-bits"),
    ],
)
def test_l2tp_control_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


def test_l2tp_length_field_must_be_the_datagram_length() -> None:
    good = l2tp2_control(1, SCCRQ_AVPS)
    assert detect_encap(good) is not None
    wrong = good[:2] + struct.pack("!H", len(good) + 2) + good[4:]
    assert detect_encap(wrong) is None
    for cut in range(len(good)):
        assert detect_encap(good[:cut]) is None, cut


def test_l2tpv2_data_message_with_ppp() -> None:
    for length in (False, True):
        d = detect_encap(l2tp2_data(LCP_CONFREQ, length=length))
        assert d is not None and d.kind == "tunnel.l2tp" and d.info["message"] == "data"
        assert "0xc021" in d.evidence
    ipcp = detect_encap(l2tp2_data(b"\xff\x03\x80\x21\x01\x01\x00\x04"))
    assert ipcp is not None


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(l2tp2_data(LCP_CONFREQ, tunnel=0), id="tunnel-id-0"),
        pytest.param(l2tp2_data(LCP_CONFREQ, session=0), id="session-id-0"),
        pytest.param(l2tp2_data(b"\xff\x03\x12\x34" + LCP_CONFREQ[4:]), id="unknown-ppp-protocol"),
        pytest.param(l2tp2_data(b"\xfe\x03" + LCP_CONFREQ[2:]), id="no-ppp-address-control"),
        pytest.param(l2tp2_data(LCP_CONFREQ, length=True) + b"\x00", id="length-field-wrong"),
        pytest.param(b"\x00\x12" + l2tp2_data(LCP_CONFREQ)[2:], id="reserved-bits"),
        pytest.param(b"\x00\x03" + l2tp2_data(LCP_CONFREQ)[2:], id="version-3-data"),
    ],
)
def test_l2tp_data_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


def test_l2tpv3_data_over_udp_with_an_ethernet_pseudowire() -> None:
    for cookie in (b"", b"\x11\x22\x33\x44", b"\x11\x22\x33\x44\x55\x66\x77\x88"):
        d = detect_encap(b"\x00\x03\x00\x00" + struct.pack("!I", 0x2A) + cookie + frame_ipv4())
        assert d is not None and d.kind == "tunnel.l2tp"
        assert d.info == {"version": "3", "message": "data", "transport": "udp"}
        assert f"{len(cookie)} bytes of cookie" in d.evidence
    ppp = detect_encap(b"\x00\x03\x00\x00" + struct.pack("!I", 7) + LCP_CONFREQ + bytes(4))
    assert ppp is not None and "PPP" in ppp.evidence
    assert detect_encap(b"\x00\x03\x00\x00" + bytes(4) + frame_ipv4()) is None  # session id 0
    assert detect_encap(b"\x00\x03\x00\x01" + struct.pack("!I", 0x2A) + frame_ipv4()) is None  # reserved
    assert detect_encap(b"\x00\x03\x00\x00" + struct.pack("!I", 0x2A) + bytes(16) + frame_ipv4()) is None  # > 8 + 4
    assert detect_encap(b"\x00\x03\x00\x00" + struct.pack("!I", 0x2A) + bad_checksum(frame_ipv4(), 14)) is None


def test_l2tpv3_directly_over_ip_protocol_115() -> None:
    from egressd.detect.tunnels import detect_ip_protocol

    ctrl = bytes(4) + l2tp3_control(1, avp(7, b"lac-ip") + avp(61, b"\x00\x00\x12\x34"))
    d = detect_ip_protocol(115, ctrl)
    assert d is not None and d.kind == "tunnel.l2tp" and d.info["transport"] == "ip"
    assert "L2TPv3 over IP (protocol 115) control message SCCRQ" in d.evidence
    data = struct.pack("!I", 0x2A) + b"\xaa\xbb\xcc\xdd" + frame_ipv4()  # 4-byte cookie
    dd = detect_ip_protocol(115, data)
    assert dd is not None and dd.info["message"] == "data" and "over IP (protocol 115)" in dd.evidence
    assert detect_ip_protocol(115, bytes(4) + l2tp2_control(1, SCCRQ_AVPS)) is None  # v2 never runs over IP
    assert detect_ip_protocol(115, bytes(4) + l2tp3_control(1)[:-1]) is None  # Length from the T bit
    assert detect_ip_protocol(115, bytes(4) + bad_checksum(frame_ipv4(), 14)) is None
    assert detect_ip_protocol(116, ctrl) is None


# -- VXLAN -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inner", "what"),
    [(frame_ipv4(), "IPv4 protocol 1"), (frame_arp(), "ARP request"), (frame_ipv6(), "IPv6 next header 58")],
)
def test_vxlan_with_each_inner_frame(inner: bytes, what: str) -> None:
    d = detect_encap(vxlan(inner, vni=0xABCDE))
    assert d is not None and d.kind == "tunnel.vxlan" and d.info["vni"] == str(0xABCDE)
    assert what in d.evidence


def test_vxlan_inner_vlan_tag_and_minimum_frame_padding() -> None:
    tagged = raw(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=100) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())
    d = detect_encap(vxlan(tagged))
    assert d is not None and "VLAN 100" in d.evidence
    arp = frame_arp()
    assert len(arp) == 42
    assert detect_encap(vxlan(arp + bytes(18))) is not None  # padded to 60 by a switch
    assert detect_encap(vxlan(arp + bytes(17))) is not None  # ARP's own length is fixed; trailing bytes unread
    short_ip = frame_ipv4(size=0)  # 14 + 28 bytes
    assert detect_encap(vxlan(short_ip + bytes(60 - len(short_ip)))) is not None
    assert detect_encap(vxlan(short_ip + bytes(5))) is None  # not padding: not to 60


def test_vxlan_gbp_and_gpe_extensions() -> None:
    gbp = detect_encap(bytes([0x88, 0x00]) + struct.pack("!HI", 0x1234, 42 << 8) + frame_ipv4())
    assert gbp is not None and gbp.kind == "tunnel.vxlan" and "group policy id 4660" in gbp.evidence
    gpe_ip = detect_encap(bytes([0x0C, 0, 0, 1]) + struct.pack("!I", 42 << 8) + ipv4_packet())
    assert gpe_ip is not None and "VXLAN-GPE" in gpe_ip.evidence
    gpe_eth = detect_encap(bytes([0x0C, 0, 0, 3]) + struct.pack("!I", 42 << 8) + frame_arp())
    assert gpe_eth is not None and gpe_eth.kind == "tunnel.vxlan"
    assert detect_encap(bytes([0x0C, 0, 0, 9]) + struct.pack("!I", 42 << 8) + ipv4_packet()) is None
    assert detect_encap(bytes([0x0C, 0, 0, 2]) + struct.pack("!I", 42 << 8) + ipv4_packet()) is None  # says IPv6


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(vxlan(frame_ipv4(), flags=0x09), id="reserved-flag-bit"),
        pytest.param(vxlan(frame_ipv4(), flags=0x18), id="reserved-flag-bit-high"),
        pytest.param(vxlan(frame_ipv4(), flags=0x00), id="no-I-bit"),
        pytest.param(vxlan(frame_ipv4(), rsv=b"\x00\x01\x00"), id="reserved-24-bits"),
        pytest.param(vxlan(frame_ipv4(), last=1), id="reserved-last-byte"),
        pytest.param(vxlan(bad_checksum(frame_ipv4(), 14)), id="inner-ipv4-checksum"),
        pytest.param(vxlan(frame_ipv4() + b"\x00" * 3), id="inner-length-mismatch"),
        pytest.param(vxlan(frame_ipv4()[:-1]), id="inner-truncated"),
        pytest.param(vxlan(frame_ipv4()[:6] + bytes([0x03]) + frame_ipv4()[7:]), id="multicast-source-mac"),
        pytest.param(vxlan(frame_ipv4()[:12] + b"\x88\xcc" + frame_ipv4()[14:]), id="unknown-ethertype"),
        pytest.param(vxlan(frame_arp()[:20] + b"\x00\x03" + frame_arp()[22:]), id="arp-opcode-3"),
        pytest.param(vxlan(frame_arp()[:22] + b"\x06" + frame_arp()[23:]), id="arp-sender-not-frame-source"),
        pytest.param(vxlan(b""), id="header-only"),
    ],
)
def test_vxlan_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


def test_vxlan_every_prefix_is_rejected() -> None:
    good = vxlan(frame_ipv4(size=80))
    assert detect_encap(good) is not None
    for cut in range(len(good)):
        assert detect_encap(good[:cut]) is None, cut


# -- GENEVE ----------------------------------------------------------------------------------------
def test_geneve_ethernet_with_and_without_options() -> None:
    d = detect_encap(geneve(frame_ipv4()))
    assert d is not None and d.kind == "tunnel.geneve" and d.info["vni"] == "7"
    opt = struct.pack("!HBB", 0x0102, 0x80, 1) + b"\xde\xad\xbe\xef"  # one option, one word of data
    d2 = detect_encap(geneve(frame_arp(), options=opt))
    assert d2 is not None and "8 bytes of options" in d2.evidence
    oam = detect_encap(geneve(frame_ipv6(), b1=0x80))
    assert oam is not None and "OAM" in oam.evidence


def test_geneve_carrying_ip_directly() -> None:
    d = detect_encap(geneve(ipv4_packet(), ptype=0x0800))
    assert d is not None and d.kind == "tunnel.geneve" and "IPv4" in d.evidence
    d6 = detect_encap(geneve(ipv6_packet(), ptype=0x86DD))
    assert d6 is not None and d6.kind == "tunnel.geneve"


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(geneve(frame_ipv4(), ver=1), id="version-1"),
        pytest.param(geneve(frame_ipv4(), b1=0x01), id="reserved-bits"),
        pytest.param(geneve(frame_ipv4(), ptype=0x1234), id="unknown-protocol-type"),
        pytest.param(geneve(bad_checksum(frame_ipv4(), 14)), id="inner-checksum"),
        pytest.param(
            geneve(frame_ipv4(), options=struct.pack("!HBB", 0x0102, 0x80, 2) + bytes(4)), id="option-overruns"
        ),
        pytest.param(
            geneve(frame_ipv4(), options=struct.pack("!HBB", 0x0102, 0x80, 0xE1) + bytes(4)), id="option-reserved"
        ),
        pytest.param(geneve(ipv4_packet(), ptype=0x86DD), id="ip-version-not-the-protocol-type"),
        pytest.param(geneve(frame_ipv4())[:-2], id="truncated"),
    ],
)
def test_geneve_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


# -- IP and Ethernet directly in UDP ------------------------------------------------------------
def test_ipv4_directly_in_udp() -> None:
    d = detect_encap(ipv4_packet())
    assert d is not None and d.kind == "tunnel.ip-in-udp" and d.info["encap"] == "direct"
    assert "10.92.0.2 -> 10.92.0.1" in d.evidence


def test_ipv6_extension_headers_that_hold_up() -> None:
    from scapy.layers.inet6 import ICMPv6MLReport2, IPv6ExtHdrHopByHop, RouterAlert

    mld = raw(IPv6(src="fe80::1", dst="ff02::16") / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport2())
    d = detect_encap(mld)
    assert d is not None and "next header 0" in d.evidence
    frag = raw(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=44) / (b"\x11\x00\x00\x01" + bytes(4) + bytes(16)))
    assert detect_encap(frag) is not None
    assert detect_encap(raw(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=59))) is not None


def test_ipv6_directly_in_udp() -> None:
    d = detect_encap(ipv6_packet())
    assert d is not None and d.kind == "tunnel.ip-in-udp" and d.info["carries"] == "IPv6"
    udp6 = raw(IPv6(src="2001:db8:5::2", dst="2001:db8:5::1") / UDP(sport=1, dport=2) / (b"x" * 30))
    assert detect_encap(udp6) is not None


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(bad_checksum(ipv4_packet()), id="ipv4-checksum"),
        pytest.param(ipv4_packet() + b"\x00", id="ipv4-trailing-byte"),
        pytest.param(ipv4_packet()[:-1], id="ipv4-truncated"),
        pytest.param(raw(IP(src="10.0.0.1", dst="10.0.0.2", flags=4) / ICMP()), id="ipv4-reserved-flag"),
        pytest.param(raw(IP(src="10.0.0.1", dst="10.0.0.2", ttl=0) / ICMP()), id="ipv4-ttl-0"),
        pytest.param(ipv6_packet() + b"\x00", id="ipv6-payload-length"),
        pytest.param(raw(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=253) / (b"z" * 20)), id="ipv6-next-header"),
        pytest.param(
            raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2, len=99) / b"x"), id="ipv6-udp-len"
        ),
        pytest.param(raw(IPv6(src="ff02::1", dst="2001:db8::2") / UDP(sport=1, dport=2)), id="ipv6-multicast-src"),
        pytest.param(ip6_ext(0, b"\xfd\x00" + bytes(6)), id="ipv6-hbh-next"),
        pytest.param(ip6_ext(60, b"\x3a\x05" + bytes(14)), id="ipv6-opt-len"),
        pytest.param(ip6_ext(44, b"\x11\x01" + bytes(14)), id="ipv6-frag-rsv"),
        pytest.param(ip6_ext(50, b"\x00\x00\x10\x01" + bytes(28)), id="ipv6-esp-first"),
        pytest.param(raw(IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=0) / ICMPv6EchoRequest()), id="ipv6-hlim-0"),
        pytest.param(ip6_ext(59, b"tail"), id="ipv6-no-next-data"),
    ],
)
def test_ip_in_udp_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


def test_gue_variant_0_and_gre_in_udp() -> None:
    gue = detect_encap(b"\x00\x04\x00\x00" + ipv4_packet())
    assert gue is not None and gue.info["encap"] == "gue"
    gue6 = detect_encap(b"\x01\x29\x00\x00" + bytes(4) + ipv6_packet())  # one extension word, proto 41
    assert gue6 is not None and gue6.info["encap"] == "gue"
    assert detect_encap(b"\x20\x04\x00\x00" + ipv4_packet()) is None  # C bit: a control message
    gre_key = detect_encap(b"\x20\x00\x08\x00" + b"\x00\x00\x00\x2a" + ipv4_packet())
    assert gre_key is not None and gre_key.info["encap"] == "gre"
    gre_eth = detect_encap(b"\x00\x00\x65\x58" + frame_ipv4())
    assert gre_eth is not None and "0x6558" in gre_eth.evidence
    assert detect_encap(b"\x00\x01\x08\x00" + ipv4_packet()) is None  # GRE version 1 is PPTP's, never in UDP


def test_tun_packet_information_prefix() -> None:
    d = detect_encap(b"\x00\x00\x08\x00" + ipv4_packet())
    assert d is not None and d.kind == "tunnel.ip-in-udp" and "TUN packet information" in d.evidence
    assert detect_encap(b"\x00\x00\x86\xdd" + ipv4_packet()) is None  # the EtherType must be the packet's


def test_bare_ethernet_frame_in_udp() -> None:
    d = detect_encap(frame_ipv4())
    assert d is not None and d.kind == "tunnel.ip-in-udp" and d.info["encap"] == "ethernet"
    arp = detect_encap(frame_arp())
    assert arp is not None and "ARP request" in arp.evidence
    assert detect_encap(bad_checksum(frame_ipv4(), 14)) is None


def test_teredo_keeps_ipv6_between_teredo_addresses() -> None:
    """A bare IPv6 packet between 2001:0::/32 addresses is Teredo's to call (tunnels.py: only
    with its indicators or port 3544); off port 3544 it stays unnamed, as before."""
    teredo = raw(IPv6(src="2001:0:4136:e378::1", dst="2001:db8::2") / UDP(sport=1, dport=2) / (b"x" * 8))
    assert detect_encap(teredo) is None
    assert detect_datagram(teredo, True, 40000, 51413) is None
    on_3544 = detect_datagram(teredo, True, 40000, 3544)
    assert on_3544 is not None and on_3544.kind == "tunnel.teredo"
    rs = raw(IPv6(src="fe80::ffff:ffff:fffe", dst="ff02::2") / ICMPv6ND_RS())  # RFC 4380 §5.2.1
    assert detect_encap(rs) is None
    other_ll = raw(IPv6(src="fe80::1", dst="ff02::2") / ICMPv6ND_RS())
    assert kind(detect_encap(other_ll)) == "tunnel.ip-in-udp"
    wrapped = detect_encap(vxlan(raw(Ether(src=MAC_A, dst=MAC_B, type=0x86DD)) + teredo))  # inside VXLAN: VXLAN's
    assert wrapped is not None and wrapped.kind == "tunnel.vxlan"
    plain = detect_datagram(ipv6_packet(), True, 40000, 3544)
    assert plain is not None and plain.kind == "tunnel.teredo"  # the Teredo port decides first


def test_the_udp_path_names_each_encapsulation() -> None:
    cases = {
        l2tp2_control(1, SCCRQ_AVPS): "tunnel.l2tp",
        vxlan(frame_arp()): "tunnel.vxlan",
        geneve(frame_ipv4()): "tunnel.geneve",
        ipv4_packet(): "tunnel.ip-in-udp",
    }
    for payload, want in cases.items():
        for from_originator in (True, False):
            assert kind(detect_datagram(payload, from_originator, 40000, 443)) == want


def ayiya(inner: bytes, b0: int = 0x41, b1: int = 0x52, b2: int = 0x11, nh: int = 41) -> bytes:
    """AYIYA: 16-byte integer identity, SHA-1 signature (5 words), shared secret, forward."""
    sig = os.urandom(4 * (b1 >> 4))
    return bytes([b0, b1, b2, nh]) + struct.pack("!I", 1_700_000_000) + os.urandom(1 << (b0 >> 4)) + sig + inner


def test_ayiya_forwarding_ipv6() -> None:
    d = detect_encap(ayiya(ipv6_packet()))
    assert d is not None and d.kind == "tunnel.ip-in-udp" and d.info["encap"] == "ayiya"
    assert "44 bytes" in d.evidence
    md5 = detect_encap(ayiya(ipv4_packet(), b1=0x41, nh=4))  # MD5 signature (4 words), IPv4 inside
    assert md5 is not None and md5.info["carries"] == "IPv4"


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(ayiya(ipv6_packet(), b1=0x53), id="unknown-hash-method"),
        pytest.param(ayiya(ipv6_packet(), b1=0x42), id="signature-length-not-the-hash"),
        pytest.param(ayiya(ipv6_packet(), b2=0x10), id="opcode-noop"),
        pytest.param(ayiya(ipv6_packet(), b2=0x31), id="unknown-auth-method"),
        pytest.param(ayiya(ipv6_packet(), nh=4), id="next-header-not-the-packet"),
        pytest.param(ayiya(ipv6_packet() + b"\x00"), id="inner-length"),
    ],
)
def test_ayiya_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


def fastd_record(rtype: int, value: bytes) -> bytes:
    """A fastd handshake record (src/handshake.h): little-endian type and length, the value."""
    return struct.pack("<HH", rtype, len(value)) + value


def fastd_handshake(kind_: int = 1, extra: bytes = b"") -> bytes:
    records = (
        fastd_record(0, bytes([kind_]))  # RECORD_HANDSHAKE_TYPE
        + fastd_record(3, b"\x01")  # RECORD_FLAGS
        + fastd_record(4, b"\x01")  # RECORD_MODE: tun
        + fastd_record(13, b"v22")  # RECORD_VERSION_NAME
        + fastd_record(5, b"ec25519-fhmqvc")  # RECORD_PROTOCOL_NAME
        + fastd_record(6, os.urandom(32))  # sender key
        + fastd_record(7, os.urandom(32))  # recipient key
        + fastd_record(8, os.urandom(32))  # sender handshake key
        + extra
    )
    return b"\x01\x00" + struct.pack("!H", len(records)) + records


def test_fastd_handshake_init_names_protocol_and_version() -> None:
    d = detect_encap(fastd_handshake())
    assert d is not None and d.kind == "tunnel.fastd"
    assert d.info == {"version": "v22", "protocol": "ec25519-fhmqvc"}
    assert "init" in d.evidence and "'tun'" in d.evidence


def test_fastd_reply_with_method_and_behind_the_l2tp_header() -> None:
    reply = fastd_handshake(2, fastd_record(14, b"salsa2012+umac") + fastd_record(11, b"\x78\x05"))
    d = detect_encap(reply)
    assert d is not None and d.kind == "tunnel.fastd" and "reply" in d.evidence
    wrapped = b"\xc8\x03\x00\x0c" + bytes(8) + fastd_handshake(3, fastd_record(12, b"salsa2012+umac"))
    w = detect_encap(wrapped)
    assert w is not None and w.kind == "tunnel.fastd" and w.info["method"] == "salsa2012+umac"
    assert "L2TPv3" in w.evidence


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(fastd_handshake()[:-1], id="truncated"),
        pytest.param(fastd_handshake() + b"\x00", id="trailing-byte"),
        pytest.param(b"\x02" + fastd_handshake()[1:], id="data-packet-type"),
        pytest.param(b"\x01\x01" + fastd_handshake()[2:], id="reserved-byte"),
        pytest.param(fastd_handshake(kind_=4), id="unknown-handshake-type"),
        pytest.param(fastd_handshake()[:4] + b"\x03\x00" + fastd_handshake()[6:], id="first-record-not-type"),
        pytest.param(fastd_handshake(extra=fastd_record(40, b"x")), id="unknown-record-type"),
        pytest.param(fastd_handshake(extra=b"\x05\x00\x10\x00abc"), id="record-overruns"),
        pytest.param(b"\xc8\x03\x00\x0c" + bytes(7) + b"\x01" + fastd_handshake(), id="l2tp-prefix-not-zero"),
    ],
)
def test_fastd_negatives(broken: bytes) -> None:
    assert detect_encap(broken) is None


# -- the real programs' datagrams ------------------------------------------------------------
REAL = Path(__file__).resolve().parents[1] / "pcaps" / "tunnels"


@pytest.mark.parametrize(
    ("capture", "want", "every"),
    [
        ("l2tp-xl2tpd", "tunnel.l2tp", True),
        ("vxlan-kernel", "tunnel.vxlan", True),
        ("vxlan-kernel-8472", "tunnel.vxlan", True),
        ("ip-in-udp-quicktun-raw-tun", "tunnel.ip-in-udp", True),
        ("ip-in-udp-quicktun-raw-tap", "tunnel.ip-in-udp", True),
        ("fastd-salsa2012-umac", "tunnel.fastd", False),  # its data packets are encrypted
        ("ip-in-udp-socat-tun", "tunnel.ip-in-udp", True),
        ("ip-in-udp-socat-tun-no-pi", "tunnel.ip-in-udp", True),
        ("benign-udp-iperf3", None, True),  # ~230 datagrams of random bytes: none is anything
    ],
)
def test_every_datagram_of_the_real_sessions(capture: str, want: str | None, every: bool) -> None:
    """Not only the first datagram: any of them names the tunnel, so a flow picked up mid-way
    (a daemon restarted under a running tunnel) is named too. fastd: its four handshake packets."""
    kinds = []
    for _ts, frame in Reader(REAL / f"{capture}.pcap"):
        p = decode(frame)
        if isinstance(p, Packet) and p.proto == PROTO_UDP:
            kinds.append(kind(detect_encap(p.payload)))
    assert len(kinds) >= 4
    if every:
        assert set(kinds) == {want}, kinds
    else:
        assert kinds[:4] == [want] * 4 and set(kinds[4:]) == {None}, kinds


# -- benign datagrams ------------------------------------------------------------------------------
def _quic_initial() -> bytes:
    dcid = os.urandom(8)
    return bytes([0xC3]) + b"\x00\x00\x00\x01" + bytes([8]) + dcid + b"\x00\x00\x44\xd0" + os.urandom(1180)


BENIGN = {
    "dns-query": (raw(DNS(id=0x4500, rd=1, qd=DNSQR(qname="example.com"))), 53000, 53),
    "mdns-query": (raw(DNS(id=0, qd=DNSQR(qname="_services._dns-sd._udp.local", qtype="PTR"))), 5353, 5353),
    "quic-initial": (_quic_initial(), 50000, 443),
    "quic-v2": (bytes([0xD0]) + b"\x6b\x33\x43\xcf\x08" + os.urandom(1195), 50000, 443),
    "ntp-client": (b"\x23" + bytes(39) + os.urandom(8), 123, 123),
    "ntp-server": (b"\x24\x02\x00\xe9" + os.urandom(44), 123, 123),
    "ssdp": (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n"
             b"ST: ssdp:all\r\n\r\n", 50000, 1900),
    "stun-binding": (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12), 50000, 3478),
    "stun-binding-attrs": (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + os.urandom(12) + b"\x80\x22\x00\x04test",
                           50000, 19302),
    "syslog": (b"<34>1 2026-12-05T12:00:00Z node egressd - - - hello", 514, 514),
    "l2tp-port-garbage": (os.urandom(64), 1701, 1701),
}


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_datagrams_are_not_encapsulations(name: str) -> None:
    payload, sport, dport = BENIGN[name]
    assert detect_encap(payload) is None
    assert detect_datagram(payload, True, sport, dport) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_and_are_not_named(data: bytes) -> None:
    assert detect_encap(data) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"\xc8\x02", b"\xc8\x03", b"\x08\x00", b"\x00\x00", b"\x45\x00"]))
def test_headers_followed_by_arbitrary_bytes_never_raise(tail: bytes, head: bytes) -> None:
    d = detect_encap(head + tail)
    assert d is None or d.kind.startswith("tunnel.")
