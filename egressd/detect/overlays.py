"""Peer-to-peer overlay VPNs on UDP: ZeroTier, Tailscale, n2n, SoftEther NAT-T — from one datagram.

Why these need a module of their own: an overlay puts the node on a private Ethernet or IP
network that crosses every egress rule, and each of these speaks its own protocol on any
UDP port (ZeroTier defaults to 9993, n2n's supernode to 7654, Tailscale to 41641, all
configurable). Like the handshakes in ``tunnels.py``, each is recognised only from a message
whose layout its implementation fixes exactly, checked field by field, so that benign
traffic (DNS, QUIC, NTP, STUN, DTLS ...) never matches. Payloads the protocol encrypts are
not guessed at.

* **ZeroTier** (zerotier/ZeroTierOne ``node/Packet.hpp``: header field indexes
  ``ZT_PACKET_IDX_*``, ``VERB_HELLO`` and ``ZT_PROTO_VERB_HELLO_IDX_*``; ``node/Peer.cpp``
  ``Peer::sendHELLO``; ``node/Identity.hpp`` ``Identity::serialize``; ``node/InetAddress``
  ``serialize``). HELLO is the one message sent in the clear (``armor(key, false)``: cipher
  suite ``C25519_POLY1305_NONE``, or ``NO_CRYPTO_TRUSTED_PATH`` on a trusted path): packet id
  (8), destination address (5), source address (5), flags/cipher/hops (1), MAC (8), verb
  ``0x01`` (never compressed: sendHELLO does not call ``compress()``, and an LZ4 payload would
  have no fixed layout), protocol version (>= ``ZT_PROTO_VERSION_MIN`` 4, which ``_doHELLO``
  enforces), major, minor, revision (2), timestamp (8), then the sender's identity: its own
  5-byte address — which must equal the header's source address, 40 bits that random bytes
  match once in 10^12 —, type 0 (C25519), the 64-byte public key, a private-key length of 0;
  then the address the HELLO was sent to (type 0, 4 or 6 and its 0, 6 or 18 bytes). The OK
  and ERROR answers are armoured with encryption (``armor(key, true)`` in
  ``IncomingPacket::_doHELLO``): from the verb byte on they are ciphertext, so they have no
  fixed layout to check and are not named.
* **Tailscale disco** (tailscale/tailscale ``disco/disco.go``: ``Magic``, ``keyLen``,
  ``NonceLen``, ``LooksLikeDiscoWrapper``): the 6-byte magic ``TS`` + U+1F4AC in UTF-8
  (``54 53 f0 9f 92 ac``), the sender's 32-byte disco public key, a 24-byte nonce, then a
  NaCl box: a 16-byte Poly1305 tag over at least the 2-byte message type and version, so 80
  bytes at least. Tailscale's WireGuard packets are ``tunnel.wireguard`` already. Through a
  peer relay (``net/udprelay``, ``net/packet/geneve.go``) the same message follows an 8-byte
  Geneve header whose protocol is ``GeneveProtocolDisco`` (``0x7A11``).
* **n2n**, three wire formats, each from its implementation:
  v1 (n2n 1.3, Debian's ``n2n`` package; ``n2n.h`` ``struct n2n_packet_header``,
  ``n2n.c`` ``marshall_n2n_packet_header`` and ``fill_standard_header_fields``): version 1,
  message type (REGISTER 1 .. REGISTER_ACK 4), TTL, sent-by-supernode 0/1, a 16-byte
  community name (NUL-terminated; the edge copies 16 bytes, so bytes after the NUL are
  whatever followed the name in memory), source and destination MAC, the public address
  (``peer_addr``: family ``AF_INET``), the private one (``getsockname``'s ``sockaddr_in``,
  family 2 in host order), packet type 0..3, sequence id and CRC; the 84-byte header struct
  is sent whole, then an LZO stream (a REGISTER is 87 bytes: the empty stream ``11 00 00``).
  v2 (ntop/n2n 2.x ``n2n_wire.h``, ``wire.c`` ``encode_common``): version 2, TTL, 16-bit
  flags whose low 5 bits are the packet code, a 16-byte NUL-padded community;
  REGISTER_SUPER (5) is cookie, edge MAC and an auth block whose token length makes the
  datagram's length exact; REGISTER (1) cookie, two MACs and the socket if flagged.
  v3 (ntop/n2n 3.x ``include/n2n_define.h``, ``src/wire.c`` ``encode_REGISTER_SUPER``,
  ``encode_REGISTER``, ``encode_sock``): version 3, a 20-byte community, REGISTER_SUPER with
  device address, 16-byte description, auth token and key time, its length exact too;
  QUERY_PEER (11, ``encode_QUERY_PEER``: two MACs and 16-bit flags, 38 bytes), with which an
  edge pings its supernodes.
  With header encryption (n2n 3 ``-H``) the header is ciphertext and is not named.
* **SoftEther VPN NAT traversal** (SoftEtherVPN/SoftEtherVPN ``src/Mayaqua/Network.c``
  ``RUDPDo_NatT_Interrupt`` and the NAT-T connect loop, sent to ``UDP_NAT_T_PORT``;
  ``src/Mayaqua/Pack.c`` ``WritePack``, ``WriteElement``, ``WriteValue``, ``WriteBufStr``):
  the requests to SoftEther's NAT-T servers (``get_token``, ``nat_t_register``,
  ``nat_t_connect_request``) are a serialised PACK in the datagram: an element count, then per
  element its name (length + 1, the name), type (INT 0, DATA 1, STR 2, UNISTR 3, INT64 4),
  value count and values (INT 4 bytes, INT64 8, DATA and STR a length and the bytes, UNISTR
  a length and NUL-terminated UTF-8). Named when the whole datagram parses as one PACK, to
  its last byte, with an ``opcode`` string element and a ``nat_traversal_version`` integer.
  The one-byte IP query (``A``) that also goes to the NAT-T port has no layout to check.
"""

