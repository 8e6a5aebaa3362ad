"""detect/relays.py: frp, bore, chisel, vtun and Yggdrasil from the bytes their sources write.

frp, bore and chisel are not packaged for Debian: their streams here are built byte for byte
from their sources (each builder names the file and function it follows), and these crafted
streams are the evidence for them. vtun and Yggdrasil also have real captures
(pcaps/tunnels/vtun.pcap, yggdrasil.pcap, replayed by tests/test_tunnels_golden.py).
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, Result, StreamContext
from egressd.detect.relays import detect_relays
from egressd.detect.tls import detect_tls
from egressd.detect.websocket import WebSocketDetector
from egressd.engine import _PROTOCOL_DETECTORS, PIN_DENY, Engine
from egressd.paths import default_policy
from egressd.policy import load_policy
from tests.test_detect_covert_tunnels import SWITCH, frame
from tests.test_engine import Conn, feed_all

CTX = StreamContext(40000, 7000)
CLOSED = StreamContext(40000, 7000, fwd_closed=True, rev_closed=True)


def det(fwd: bytes, rev: bytes = b"", ctx: StreamContext = CTX) -> Detection:
    r = detect_relays(fwd, rev, ctx)
    assert isinstance(r, Detection), r
    return r


def grows(data: bytes, *, rev: bytes = b"", fwd_side: bool = True) -> Result:
    """Feed ``data`` one byte more at a time (1-byte segments): no prefix may be given up on
    (NOT_THIS); the first finding, or the outcome on the whole, is returned."""
    for i in range(1, len(data)):
        part = data[:i]
        r = detect_relays(part, rev, CTX) if fwd_side else detect_relays(rev, part, CTX)
        assert r is not NOT_THIS, f"gave up after {i} bytes: {part!r}"
        if isinstance(r, Detection):
            return r
    return detect_relays(data, rev, CTX) if fwd_side else detect_relays(rev, data, CTX)


# -- frp: golib msg/json framing, pkg/msg/msg.go types -------------------------------------------
def frp_msg(type_byte: bytes, obj: dict[str, object]) -> bytes:
    """golib msg/json Pack: the type byte, an int64 big-endian length, Go's json.Marshal (no
    spaces, struct field order)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return type_byte + struct.pack(">q", len(body)) + body


# msg.Login in struct order, empty fields omitted (omitempty), as frpc 0.52 writes it.
LOGIN = frp_msg(b"o", {"version": "0.52.3", "os": "linux", "arch": "amd64",
                       "privilege_key": "5f1c0e6a9d1d4a3c8b1e2f3a4b5c6d7e", "timestamp": 1700000000,
                       "pool_count": 1})  # fmt: skip
WORK = frp_msg(b"w", {"run_id": "a1b2c3d4e5f60718", "privilege_key": "0c1d", "timestamp": 1700000001})


def yamux(typ: int, flags: int, sid: int, length: int) -> bytes:
    """hashicorp/yamux const.go header.encode: version 0, type, flags, stream id, length."""
    return struct.pack(">BBHII", 0, typ, flags, sid, length)


# The client opens stream 1 with a SYN window update (stream.go sendWindowUpdate; frp raises
# MaxStreamWindowSize, so the delta is not zero), then writes the Login in a data frame.
YAMUX_LOGIN = yamux(1, 1, 1, 6 * 1024 * 1024 - 256 * 1024) + yamux(0, 0, 1, len(LOGIN)) + LOGIN


