"""Encapsulations that carry a link or a network in UDP (L2TP, VXLAN, GENEVE, IP or Ethernet
in UDP) and fastd's handshake.

Why these, and why from one datagram: each wraps a packet or frame whose own header is
checkable (an IPv4 header checksum, an IPv6 payload length and the header behind it, an
Ethernet type and the packet behind it), or opens with a message whose every length field must
add up to what arrived. A datagram passes only by a coincidence of several fields: none of 7
million random datagrams did (6 million of them starting with the first bytes of one of these
headers). No port is required: the ports are conventions (1701, 4789, 8472, 6081, 5555, 2998,
5072, 10000), and a tunnel moved off them is the case that matters.

* L2TPv2 (RFC 2661 §3.1 header, §4.1 AVP format, §3.2 message types): a control message has
  T=1, L=1, S=1, O=0, P=0, the reserved bits zero and Ver=2 (``c8 02``), a Length equal to the
  datagram's, tunnel and session id, Ns/Nr, then AVPs whose lengths add up to the end; the
  first is the Message Type AVP (M bit, not hidden, length 8, vendor 0, attribute 0) with a
  defined type (SCCRQ = 1 opens a tunnel). A header with no AVPs is a ZLB acknowledgement
  (§5.8), taken only inside a tunnel (tunnel id not 0). A data message (T=0) is taken with its
  optional fields laid out by its flag bits, non-zero tunnel and session ids and, right after
  the header, a PPP frame (RFC 1661/1662: ``ff 03`` and a known PPP protocol).
* L2TPv3 over UDP (RFC 3931 §4.1.2.1, §3.2.1): the control header T=1, L=1, S=1, Ver=3
  (``c8 03``), Length equal to the datagram's, the 32-bit Control Connection ID, Ns/Nr, then
  the same AVP walk (§5.1) with the Message Type AVP first (ACK = 20 added to the types).
  A v3 data message over UDP (§4.1.2.1, §4.1: ``00 03 00 00``, a non-zero session id, a cookie of
  0, 4 or 8 bytes and an optional 4-byte sublayer) is taken when what follows is an Ethernet
  frame that holds up (Linux's ``ip l2tp`` Ethernet pseudowires) or a PPP frame.
  L2TPv3 directly over IP (protocol 115, §4.1.1; called from tunnels.detect_ip_protocol):
  32 zero bits then the same control message, or a non-zero session id then the same data.
* VXLAN (RFC 7348 §5): an 8-byte header, flags ``08`` (the I bit alone) and every reserved
  bit zero, a 24-bit VNI, then an inner Ethernet frame that holds up (below). Linux's two
  extensions with their own flag bits: Group Policy (``88``, draft-smith-vxlan-group-policy
  §2.1: only the D and A bits beside the 16-bit group id) and VXLAN-GPE (``0c``, draft-ietf-
  nvo3-vxlan-gpe §3.2: version 0, next protocol 1 IPv4, 2 IPv6 or 3 Ethernet).
* GENEVE (RFC 8926 §3.4, §3.5): version 0, the option length in 4-byte words, the six
  reserved bits zero, protocol type ``6558`` (Transparent Ethernet Bridging) or an IP
  EtherType, the last reserved byte zero, and options whose own lengths fill the option
  length exactly; then the inner frame or packet.
* IP directly in UDP: an IPv4 header (RFC 791 §3.1) with version 4, IHL >= 5, a correct
  header checksum and a total length equal to the datagram, or an IPv6 header (RFC 8200 §3)
  whose payload length fills the datagram, a known next header and an inner header that
  agrees (TCP, UDP, ICMPv6; an extension header of §4 with a known next header and a length
  inside the payload) and a hop limit. This is Linux FOU's direct encapsulation, GUE variant
  1 (draft-ietf-intarea-gue §4: the first two bits 01 *are* the IP version nibble) and VPNs
  that relay a TUN device's packets raw (quicktun's ``raw`` protocol in TUN mode,
  ``proto.raw.c``; socat's ``TUN:`` address joined to ``UDP:``); with the 4-byte
  TUN packet information in front (quicktun ``USE_PI``: flags 0, the EtherType), and as an
  Ethernet frame (quicktun's default TAP mode). Also GUE variant 0 (a 4-byte header, C=0,
  Hlen extension words, IP protocol 4 or 41) and GRE-in-UDP (RFC 8086 §3: a GRE header,
  RFC 2784/2890, version 0, then the carried protocol). And AYIYA (draft-massar-v6ops-
  ayiya-02 §4, SixXS's AICCU): identity length 2^n, a signature length that is its hash's
  (none, MD5, SHA-1), a known authentication method, the forward opcode, then the IPv6 (or
  IPv4) packet its next header names, filling the datagram. An IPv6 packet between Teredo
  addresses (2001:0::/32), or from a Teredo client's link-local address (RFC 4380 §5.2.1), is
  left to the Teredo check in tunnels.py, which calls only what carries Teredo's framing or
  port.
* fastd (v22 ``src/handshake.h``): a handshake packet is type 1, a zero reserved byte, a
  big-endian length equal to the rest, then little-endian type/length records that end exactly
  at the end, the handshake type (init, reply, finish) first; its protocol, method and
  version names are plain text. v22 also sends each handshake behind an L2TPv3 control
  header of length 12 (seen in the lab capture), which is taken too.

An inner Ethernet frame holds up when its source MAC is unicast and its EtherType (after at
most one 802.1Q/802.1ad tag) is IPv4 or IPv6 with a header as above (a frame padded to the
60-byte minimum may be longer than its packet), or ARP (RFC 826) for IPv4 over Ethernet with
an opcode 1/2 and a sender MAC equal to the frame's source.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from typing import Final

from egressd.detect.base import (
    TUNNEL_FASTD,
    TUNNEL_GENEVE,
    TUNNEL_IP_IN_UDP,
    TUNNEL_L2TP,
    TUNNEL_VXLAN,
    Detection,
    printable,
)

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
# One struct per IPv4 header length (IHL 5..15): the header's 16-bit words, for the checksum.
_IP4_WORDS: Final = tuple(struct.Struct(f"!{ihl * 2}H") for ihl in range(16))

_ETH_IPV4: Final = 0x0800
_ETH_IPV6: Final = 0x86DD
_ETH_ARP: Final = 0x0806
_ETH_VLAN: Final = frozenset({0x8100, 0x88A8})
_ETH_BRIDGING: Final = 0x6558  # Transparent Ethernet Bridging (GENEVE, GRE)
_VXLAN_FLAGS: Final = frozenset({0x08, 0x88, 0x0C})  # I; I with G (group policy); I with P (GPE)
# fastd (src/handshake.h, v22): a handshake packet is type 1, a reserved zero byte and the
# big-endian length of the records after them; each record a little-endian type and length.
_FASTD_HANDSHAKE: Final = 1
_FASTD_RECORD_MAX: Final = 32  # v22 defines 16 (RECORD_MAX); later versions may add a few
_FASTD_KINDS: Final = {1: "init", 2: "reply", 3: "finish"}
_FASTD_TEXT: Final = {4: "mode", 5: "protocol", 12: "method", 13: "version", 14: "methods"}
# The same handshake behind an L2TPv3 control header of length 12 (v22, which can offload its
# data to the kernel's L2TP, sends both forms): flags c803, length 12, connection id 0, Ns/Nr 0.
_FASTD_L2TP_PREFIX: Final = b"\xc8\x03\x00\x0c" + bytes(8)
# AYIYA hash method -> signature length in words: none, MD5 (16 bytes), SHA-1 (20 bytes).
_AYIYA_SIGNATURES: Final = frozenset({(0, 0), (1, 4), (2, 5)})
_GENEVE_TYPES: Final = frozenset({b"\x65\x58", b"\x08\x00", b"\x86\xdd"})
_FRAME_TYPES: Final = frozenset({b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00", b"\x88\xa8"})
_ETH_MIN_FRAME: Final = 60  # without the FCS: shorter frames are padded to it

# IPv6 next headers a real packet opens with, each of which can be checked: hop-by-hop (MLD),
# TCP, UDP, routing, fragment, ICMPv6, no next header, destination options. (ESP and AH
# first, IPsec inside a raw tunnel, would leave only an SPI to check: not taken.)
_IP6_NEXT: Final = frozenset({0, 6, 17, 43, 44, 58, 59, 60})
_IP6_OPTIONS: Final = frozenset({0, 43, 60})  # extension headers with (length + 1) * 8 bytes
_ICMP6_TYPES: Final = frozenset({1, 2, 3, 4, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 143})
_TEREDO_PREFIX: Final = b"\x20\x01\x00\x00"
# RFC 4380 §5.2.1: the link-local sources of a Teredo client's router solicitations (cone, restricted).
_TEREDO_LINK_LOCAL: Final = frozenset(
    ipaddress.IPv6Address(a).packed for a in ("fe80::8000:ffff:ffff:fffd", "fe80::ffff:ffff:fffe")
)

# L2TP (RFC 2661 §3.1, RFC 3931 §3.2.1): control headers are exactly these flag words.
_L2TP2_CTRL: Final = 0xC802
_L2TP3_CTRL: Final = 0xC803
_L2TP_DATA_BITS: Final = 0x4B02  # L, S, O, P may be set in a v2 data message; Ver 2
_L2TP3_DATA: Final = b"\x00\x03\x00\x00"  # v3 data over UDP: T=0, reserved zero, Ver 3, reserved
_L2TP3_EXTRA: Final = tuple(cookie + sublayer for cookie in (0, 4, 8) for sublayer in (0, 4))
_L2TP_TYPE_AVP: Final = b"\x80\x08\x00\x00\x00\x00"  # M=1, H=0, length 8, vendor 0, attribute 0
_L2TP2_TYPES: Final = {
    1: "SCCRQ", 2: "SCCRP", 3: "SCCCN", 4: "StopCCN", 6: "HELLO", 7: "OCRQ", 8: "OCRP", 9: "OCCN",
    10: "ICRQ", 11: "ICRP", 12: "ICCN", 14: "CDN", 15: "WEN", 16: "SLI",
}  # fmt: skip
_L2TP3_TYPES: Final = {**_L2TP2_TYPES, 20: "ACK"}
_L2TP_HOST_NAME: Final = 7  # AVP attribute 7, Host Name
_L2TP_VENDOR_NAME: Final = 8
# PPP protocols a first PPP frame carries (RFC 1661 and the NCP RFCs): LCP, PAP, CHAP, EAP,
# IPCP, IPv6CP, CCP, IPv4, IPv6.
_PPP_PROTOCOLS: Final = frozenset({0xC021, 0xC023, 0xC223, 0xC227, 0x8021, 0x8057, 0x80FD, 0x0021, 0x0057})


def detect_encap(p: bytes) -> Detection | None:
    """A UDP datagram that is L2TP, VXLAN, GENEVE, an IP packet or Ethernet frame in UDP, or a
    fastd handshake; None for anything else. Never raises (every read is bounds-checked)."""
    n = len(p)
    if n < 12:
        return None
    b0 = p[0]
    if b0 == 0xC8:
        det = _l2tp_control(p, n)
        if det is None and p.startswith(_FASTD_L2TP_PREFIX):
            det = _fastd(p, 12, n)
        if det is not None:
            return det
    elif b0 in _VXLAN_FLAGS:
        det = _vxlan(p, n)
        if det is not None:
            return det
    elif b0 >> 4 in (4, 6):
        what = _ip_exact(p, 0, n)
        if what is not None and not (b0 >> 4 == 6 and _teredo_owned(p)):
            return _in_udp(
                what,
                "direct",
                "an IP packet directly (Linux FOU, GUE variant 1, a TUN device relayed raw: quicktun, socat)",
            )
    elif b0 < 0x40:
        # Cheap gates first (a new UDP flow's first datagram passes here): the byte each needs.
        det = _fastd(p, 0, n) if b0 == 1 else None
        if det is None and p[2:4] in _GENEVE_TYPES:
            det = _geneve(p, n)
        if det is None and p[1] in (4, 41):
            det = _gue0(p, n)
        if det is not None:
            return det
    if p[1] == 0x02 and b0 & 0x80 == 0:
        det = _l2tp_data(p, n)
        if det is not None:
            return det
    if p[:4] == _L2TP3_DATA:
        det = _l2tp3_data(p, n)
        if det is not None:
            return det
    if p[1] == 0 and b0 & 0x4F == 0:
        det = _gre_in_udp(p, n)
        if det is not None:
            return det
    if p[3] in (4, 41):
        det = _ayiya(p, n)
        if det is not None:
            return det
    what = _ether(p, 0, n) if p[12:14] in _FRAME_TYPES else None
    if what is not None:
        return _in_udp(what, "ethernet", "a bare Ethernet frame (a TAP device's: quicktun raw in TAP mode)")
    return None


def _in_udp(what: str, encap: str, how: str) -> Detection:
    return Detection(
        TUNNEL_IP_IN_UDP, f"UDP carrying {how}; inside: {what}", info={"encap": encap, "carries": what.split(" ", 1)[0]}
    )


# -- inner packets and frames ------------------------------------------------------------------
def _ipv4(p: bytes, off: int, end: int) -> str | None:
    """An IPv4 header at ``off`` that holds up; its total length may fall short of ``end``
    (the caller decides whether padding is allowed). Returns ``IPv4 <proto> a -> b``."""
    if end - off < 20:
        return None
    b = p[off]
    ihl = b & 0x0F
    if b >> 4 != 4 or ihl < 5 or end - off < ihl * 4:
        return None
    total = _U16.unpack_from(p, off + 2)[0]
    if total < ihl * 4 or total > end - off or p[off + 6] & 0x80 or p[off + 8] == 0:
        return None  # shorter than its header, longer than what arrived, the reserved flag, TTL 0
    s = sum(_IP4_WORDS[ihl].unpack_from(p, off))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    if s != 0xFFFF:
        return None
    src = ".".join(str(x) for x in p[off + 12 : off + 16])
    dst = ".".join(str(x) for x in p[off + 16 : off + 20])
    return f"IPv4 protocol {p[off + 9]} {src} -> {dst}"


def _ipv6(p: bytes, off: int, end: int) -> str | None:
    """An IPv6 header at ``off`` that holds up (its payload may fall short of ``end``)."""
    if end - off < 40 or p[off] >> 4 != 6:
        return None
    plen = _U16.unpack_from(p, off + 4)[0]
    nxt = p[off + 6]
    if plen + 40 > end - off or nxt not in _IP6_NEXT or p[off + 7] == 0 or p[off + 8] == 0xFF:
        return None  # longer than what arrived, an unknown first header, hop limit 0, a multicast source
    l4 = off + 40
    if nxt == 17 and (plen < 8 or _U16.unpack_from(p, l4 + 4)[0] != plen):
        return None  # the UDP length must be the payload length
    if nxt == 6 and (plen < 20 or not 5 <= p[l4 + 12] >> 4 <= plen // 4):
        return None  # a TCP data offset inside the payload
    if nxt == 58 and (plen < 4 or p[l4] not in _ICMP6_TYPES):
        return None
    if nxt in _IP6_OPTIONS and (plen < 8 or p[l4] not in _IP6_NEXT or (p[l4 + 1] + 1) * 8 > plen):
        return None  # hop-by-hop, routing, destination options: a known next header, a length inside
    if nxt == 44 and (plen < 8 or p[l4] not in _IP6_NEXT or p[l4 + 1] != 0):
        return None  # a fragment header: a known next header, the reserved byte zero
    if nxt == 59 and plen:
        return None  # no next header: nothing follows
    return f"IPv6 next header {nxt}"


def _teredo_owned(p: bytes) -> bool:
    """A bare IPv6 packet that is Teredo's to call (tunnels.py, only with Teredo's framing or
    port): to or from 2001:0::/32, or a client's qualification from its RFC 4380 §5.2.1
    link-local address."""
    return p[8:12] == _TEREDO_PREFIX or p[24:28] == _TEREDO_PREFIX or p[8:24] in _TEREDO_LINK_LOCAL


def _ip_exact(p: bytes, off: int, end: int) -> str | None:
    """An IPv4 or IPv6 packet that fills ``p[off:end]`` exactly."""
    if p[off] >> 4 == 4:
        what = _ipv4(p, off, end)
        if what is not None and _U16.unpack_from(p, off + 2)[0] == end - off:
            return what
        return None
    what = _ipv6(p, off, end)
    if what is not None and _U16.unpack_from(p, off + 4)[0] + 40 == end - off:
        return what
    return None


def _ip_of_type(p: bytes, off: int, end: int, ptype: int) -> str | None:
    """``_ip_exact`` for a header that named the EtherType: the IP version must be that one."""
    if p[off] >> 4 != (4 if ptype == _ETH_IPV4 else 6):
        return None
    return _ip_exact(p, off, end)


def _ether(p: bytes, off: int, end: int) -> str | None:
    """An Ethernet frame at ``off`` (to ``end``) whose source is unicast and whose payload holds up."""
    if end - off < 14 or p[off + 6] & 0x01:
        return None
    etype = _U16.unpack_from(p, off + 12)[0]
    pay = off + 14
    vlan = ""
    if etype in _ETH_VLAN:
        if end - off < 18:
            return None
        vlan = f" VLAN {_U16.unpack_from(p, off + 14)[0] & 0x0FFF}"
        etype = _U16.unpack_from(p, off + 16)[0]
        pay = off + 18
    padded = end - off == _ETH_MIN_FRAME  # a short frame padded to the minimum
    if etype == _ETH_IPV4:
        what = _ipv4(p, pay, end)
        if what is None or (_U16.unpack_from(p, pay + 2)[0] != end - pay and not padded):
            return None
    elif etype == _ETH_IPV6:
        what = _ipv6(p, pay, end)
        if what is None or (_U16.unpack_from(p, pay + 4)[0] + 40 != end - pay and not padded):
            return None
    elif etype == _ETH_ARP:
        # Ethernet/IPv4 ARP (RFC 826): htype 1, ptype 0800, hlen 6, plen 4, request or reply,
        # the sender's hardware address the frame's source.
        if (
            end - pay < 28
            or p[pay : pay + 6] != b"\x00\x01\x08\x00\x06\x04"
            or p[pay + 6 : pay + 8]
            not in (
                b"\x00\x01",
                b"\x00\x02",
            )
        ):
            return None
        if p[pay + 8 : pay + 14] != p[off + 6 : off + 12]:
            return None
        what = "ARP " + ("request" if p[pay + 7] == 1 else "reply")
    else:
        return None
    return f"Ethernet{vlan} {what}"


# -- L2TP --------------------------------------------------------------------------------------
def _l2tp_control(p: bytes, n: int) -> Detection | None:
    flags, length = _U16.unpack_from(p, 0)[0], _U16.unpack_from(p, 2)[0]
    if length != n or flags not in (_L2TP2_CTRL, _L2TP3_CTRL):
        return None
    v3 = flags == _L2TP3_CTRL
    ids = (
        f"control connection id {_U32.unpack_from(p, 4)[0]}"
        if v3
        else f"tunnel id {_U16.unpack_from(p, 4)[0]}, session id {_U16.unpack_from(p, 6)[0]}"
    )
    ver = "L2TPv3" if v3 else "L2TPv2"
    if n == 12:
        if p[4 : 8 if v3 else 6] == (b"\x00\x00\x00\x00" if v3 else b"\x00\x00"):
            return None  # an acknowledgement belongs to a tunnel that exists
        return Detection(TUNNEL_L2TP, f"{ver} control message ZLB acknowledgement, {ids}", confidence=0.8,
                         info={"version": ver[-1], "message": "ZLB"})  # fmt: skip
    if n < 20 or p[12:18] != _L2TP_TYPE_AVP:
        return None
    mtype = _U16.unpack_from(p, 18)[0]
    name = (_L2TP3_TYPES if v3 else _L2TP2_TYPES).get(mtype)
    if name is None:
        return None
    # Every AVP (RFC 2661 §4.1): M, H, 4 reserved bits zero, a 10-bit length >= 6 covering the
    # header; together they must end where the message ends.
    pos = 20
    host = vendor = b""
    while pos < n:
        if n - pos < 6:
            return None
        word = _U16.unpack_from(p, pos)[0]
        alen = word & 0x03FF
        if word & 0x3C00 or alen < 6 or pos + alen > n:
            return None
        if p[pos + 2 : pos + 4] == b"\x00\x00" and not word & 0x4000:
            attr = _U16.unpack_from(p, pos + 4)[0]
            if attr == _L2TP_HOST_NAME:
                host = p[pos + 6 : pos + alen]
            elif attr == _L2TP_VENDOR_NAME:
                vendor = p[pos + 6 : pos + alen]
        pos += alen
    extra = "".join(f", {label} {printable(v, 40)!r}" for label, v in (("host name", host), ("vendor", vendor)) if v)
    info = {"version": ver[-1], "message": name}
    if host:
        info["host"] = printable(host, 64)
    if vendor:
        info["vendor"] = printable(vendor, 64)
    return Detection(TUNNEL_L2TP, f"{ver} control message {name} (message type {mtype}), {ids}{extra}", info=info)


def _l2tp_data(p: bytes, n: int) -> Detection | None:
    """An L2TPv2 data message (T=0): its optional fields, then a PPP frame."""
    flags = _U16.unpack_from(p, 0)[0]
    if flags & ~_L2TP_DATA_BITS & 0xFFFF:
        return None
    pos = 2
    if flags & 0x4000:
        if _U16.unpack_from(p, 2)[0] != n:
            return None
        pos = 4
    tunnel, session = _U16.unpack_from(p, pos)[0], _U16.unpack_from(p, pos + 2)[0]
    pos += 4
    if flags & 0x0800:
        pos += 4
    if flags & 0x0200:
        if n - pos < 2:
            return None
        pos += 2 + _U16.unpack_from(p, pos)[0]
    if not tunnel or not session or n - pos < 5 or p[pos : pos + 2] != b"\xff\x03":
        return None
    proto = _U16.unpack_from(p, pos + 2)[0]
    if proto not in _PPP_PROTOCOLS:
        return None
    return Detection(
        TUNNEL_L2TP,
        f"L2TPv2 data message, tunnel id {tunnel}, session id {session}, a PPP frame (protocol 0x{proto:04x})",
        info={"version": "2", "message": "data"},
    )


def _l2tp3_data(p: bytes, n: int, base: int = 8, over: str = "UDP") -> Detection | None:
    """An L2TPv3 data message (RFC 3931 §4.1): a non-zero session id (ending at ``base``: after
    the 4-byte UDP header of §4.1.2.1, or first over IP, §4.1.1.1), an optional cookie (0, 4
    or 8 bytes) and L2-specific sublayer (0 or 4), then the pseudowire's frame: Ethernet
    (Linux ``ip l2tp``) or PPP. The first offset whose frame holds up wins."""
    session = _U32.unpack_from(p, base - 4)[0]
    if not session:
        return None
    for extra in _L2TP3_EXTRA:
        off = base + extra
        if n - off < 14:
            break
        what = _ether(p, off, n)
        if what is None and p[off : off + 2] == b"\xff\x03" and _U16.unpack_from(p, off + 2)[0] in _PPP_PROTOCOLS:
            what = f"PPP (protocol 0x{_U16.unpack_from(p, off + 2)[0]:04x})"
        if what is not None:
            return Detection(
                TUNNEL_L2TP,
                f"L2TPv3 data message over {over}, session id {session}, {extra} bytes of cookie/sublayer, "
                f"carrying {what}",
                info={"version": "3", "message": "data", "transport": over.split(" ", 1)[0].lower()},
            )
    return None


def detect_l2tp_ip(payload: bytes) -> Detection | None:
    """L2TPv3 directly over IP, protocol 115 (RFC 3931 §4.1.1): a control message is 32 zero
    bits and then the same control header and AVPs as over UDP (its Length counts from the T
    bit); a data message is a non-zero session id, then as over UDP."""
    if len(payload) < 16:
        return None
    if payload[:4] == b"\x00\x00\x00\x00":
        if payload[4:6] != b"\xc8\x03":
            return None
        det = _l2tp_control(payload[4:], len(payload) - 4)
        if det is None:
            return None
        return replace(
            det,
            evidence=det.evidence.replace("L2TPv3 control", "L2TPv3 over IP (protocol 115) control", 1),
            info={**det.info, "transport": "ip"},
        )
    return _l2tp3_data(payload, len(payload), base=4, over="IP (protocol 115)")


# -- VXLAN, GENEVE -----------------------------------------------------------------------------
def _vxlan(p: bytes, n: int) -> Detection | None:
    if p[7] != 0:
        return None
    b0 = p[0]
    if b0 == 0x08 and p[1:4] == b"\x00\x00\x00":
        what, variant = _ether(p, 8, n), "VXLAN"
    elif b0 == 0x88 and not p[1] & 0xB7:
        what, variant = _ether(p, 8, n), f"VXLAN-GBP (group policy id {_U16.unpack_from(p, 2)[0]})"
    elif b0 == 0x0C and p[1:3] == b"\x00\x00" and p[3] in (1, 2, 3):
        what = _ether(p, 8, n) if p[3] == 3 else _ip_of_type(p, 8, n, _ETH_IPV4 if p[3] == 1 else _ETH_IPV6)
        variant = f"VXLAN-GPE (next protocol {p[3]})"
    else:
        return None
    if what is None:
        return None
    vni = _U32.unpack_from(p, 4)[0] >> 8
    return Detection(
        TUNNEL_VXLAN, f"{variant} header (flags {b0:02x}, VNI {vni}) carrying {what}", info={"vni": str(vni)}
    )


def _geneve(p: bytes, n: int) -> Detection | None:
    opt_len = (p[0] & 0x3F) * 4
    hdr = 8 + opt_len
    if p[1] & 0x3F or p[7] != 0 or n <= hdr:
        return None
    ptype = _U16.unpack_from(p, 2)[0]
    if ptype not in (_ETH_BRIDGING, _ETH_IPV4, _ETH_IPV6):
        return None
    pos = 8
    while pos < hdr:  # options (§3.5): class, type, 3 reserved bits zero, length in words
        if hdr - pos < 4 or p[pos + 3] & 0xE0:
            return None
        pos += 4 + (p[pos + 3] & 0x1F) * 4
    if pos != hdr:
        return None
    what = _ether(p, hdr, n) if ptype == _ETH_BRIDGING else _ip_of_type(p, hdr, n, ptype)
    if what is None:
        return None
    vni = _U32.unpack_from(p, 4)[0] >> 8
    oam = ", OAM" if p[1] & 0x80 else ""
    return Detection(
        TUNNEL_GENEVE,
        f"GENEVE header (version 0, {opt_len} bytes of options, VNI {vni}{oam}) carrying {what}",
        info={"vni": str(vni)},
    )


# -- GUE, GRE in UDP ---------------------------------------------------------------------------
def _gue0(p: bytes, n: int) -> Detection | None:
    """GUE variant 0 data (C=0): proto 4 or 41 after the header and its extension words."""
    if p[0] & 0x20 or p[1] not in (4, 41):
        return None
    hdr = 4 + (p[0] & 0x1F) * 4
    if n <= hdr or (p[hdr] >> 4) != (4 if p[1] == 4 else 6):
        return None
    what = _ip_exact(p, hdr, n)
    if what is None:
        return None
    return _in_udp(what, "gue", f"GUE variant 0 (a {hdr}-byte header naming IP protocol {p[1]})")


def _gre_in_udp(p: bytes, n: int) -> Detection | None:
    """GRE-in-UDP: a GRE header (checksum, key, sequence as flagged), then its protocol."""
    hdr = 4 + 4 * ((p[0] >> 7) + ((p[0] >> 5) & 1) + ((p[0] >> 4) & 1))
    if n <= hdr:
        return None
    ptype = _U16.unpack_from(p, 2)[0]
    if ptype == _ETH_BRIDGING:
        what = _ether(p, hdr, n)
    elif ptype in (_ETH_IPV4, _ETH_IPV6):
        what = _ip_of_type(p, hdr, n, ptype)
    else:
        return None
    if what is None:
        return None
    if hdr == 4 and ptype != _ETH_BRIDGING:
        # The same four bytes are the TUN driver's packet information (struct tun_pi: flags 0,
        # the EtherType) that a raw VPN sends when it keeps it (quicktun USE_PI).
        how = f"a 4-byte header 00 00 {ptype >> 8:02x} {ptype & 0xFF:02x} (GRE-in-UDP, or TUN packet information)"
        return _in_udp(what, "gre", how)
    return _in_udp(what, "gre", f"GRE-in-UDP (a GRE version 0 header, protocol type 0x{ptype:04x})")


def _ayiya(p: bytes, n: int) -> Detection | None:
    """AYIYA (draft-massar-v6ops-ayiya-02; SixXS's AICCU): identity and signature lengths, hash
    and authentication methods from known sets, a forward opcode, then the IP packet named by
    the next header, filling the datagram."""
    b0, b1, b2 = p[0], p[1], p[2]
    if b0 & 0x0F > 2 or (b1 & 0x0F, b1 >> 4) not in _AYIYA_SIGNATURES or b2 >> 4 > 2 or b2 & 0x0F not in (1, 3):
        return None
    hdr = 8 + (1 << (b0 >> 4)) + (b1 >> 4) * 4
    if n <= hdr:
        return None
    what = _ip_of_type(p, hdr, n, _ETH_IPV4 if p[3] == 4 else _ETH_IPV6)
    if what is None:
        return None
    return _in_udp(what, "ayiya", f"an AYIYA header ({hdr} bytes: identity, signature, next header {p[3]})")


def _fastd(p: bytes, off: int, n: int) -> Detection | None:
    """A fastd handshake: the record lengths fill the packet exactly, the first record is the
    handshake type (1 byte: init, reply, finish); protocol, method and version names are text."""
    if n - off < 9 or p[off] != _FASTD_HANDSHAKE or p[off + 1] != 0 or _U16.unpack_from(p, off + 2)[0] != n - off - 4:
        return None
    if p[off + 4 : off + 8] != b"\x00\x00\x01\x00" or p[off + 8] not in _FASTD_KINDS:
        return None
    pos = off + 4
    names: dict[str, str] = {}
    while pos < n:
        if n - pos < 4:
            return None
        rtype, rlen = p[pos] | p[pos + 1] << 8, p[pos + 2] | p[pos + 3] << 8
        if rtype >= _FASTD_RECORD_MAX or pos + 4 + rlen > n:
            return None
        label = _FASTD_TEXT.get(rtype)
        if label == "mode" and rlen == 1:
            names[label] = "tun" if p[pos + 4] else "tap"
        elif label is not None and label != "mode":
            names[label] = printable(p[pos + 4 : pos + 4 + rlen], 48)
        pos += 4 + rlen
    what = ", ".join(f"{k} {v!r}" for k, v in names.items())
    l2tp = " behind an L2TPv3 header" if off else ""
    return Detection(
        TUNNEL_FASTD,
        f"fastd handshake {_FASTD_KINDS[p[off + 8]]}{l2tp} ({n - off} bytes): {what}",
        info={k: v for k, v in names.items() if k in ("protocol", "method", "version")},
    )