from __future__ import annotations

import struct
from typing import Final

from egressd.detect.base import TUNNEL_N2N, TUNNEL_SOFTETHER_NAT_T, TUNNEL_TAILSCALE, TUNNEL_ZEROTIER, Detection

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

# -- ZeroTier ------------------------------------------------------------------------------
_ZT_IDX_SOURCE: Final = 13
_ZT_IDX_FLAGS: Final = 18
_ZT_IDX_VERB: Final = 27
_ZT_IDX_IDENTITY: Final = 41  # ZT_PROTO_VERB_HELLO_IDX_IDENTITY
_ZT_ID_TYPE: Final = _ZT_IDX_IDENTITY + 5
_ZT_ID_PRIVLEN: Final = _ZT_ID_TYPE + 1 + 64
_ZT_AT_ADDRESS: Final = _ZT_ID_PRIVLEN + 1  # InetAddress::serialize: type, then its bytes
_ZT_AT_LEN: Final = {0: 0, 4: 6, 6: 18}  # nil, IPv4 + port, IPv6 + port
_ZT_MIN_HELLO: Final = _ZT_AT_ADDRESS + 1
_ZT_VERB_HELLO: Final = 0x01
_ZT_CIPHERS_CLEAR: Final = (0, 2)  # C25519_POLY1305_NONE, NO_CRYPTO_TRUSTED_PATH
_ZT_RESERVED_PREFIX: Final = 0xFF  # ZT_ADDRESS_RESERVED_PREFIX, also the fragment indicator
_ZT_PROTO_VERSION_MIN: Final = 4

# -- Tailscale -----------------------------------------------------------------------------
_TS_MAGIC: Final = "TS\U0001f4ac".encode()  # b"TS\xf0\x9f\x92\xac"
_TS_KEY_END: Final = 6 + 32
_TS_MIN: Final = _TS_KEY_END + 24 + 16 + 2  # magic, key, nonce, box tag, type + version

