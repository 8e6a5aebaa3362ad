"""VPN handshakes that carry a whole network out of the node: WireGuard, IKE, OpenVPN.

Why only these, and only their handshakes: each has a first message whose layout the
protocol fixes exactly (lengths, type bytes, a length field that must equal what arrived),
so it can be recognised on the first datagram or segment with no false positives on the
traffic a training node normally makes. Encrypted payloads after the handshake are not
guessed at.

* WireGuard (whitepaper §5.4.2): the handshake initiation is exactly 148 bytes, type 1
  followed by three zero bytes; the response exactly 92 bytes, type 2; transport data (a
  session picked up mid-way) type 4, a 16-byte header and a multiple of 16 after it.
* IKE (RFC 7296 §3.1, RFC 2408 §3.1): a 28-byte header whose length field equals the
  message length, version 2.0 or 1.0, a known exchange type and a non-zero initiator SPI;
  on port 4500 after the 4-byte non-ESP marker (RFC 3948).
* OpenVPN over TCP (openvpn ssl.h / ssl_pkt.h): a 2-byte length equal to the rest of the
  first record, then opcode P_CONTROL_HARD_RESET_CLIENT_V2 or _V3 with key id 0 and an
  8-byte session id; the server answers with P_CONTROL_HARD_RESET_SERVER_V2.
* OpenVPN over UDP: the same first packet without the length prefix, whose exact layout
  depends on the control-channel protection (ssl_pkt.c, tls_crypt.c), each one checked
  field by field: none — opcode, session id, an empty ACK array (0) and message packet id 0,
  14 bytes in all; tls-auth — opcode, session id, an HMAC of 16..64 bytes, replay packet id
  1, a timestamp, then the same empty ACK array and packet id 0 (9 + HMAC + 13 bytes);
  tls-crypt — opcode, session id, packet id 1, timestamp, a 32-byte tag and 5 encrypted
  bytes (54 bytes); tls-crypt-v2 (opcode _V3) — the same followed by the wrapped client key,
  whose last two bytes give its own length (so the total length is checked exactly).
* tinc (``protocol.c``, ``protocol_auth.c`` send_id): the connecting daemon's first line is
  its ID request ``0 <name> <major>[.<minor>]\n``: request number 0, a node name of
  letters, digits and ``_``, protocol major version 17.
* PPTP (RFC 2637 §2.1): the client's Start-Control-Connection-Request, 156 bytes, message
  type 1 (control), the magic cookie 0x1A2B3C4D, control message type 1.
* Teredo (RFC 4380 §5.1.1): an IPv6 packet in a UDP datagram (version 6, payload length
  equal to what follows the 40-byte header), after an optional authentication indicator
  (``00 01``, id and auth lengths, their bytes, nonce, confirmation) and an optional origin
  indication (``00 00``, port, address); called Teredo when an indicator is present or the
  port is 3544. (Direct client-to-peer data, a bare IPv6 packet between Teredo addresses on
  another port, is not called: the corpus labels such a flow benign.)
* Tunnels that are an IP protocol of their own, named from the protocol number with the
  inner header checked: GRE (47; RFC 2784/2637: version 0 or 1, the carried protocol type),
  ESP (50; RFC 4303: a non-reserved SPI) and AH (51; RFC 4302), IPv4-in-IP (4) and
  IPv6-in-IP (41; the inner header's version, and its length field consistent). L2TPv3
  over IP (115; RFC 3931 §4.1.1) is checked in detect/encap.py, as over UDP.
* Link and network encapsulations in UDP (L2TP, VXLAN, GENEVE, IP or Ethernet directly in
  UDP, AYIYA) are told from the header they wrap: ``detect/encap.py``, tried last.
* Nebula (``header/header.go``): a 16-byte header, version 1 and type 0 (handshake) in the
  first byte, subtype 0 or 1 (IX/XX with PSK0), two reserved zero bytes, remote index 0
  (the initiator does not know it yet) and message counter 1, then the Noise message.
"""

from __future__ import annotations

import struct
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_GRE,
    TUNNEL_IKE,
    TUNNEL_IP_IN_IP,
    TUNNEL_IPSEC,
    TUNNEL_NEBULA,
    TUNNEL_OPENVPN,
    TUNNEL_PPTP,
    TUNNEL_TEREDO,
    TUNNEL_TINC,
    TUNNEL_WIREGUARD,
    Detection,
    Result,
    StreamContext,
    printable,
)
from egressd.detect.encap import detect_encap, detect_l2tp_ip
from egressd.detect.overlays import detect_overlay

