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
"""

from __future__ import annotations

import struct
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_IKE,
    TUNNEL_OPENVPN,
    TUNNEL_WIREGUARD,
    Detection,
    Result,
    StreamContext,
    printable,
)

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
    n = len(payload)
    if n == 148 and payload.startswith(_WG_INIT):
        return Detection(TUNNEL_WIREGUARD, "WireGuard handshake initiation (148 bytes, type 1)")
    if n == 92 and payload.startswith(_WG_RESP) and not from_originator:
        return Detection(TUNNEL_WIREGUARD, "WireGuard handshake response (92 bytes, type 2)")
    if n >= 32 and (n - 16) % 16 == 0 and payload.startswith(_WG_DATA):
        # A session picked up after its handshake: type 4, 16-byte header, then data padded
        # to 16 bytes plus a 16-byte tag. Less certain than a handshake, and said so.
        return Detection(TUNNEL_WIREGUARD, f"WireGuard transport data ({n} bytes, type 4)", confidence=0.7)
    ike = payload
    if (dport == 4500 or sport == 4500) and payload.startswith(b"\x00\x00\x00\x00"):
        ike = payload[4:]  # non-ESP marker (NAT traversal)
    return _ike(ike)


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
    """OpenVPN over TCP, from the client's first record (on any port)."""
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