# -- n2n -----------------------------------------------------------------------------------
_N2N_V1_HDR: Final = 84  # sizeof(struct n2n_packet_header), what the edge sends
_N2N_V1_TYPES: Final = {1: "REGISTER", 2: "DEREGISTER", 3: "PACKET", 4: "REGISTER_ACK"}
_N2N_V1_PRIVATE_FAMILY: Final = (b"\x02\x00", b"\x00\x02")  # AF_INET in host order
_N2N_MAX_TTL: Final = 2  # N2N_DEFAULT_TTL: "can be forwarded twice at most"
_N2N_FLAG_BITS: Final = 0x00E0  # OPTIONS 0x80, SOCKET 0x40, FROM_SUPERNODE 0x20
_N2N_FLAG_SOCKET: Final = 0x0040
_N2N_REGISTER: Final = 1
_N2N_REGISTER_SUPER: Final = 5
_N2N_V3_QUERY_PEER: Final = 11  # MSG_TYPE_QUERY_PEER (n2n 3): how an edge pings its supernodes
_N2N_AUTH_TOKEN_MAX: Final = 128  # a bound: v2 N2N_AUTH_TOKEN_SIZE is 32, v3 user/password tokens are larger
# Printable ASCII: what a community name is typed as on a command line.
_PRINTABLE: Final = bytes(range(0x20, 0x7F))


def detect_overlay(p: bytes) -> Detection | None:
    """A datagram that is a ZeroTier HELLO, a Tailscale disco message, an n2n packet header
    or a SoftEther NAT-T request, or None. Cheapest rejections first: every first UDP
    datagram passes here."""
    # Literals rather than the named constants on this path: a module-global lookup per
    # comparison is most of what a non-matching datagram costs here.
    n = len(p)
    if n < 34:  # n2n v2 REGISTER_SUPER, the shortest message named here
        return None
    if n >= 113 and p[27] == 1 and p[46] == 0:  # _ZT_MIN_HELLO, _ZT_IDX_VERB == HELLO, _ZT_ID_TYPE == 0
        det = _zerotier(p, n)
        if det is not None:
            return det
    first = p[0]
    if first > 3:
        return _tailscale(p, n) if first == 0x54 else None
    if first == 1:
        return _n2n_v1(p, n)
    if first != 0:
        return _n2n_v2_v3(p, n, first)
    if p[2] == 0x7A and p[3] == 0x11:  # Geneve protocol GeneveProtocolDisco
        return _tailscale_relayed(p, n)
    if p[1] == 0 and p[2] == 0 and p[4] == 0 and p[5] == 0 and p[6] == 0:  # PACK: element count, name length
        return _softether_pack(p, n)
    return None


def _zerotier(p: bytes, n: int) -> Detection | None:
    if (p[_ZT_IDX_FLAGS] >> 3) & 0x07 not in _ZT_CIPHERS_CLEAR or p[_ZT_ID_PRIVLEN] != 0:
        return None
    if p[8] == _ZT_RESERVED_PREFIX or p[_ZT_IDX_SOURCE] == _ZT_RESERVED_PREFIX:
        return None
    proto = p[28]
    if proto < _ZT_PROTO_VERSION_MIN:
        return None
    at_len = _ZT_AT_LEN.get(p[_ZT_AT_ADDRESS])
    if at_len is None or n < _ZT_AT_ADDRESS + 1 + at_len:
        return None
    src = p[_ZT_IDX_SOURCE : _ZT_IDX_SOURCE + 5]
    if src == b"\x00\x00\x00\x00\x00" or p[_ZT_IDX_IDENTITY : _ZT_IDX_IDENTITY + 5] != src:
        return None
    node, dest = src.hex(), p[8:13].hex()
    version = f"{p[29]}.{p[30]}.{_U16.unpack_from(p, 31)[0]}"
    return Detection(
        TUNNEL_ZEROTIER,
        f"ZeroTier HELLO from node {node} to {dest} (protocol {proto}, ZeroTier {version}): "
        f"cipher suite {(p[_ZT_IDX_FLAGS] >> 3) & 0x07}, identity type 0 whose address is the header's source, "
        f"{n} bytes",
        info={"node": node, "peer": dest, "version": version},
    )


