"""VPN handshakes: recognised from the first message the protocol's specification fixes."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, StreamContext
from egressd.detect.tunnels import detect_datagram, detect_stream

CTX = StreamContext(40000, 443)


def wg_init() -> bytes:
    return b"\x01\x00\x00\x00" + os.urandom(144)


def ike_sa_init(version: int = 0x20, exchange: int = 34, extra: int = 200) -> bytes:
    body = os.urandom(extra)
    hdr = os.urandom(8) + bytes(8) + bytes([33, version, exchange, 0x08]) + bytes(4)
    return hdr + struct.pack("!I", 28 + len(body)) + body


def ovpn_reset(opcode: int = 7 << 3, rest: int = 40) -> bytes:
    rec = bytes([opcode]) + os.urandom(8) + os.urandom(rest)
    return struct.pack("!H", len(rec)) + rec


def test_wireguard_handshake_initiation_is_recognised() -> None:
    d = detect_datagram(wg_init(), True, 40000, 51820)
    assert isinstance(d, Detection) and d.kind == "tunnel.wireguard"


def test_wireguard_on_any_port() -> None:
    d = detect_datagram(wg_init(), True, 40000, 443)
    assert d is not None and d.kind == "tunnel.wireguard"


def test_wireguard_length_must_be_exact() -> None:
    assert detect_datagram(wg_init() + b"x", True, 1, 51820) is None
    assert detect_datagram(wg_init()[:-1], True, 1, 51820) is None


def test_wireguard_transport_data_mid_session_is_recognised_with_lower_confidence() -> None:
    d = detect_datagram(b"\x04\x00\x00\x00" + os.urandom(12 + 80), True, 1, 5060)
    assert d is not None and d.kind == "tunnel.wireguard" and d.confidence < 1.0
    assert detect_datagram(b"\x04\x00\x00\x00" + os.urandom(12 + 81), True, 1, 5060) is None


def test_ikev2_sa_init_is_recognised_on_500_and_after_the_nat_t_marker_on_4500() -> None:
    msg = ike_sa_init()
    assert (d := detect_datagram(msg, True, 500, 500)) is not None and d.kind == "tunnel.ike"
    assert (d := detect_datagram(bytes(4) + msg, True, 4500, 4500)) is not None and d.info["version"] == "2"


def test_ikev1_main_mode_is_recognised() -> None:
    d = detect_datagram(ike_sa_init(version=0x10, exchange=2), True, 500, 500)
    assert d is not None and d.info["version"] == "1"


def test_ike_length_field_must_match_and_spi_must_not_be_zero() -> None:
    msg = bytearray(ike_sa_init())
    msg[27] ^= 1
    assert detect_datagram(bytes(msg), True, 500, 500) is None
    zero_spi = bytes(8) + ike_sa_init()[8:]
    assert detect_datagram(zero_spi, True, 500, 500) is None


def test_quic_and_dns_like_datagrams_are_not_tunnels() -> None:
    quic_initial = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(1194)
    assert detect_datagram(quic_initial, True, 50000, 443) is None
    assert detect_datagram(b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x03www\x00\x00\x01\x00\x01", True, 5, 53) is None


def test_openvpn_tcp_hard_reset_is_recognised_and_confirmed_by_the_server() -> None:
    c = ovpn_reset()
    d = detect_stream(c, b"", CTX)
    assert isinstance(d, Detection) and d.kind == "tunnel.openvpn"
    s = ovpn_reset(opcode=8 << 3)
    d2 = detect_stream(c, s, CTX)
    assert isinstance(d2, Detection) and d2.info["server"] == "P_CONTROL_HARD_RESET_SERVER_V2"


def test_openvpn_reset_split_needs_more_then_detects() -> None:
    c = ovpn_reset()
    for i in range(1, len(c)):
        assert detect_stream(c[:i], b"", CTX) is NEED_MORE
    assert isinstance(detect_stream(c, b"", CTX), Detection)


def test_openvpn_client_reset_answered_by_something_else_is_not_openvpn() -> None:
    assert detect_stream(ovpn_reset(), b"HTTP/1.1 400 Bad Request\r\n", CTX) is NOT_THIS


def test_common_tcp_openings_are_not_openvpn() -> None:
    for first in (b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x16\x03\x01\x02\x00\x01", b'{"id":1}\n'):
        assert detect_stream(first, b"", CTX) is NOT_THIS


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=40), st.booleans(), st.integers(0, 65535))
def test_arbitrary_bytes_never_raise(a: bytes, b: bytes, orig: bool, port: int) -> None:
    detect_datagram(a, orig, port, 4500)
    detect_stream(a, b, StreamContext(port, 1194, True, True, True, True))
