"""Raw IP bytes -> a small record the engine can judge. ``struct``, no scapy.

Goal: one pass over the headers with ``struct.unpack_from`` at an offset (no slicing copies
of the header), one small object per packet, no exceptions on the way out. Hostile or
truncated input is a *result* (:class:`Malformed` with a reason), because the daemon must
give every packet a verdict and an exception inside the NFQUEUE callback would leave the
packet without one.

Bounds: IPv6 extension-header walking stops after ``MAX_EXT_HEADERS`` headers (an attacker
can chain hundreds); IPv4 options are skipped by IHL. The captured length may be shorter
than the IP total length (NFQUEUE copies ~4 KB, GSO super-packets, pcap snaplen): the
payload is what was captured, and ``truncated`` says so. Fragments: only the first
fragment carries the transport header; later fragments are reported with ``frag_offset``
> 0 and no ports, and the engine judges them by the flow they cannot be tied to (policy).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# Re-exported: the decoder's callers name protocols from here (the table is egressd.protocols).
from egressd.protocols import (
    PROTO_AH as PROTO_AH,
)
from egressd.protocols import (
    PROTO_ESP as PROTO_ESP,
)
from egressd.protocols import (
    PROTO_GRE as PROTO_GRE,
)
from egressd.protocols import (
    PROTO_ICMP as PROTO_ICMP,
)
from egressd.protocols import (
    PROTO_ICMPV6 as PROTO_ICMPV6,
)
from egressd.protocols import (
    PROTO_IPIP as PROTO_IPIP,
)
from egressd.protocols import (
    PROTO_IPV6_ENCAP as PROTO_IPV6_ENCAP,
)
from egressd.protocols import (
    PROTO_TCP as PROTO_TCP,
)
from egressd.protocols import (
    PROTO_UDP as PROTO_UDP,
)

# IPv6 extension headers we walk (RFC 8200 §4): hop-by-hop, routing, fragment,
# destination options, mobility, HIP, shim6 share the (next, len) layout; AH uses 4-byte units.
_EXT_HOPOPTS: Final = 0
_EXT_ROUTING: Final = 43
_EXT_FRAGMENT: Final = 44
_EXT_AH: Final = 51
_EXT_DSTOPTS: Final = 60
_EXT_MOBILITY: Final = 135
_EXT_HIP: Final = 139
_EXT_SHIM6: Final = 140
_EXT_GENERIC: Final = frozenset({_EXT_HOPOPTS, _EXT_ROUTING, _EXT_DSTOPTS, _EXT_MOBILITY, _EXT_HIP, _EXT_SHIM6})
_EXT_NONE: Final = 59
MAX_EXT_HEADERS: Final = 16

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

_U16 = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBB")
_UDP = struct.Struct("!HHH")
_PORTS = struct.Struct("!HH")


@dataclass(slots=True)
class Packet:
    """A decoded packet. Addresses are packed bytes (4 or 16): cheap to hash and compare;
    text forms are made only when an event is written."""

    version: int
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    seq: int
    ack: int
    payload: bytes
    ip_len: int  # the IP header's own idea of the packet length
    truncated: bool  # fewer bytes captured than ip_len says
    frag_offset: int  # in bytes; > 0 means a non-first fragment (no transport header)
    more_frags: bool
    frag_id: int
    icmp_type: int = -1
    icmp_code: int = -1
    # TCP: bytes of the transport payload the packet really carries, captured or not (a GSO
    # super-packet's copy stops at NFQUEUE's copy range). Sizes of encrypted SSH segments need it.
    payload_len: int = -1


@dataclass(frozen=True, slots=True)
class Malformed:
    """The packet could not be decoded; ``reason`` says which header and why."""

    reason: str
    version: int = 0


def decode(buf: bytes) -> Packet | Malformed:
    """Decode an IPv4 or IPv6 packet starting at byte 0 of ``buf``."""
    if not buf:
        return Malformed("empty packet")
    v = buf[0] >> 4
    if v == 4:
        return _decode_v4(buf)
    if v == 6:
        return _decode_v6(buf)
    return Malformed(f"IP version {v} is neither 4 nor 6")


def _decode_v4(buf: bytes) -> Packet | Malformed:
    n = len(buf)
    if n < 20:
        return Malformed(f"IPv4 header needs 20 bytes, got {n}", 4)
    vihl, _tos, total, ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(buf, 0)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        return Malformed(f"IPv4 IHL {ihl} < 20", 4)
    if ihl > n:
        return Malformed(f"IPv4 options run past the captured {n} bytes (IHL {ihl})", 4)
    if total < ihl:
        # TSO/GSO on some paths leaves total length 0; trust the capture then.
        if total != 0:
            return Malformed(f"IPv4 total length {total} < header length {ihl}", 4)
        total = n
    frag_off = (frag & 0x1FFF) * 8
    more = bool(frag & 0x2000)
    end = total if total <= n else n
    return _transport(4, src, dst, proto, buf, ihl, end, total, total > n, frag_off, more, ident)


def _decode_v6(buf: bytes) -> Packet | Malformed:
    n = len(buf)
    if n < 40:
        return Malformed(f"IPv6 header needs 40 bytes, got {n}", 6)
    _vtcfl, plen, nxt, _hl, src, dst = _IPV6.unpack_from(buf, 0)
    total = 40 + plen
    if plen == 0:
        # Jumbograms (hop-by-hop option) and GSO super-packets: use what was captured.
        total = n
    end = total if total <= n else n
    off = 40
    frag_off = 0
    more = False
    ident = 0
    for _ in range(MAX_EXT_HEADERS):
        if nxt in _EXT_GENERIC:
            if off + 2 > end:
                return Malformed(f"IPv6 extension header {nxt} truncated at offset {off}", 6)
            hlen = (buf[off + 1] + 1) * 8
            nxt = buf[off]
            off += hlen
        elif nxt == _EXT_FRAGMENT:
            if off + 8 > end:
                return Malformed(f"IPv6 fragment header truncated at offset {off}", 6)
            fo = _U16.unpack_from(buf, off + 2)[0]
            frag_off = fo & 0xFFF8
            more = bool(fo & 1)
            ident = int.from_bytes(buf[off + 4 : off + 8], "big")
            nxt = buf[off]
            off += 8
        elif nxt == _EXT_AH:
            if off + 2 > end:
                return Malformed(f"IPv6 AH header truncated at offset {off}", 6)
            # AH is a transport of its own for policy purposes only when nothing follows;
            # its payload (the protected next header) follows in cleartext.
            hlen = (buf[off + 1] + 2) * 4
            nxt = buf[off]
            off += hlen
        else:
            break
        if off > end:
            return Malformed(f"IPv6 extension headers run past the packet ({off} > {end})", 6)
    else:
        return Malformed(f"more than {MAX_EXT_HEADERS} IPv6 extension headers", 6)
    if nxt == _EXT_NONE:
        return Packet(6, src, dst, nxt, 0, 0, 0, 0, 0, b"", total, total > n, frag_off, more, ident)
    return _transport(6, src, dst, nxt, buf, off, end, total, total > n, frag_off, more, ident)


def _transport(
    v: int,
    src: bytes,
    dst: bytes,
    proto: int,
    buf: bytes,
    off: int,
    end: int,
    total: int,
    truncated: bool,
    frag_off: int,
    more: bool,
    ident: int,
) -> Packet | Malformed:
    if frag_off:
        # Non-first fragment: no transport header here.
        return Packet(v, src, dst, proto, 0, 0, 0, 0, 0, buf[off:end], total, truncated, frag_off, more, ident)
    avail = end - off
    if proto == PROTO_TCP:
        if avail < 20:
            if more:
                # A first fragment too small to hold the TCP header (RFC 1858 tiny fragment):
                # an evasion trick. Hand it over whole; the engine reassembles the datagram
                # and judges the complete TCP header.
                sp, dp = _PORTS.unpack_from(buf, off) if avail >= 4 else (0, 0)
                return Packet(v, src, dst, proto, sp, dp, 0, 0, 0, buf[off:end], total, truncated, 0, more, ident)
            return Malformed(f"TCP header needs 20 bytes, got {avail}", v)
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(buf, off)
        thl = (doff >> 4) * 4
        if thl < 20:
            return Malformed(f"TCP data offset {thl} < 20", v)
        if thl > avail:
            return Malformed(f"TCP options run past the captured data ({thl} > {avail})", v)
        return Packet(
            v, src, dst, proto, sport, dport, flags, seq, ack, buf[off + thl : end],
            total, truncated, 0, more, ident, payload_len=max(0, total - off - thl),
        )  # fmt: skip
    if proto == PROTO_UDP:
        if avail < 8:
            return Malformed(f"UDP header needs 8 bytes, got {avail}", v)
        sport, dport, ulen = _UDP.unpack_from(buf, off)
        if ulen < 8 and ulen != 0:  # 0: jumbogram / GSO
            return Malformed(f"UDP length {ulen} < 8", v)
        stop = end if ulen == 0 or off + ulen > end else off + ulen
        return Packet(v, src, dst, proto, sport, dport, 0, 0, 0, buf[off + 8 : stop], total, truncated, 0, more, ident)
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if avail < 4:
            return Malformed(f"ICMP header needs 4 bytes, got {avail}", v)
        t, c = buf[off], buf[off + 1]
        # Echo id as "port" so that ping flows are told apart: the request's source port and
        # the reply's destination port, so a request and its reply share one flow key.
        ident_port = _U16.unpack_from(buf, off + 4)[0] if avail >= 8 else 0
        sp, dp = (0, ident_port) if t == (0 if proto == PROTO_ICMP else 129) else (ident_port, 0)
        p = Packet(v, src, dst, proto, sp, dp, 0, 0, 0, buf[off + 4 : end], total, truncated, 0, more, ident)
        p.icmp_type = t
        p.icmp_code = c
        return p
    # Other protocols (GRE, ESP, IP-in-IP, ...): no ports; payload kept for tunnel detectors.
    return Packet(v, src, dst, proto, 0, 0, 0, 0, 0, buf[off:end], total, truncated, 0, more, ident)