def client_hello() -> bytes:
    """A real ClientHello, from OpenSSL through Python's ssl module (no socket)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="frps.example.net")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_frp_login_without_mux_is_named_with_its_facts() -> None:
    d = det(LOGIN)
    assert d.kind == "tunnel.frp"
    assert d.info["message"] == "Login" and d.info["version"] == "0.52.3" and d.info["os"] == "linux"
    assert "type 'o'" in d.evidence and "amd64" in d.evidence


def test_frp_login_inside_yamux_stream_1_is_named() -> None:
    d = det(YAMUX_LOGIN)
    assert d.kind == "tunnel.frp" and "yamux stream 1" in d.evidence and d.info["arch"] == "amd64"


def test_frp_login_split_into_one_byte_segments_waits_then_is_named() -> None:
    for stream in (LOGIN, YAMUX_LOGIN):
        r = grows(stream)
        assert isinstance(r, Detection) and r.kind == "tunnel.frp"


def test_frp_work_connection_and_v2_magic_are_named() -> None:
    assert det(WORK).info["message"] == "NewWorkConn"
    assert det(yamux(1, 1, 1, 0) + yamux(0, 0, 1, len(WORK)) + WORK).info["message"] == "NewWorkConn"
    # pkg/proto/wire/wire.go: MagicV2, then the ClientHello frame (type 1, flags 0, u32 length).
    hello = b'{"bootstrap":{"tcpMux":true},"capabilities":{"message":{"codecs":["json"]}}}'
    v2 = b"FRP\x00\x02\r\n" + struct.pack(">HHI", 1, 0, len(hello)) + hello
    assert det(v2).info["wire"] == "v2"
    assert det(yamux(1, 1, 1, 0) + yamux(0, 0, 1, len(v2)) + v2).info["wire"] == "v2"


def test_frp_tls_head_byte_before_a_client_hello_is_frp_and_a_plain_client_hello_is_not() -> None:
    ch = client_hello()
    assert ch[:1] == b"\x16" and ch[5] == 1
    assert not isinstance(detect_relays(ch, b"", CTX), Detection)
    assert detect_relays(ch, b"", CLOSED) is NOT_THIS
    assert isinstance(detect_tls(ch, b"", CTX), Detection)  # the TLS detector still has it
    d = det(b"\x17" + ch)
    assert d.kind == "tunnel.frp" and d.info["transport"] == "tls"
    r = grows(b"\x17" + ch)
    assert isinstance(r, Detection) and r.kind == "tunnel.frp"
    # A TLS application-data record at byte 0 (a session picked up mid-way) is not frp's.
    assert detect_relays(b"\x17\x03\x03\x00\x20" + os.urandom(32), b"", CTX) is NOT_THIS


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=frps.example.net", "-days", "1", "-keyout", str(d / "k.pem"), "-out",
                    str(d / "c.pem")], check=True, capture_output=True, timeout=30)  # fmt: skip
    return str(d / "c.pem"), str(d / "k.pem")


def tls13_client_bytes(cert: tuple[str, str], writes: list[bytes], alpn: list[str] | None = None) -> bytes:
    """A real TLS 1.3 session (OpenSSL both ends, memory BIOs): the client's bytes, one record
    per ``write`` after the handshake, as a Go ``tls.Conn`` makes one record per ``Write``."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*cert)
    if alpn:
        sctx.set_alpn_protocols(alpn)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        cctx.set_alpn_protocols(alpn)
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(ci, co, server_hostname="frps.example.net")
    srv = sctx.wrap_bio(si, so, server_side=True)
    fwd = b""
    done = [False, False]
    for _ in range(10):
        for i, obj in enumerate((c, srv)):
            try:
                obj.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
        out = co.read()
        fwd += out
        si.write(out)
        ci.write(so.read())
        if all(done):
            break
    assert all(done)
    for w in writes:
        c.write(w)
        fwd += co.read()
    return fwd


def test_frpcs_own_transport_stack_go_tls_and_yamux_is_named() -> None:
    """The client's bytes as Go's crypto/tls and hashicorp/yamux (Debian's golang-go 1.19 and
    golang-github-hashicorp-yamux-dev) write them for frpc's control connection: recorded by
    tests/data/frp_wire/main.go (its header says how), not made up here. Go sends the dummy
    ChangeCipherSpec, a 53-byte Finished, then one record per yamux header."""
    data = (Path(__file__).parent / "data" / "frp_wire" / "client.bin").read_bytes()
    d = det(data)
    assert d.kind == "tunnel.frp" and d.info["transport"] == "tls"
    assert "two 12-byte yamux headers" in d.evidence
    records, pos = [], 0
    while pos + 5 <= len(data):
        records.append((pos, data[pos], int.from_bytes(data[pos + 3 : pos + 5], "big")))
        pos += 5 + records[-1][2]
    assert [(ct, n) for _, ct, n in records[1:5]] == [(0x14, 1), (0x17, 53), (0x17, 29), (0x17, 29)]
    login_at = records[5][0]
    assert detect_relays(data[: login_at + 3], b"", CTX) is NEED_MORE  # the Login's record not begun