def _tailscale(p: bytes, n: int) -> Detection | None:
    if n < _TS_MIN or not p.startswith(_TS_MAGIC):
        return None
    key = p[6:_TS_KEY_END]
    if key.count(0) == 32:
        return None  # a Curve25519 public key is never all zero
    return Detection(
        TUNNEL_TAILSCALE,
        f"Tailscale disco message: magic TS\\xf0\\x9f\\x92\\xac, sender disco key {key[:8].hex()}..., "
        f"24-byte nonce and a {n - _TS_MIN + 18}-byte NaCl box ({n} bytes)",
        info={"disco_key": key.hex()},
    )


def _tailscale_relayed(p: bytes, n: int) -> Detection | None:
    """A disco message to or from a Tailscale peer relay (``net/udprelay``): an 8-byte Geneve
    header (RFC 8926; version 0, no options, the control bit, protocol ``0x7A11``,
    ``packet.GeneveProtocolDisco``, a 24-bit VNI, a reserved zero byte), then the message."""
    if p[1] not in (0x00, 0x40) or p[7] != 0:
        return None
    det = _tailscale(p[8:], n - 8)
    if det is None:
        return None
    vni = int.from_bytes(p[4:7], "big")
    return Detection(det.kind, f"{det.evidence}, via a Tailscale peer relay (Geneve, VNI {vni})", info=det.info)


def _community(p: bytes, start: int, size: int, padded: bool) -> str | None:
    """The community name at ``p[start:start+size]``: 1..size-1 printable bytes, a NUL, and
    with ``padded`` only NULs after it; None otherwise."""
    end = p.find(0, start, start + size)
    if end <= start:
        return None
    name = p[start:end]
    if name.translate(None, _PRINTABLE):
        return None
    if padded and p.count(0, end, start + size) != start + size - end:
        return None
    return name.decode("ascii")


def _n2n_v1(p: bytes, n: int) -> Detection | None:
    if n < _N2N_V1_HDR:
        return None
    msg = _N2N_V1_TYPES.get(p[1])
    if msg is None or p[2] > _N2N_MAX_TTL or p[3] > 1 or p[32] != 2 or p[72] > 3:
        return None
    if p[52:54] not in _N2N_V1_PRIVATE_FAMILY or p[20] & 1:  # the sender's MAC is unicast
        return None
    community = _community(p, 4, 16, padded=False)
    if community is None:
        return None
    port = _U16.unpack_from(p, 54)[0]
    return _n2n(
        1,
        msg,
        community,
        f"source MAC {p[20:26].hex(':')}, private port {port}, {n} bytes",
        p[3] == 1,
    )


def _n2n_v2_v3(p: bytes, n: int, version: int) -> Detection | None:
    if p[1] > _N2N_MAX_TTL:
        return None
    flags = _U16.unpack_from(p, 2)[0]
    pc, bits = flags & 0x001F, flags & 0xFFE0
    if bits & ~_N2N_FLAG_BITS:
        return None
    csize = 16 if version == 2 else 20
    mac = 4 + csize + 4  # after the common header and the cookie: the edge's MAC
    if pc == _N2N_V3_QUERY_PEER and version == 3:
        # encode_QUERY_PEER: source MAC, target MAC (zero when it pings a supernode), aflags.
        mac = 4 + csize
        if n != mac + 6 + 6 + 2:
            return None
        what = "QUERY_PEER"
    elif pc == _N2N_REGISTER_SUPER:
        if version == 2:
            tok_at, tail = mac + 6 + 2, 0  # auth scheme, token size, token (wire.c writes 0, 0)
        else:
            sock = _n2n_sock(p, n, mac + 6, bits)  # [sock], device address, bit length, description, scheme
            if sock < 0:
                return None
            tok_at, tail = mac + 6 + sock + 4 + 1 + 16 + 2, 4  # ... token, key_time
        if n < tok_at + 2:
            return None
        tok = _U16.unpack_from(p, tok_at)[0]
        if tok > _N2N_AUTH_TOKEN_MAX or n != tok_at + 2 + tok + tail:
            return None
        what = "REGISTER_SUPER"
    elif pc == _N2N_REGISTER:
        sock = _n2n_sock(p, n, mac + 12, bits)  # after source and destination MAC
        if sock < 0 or n != mac + 12 + sock + (0 if version == 2 else 4 + 1 + 16):
            return None
        what = "REGISTER"
    else:
        return None
    if p[mac] & 1:  # the registering edge's MAC is unicast
        return None
    community = _community(p, 4, csize, padded=True)
    if community is None:
        return None
    return _n2n(version, what, community, f"edge MAC {p[mac : mac + 6].hex(':')}, {n} bytes", bool(bits & 0x20))