_WG_INIT: Final = b"\x01\x00\x00\x00"
_WG_RESP: Final = b"\x02\x00\x00\x00"
_WG_DATA: Final = b"\x04\x00\x00\x00"
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

# IKEv2 exchange types 34..37 (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL), 43
# (IKE_INTERMEDIATE); IKEv1: 2 (identity protection / main mode), 4 (aggressive), 5
# (informational), 32 (quick mode), 33 (new group).
_IKE_V2_EXCHANGES: Final = frozenset({34, 35, 36, 37, 43})
_IKE_V1_EXCHANGES: Final = frozenset({2, 4, 5, 32, 33})

# OpenVPN opcodes (high 5 bits of the first byte; low 3 bits: key id, 0 in a hard reset).
_OVPN_CLIENT_RESETS: Final = frozenset({7 << 3, 10 << 3})  # HARD_RESET_CLIENT_V2, _V3
_OVPN_SERVER_RESET: Final = 8 << 3  # HARD_RESET_SERVER_V2


def detect_datagram(payload: bytes, from_originator: bool, sport: int, dport: int) -> Detection | None:
    """A UDP datagram that is a VPN handshake message, or None."""
    if (overlay := detect_overlay(payload)) is not None:  # ZeroTier, Tailscale, n2n, SoftEther NAT-T
        return overlay
    n = len(payload)
    if n == 148 and payload.startswith(_WG_INIT):
        return Detection(TUNNEL_WIREGUARD, "WireGuard handshake initiation (148 bytes, type 1)")
    if n == 92 and payload.startswith(_WG_RESP) and not from_originator:
        return Detection(TUNNEL_WIREGUARD, "WireGuard handshake response (92 bytes, type 2)")
    if n >= 32 and (n - 16) % 16 == 0 and payload.startswith(_WG_DATA):
        # A session picked up after its handshake: type 4, 16-byte header, then data padded
        # to 16 bytes plus a 16-byte tag. Less certain than a handshake, and said so.
        return Detection(TUNNEL_WIREGUARD, f"WireGuard transport data ({n} bytes, type 4)", confidence=0.7)
    if from_originator:
        det = _openvpn_udp(payload) or _nebula(payload) or _teredo(payload, 3544 in (sport, dport))
        if det is not None:
            return det
    ike = payload
    if (dport == 4500 or sport == 4500) and payload.startswith(b"\x00\x00\x00\x00"):
        ike = payload[4:]  # non-ESP marker (NAT traversal)
    return _ike(ike) or detect_encap(payload)


_PPTP_SCCRQ: Final = b"\x00\x9c\x00\x01\x1a\x2b\x3c\x4d"  # length 156, control message, magic cookie
_OVPN_HMAC_SIZES: Final = (16, 20, 28, 32, 48, 64)  # MD5, SHA1, SHA224, SHA256, SHA384, SHA512
_OVPN_TLS_CRYPT_LEN: Final = 1 + 8 + 4 + 4 + 32 + 5
_ZERO5: Final = bytes(5)
_PID1: Final = b"\x00\x00\x00\x01"


def _openvpn_udp(p: bytes) -> Detection | None:
    """The client's first control packet over UDP (P_CONTROL_HARD_RESET_CLIENT_V2/_V3)."""
    n = len(p)
    if n < 14 or p[0] not in _OVPN_CLIENT_RESETS or p[1:9] == bytes(8):
        return None
    sid = p[1:9].hex()
    if p[0] == 7 << 3:
        if n == 14 and p[9:14] == _ZERO5:
            return _ovpn("none", sid)
        for h in _OVPN_HMAC_SIZES:
            if n == 9 + h + 13 and p[9 + h : 13 + h] == _PID1 and p[17 + h : 22 + h] == _ZERO5:
                return _ovpn(f"tls-auth ({h}-byte HMAC)", sid)
        if n == _OVPN_TLS_CRYPT_LEN and p[9:13] == _PID1:
            return _ovpn("tls-crypt", sid)
        return None
    # _V3: tls-crypt-v2, the wrapped client key (a 32-byte tag, the encrypted key and its
    # metadata, >= 64 bytes) appended, whose last two bytes are its own length. The packet id
    # is not checked here: 2.6 clients set flag bits in it (seen: 0x0a010001).
    wkc = n - _OVPN_TLS_CRYPT_LEN
    if wkc >= 64 and _U16.unpack_from(p, n - 2)[0] == wkc:
        return _ovpn("tls-crypt-v2", sid)
    return None