def test_frp_over_tls13_is_named_from_yamux_record_sizes_and_https_is_not(cert: tuple[str, str]) -> None:
    frpc = tls13_client_bytes(cert, [yamux(1, 1, 1, 6029312), yamux(0, 0, 1, len(LOGIN)), LOGIN])
    d = det(frpc)
    assert d.kind == "tunnel.frp" and d.info["transport"] == "tls" and d.confidence < 1.0
    assert f"a {len(LOGIN)}-byte message" in d.evidence
    r = grows(frpc)
    assert isinstance(r, Detection) and r.kind == "tunnel.frp"
    ccs = b"\x14\x03\x03\x00\x01\x01"  # the dummy ChangeCipherSpec: a client may leave it out
    assert ccs in frpc and det(frpc.replace(ccs, b"", 1)).kind == "tunnel.frp"
    # The same library and handshake carrying HTTP/1.1, or yamux headers coalesced with the Login.
    http = tls13_client_bytes(cert, [b"GET / HTTP/1.1\r\nHost: frps.example.net\r\n\r\n"])
    assert detect_relays(http, b"", CTX) is NOT_THIS
    bare = tls13_client_bytes(cert, [])  # the handshake only: the records may still come
    assert detect_relays(bare, b"", CTX) is NEED_MORE
    assert detect_relays(bare, b"", CLOSED) is NOT_THIS
    two = tls13_client_bytes(cert, [b"GET / HTTP/1.1\r\n\r\n", b"x" * 12, b"y" * 12])
    assert detect_relays(two, b"", CTX) is NOT_THIS
    one = tls13_client_bytes(cert, [yamux(1, 1, 1, 6029312) + yamux(0, 0, 1, len(LOGIN)) + LOGIN])
    assert detect_relays(one, b"", CTX) is NOT_THIS
    # A client that offers ALPN (browsers, curl, Go's net/http) is never looked at.
    h2 = tls13_client_bytes(cert, [yamux(1, 1, 1, 0), yamux(0, 0, 1, len(LOGIN)), LOGIN], alpn=["h2"])
    assert detect_relays(h2, b"", CTX) is NOT_THIS