def _n2n_sock(p: bytes, n: int, at: int, bits: int) -> int:
    """The length of the socket ``encode_sock`` wrote at ``at`` when the SOCKET flag says one
    is there (16-bit flags, 0x8000 IPv6; port; 4 or 16 address bytes), 0 without the flag,
    -1 when the datagram is too short for it."""
    if not bits & _N2N_FLAG_SOCKET:
        return 0
    if n < at + 2:
        return -1
    return 20 if _U16.unpack_from(p, at)[0] & 0x8000 else 8


def _n2n(version: int, msg: str, community: str, more: str, from_supernode: bool) -> Detection:
    who = "from a supernode" if from_supernode else "from an edge"
    return Detection(
        TUNNEL_N2N,
        f"n2n v{version} {msg} {who}, community {community!r}: {more}",
        info={"version": str(version), "message": msg, "community": community},
    )


# -- SoftEther NAT-T -----------------------------------------------------------------------
_PACK_MAX_ELEMENTS: Final = 64  # the NAT-T requests carry a dozen at most
_PACK_MAX_VALUES: Final = 16  # and one value each
_PACK_MAX_NAME: Final = 63  # MAX_ELEMENT_NAME_LEN
_PACK_NAME: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_PACK_INT, _PACK_DATA, _PACK_STR, _PACK_UNISTR, _PACK_INT64 = 0, 1, 2, 3, 4


def _softether_pack(p: bytes, n: int) -> Detection | None:
    """A datagram that is exactly one serialised PACK (Pack.c ``WritePack``) holding
    SoftEther's NAT-T ``opcode`` and ``nat_traversal_version``."""
    count = p[3]
    if not 1 <= count <= _PACK_MAX_ELEMENTS:
        return None
    pos = 4
    opcode = ""
    version = -1
    for _ in range(count):
        if pos + 4 > n:
            return None
        stored = _U32.unpack_from(p, pos)[0]  # WriteBufStr: length + 1, then the name without NUL
        if not 2 <= stored <= _PACK_MAX_NAME + 1 or pos + 4 + stored - 1 + 8 > n:
            return None
        name = p[pos + 4 : pos + 3 + stored]
        if not set(name) <= _PACK_NAME:
            return None
        pos += 3 + stored
        vtype, nval = _U32.unpack_from(p, pos)[0], _U32.unpack_from(p, pos + 4)[0]
        pos += 8
        if vtype > _PACK_INT64 or not 1 <= nval <= _PACK_MAX_VALUES:
            return None
        for _ in range(nval):
            if vtype in (_PACK_INT, _PACK_INT64):
                size = 4 if vtype == _PACK_INT else 8
                if pos + size > n:
                    return None
                if vtype == _PACK_INT and name == b"nat_traversal_version":
                    version = _U32.unpack_from(p, pos)[0]
                pos += size
                continue
            if pos + 4 > n:
                return None
            size = _U32.unpack_from(p, pos)[0]
            end = pos + 4 + size
            if end > n or (vtype == _PACK_UNISTR and (size == 0 or p[end - 1] != 0)):
                return None
            if vtype == _PACK_STR and name == b"opcode":
                opcode = p[pos + 4 : end].decode("ascii", "replace")
            pos = end
    if pos != n or not opcode or version < 0:
        return None
    return Detection(
        TUNNEL_SOFTETHER_NAT_T,
        f"SoftEther VPN NAT-T request: a {count}-element PACK filling the datagram ({n} bytes), "
        f"opcode {opcode!r}, nat_traversal_version {version}",
        info={"opcode": opcode},
    )