def _ovpn(mode: str, sid: str) -> Detection:
    return Detection(
        TUNNEL_OPENVPN,
        f"OpenVPN over UDP: P_CONTROL_HARD_RESET_CLIENT, session id {sid}, control channel {mode}",
        info={"transport": "udp", "mode": mode.split(" ")[0]},
    )


_NEBULA_HANDSHAKE: Final = b"\x10"  # version 1 << 4 | type 0 (handshake)
_NEBULA_FIRST: Final = bytes(6) + b"\x00\x00\x00\x00\x00\x00\x00\x01"  # reserved, remote index 0, counter 1


def _nebula(p: bytes) -> Detection | None:
    if len(p) >= 16 + 32 and p.startswith(_NEBULA_HANDSHAKE) and p[1] in (0, 1) and p[2:16] == _NEBULA_FIRST:
        sub = "ix_psk0" if p[1] == 0 else "xx_psk0"
        return Detection(
            TUNNEL_NEBULA,
            f"Nebula handshake stage 1 (header v1 type handshake/{sub}, remote index 0, counter 1, {len(p)} bytes)",
        )
    return None


_IPV6_NEXT: Final = frozenset({0, 6, 17, 43, 44, 58, 59, 60})  # hop-by-hop .. dest options, ICMPv6, none
_TEREDO_PREFIX: Final = b"\x20\x01\x00\x00"


def _teredo(p: bytes, teredo_port: bool) -> Detection | None:
    pos = 0
    marks = []
    if p[:2] == b"\x00\x01" and len(p) >= 4:
        pos = 4 + p[2] + p[3] + 8 + 1
        marks.append("authentication indicator")
    if p[pos : pos + 2] == b"\x00\x00":
        pos += 8
        marks.append("origin indication")
    ip6 = p[pos:]
    if len(ip6) < 40 or ip6[0] >> 4 != 6 or _U16.unpack_from(ip6, 4)[0] + 40 != len(ip6) or ip6[6] not in _IPV6_NEXT:
        return None
    if not (marks or teredo_port):
        return None
    teredo_addr = ip6[8:12] == _TEREDO_PREFIX or ip6[24:28] == _TEREDO_PREFIX
    why = ", ".join(marks + (["a 2001:0::/32 address"] if teredo_addr else []) + (["port 3544"] if teredo_port else []))
    return Detection(TUNNEL_TEREDO, f"IPv6 packet (next header {ip6[6]}) inside UDP, Teredo framing: {why}")


def _ike(msg: bytes) -> Detection | None:
    if len(msg) < 28:
        return None
    if msg[:8] == bytes(8):
        return None  # the initiator SPI is never zero
    version, exchange = msg[17], msg[18]
    length = _U32.unpack_from(msg, 24)[0]
    if length != len(msg):
        return None
    if version == 0x20 and exchange in _IKE_V2_EXCHANGES:
        return Detection(TUNNEL_IKE, f"IKEv2 exchange {exchange}, {length} bytes", info={"version": "2"})
    if version == 0x10 and exchange in _IKE_V1_EXCHANGES:
        return Detection(TUNNEL_IKE, f"IKEv1 exchange {exchange}, {length} bytes", info={"version": "1"})
    return None