def test_frp_websocket_path_is_named_and_a_custom_path_is_named_from_what_it_carries() -> None:
    up = (b"GET /~!frp HTTP/1.1\r\nHost: 203.0.113.9:7000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://203.0.113.9:7000\r\n"
          b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    assert det(up).info["transport"] == "websocket"
    # A custom path (newer frp): the WebSocket decoder runs this detector on what the frames carry.
    custom = up.replace(b"/~!frp", b"/static/app")
    assert detect_relays(custom, b"", CTX) is NOT_THIS
    ws = WebSocketDetector(_PROTOCOL_DETECTORS)
    r = ws(custom + frame(YAMUX_LOGIN), SWITCH, CTX)
    assert isinstance(r, Detection) and r.kind == "tunnel.websocket" and r.info["inner_kind"] == "tunnel.frp"


def test_look_alikes_of_frp_framing_are_not_frp() -> None:
    # memcached's "version", a line protocol starting with 'w'/'o', other yamux users.
    for fwd in (b"version\r\n", b"watch /x\r\n", b"ok\n", b"options\r\n"):
        assert detect_relays(fwd, b"", CTX) is NOT_THIS, fwd
    other = b"hello from a consul stream"
    assert detect_relays(yamux(1, 1, 1, 0) + yamux(0, 0, 1, len(other)) + other, b"", CTX) is NOT_THIS
    assert detect_relays(yamux(0, 0, 3, 4) + b"abcd", b"", CTX) is NOT_THIS  # no stream 1 SYN first
    # The right type byte and length, but a body that is not frp's JSON.
    body = b'{"jsonrpc":"2.0","method":"x"}'
    assert detect_relays(b"o" + struct.pack(">q", len(body)) + body, b"", CTX) is NOT_THIS
    broken = LOGIN[:-1] + b"!"  # complete, same prefix, not JSON
    assert detect_relays(broken, b"", CTX) is NOT_THIS


def test_a_truncated_frp_message_gives_up_once_the_side_closed() -> None:
    assert detect_relays(LOGIN[:5], b"", CTX) is NEED_MORE
    assert detect_relays(LOGIN[:5], b"", CLOSED) is NOT_THIS
    assert detect_relays(YAMUX_LOGIN[:20], b"", CLOSED) is NOT_THIS


# -- bore: src/shared.rs (serde JSON + NUL), src/auth.rs -------------------------------------------
UUID = b"6f0b9c2e-8f5d-4b7a-9c3e-2a1d0e4f5b6c"
TAG = b"9" * 8 + b"a1b2c3d4" * 7  # hex HMAC-SHA256: 64 lowercase hex characters


def test_bore_hello_and_the_servers_answer_are_named() -> None:
    d = det(b'{"Hello":0}\x00', b'{"Hello":41234}\x00')
    assert d.kind == "tunnel.bore" and d.info["public_port"] == "41234" and d.info["requested_port"] == "0"
    assert "client Hello 0" in d.evidence and "server Hello 41234" in d.evidence


def test_bore_with_a_secret_is_named_from_the_servers_challenge_then_the_clients_answer() -> None:
    challenge = b'{"Challenge":"' + UUID + b'"}\x00'
    d = det(b"", challenge)
    assert d.kind == "tunnel.bore" and UUID.decode() in d.evidence
    d = det(b'{"Authenticate":"' + TAG + b'"}\x00{"Hello":8000}\x00', challenge)
    assert d.evidence.startswith("bore NUL-delimited JSON control messages: server Challenge")
    assert "client Authenticate" in d.evidence and "client Hello 8000" in d.evidence


def test_bore_accept_on_a_visitor_connection_is_named() -> None:
    assert "Accept " + UUID.decode() in det(b'{"Accept":"' + UUID + b'"}\x00').evidence


def test_bore_one_byte_segments_wait_then_name_it() -> None:
    r = grows(b'{"Hello":0}\x00')
    assert isinstance(r, Detection) and r.kind == "tunnel.bore"
    r = grows(b'{"Challenge":"' + UUID + b'"}\x00', fwd_side=False)
    assert isinstance(r, Detection) and r.kind == "tunnel.bore"


def test_json_rpc_http_chat_and_nul_terminated_text_are_not_bore() -> None:
    for fwd in (
        b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}\n',
        b'{"id":1,"method":"mining.subscribe","params":[]}\n',
        b'{"Hello":"world"}\x00',
        b'{"Hello":0}\n',  # the frame is over, no NUL
        b'{"Hello":070}\x00',  # serde writes no leading zero
        b'{"Hello":99999}\x00',  # not a port
        b'{"Accept":"not-a-uuid"}\x00',
        b'{"Authenticate":"short"}\x00',
        b'{"type":"message","text":"hi"}\x00',
        b"hello\x00",
        b"POST /rpc HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}",
    ):
        assert detect_relays(fwd, b"", CTX) is NOT_THIS, fwd
    # A server that speaks first with anything but a challenge.
    assert detect_relays(b"", b'{"Hello":5}\x00', CTX) is NOT_THIS
    assert detect_relays(b"", b'"Heartbeat"\x00', CTX) is NOT_THIS
    assert detect_relays(b'{"Hel', b"", CLOSED) is NOT_THIS


# -- chisel: share/version.go ProtocolVersion, client/client.go Subprotocols ----------------------
CHISEL_UP = (b"GET / HTTP/1.1\r\nHost: 203.0.113.5:8080\r\nUser-Agent: Go-http-client/1.1\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Protocol: chisel-v3\r\nSec-WebSocket-Version: 13\r\n"
             b"Upgrade: websocket\r\n\r\n")  # fmt: skip


def test_the_websocket_decoder_alone_does_not_name_chisels_ssh() -> None:
    """Why the upgrade must be named: chisel's SSH says "SSH-chisel-v3-client", no RFC 4253
    version line, so nothing inside the frames is recognised without this detector."""
    inner = tuple(x for x in _PROTOCOL_DETECTORS if x[0] != "relays")
    ws = WebSocketDetector(inner)
    fwd = CHISEL_UP + frame(b"SSH-chisel-v3-client\r\n")
    rev = SWITCH + frame(b"SSH-chisel-v3-server\r\n", mask=False)
    assert ws(fwd, rev, CLOSED) is NOT_THIS


