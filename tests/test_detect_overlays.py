"""Peer-to-peer overlays (ZeroTier, Tailscale disco, n2n): byte-exact datagrams built the way
the implementations write them, one field wrong at a time, and the benign UDP a training
node sends, none of which may match."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from egressd.detect.base import Detection
from egressd.detect.overlays import detect_overlay
from egressd.detect.tunnels import detect_datagram
from egressd.packet import PROTO_UDP, Packet, decode
from egressd.pcapio import Reader

# ZeroTierOne selftest.cpp's known-good identity: address 8e4df28b72, type 0, its public key.
ZT_ADDR = bytes.fromhex("8e4df28b72")
ZT_PUB = bytes.fromhex(
    "ac3d46abe0c21f3cfe7a6c8d6a85cfcffcb82fbd55af6a4d6350657c68200843"
    "fa2e16f9418bbd9702cae365f2af5fb4c420908b803a681d4daef6114d78a2d7"
)
ZT_ROOT = bytes.fromhex("778cde7190")  # a destination address (a root server's)
AT_V4 = b"\x04" + bytes([203, 0, 113, 9]) + struct.pack("!H", 9993)


def zt_hello(
    *,
    source: bytes = ZT_ADDR,
    identity_address: bytes | None = None,
    dest: bytes = ZT_ROOT,
    flags: int = 0x00,
    verb: int = 0x01,
    proto: int = 11,
    id_type: int = 0,
    privlen: int = 0,
    at: bytes = AT_V4,
    tail: bool = True,
) -> bytes:
    """Peer::sendHELLO: header (Packet.hpp ZT_PACKET_IDX_*), then protocol version, major,
    minor, revision, timestamp, Identity::serialize(false), InetAddress::serialize, world id
    and timestamp, then the encrypted moon/certificate part."""
    header = os.urandom(8) + dest + source + bytes([flags]) + os.urandom(8) + bytes([verb])
    body = bytes([proto, 1, 14]) + struct.pack("!HQ", 2, 1_764_900_000_000)
    identity = (identity_address or source) + bytes([id_type]) + ZT_PUB + bytes([privlen])
    world = struct.pack("!QQ", 149_604_618, 1_567_191_349_589) if tail else b""
    return header + body + identity + at + world + (os.urandom(40) if tail else b"")


TS_MAGIC = bytes.fromhex("5453f09f92ac")


def disco(key: bytes | None = None, box: int = 16 + 2 + 12 + 32, magic: bytes = TS_MAGIC) -> bytes:
    """disco.go: magic, sender disco public key, nonce, NaCl box (a Ping: type, version,
    TxID, node key, sealed with a 16-byte tag)."""
    return magic + (key if key is not None else os.urandom(32)) + os.urandom(24) + os.urandom(box)


def n2n_v1(
    *, msg: int = 1, community: bytes = b"labnet\x00\x00\xc0\xdc\xb8\x85\xae\x7f\x00\x00", ttl: int = 0
) -> bytes:
    """n2n 1.3 marshall_n2n_packet_header: the 84-byte header struct, then the empty LZO stream."""
    hdr = bytes([1, msg, ttl, 0]) + community + bytes.fromhex("02005e005301") + bytes(6)
    hdr += b"\x02\x00" + bytes(18)  # public_ip: peer_addr, family AF_INET
    hdr += b"\x02\x00\xdb\x21" + bytes(16)  # private_ip: getsockname's sockaddr_in
    hdr += b"\x00" + bytes(8) + bytes(3)  # pkt_type, sequence id, crc, struct tail
    assert len(hdr) == 84
    return hdr + b"\x11\x00\x00"


def n2n_v2_register_super(*, flags: int = 5, community: bytes = b"labnet".ljust(16, b"\x00")) -> bytes:
    """n2n 2.x wire.c encode_REGISTER_SUPER: common, cookie, edge MAC, auth scheme 0, size 0."""
    return b"\x02\x02" + struct.pack("!H", flags) + community + os.urandom(4) + bytes.fromhex("02005e005302") + bytes(4)


def n2n_v3_register_super(token: bytes = b"", declared: int | None = None, community_size: int = 20) -> bytes:
    """n2n 3.x src/wire.c encode_REGISTER_SUPER: common (version 3, 20-byte community),
    cookie, edge MAC, device address and bit length, description, auth, key time."""
    common = b"\x03\x02" + struct.pack("!H", 5) + b"gpu-cluster".ljust(community_size, b"\x00")
    body = os.urandom(4) + bytes.fromhex("02005e005303") + bytes([203, 0, 113, 225, 28]) + b"edge1".ljust(16, b"\x00")
    auth = struct.pack("!HH", 1, len(token) if declared is None else declared) + token
    return common + body + auth + struct.pack("!I", 0)


def n2n_v3_register(sock: bytes = b"") -> bytes:
    flags = 1 | (0x40 if sock else 0)
    common = b"\x03\x02" + struct.pack("!H", flags) + b"gpu-cluster".ljust(20, b"\x00")
    macs = bytes.fromhex("02005e005303") + bytes.fromhex("02005e005304")
    return common + os.urandom(4) + macs + sock + bytes([203, 0, 113, 225, 28]) + bytes(16)


def kind(p: bytes) -> str | None:
    d = detect_overlay(p)
    return d.kind if d is not None else None


# -- ZeroTier ------------------------------------------------------------------------------
def test_the_hot_path_literals_are_the_zerotier_offsets() -> None:
    from egressd.detect import overlays

    assert (overlays._ZT_MIN_HELLO, overlays._ZT_IDX_VERB, overlays._ZT_ID_TYPE) == (113, 27, 46)
    assert overlays._ZT_VERB_HELLO == 1


def test_zerotier_hello_is_named_with_its_node_address() -> None:
    d = detect_overlay(zt_hello())
    assert isinstance(d, Detection) and d.kind == "tunnel.zerotier"
    assert d.info["node"] == "8e4df28b72" and d.info["peer"] == "778cde7190"
    assert d.info["version"] == "1.14.2"
    assert "identity type 0" in d.evidence


AT_V6 = b"\x06" + bytes.fromhex("20010db8000200000000000000000009") + b"\x27\x09"


@pytest.mark.parametrize("at", [b"\x00", AT_V4, AT_V6])
def test_zerotier_hello_with_each_kind_of_destination_address(at: bytes) -> None:
    assert kind(zt_hello(at=at)) == "tunnel.zerotier"


def test_zerotier_hello_on_a_trusted_path_and_with_hops_and_fragment_flag() -> None:
    assert kind(zt_hello(flags=2 << 3)) == "tunnel.zerotier"  # NO_CRYPTO_TRUSTED_PATH
    assert kind(zt_hello(flags=0x40 | 3)) == "tunnel.zerotier"  # fragmented, 3 hops


def test_zerotier_hello_through_detect_datagram_on_any_port() -> None:
    for dport in (9993, 443, 53000):
        d = detect_datagram(zt_hello(), True, 41000, dport)
        assert d is not None and d.kind == "tunnel.zerotier"


@pytest.mark.parametrize(
    "why, payload",
    [
        ("identity address != source address", zt_hello(identity_address=bytes.fromhex("8e4df28b73"))),
        ("verb OK", zt_hello(verb=0x03)),
        ("verb ERROR", zt_hello(verb=0x02)),
        ("compressed verb (LZ4 payload, no fixed layout)", zt_hello(verb=0x81)),
        ("cipher suite Salsa20/12 (encrypted)", zt_hello(flags=1 << 3)),
        ("cipher suite AES-GMAC-SIV", zt_hello(flags=3 << 3)),
        ("identity type P-384", zt_hello(id_type=1)),
        ("private key included", zt_hello(privlen=64)),
        ("protocol version below the minimum", zt_hello(proto=3)),
        ("unknown destination address type", zt_hello(at=b"\x05" + bytes(6))),
        ("source address with the reserved prefix", zt_hello(source=bytes.fromhex("ff4df28b72"))),
        ("destination with the reserved prefix", zt_hello(dest=bytes.fromhex("ff8cde7190"))),
        ("zero source address", zt_hello(source=bytes(5))),
    ],
)
def test_zerotier_one_field_wrong_is_not_named(why: str, payload: bytes) -> None:
    assert kind(payload) != "tunnel.zerotier", why


def test_zerotier_hello_too_short_for_its_destination_address() -> None:
    full = zt_hello(at=AT_V4, tail=False)
    assert kind(full) == "tunnel.zerotier"
    assert kind(full[:-1]) is None
    assert kind(zt_hello(at=b"\x00", tail=False)[:-1]) is None  # the address type byte cut off


# -- Tailscale disco -----------------------------------------------------------------------
def test_disco_magic_is_the_bytes_of_disco_go() -> None:
    assert "TS\U0001f4ac".encode() == TS_MAGIC


def test_tailscale_disco_ping_is_named() -> None:
    key = bytes(range(1, 33))
    d = detect_overlay(disco(key=key))
    assert isinstance(d, Detection) and d.kind == "tunnel.tailscale"
    assert d.info["disco_key"] == key.hex()
    d = detect_datagram(disco(), False, 41641, 41641)
    assert d is not None and d.kind == "tunnel.tailscale"


def test_tailscale_disco_minimum_length() -> None:
    assert kind(disco(box=18)) == "tunnel.tailscale"  # tag + type + version: 80 bytes
    assert len(disco(box=18)) == 80
    assert kind(disco(box=17)) is None


@pytest.mark.parametrize("i", range(6))
def test_tailscale_magic_off_by_one_byte(i: int) -> None:
    magic = bytearray(TS_MAGIC)
    magic[i] ^= 0x01
    assert kind(disco(magic=bytes(magic))) is None


def test_tailscale_zero_sender_key_is_not_a_disco_message() -> None:
    assert kind(disco(key=bytes(32))) is None


# -- n2n -----------------------------------------------------------------------------------
def test_n2n_v1_register_as_the_debian_edge_sends_it() -> None:
    p = n2n_v1()
    assert len(p) == 87
    d = detect_overlay(p)
    assert isinstance(d, Detection) and d.kind == "tunnel.n2n"
    assert d.info == {"version": "1", "message": "REGISTER", "community": "labnet"}
    assert "02:00:5e:00:53:01" in d.evidence


def test_n2n_v1_first_datagram_of_the_recorded_capture() -> None:
    """The real first datagram of pcaps/tunnels/n2n.pcap (Debian n2n 1.3 edge)."""
    first = None
    for _ts, raw in Reader(Path(__file__).resolve().parents[1] / "pcaps" / "tunnels" / "n2n.pcap"):
        pkt = decode(raw)
        if isinstance(pkt, Packet) and pkt.proto == PROTO_UDP:
            first = pkt.payload
            break
    assert first is not None and len(first) == 87 and first[:2] == b"\x01\x01"
    d = detect_overlay(first)
    assert d is not None and d.kind == "tunnel.n2n" and d.info["community"] == "labnet"


@pytest.mark.parametrize(
    "why, payload",
    [
        ("version 4", b"\x04" + n2n_v1()[1:]),
        ("message type 0", n2n_v1(msg=0)),
        ("message type 9", n2n_v1(msg=9)),
        ("TTL 3", n2n_v1(ttl=3)),
        ("community without a NUL", n2n_v1(community=b"A" * 16)),
        ("empty community", n2n_v1(community=bytes(16))),
        ("community with a control byte", n2n_v1(community=b"lab\x01net".ljust(16, b"\x00"))),
        ("public address family not AF_INET", n2n_v1()[:32] + b"\x0a" + n2n_v1()[33:]),
        ("private address family wrong", n2n_v1()[:52] + b"\x0a\x00" + n2n_v1()[54:]),
        ("packet type 7", n2n_v1()[:72] + b"\x07" + n2n_v1()[73:]),
        ("multicast source MAC", n2n_v1()[:20] + b"\x03" + n2n_v1()[21:]),
        ("shorter than the header", n2n_v1()[:83]),
    ],
)
def test_n2n_v1_one_field_wrong_is_not_named(why: str, payload: bytes) -> None:
    assert kind(payload) is None, why


def test_n2n_v2_register_super_is_exactly_34_bytes() -> None:
    p = n2n_v2_register_super()
    assert len(p) == 34
    d = detect_overlay(p)
    assert d is not None and d.kind == "tunnel.n2n" and d.info["message"] == "REGISTER_SUPER"
    assert d.info["version"] == "2"
    assert kind(p + b"\x00") is None  # one byte more than the layout
    assert kind(p[:-1]) is None
    assert kind(n2n_v2_register_super(flags=5 | 0x0100)) is None  # a flag bit n2n does not define
    assert kind(n2n_v2_register_super(flags=3)) is None  # PACKET: not a registration
    assert kind(n2n_v2_register_super(community=b"labnet\x00x".ljust(16, b"\x00"))) is None  # not NUL padded


def test_n2n_v3_register_super_with_and_without_token() -> None:
    for token in (b"", os.urandom(48)):
        d = detect_overlay(n2n_v3_register_super(token))
        assert d is not None and d.kind == "tunnel.n2n", len(token)
        assert d.info == {"version": "3", "message": "REGISTER_SUPER", "community": "gpu-cluster"}
    assert kind(n2n_v3_register_super(b"abcd", declared=5)) is None  # token size disagrees with the length
    assert kind(n2n_v3_register_super(community_size=16)) is None  # a v2-sized community in a v3 header


def test_n2n_v3_query_peer_is_38_bytes() -> None:
    """encode_QUERY_PEER: common, source MAC, target MAC (zero: a supernode ping), aflags."""
    common = b"\x03\x02" + struct.pack("!H", 11) + b"gpu-cluster".ljust(20, b"\x00")
    p = common + bytes.fromhex("02005e005303") + bytes(6) + struct.pack("!H", 0)
    assert len(p) == 38
    d = detect_overlay(p)
    assert d is not None and d.kind == "tunnel.n2n" and d.info["message"] == "QUERY_PEER"
    assert kind(p + b"\x00") is None
    assert kind(b"\x02" + p[1:]) is None  # n2n 2 has no QUERY_PEER
    assert kind(p[:2] + struct.pack("!H", 10) + p[4:]) is None  # PEER_INFO: not this layout


def test_n2n_v3_register_with_and_without_socket() -> None:
    assert kind(n2n_v3_register()) == "tunnel.n2n"
    v4 = struct.pack("!HH", 0, 7654) + bytes([203, 0, 113, 96])
    v6 = struct.pack("!HH", 0x8000, 7654) + bytes.fromhex("20010db8000200000000000000000096")
    assert kind(n2n_v3_register(v4)) == "tunnel.n2n"
    assert kind(n2n_v3_register(v6)) == "tunnel.n2n"
    assert kind(n2n_v3_register(v4)[:-1]) is None


# -- what a training node sends that must never match ---------------------------------------
def _dns_query(name: bytes = b"\x07example\x03com\x00") -> bytes:
    return os.urandom(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"


BENIGN = {
    "dns": _dns_query(),
    "dns-long": _dns_query(b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x03com\x00"),
    "mdns": b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x0b_googlecast\x04_tcp\x05local\x00\x00\x0c\x00\x01",
    "quic-initial": b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x00\x00\x44\xd0" + os.urandom(1200),
    "quic-v2": b"\xd3\x6b\x33\x43\xcf\x08" + os.urandom(8) + b"\x00\x00\x44\xd0" + os.urandom(1200),
    "ntp": b"\x23" + bytes(39) + os.urandom(8),
    "ssdp": b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n"
    b"ST: ssdp:all\r\n\r\n",
    "stun-binding": b"\x00\x01\x00\x08\x21\x12\xa4\x42" + os.urandom(12) + b"\x00\x03\x00\x04\x00\x00\x00\x00",
    "stun-binding-tailscale-derp": b"\x00\x01\x00\x0c\x21\x12\xa4\x42" + os.urandom(12)
    + b"\x80\x22\x00\x08tailnode",
    "wireguard-init": b"\x01\x00\x00\x00" + os.urandom(144),
    "wireguard-response": b"\x02\x00\x00\x00" + os.urandom(88),
    "wireguard-data": b"\x04\x00\x00\x00" + os.urandom(76),
    "dtls-client-hello": b"\x16\xfe\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x9c\x01\x00\x00\x90" + os.urandom(0x90),
    "dtls-1.0": b"\x16\xfe\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x50" + os.urandom(0x50),
    "syslog": b"<14>Dec  5 13:00:00 gpu-node-7 trainer[2211]: epoch 3 loss 0.412",
    "statsd": b"train.step.duration:212|ms|#host:gpu-node-7",
    "nccl-ish": bytes(range(256)) * 4,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_datagrams_are_not_overlays(name: str) -> None:
    assert detect_overlay(BENIGN[name]) is None


def test_wireguard_is_still_named_wireguard() -> None:
    d = detect_datagram(BENIGN["wireguard-init"], True, 40000, 51820)
    assert d is not None and d.kind == "tunnel.wireguard"


def test_random_datagrams_with_the_cheap_bytes_forced_never_match() -> None:
    """The first byte (n2n, disco) and ZeroTier's verb and identity type byte set to what
    the detectors look at first: the field-by-field checks after them must still reject."""
    rng = os.urandom
    hits = []
    for i in range(6000):
        b = bytearray(rng(34 + (i * 37) % 600))
        b[0] = (1, 2, 3, 0x54, b[0], b[0])[i % 6]
        if len(b) > 46 and i % 2:
            b[27], b[46] = 1, 0
        if detect_overlay(bytes(b)) is not None:
            hits.append(bytes(b).hex())
    assert not hits


# -- SoftEther NAT-T -----------------------------------------------------------------------
def pack(*elements: tuple[str, int, bytes]) -> bytes:
    """Pack.c WritePack: element count, then per element WriteBufStr(name) (length + 1, the
    name without its NUL), type, value count (1 here) and the value as WriteValue writes it."""
    out = struct.pack("!I", len(elements))
    for name, vtype, value in elements:
        out += struct.pack("!I", len(name) + 1) + name.encode() + struct.pack("!II", vtype, 1)
        if vtype in (1, 2, 3):  # DATA, STR, UNISTR: a length, then the bytes
            out += struct.pack("!I", len(value))
        out += value
    return out


def natt(opcode: bytes = b"get_token", version: int = 1, extra: tuple[tuple[str, int, bytes], ...] = ()) -> bytes:
    """RUDPDo_NatT_Interrupt: PackAddStr opcode, PackAddInt64 tran_id, PackAddInt nat_traversal_version."""
    return pack(("opcode", 2, opcode), ("tran_id", 4, os.urandom(8)), *extra,
                ("nat_traversal_version", 0, struct.pack("!I", version)))  # fmt: skip


def test_softether_natt_get_token_is_named() -> None:
    p = natt()
    assert p[14:18] == b"\x00\x00\x00\x02"  # opcode's type, STR (the negative test below changes it)
    assert len(p) == 99  # the size SoftEther's get_token request has on the wire
    d = detect_overlay(p)
    assert isinstance(d, Detection) and d.kind == "tunnel.softether.nat-t"
    assert d.info["opcode"] == "get_token" and "nat_traversal_version 1" in d.evidence


def test_softether_natt_register_with_every_value_type() -> None:
    extra = (
        ("host_name", 2, b"vpn"),
        ("machine_key", 1, os.urandom(20)),
        ("product_str", 3, b"SoftEther OSS\x00"),
        ("private_port", 0, struct.pack("!I", 51381)),
    )
    d = detect_overlay(natt(b"nat_t_register", extra=extra))
    assert d is not None and d.info["opcode"] == "nat_t_register"


@pytest.mark.parametrize(
    "why, payload",
    [
        ("one byte more than the PACK", natt() + b"\x00"),
        ("one byte less", natt()[:-1]),
        ("no opcode element", pack(("tran_id", 4, bytes(8)), ("nat_traversal_version", 0, bytes(4)))),
        ("no nat_traversal_version", pack(("opcode", 2, b"get_token"), ("tran_id", 4, bytes(8)))),
        ("unknown value type", natt()[:14] + b"\x00\x00\x00\x05" + natt()[18:]),  # opcode's type: 5
        ("element count says 4", b"\x00\x00\x00\x04" + natt()[4:]),
        ("name with a space", pack(("op code", 2, b"get_token"), ("nat_traversal_version", 0, bytes(4)))),
        ("UNISTR without its NUL", natt(extra=(("product_str", 3, b"SoftEther"),))),
        ("the one-byte IP query", b"A"),
    ],
)  # fmt: skip
def test_softether_one_field_wrong_is_not_named(why: str, payload: bytes) -> None:
    assert kind(payload) is None, why


def geneve(protocol: int = 0x7A11, control: bool = True, vni: int = 0x123456) -> bytes:
    """net/packet/geneve.go GeneveHeader.Encode: version 0, no options, the control bit,
    the protocol type, a 24-bit VNI and a reserved byte."""
    return bytes([0, 0x40 if control else 0]) + struct.pack("!H", protocol) + vni.to_bytes(3, "big") + b"\x00"


def test_tailscale_disco_through_a_peer_relay() -> None:
    d = detect_overlay(geneve() + disco())
    assert d is not None and d.kind == "tunnel.tailscale" and "VNI 1193046" in d.evidence
    assert kind(geneve(control=False) + disco()) == "tunnel.tailscale"
    assert kind(geneve(protocol=0x7A12) + disco()) is None  # relayed WireGuard: not a disco message
    assert kind(geneve()[:7] + b"\x01" + disco()) is None  # reserved byte set
    assert kind(geneve() + disco(magic=b"TS\xf0\x9f\x92\xad")) is None


# -- through the engine, with the shipped policy ---------------------------------------------
@pytest.mark.parametrize(
    "name, payload, kind_",
    [
        ("zerotier", zt_hello(), "tunnel.zerotier"),
        ("tailscale", disco(), "tunnel.tailscale"),
        ("n2n-v1", n2n_v1(), "tunnel.n2n"),
        ("n2n-v3", n2n_v3_register_super(), "tunnel.n2n"),
        ("softether", natt(), "tunnel.softether.nat-t"),
    ],
)
def test_the_engine_alerts_on_the_first_datagram_on_any_port(name: str, payload: bytes, kind_: str) -> None:
    from scapy.layers.inet import IP, UDP

    from egressd.engine import Engine
    from egressd.paths import default_policy
    from egressd.policy import load_policy

    eng = Engine(load_policy(default_policy()))
    eng.feed(bytes(IP(src="198.51.100.2", dst="203.0.113.9") / UDP(sport=40000, dport=443) / payload), 1000.0)
    ev = eng.events[-1]
    assert (ev.verdict, ev.rule) == ("alert", "alert-vpn-tunnels"), name
    assert ev.detection is not None and ev.detection["kind"] == kind_, name