def detect_stream(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """OpenVPN over TCP, from the client's first record, or tinc's ID line (on any port)."""
    if fwd.startswith(b"0 "):
        return _tinc(fwd, ctx)
    if fwd[:8] == _PPTP_SCCRQ[: min(8, len(fwd))]:
        if len(fwd) < 10:
            return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
        if fwd[8:10] == b"\x00\x01":
            return Detection(TUNNEL_PPTP, "PPTP Start-Control-Connection-Request (156 bytes, magic cookie 1a2b3c4d)")
        return NOT_THIS
    if len(fwd) < 2:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    rec_len = _U16.unpack_from(fwd, 0)[0]
    # A hard reset is 9 bytes of opcode + session id and a little more (packet id array,
    # optional HMAC/tls-crypt, and with V3 a wrapped key): never tiny, never large.
    if not 14 <= rec_len <= 1400:
        return NOT_THIS
    if len(fwd) < 3:
        return NEED_MORE
    if fwd[2] not in _OVPN_CLIENT_RESETS:
        return NOT_THIS
    if len(fwd) < 2 + rec_len:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    if fwd[3:11] == bytes(8):
        return NOT_THIS  # the client's session id is random, never zero
    info = {"opcode": "P_CONTROL_HARD_RESET_CLIENT_V" + ("2" if fwd[2] == 7 << 3 else "3")}
    if len(rev) >= 3:
        if fwd[2] == 7 << 3 and rev[2] != _OVPN_SERVER_RESET:
            return NOT_THIS
        info["server"] = "P_CONTROL_HARD_RESET_SERVER_V2"
    return Detection(TUNNEL_OPENVPN, "OpenVPN hard reset " + printable(fwd[: 2 + min(rec_len, 16)], 40), info=info)


_TINC_NAME: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_TINC_MAX_LINE: Final = 2048


def _tinc(fwd: bytes, ctx: StreamContext) -> Result:
    """``0 name 17[.minor]\\n``: tinc's ID request (tinc 1.0 sends the major only)."""
    eol = fwd.find(b"\n", 0, _TINC_MAX_LINE)
    if eol < 0:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full or len(fwd) >= _TINC_MAX_LINE else NEED_MORE
    parts = fwd[:eol].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[1] or not set(parts[1]) <= _TINC_NAME:
        return NOT_THIS
    major, _, minor = parts[2].partition(b".")
    if major != b"17" or (minor and not minor.isdigit()):
        return NOT_THIS
    return Detection(
        TUNNEL_TINC,
        f"tinc ID request {printable(fwd[:eol], 60)} (protocol {parts[2].decode()})",
        info={"node": parts[1].decode()},
    )


_GRE_TYPES: Final = {
    0x0800: "IPv4", 0x86DD: "IPv6", 0x880B: "PPP", 0x6558: "Ethernet", 0x8847: "MPLS", 0x88BE: "ERSPAN",
}  # fmt: skip


def detect_ip_protocol(proto: int, payload: bytes) -> Detection | None:
    """A packet whose IP protocol is itself a tunnel (GRE, ESP, AH, IP-in-IP), checked against
    the inner header it must start with; None for anything else."""
    n = len(payload)
    if proto == 47 and n >= 4:
        version = payload[1] & 0x07
        ptype = _U16.unpack_from(payload, 2)[0]
        if version in (0, 1) and (ptype in _GRE_TYPES or version == 1):
            what = _GRE_TYPES.get(ptype, f"0x{ptype:04x}")
            return Detection(TUNNEL_GRE, f"GRE version {version} carrying {what}", info={"carries": what})
    elif proto == 50 and n >= 8:
        spi = _U32.unpack_from(payload, 0)[0]
        if spi > 255:
            return Detection(TUNNEL_IPSEC, f"IPsec ESP, SPI 0x{spi:08x}", info={"spi": f"0x{spi:08x}"})
    elif proto == 51 and n >= 12:
        spi = _U32.unpack_from(payload, 4)[0]
        if spi > 255 and (payload[1] + 2) * 4 <= n:
            return Detection(TUNNEL_IPSEC, f"IPsec AH, SPI 0x{spi:08x}, next header {payload[0]}")
    elif proto == 4 and n >= 20 and payload[0] >> 4 == 4 and payload[0] & 0xF >= 5:
        if _U16.unpack_from(payload, 2)[0] <= n:
            return Detection(TUNNEL_IP_IN_IP, f"IPv4 packet inside IP (inner protocol {payload[9]})")
    elif proto == 41 and n >= 40 and payload[0] >> 4 == 6 and _U16.unpack_from(payload, 4)[0] + 40 <= n:
        return Detection(TUNNEL_IP_IN_IP, f"IPv6 packet inside IP (6in4/6in6, next header {payload[6]})")
    elif proto == 115:
        return detect_l2tp_ip(payload)  # L2TPv3 over IP (detect/encap.py)
    return None