def test_chisel_is_named_from_its_subprotocol() -> None:
    d = det(CHISEL_UP)
    assert d.kind == "tunnel.websocket" and d.info["tool"] == "chisel" and d.info["subprotocol"] == "chisel-v3"
    r = grows(CHISEL_UP)
    assert isinstance(r, Detection) and r.info["tool"] == "chisel"


def test_an_ordinary_websocket_or_get_is_not_chisel() -> None:
    chat = CHISEL_UP.replace(b"chisel-v3", b"chat, superchat")
    assert detect_relays(chat, b"", CTX) is NOT_THIS
    assert detect_relays(b"GET /chisel-v3 HTTP/1.1\r\nHost: x\r\n\r\n", b"", CTX) is NOT_THIS  # no upgrade
    assert detect_relays(b"GET / HTTP/1.1\r\nHost: x", b"", CTX) is NEED_MORE
    assert detect_relays(b"GET / HTTP/1.1\r\nHost: x", b"", CLOSED) is NOT_THIS


# -- vtun: auth.c auth_server/auth_client, print_p (50-byte NUL-padded lines) ---------------------
def vtun_line(text: bytes) -> bytes:
    return text + bytes(50 - len(text))


VTUN_BANNER = vtun_line(b"VTUN server ver 3.X 05/14/2022\n")


def test_vtun_server_greeting_is_named_and_the_host_line_added() -> None:
    d = det(b"", VTUN_BANNER)
    assert d.kind == "tunnel.vtun" and d.info["server_version"] == "3.X 05/14/2022" and "NUL-padded" in d.evidence
    d = det(vtun_line(b"HOST: lab\n"), VTUN_BANNER)
    assert d.info["host"] == "lab"
    r = grows(VTUN_BANNER, fwd_side=False)
    assert isinstance(r, Detection) and r.kind == "tunnel.vtun"


def test_other_server_greetings_are_not_vtun() -> None:
    for rev in (b"220 mail.example.net ESMTP\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"VTUNE profiler\n"):
        assert detect_relays(b"", rev, CTX) is NOT_THIS, rev
    assert detect_relays(b"EHLO x\r\n", VTUN_BANNER, CTX) is NOT_THIS


# -- Yggdrasil: src/core/version.go --------------------------------------------------------------
def ygg_04() -> bytes:
    return b"meta\x00\x04" + os.urandom(32)


def ygg_05() -> bytes:
    """version_metadata.encode(): meta, remaining length, TLVs major, minor, key, priority."""
    tlv = struct.pack(">HHH", 0, 2, 0) + struct.pack(">HHH", 1, 2, 5)
    tlv += struct.pack(">HH", 2, 32) + os.urandom(32) + struct.pack(">HHB", 3, 1, 0)
    return b"meta" + struct.pack(">H", len(tlv)) + tlv


def test_yggdrasil_metadata_of_both_generations_is_named() -> None:
    d = det(ygg_04(), ygg_04())
    assert d.kind == "tunnel.yggdrasil" and d.info["protocol"] == "0.4" and "node and peer" in d.evidence
    assert det(ygg_05()).info["protocol"] == "0.5"
    assert det(b"", ygg_05()).info["protocol"] == "0.5"
    for data in (ygg_04(), ygg_05()):
        r = grows(data)
        assert isinstance(r, Detection) and r.kind == "tunnel.yggdrasil"


def test_text_starting_with_meta_is_not_yggdrasil() -> None:
    for fwd in (b"metadata: {}\n", b"meta\x00\x35" + bytes(12), b"meta\x00\x09" + os.urandom(40)):
        assert detect_relays(fwd, b"", CTX) is NOT_THIS, fwd
    assert detect_relays(ygg_04(), b"HTTP/1.1 400 Bad Request\r\n", CTX) is NOT_THIS
    assert detect_relays(b"meta\x00\x04" + bytes(10), b"", CLOSED) is NOT_THIS


# -- never raises; the shipped policy ------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=120), st.booleans())
def test_hostile_bytes_never_raise(fwd: bytes, rev: bytes, closed: bool) -> None:
    for prefix in (b"", b"o", b"\x00\x01\x00\x01\x00\x00\x00\x01", b"\x17\x16\x03", b'{"', b"meta\x00", b"GET "):
        r = detect_relays(prefix + fwd, rev, CLOSED if closed else CTX)
        assert r is NEED_MORE or r is NOT_THIS or isinstance(r, Detection)
    r = detect_relays(b"", b"VTUN server ver " + rev, CTX)
    assert r is NEED_MORE or r is NOT_THIS or isinstance(r, Detection)


def test_every_truncation_of_every_stream_never_raises() -> None:
    for data in (LOGIN, YAMUX_LOGIN, WORK, CHISEL_UP, VTUN_BANNER, ygg_05(), b'{"Hello":0}\x00'):
        for i in range(len(data) + 1):
            for ctx in (CTX, CLOSED):
                detect_relays(data[:i], b"", ctx)
                detect_relays(b"", data[:i], ctx)


@pytest.mark.parametrize(
    ("fwd", "rev", "kind", "rule"),
    [
        (YAMUX_LOGIN, b"", "tunnel.frp", "drop-covert-tunnels"),
        (b'{"Hello":0}\x00', b'{"Hello":41234}\x00', "tunnel.bore", "drop-covert-tunnels"),
        (CHISEL_UP, b"", "tunnel.websocket", "drop-covert-tunnels"),
    ],
    ids=["frp", "bore", "chisel"],
)
def test_the_shipped_policy_drops_the_port_exposing_relays(fwd: bytes, rev: bytes, kind: str, rule: str) -> None:
    eng = Engine(load_policy(default_policy()))
    c = Conn("203.0.113.40", 7000)
    pkts = [c.syn(), c.synack(), c.c(fwd)] + ([c.s(rev)] if rev else [])
    verdicts = feed_all(eng, pkts)
    assert PIN_DENY in verdicts
    ev = eng.events[-1]
    assert ev.rule == rule and ev.detection is not None and ev.detection["kind"] == kind


# -- rathole: src/protocol.rs (bincode, fixed sizes) ------------------------------------------------
SERVICE_DIGEST = bytes.fromhex("4f2b6c8e1a3d5f7092b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d3e5f7")
NONCE = bytes.fromhex("9a8b7c6d5e4f30211f2e3d4c5b6a79881726354453627180f1e2d3c4b5a69788")
AUTH = bytes.fromhex("1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d")
RH_CLIENT_HELLO = b"\x00\x00\x00\x00" + b"\x00" + SERVICE_DIGEST  # ControlChannelHello(0, digest)
RH_SERVER_HELLO = b"\x00\x00\x00\x00" + b"\x00" + NONCE


def test_rathole_control_channel_is_named_from_both_hellos() -> None:
    d = det(RH_CLIENT_HELLO, RH_SERVER_HELLO)
    assert d.kind == "tunnel.rathole" and d.info["channel"] == "control"
    # + Auth (32 bytes), Ack::Ok and ControlChannelCmd::CreateDataChannel (4 bytes each)
    d = det(RH_CLIENT_HELLO + AUTH, RH_SERVER_HELLO + bytes(4) + bytes(4))
    assert "auth digest" in d.evidence
    r = grows(RH_CLIENT_HELLO, rev=RH_SERVER_HELLO)
    assert isinstance(r, Detection) and r.kind == "tunnel.rathole"
    assert detect_relays(RH_CLIENT_HELLO, b"", CTX) is NEED_MORE  # the server has not answered yet
    assert detect_relays(RH_CLIENT_HELLO, b"", CLOSED) is NOT_THIS


def test_rathole_data_channel_is_named_once_the_server_commands_it() -> None:
    hello = b"\x01\x00\x00\x00\x00" + AUTH  # DataChannelHello(0, session key)
    d = det(hello + b"HTTP/1.1 200 OK\r\n", b"\x00\x00\x00\x00" + b"GET / HTTP/1.1\r\n")
    assert d.kind == "tunnel.rathole" and d.info["channel"] == "data" and "StartForwardTcp" in d.evidence
    assert detect_relays(hello, b"\x05\x00\x00\x00", CTX) is NOT_THIS


def test_zero_led_binary_protocols_are_not_rathole() -> None:
    pg_ssl = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # PostgreSQL SSLRequest
    pg_startup = b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00"
    for fwd in (pg_ssl, pg_startup, bytes(64), b"\x00\x00\x00\x00\x00" + bytes(10) + b"x" * 22):
        assert detect_relays(fwd, b"", CTX) is NOT_THIS, fwd
    # The right client hello, but the server answers something else, or the client says more.
    assert detect_relays(RH_CLIENT_HELLO, b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(10), CTX) is NOT_THIS
    assert detect_relays(RH_CLIENT_HELLO + b"more", RH_SERVER_HELLO, CTX) is NOT_THIS
    assert detect_relays(RH_CLIENT_HELLO, RH_SERVER_HELLO + b"\x07\x00\x00\x00", CTX) is NOT_THIS


# -- gost relay: go-gost/relay relay.go Request.WriteTo, feature.go ----------------------------------
def gost_feature(ftype: int, value: bytes) -> bytes:
    return bytes([ftype]) + struct.pack(">H", len(value)) + value


def gost_request(cmd: int, *features: bytes) -> bytes:
    body = b"".join(features)
    return bytes([1, cmd]) + struct.pack(">H", len(body)) + body


ADDR = gost_feature(2, b"\x03\x0bexample.net\x01\xbb")  # AddrFeature: domain, port 443
USER = gost_feature(1, b"\x04user\x06secret")  # UserAuthFeature
TUNNEL_ID = gost_feature(3, bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0"))


def test_gost_relay_connect_and_bind_requests_are_parsed_exactly() -> None:
    d = det(gost_request(1, USER, ADDR))
    assert d.kind == "tunnel.gost" and d.info["command"] == "connect"
    assert "user user" in d.evidence and "example.net:443" in d.evidence
    d = det(gost_request(2, TUNNEL_ID, gost_feature(2, b"\x01\x00\x00\x00\x00\x1f\x90"), gost_feature(4, b"\x00\x00")))
    assert d.info["command"] == "bind" and "tunnel id" in d.evidence
    r = grows(gost_request(1 | 0x80, ADDR))
    assert isinstance(r, Detection) and r.info["command"] == "connect (UDP)"


def test_requests_that_do_not_parse_to_the_last_byte_are_not_gost() -> None:
    for fwd in (
        gost_request(5, ADDR),  # no such command
        gost_request(1),  # no feature
        gost_request(1, gost_feature(2, b"\x03\x0bexample.net")),  # address without its port
        gost_request(1, gost_feature(9, b"ab")),  # unknown feature
        gost_request(1, ADDR)[:-1] + b"",  # the declared length runs past the data (closed below)
        b"\x01\x01\x00\x05\x02\x00\x09ab",  # a feature longer than the features
    ):
        assert detect_relays(fwd, b"", CLOSED) is NOT_THIS, fwd


@pytest.mark.parametrize(
    ("fwd", "rev", "kind"),
    [
        (RH_CLIENT_HELLO, RH_SERVER_HELLO, "tunnel.rathole"),
        (gost_request(2, TUNNEL_ID, ADDR), b"", "tunnel.gost"),
    ],
    ids=["rathole", "gost"],
)
def test_the_shipped_policy_drops_rathole_and_gost(fwd: bytes, rev: bytes, kind: str) -> None:
    eng = Engine(load_policy(default_policy()))
    c = Conn("203.0.113.41", 2333)
    verdicts = feed_all(eng, [c.syn(), c.synack(), c.c(fwd)] + ([c.s(rev)] if rev else []))
    assert verdicts[-1] == PIN_DENY
    ev = eng.events[-1]
    assert ev.rule == "drop-covert-tunnels" and ev.detection is not None and ev.detection["kind"] == kind


def test_vtun_is_alerted_not_dropped_like_the_other_vpns() -> None:
    eng = Engine(load_policy(default_policy()))
    c = Conn("203.0.113.42", 5000)
    verdicts = feed_all(eng, [c.syn(), c.synack(), c.s(VTUN_BANNER)])
    assert PIN_DENY not in verdicts
    eng.finish(2000.0)  # an accepted flow is reported when it ends
    ev = eng.events[-1]
    assert ev.rule == "alert-vpn-tunnels" and ev.detection is not None and ev.detection["kind"] == "tunnel.vtun"
