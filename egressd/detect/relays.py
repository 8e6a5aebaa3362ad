"""Port-exposing relays and small VPNs with a fixed clear-text opening: frp, bore, chisel,
rathole, gost's relay, vtun, Yggdrasil.

Why one detector for five tools: each opens its connection with a first message whose bytes
its source fixes exactly, and the first byte of the originator's head (or, for tools whose
server speaks first, of the responder's) tells which of them it could be. One cheap dispatch
on that byte rejects every other flow at once (a TLS ClientHello starts ``16``, HTTP with a
method other than ``GET``, SSH with ``S``), so the hot path pays one index and one lookup.

* **frp** (github fatedier/frp). The client's first message on its control connection is
  Login, framed by golib's ``msg/json`` (``process.go`` ``WriteMsg``/``readMsg``): the type
  byte ``'o'`` (``pkg/msg/msg.go`` ``TypeLogin``), an int64 big-endian length, then the JSON
  of ``msg.Login`` in struct order, so it starts ``{"version":"``. Work connections open with
  ``'w'`` (NewWorkConn) and visitors with ``'v'`` (NewVisitorConn), whose JSON starts
  ``{"run_id":"``. With ``tcpMux`` (the default) the message travels in a yamux session
  (hashicorp/yamux ``const.go``: a 12-byte header, version 0, type data 0 / window update 1 /
  ping 2 / go away 3, flags SYN 1 ACK 2 FIN 4 RST 8, stream id, length): the client's first
  frame opens stream 1 (SYN set; ``stream.go`` ``sendWindowUpdate``) and a data frame of that
  stream carries the Login. frp's newer wire protocol v2 (``pkg/proto/wire/wire.go``) opens
  with the magic ``FRP\\x00\\x02\\r\\n``. With TLS and ``disableCustomTLSFirstByte = false``
  (the default before v0.50) the client writes ``0x17`` before its ClientHello
  (``pkg/util/net/dial.go`` ``DialHookCustomTLSHeadByte``, ``FRPTLSHeadByte``): a TLS record
  that does not start at byte 0 is nothing a TLS library sends. Over WebSocket the upgrade
  goes to ``/~!frp`` (``pkg/util/net/websocket.go`` ``FrpWebsocketPath``). With TLS as it is
  by default since v0.50 (no head byte, yamux inside), only record sizes show: see
  :func:`_frp_over_tls13` (confidence 0.7).
* **bore** (github ekzhang/bore, ``src/shared.rs`` ``Delimited``, ``ClientMessage``,
  ``ServerMessage``): serde JSON frames, each ended by a NUL byte (``AnyDelimiterCodec`` with
  delimiter 0, 256 bytes at most). The client sends ``{"Hello":<port>}``, then on each
  visitor's connection ``{"Accept":"<uuid>"}``; with a secret the server speaks first,
  ``{"Challenge":"<uuid>"}``, and the client answers ``{"Authenticate":"<64 hex>"}``
  (``src/auth.rs``: hex HMAC-SHA256). The server answers Hello with ``{"Hello":<port>}``.
* **chisel** (github jpillora/chisel): the client's WebSocket upgrade names the subprotocol
  ``chisel-v3`` (``share/version.go`` ``ProtocolVersion``; ``client/client.go`` dials with
  ``Subprotocols: []string{chshare.ProtocolVersion}``). The SSH inside it identifies itself as
  ``SSH-chisel-v3-client``, which is no RFC 4253 version line, so the WebSocket decoder's SSH
  detector does not name it: the upgrade does. Named ``tunnel.websocket`` (tool chisel), the
  kind wstunnel's upgrade gets too: what the policy must know is "TCP carried in WebSocket".
* **vtun** (vtun ``auth.c`` ``auth_server``/``auth_client``, ``lib.c`` ``print_p``): the server
  greets first with ``VTUN server ver <version>\\n``, the client answers ``HOST: <name>\\n``,
  then ``OK CHAL: <...>``; every line is written NUL-padded to 50 bytes (``VTUN_MESG_SIZE``).
* **Yggdrasil** (yggdrasil-go ``src/core/version.go``): both ends of a peering link open with
  the metadata block that starts ``meta``. Up to 0.4 it is ``meta``, major version 0, minor
  version (one byte each) and the 32-byte ed25519 key (38 bytes); from 0.5 on ``meta``, a
  16-bit remaining length, then TLVs (type, length, value) starting with the major version
  (type 0, length 2, value 0) and the minor (type 1, length 2).

* **rathole** (github rapiz1/rathole, ``src/protocol.rs``): bincode-serialised fixed-size
  messages with no framing. The control channel opens with ``Hello::ControlChannelHello(0,
  sha256(service name))``: the variant as a little-endian u32 (0), the protocol version byte
  (0) and 32 digest bytes, 37 in all; the server answers with the same layout carrying a nonce,
  the client sends ``Auth`` (32 bytes) and the server ``Ack`` (a 4-byte variant, 0..2). A data
  channel opens with ``DataChannelHello`` (variant 1) and is answered with ``DataChannelCmd``
  (a 4-byte variant, 0 or 1). The control channel is named once both hellos are seen with
  these exact sizes; a data channel once the server's command follows its hello.
* **gost relay** (github go-gost/relay, ``relay.go`` ``Request.WriteTo``, ``feature.go``):
  version 1, a command (connect 1, bind 2, associate 3; flag 0x80 UDP), the features' length,
  then the features (type 1..4, a 16-bit length, their value), each of a length its type
  fixes (user/password with their own length bytes, an address of type 1/3/4, a 16-byte tunnel
  id, a 2-byte network). The whole request is checked down to its last byte.

Never raises: every index is bounds-checked, JSON is parsed only within a bound, with its
errors caught.
"""

from __future__ import annotations

import json
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_BORE,
    TUNNEL_FRP,
    TUNNEL_GOST,
    TUNNEL_RATHOLE,
    TUNNEL_VTUN,
    TUNNEL_WEBSOCKET,
    TUNNEL_YGGDRASIL,
    Detection,
    Result,
    StreamContext,
    printable,
)
from egressd.detect.tls import detect_tls

MAX_HEAD: Final = 8192  # an HTTP head longer than this is not waited for
MAX_FRP_MSG: Final = 65536  # frp's own limit for a control message is far above a Login's size
BORE_MAX_FRAME: Final = 256  # shared.rs MAX_FRAME_LENGTH
VTUN_MESG_SIZE: Final = 50

# -- frp ----------------------------------------------------------------------------------------
_FRP_TLS_HEAD: Final = 0x17
_FRP_V2_MAGIC: Final = b"FRP\x00\x02\r\n"
_FRP_WS_GET: Final = b"GET /~!frp "
_FRP_MSGS: Final = {
    ord("o"): ("Login", b'{"version":"'),
    ord("w"): ("NewWorkConn", b'{"run_id":"'),
    ord("v"): ("NewVisitorConn", b'{"run_id":"'),
}
_FRP_INFO_KEYS: Final = ("version", "os", "arch", "user", "proxy_name")
_YAMUX_HDR: Final = 12
_YAMUX_MAX_FRAMES: Final = 8
_YAMUX_OPEN: Final = b"\x00\x01\x00\x01\x00\x00\x00\x01"  # version 0, window update, SYN, stream 1
# TLS 1.3 (RFC 8446 §5.2): a record of n plaintext bytes is n + 1 (content type) + 16 (AEAD tag)
# long; the client's Finished (4 + a SHA-256 or SHA-384 sized MAC) is its first such record.
_TLS13_OVERHEAD: Final = 17
_TLS13_FINISHED: Final = frozenset({4 + 32 + _TLS13_OVERHEAD, 4 + 48 + _TLS13_OVERHEAD})
_TLS13_YAMUX_HDR: Final = _YAMUX_HDR + _TLS13_OVERHEAD
_TLS_MAX_RECORDS: Final = 16

# -- bore ---------------------------------------------------------------------------------------
_BORE_CLIENT: Final = (b'{"Hello":', b'{"Accept":"', b'{"Authenticate":"')
_BORE_SERVER: Final = (b'{"Challenge":"', b'{"Hello":', b'{"Connection":"', b'{"Error":"', b'"Heartbeat"')
_HEX: Final = frozenset(b"0123456789abcdef")

# -- rathole, gost relay -------------------------------------------------------------------------
_RH_CONTROL: Final = b"\x00\x00\x00\x00\x00"  # bincode: variant 0 (u32 LE), protocol version 0
_RH_DATA: Final = b"\x01\x00\x00\x00\x00"  # variant 1: DataChannelHello
_RH_HELLO: Final = 37
_RH_AUTH: Final = 32
_RH_MAX_ZEROS: Final = 3
_RH_ACKS: Final = frozenset({b"\x00\x00\x00\x00", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"})
_RH_DATA_CMDS: Final = frozenset({b"\x00\x00\x00\x00", b"\x01\x00\x00\x00"})
_GOST_CMDS: Final = {1: "connect", 2: "bind", 3: "associate"}
_GOST_MAX_FEATURES: Final = 8

# -- vtun, Yggdrasil ----------------------------------------------------------------------------
_VTUN_BANNER: Final = b"VTUN server ver "
_VTUN_HOST: Final = b"HOST: "
_YGG_META: Final = b"meta"
_YGG_KEY: Final = 32
_YGG_TLV_MAJOR: Final = b"\x00\x00\x00\x02\x00\x00"  # type 0 (major version), length 2, value 0
_YGG_TLV_MINOR: Final = b"\x00\x01\x00\x02"  # type 1 (minor version), length 2


def _final(closed: bool, full: bool) -> Result:
    """What to say when a side's bytes are a prefix of a message: wait, unless none can come."""
    return NOT_THIS if closed or full else NEED_MORE


# =================================================================================================
# frp
# =================================================================================================


def _frp_message(data: bytes, done: bool, where: str) -> Result:
    """An frp message at the start of ``data`` (golib msg/json framing, or the v2 magic)."""
    if data.startswith(_FRP_V2_MAGIC):
        return Detection(TUNNEL_FRP, f"frp wire protocol v2 magic {printable(_FRP_V2_MAGIC)}{where}",
                         info={"tool": "frp", "wire": "v2"})  # fmt: skip
    if _FRP_V2_MAGIC.startswith(data):
        return NOT_THIS if done else NEED_MORE
    if not data:
        return NOT_THIS if done else NEED_MORE
    msg = _FRP_MSGS.get(data[0])
    if msg is None:
        return NOT_THIS
    name, first = msg
    head = data[1:9]
    if len(head) < 8:
        # The length is an int64 far below 2**40: its first five bytes are zero.
        return NOT_THIS if done or any(head[:5]) else NEED_MORE
    length = int.from_bytes(head, "big")
    body = data[9 : 9 + length]
    if not len(first) <= length <= MAX_FRP_MSG:
        return NOT_THIS
    if not body.startswith(first[: len(body)]):
        return NOT_THIS
    if len(body) < len(first):
        return NOT_THIS if done else NEED_MORE
    info = {"tool": "frp", "message": name, "length": str(length)}
    if len(body) == length:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return NOT_THIS  # a complete message that is not JSON is not frp's
        if not isinstance(obj, dict):
            return NOT_THIS
        for k in _FRP_INFO_KEYS:
            v = obj.get(k)
            if isinstance(v, str) and v:
                info[k] = printable(v.encode(), 40)
    facts = ", ".join(f"{k} {info[k]}" for k in ("version", "os", "arch", "user") if k in info)
    return Detection(
        TUNNEL_FRP,
        f"frp {name} message (type {chr(data[0])!r}, {length}-byte JSON{': ' + facts if facts else ''}){where}",
        info=info,
    )


def _yamux_open_prefix(b: bytes) -> bool:
    """Whether the bytes so far can begin the frame that opens stream 1: version 0, type data (0)
    or window update (1), flags with SYN (0x0001 .. 0x000f), stream id 1."""
    for i in range(min(len(b), 8)):
        c = b[i]
        if i == 1:
            ok = c <= 1
        elif i == 3:
            ok = bool(c & 1) and c <= 0x0F
        else:
            ok = c == _YAMUX_OPEN[i]
        if not ok:
            return False
    return True


def _yamux(fwd: bytes, done: bool) -> Result:
    """frp's control connection with tcpMux: yamux frames, stream 1 opened with SYN, whose data
    is an frp message. Window updates and pings carry no payload (their length is a delta or an
    opaque value); data frames of other streams are skipped."""
    n = len(fwd)
    if n < _YAMUX_HDR and not _yamux_open_prefix(fwd):
        return NOT_THIS
    pos = 0
    for i in range(_YAMUX_MAX_FRAMES):
        if n - pos < _YAMUX_HDR:
            # A prefix of a header: consistent so far (version 0) is all that can be said.
            return NOT_THIS if done or (pos < n and fwd[pos] != 0) else NEED_MORE
        ver, typ = fwd[pos], fwd[pos + 1]
        flags = int.from_bytes(fwd[pos + 2 : pos + 4], "big")
        sid = int.from_bytes(fwd[pos + 4 : pos + 8], "big")
        length = int.from_bytes(fwd[pos + 8 : pos + 12], "big")
        if ver != 0 or typ > 3 or flags > 0xF:
            return NOT_THIS
        if i == 0 and (sid != 1 or not flags & 1 or typ > 1):
            return NOT_THIS  # the client's first frame opens its first stream (odd id 1)
        pos += _YAMUX_HDR
        if typ != 0:
            continue
        if sid == 1:
            payload = fwd[pos : pos + length]
            if not payload:
                return NOT_THIS if done else NEED_MORE
            return _frp_message(payload, done or len(payload) == length, " in yamux stream 1")
        pos += length
    return NOT_THIS


def _frp_tls(fwd: bytes, done: bool) -> Result:
    """``0x17`` then a TLS handshake record holding a ClientHello (type 1)."""
    want = b"\x16\x03"
    got = fwd[1:3]
    if not want.startswith(got):
        return NOT_THIS
    if len(fwd) < 7:
        if len(fwd) >= 4 and fwd[3] > 4:
            return NOT_THIS
        return NOT_THIS if done else NEED_MORE
    rec_len = int.from_bytes(fwd[4:6], "big")
    if fwd[3] > 4 or not 40 <= rec_len <= 16384 or fwd[6] != 1:
        return NOT_THIS
    return Detection(
        TUNNEL_FRP,
        f"frp TLS head byte 0x17 before a TLS ClientHello record (version 03 {fwd[3]:02x}, {rec_len} bytes)",
        info={"tool": "frp", "transport": "tls"},
    )


def _frp_over_tls13(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """frpc's default since v0.50: TLS with no head byte, then yamux inside. The ClientHello is
    Go's, with no ALPN (``pkg/transport/tls.go`` ``NewClientTLSConfig`` sets none); after the
    Finished, yamux writes each frame header with a ``Write`` of its own (``session.go``
    ``sendLoop``), so each becomes a TLS record: the SYN window update opening stream 1 (12
    bytes), the data header (12 bytes), then the Login. Two 12-byte records in a row as the
    first application data is what yamux does and no request/response protocol does (HTTP/1,
    HTTP/2's 24-byte preface, gRPC, a database handshake); smux's headers are 8 bytes."""
    hello = detect_tls(fwd, rev, ctx)
    if not isinstance(hello, Detection):
        return hello
    if hello.info.get("alpn") not in ("", "-", None):
        return NOT_THIS
    pos = 5 + int.from_bytes(fwd[3:5], "big")  # past the ClientHello's record
    sizes: list[int] = []
    for _ in range(_TLS_MAX_RECORDS):
        if pos + 5 > len(fwd):
            return _final(ctx.fwd_closed, ctx.fwd_full)
        ct = fwd[pos]
        length = int.from_bytes(fwd[pos + 3 : pos + 5], "big")
        if ct == 0x16:
            return NOT_THIS  # TLS 1.2 (ClientKeyExchange, Finished) or a second ClientHello
        if ct == 0x17:  # the dummy ChangeCipherSpec (0x14, middlebox compatibility) is skipped
            sizes.append(length)
            if len(sizes) == 1 and length not in _TLS13_FINISHED:
                return NOT_THIS
            if len(sizes) in (2, 3) and length != _TLS13_YAMUX_HDR:
                return NOT_THIS
            if len(sizes) == 4:
                if length - _TLS13_OVERHEAD < len(_FRP_V2_MAGIC):  # the v2 magic, or a message
                    return NOT_THIS
                return Detection(
                    TUNNEL_FRP,
                    "frp over TLS 1.3 (no ALPN): the client's first records after its Finished are two "
                    f"12-byte yamux headers ({_TLS13_YAMUX_HDR}-byte records: stream 1 opened, a data frame) "
                    f"and a {length - _TLS13_OVERHEAD}-byte message",
                    confidence=0.7,
                    info={"tool": "frp", "transport": "tls"},
                )
        elif ct != 0x14:
            return NOT_THIS
        pos += 5 + length
    return NOT_THIS


# =================================================================================================
# bore
# =================================================================================================


def _uuid(s: bytes) -> bool:
    """A hyphenated lowercase UUID as serde writes uuid::Uuid."""
    if len(s) != 36 or s[8:9] != b"-" or s[13:14] != b"-" or s[18:19] != b"-" or s[23:24] != b"-":
        return False
    return set(s[:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]) <= _HEX


def _bore_frame(frame: bytes, client: bool) -> str | None:
    """What one bore message (without its NUL) is, or None when it is none of bore's."""
    if frame.startswith(b'{"Hello":') and frame.endswith(b"}"):
        port = frame[9:-1]
        if port.isdigit() and len(port) <= 5 and int(port) <= 65535 and (port == b"0" or port[:1] != b"0"):
            return f"Hello {int(port)}"
        return None
    if client:
        if frame.startswith(b'{"Accept":"') and frame.endswith(b'"}') and _uuid(frame[11:-2]):
            return "Accept " + frame[11:-2].decode()
        if frame.startswith(b'{"Authenticate":"') and frame.endswith(b'"}'):
            tag = frame[17:-2]
            if len(tag) == 64 and set(tag) <= _HEX:
                return "Authenticate <HMAC-SHA256>"
        return None
    if frame.startswith(b'{"Challenge":"') and frame.endswith(b'"}') and _uuid(frame[14:-2]):
        return "Challenge " + frame[14:-2].decode()
    if frame.startswith(b'{"Connection":"') and frame.endswith(b'"}') and _uuid(frame[15:-2]):
        return "Connection " + frame[15:-2].decode()
    if frame == b'"Heartbeat"':
        return "Heartbeat"
    return None


def _bore_first(data: bytes, client: bool, done: bool) -> str | Result:
    """The first NUL-ended frame of one side, named; or the outcome when there is none (yet)."""
    starts = _BORE_CLIENT if client else _BORE_SERVER
    nul = data.find(b"\x00", 0, BORE_MAX_FRAME + 1)
    if nul < 0:
        # A bore frame's JSON ends with its only '}' (Hello) or '"}', then the NUL at once.
        close = data.find(b"}")
        if len(data) > BORE_MAX_FRAME or 0 <= close < len(data) - 1:
            return NOT_THIS
        if not any(s.startswith(data[: len(s)]) for s in starts):
            return NOT_THIS
        return NOT_THIS if done else NEED_MORE
    what = _bore_frame(data[:nul], client)
    return NOT_THIS if what is None else what


def _bore(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    if fwd:
        first = _bore_first(fwd, True, ctx.fwd_closed or ctx.fwd_full)
        if not isinstance(first, str):
            return first
        msgs = [f"client {first}"]
        rest = fwd[fwd.find(b"\x00") + 1 :]
        if rest:
            nxt = _bore_first(rest, True, True)
            if isinstance(nxt, str):
                msgs.append(f"client {nxt}")
    else:
        msgs = []
    info = {"tool": "bore"}
    if rev:
        srv = _bore_first(rev, False, ctx.rev_closed or ctx.rev_full)
        if isinstance(srv, str) and not fwd and not srv.startswith("Challenge"):
            return NOT_THIS  # only the challenge comes before the client has said anything
        if isinstance(srv, str):
            msgs.insert(0 if srv.startswith("Challenge") else len(msgs), f"server {srv}")
            if srv.startswith("Hello "):
                info["public_port"] = srv[6:]
        elif not fwd:
            return srv
    if not msgs:
        return _final(ctx.rev_closed, ctx.rev_full)
    if msgs[0].startswith("client Hello "):
        info["requested_port"] = msgs[0][13:]
    return Detection(TUNNEL_BORE, "bore NUL-delimited JSON control messages: " + "; ".join(msgs), info=info)


# =================================================================================================
# rathole, gost relay
# =================================================================================================


def _random32(b: bytes) -> bool:
    """A SHA-256 digest or a random nonce: 32 bytes, each zero with probability 1/256, so more
    than 3 zero bytes happens about once in 10**5 (the lost recall); structured data has more."""
    return len(b) == 32 and b.count(0) <= _RH_MAX_ZEROS


def _rathole(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    head = fwd[:5]
    control = _RH_CONTROL.startswith(head)
    if not control and not _RH_DATA.startswith(head):
        return NOT_THIS
    if fwd[5:_RH_HELLO].count(0) > _RH_MAX_ZEROS:
        return NOT_THIS  # already more zeros than a digest has
    if len(fwd) < _RH_HELLO:
        return _final(ctx.fwd_closed, ctx.fwd_full)
    if control:
        # The client says nothing but its hello, then (after the server's hello) its auth.
        if len(fwd) not in (_RH_HELLO, _RH_HELLO + _RH_AUTH):
            return NOT_THIS
        if len(rev) < _RH_HELLO:
            if rev and not _RH_CONTROL.startswith(rev[:5]):
                return NOT_THIS
            return _final(ctx.rev_closed, ctx.rev_full)
        if not rev.startswith(_RH_CONTROL) or not _random32(rev[5:_RH_HELLO]):
            return NOT_THIS
        if len(rev) >= _RH_HELLO + 4 and rev[_RH_HELLO : _RH_HELLO + 4] not in _RH_ACKS:
            return NOT_THIS
        auth = " and its 32-byte auth digest" if len(fwd) > _RH_HELLO else ""
        return Detection(
            TUNNEL_RATHOLE,
            "rathole control channel: ControlChannelHello (bincode: variant 0, protocol 0, 32-byte service digest)"
            f"{auth}, answered by the server's 37-byte hello with its nonce",
            info={"tool": "rathole", "channel": "control"},
        )
    if len(rev) < 4:
        return _final(ctx.rev_closed, ctx.rev_full)
    if rev[:4] not in _RH_DATA_CMDS:
        return NOT_THIS
    return Detection(
        TUNNEL_RATHOLE,
        "rathole data channel: DataChannelHello (variant 1, protocol 0, 32-byte session key), answered by "
        + ("StartForwardTcp" if rev[0] == 0 else "StartForwardUdp"),
        confidence=0.9,
        info={"tool": "rathole", "channel": "data"},
    )


def _gost_feature(ftype: int, v: bytes) -> str | None:
    """A relay feature's value checked against the length its type fixes; what it says."""
    n = len(v)
    if ftype == 1:  # user auth: ULEN UNAME PLEN PASSWD
        if n < 2 or v[0] + 2 > n or v[0] + 2 + v[v[0] + 1] != n:
            return None
        return "user " + printable(v[1 : 1 + v[0]], 32) if v[0] else "auth"
    if ftype == 2:  # address: ATYP ADDR PORT
        if n >= 1 and ((v[0] == 1 and n == 7) or (v[0] == 4 and n == 19)):
            return f"address type {v[0]} port {int.from_bytes(v[-2:], 'big')}"
        if n >= 2 and v[0] == 3 and n == 4 + v[1]:
            return f"address {printable(v[2 : 2 + v[1]], 64)}:{int.from_bytes(v[-2:], 'big')}"
        return None
    if ftype == 3:
        return "tunnel id " + v.hex() if n == 16 else None
    if ftype == 4:
        return f"network {int.from_bytes(v, 'big')}" if n == 2 else None
    return None


def _gost(fwd: bytes, ctx: StreamContext) -> Result:
    """A gost relay request, checked to its last feature byte; the server's answer is not
    needed (a relay request parsed exactly is no other protocol's first message)."""
    if len(fwd) < 4:
        if len(fwd) >= 2 and fwd[1] & 0x0F not in _GOST_CMDS:
            return NOT_THIS
        return _final(ctx.fwd_closed, ctx.fwd_full)
    cmd = fwd[1]
    if cmd & 0x0F not in _GOST_CMDS or cmd & 0x70:
        return NOT_THIS
    flen = int.from_bytes(fwd[2:4], "big")
    if flen < 3:
        return NOT_THIS  # a request with no feature carries neither target nor tunnel: not named
    if len(fwd) < 4 + flen:
        return NOT_THIS if flen > 1024 else _final(ctx.fwd_closed, ctx.fwd_full)
    pos, end = 4, 4 + flen
    said: list[str] = []
    while pos < end and len(said) < _GOST_MAX_FEATURES:
        if pos + 3 > end:
            return NOT_THIS
        ftype, flen1 = fwd[pos], int.from_bytes(fwd[pos + 1 : pos + 3], "big")
        if pos + 3 + flen1 > end:
            return NOT_THIS
        what = _gost_feature(ftype, fwd[pos + 3 : pos + 3 + flen1])
        if what is None:
            return NOT_THIS
        said.append(what)
        pos += 3 + flen1
    if pos != end:
        return NOT_THIS
    name = _GOST_CMDS[cmd & 0x0F] + (" (UDP)" if cmd & 0x80 else "")
    return Detection(
        TUNNEL_GOST,
        f"gost relay request: version 1, {name}, features: {', '.join(said)}",
        info={"tool": "gost", "command": name},
    )


# =================================================================================================
# WebSocket upgrades: chisel, frp
# =================================================================================================


def _upgrade(fwd: bytes, ctx: StreamContext) -> Result:
    end = fwd.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full or len(fwd) > MAX_HEAD else NEED_MORE
    head = fwd[:end]
    frp = head.startswith(_FRP_WS_GET)
    if not frp and head.find(b"chisel-v") < 0:
        return NOT_THIS
    fields: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if b"websocket" not in fields.get(b"upgrade", b"").lower():
        return NOT_THIS
    if frp:
        return Detection(TUNNEL_FRP, "frp over WebSocket: upgrade to frp's path /~!frp",
                         info={"tool": "frp", "transport": "websocket"})  # fmt: skip
    for token in fields.get(b"sec-websocket-protocol", b"").split(b","):
        token = token.strip()
        if token.startswith(b"chisel-v") and token[8:].isdigit():
            path = head[4 : head.find(b" ", 4)] if head.find(b" ", 4) > 0 else b"?"
            return Detection(
                TUNNEL_WEBSOCKET,
                f"chisel upgrade: WebSocket subprotocol {printable(token, 16)} (SSH inside)"
                f" on GET {printable(path, 64)}",
                info={"tool": "chisel", "subprotocol": printable(token, 16), "path": printable(path, 64)},
            )
    return NOT_THIS


# =================================================================================================
# vtun, Yggdrasil
# =================================================================================================


def _vtun(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    if not rev.startswith(_VTUN_BANNER):
        if _VTUN_BANNER.startswith(rev):
            return _final(ctx.rev_closed, ctx.rev_full)
        return NOT_THIS
    eol = rev.find(b"\n", 0, VTUN_MESG_SIZE)
    if eol < 0:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full or len(rev) >= VTUN_MESG_SIZE else NEED_MORE
    info = {"tool": "vtun", "server_version": printable(rev[len(_VTUN_BANNER) : eol], 32)}
    evidence = f"vtun server greeting {printable(rev[:eol], 48)}"
    if len(rev) >= VTUN_MESG_SIZE and not rev[eol + 1 : VTUN_MESG_SIZE].strip(b"\x00"):
        evidence += " (NUL-padded to 50 bytes)"
    if fwd.startswith(_VTUN_HOST):
        end = fwd.find(b"\n", 0, VTUN_MESG_SIZE)
        if end > len(_VTUN_HOST):
            info["host"] = printable(fwd[len(_VTUN_HOST) : end], 32)
            evidence += f"; the node answered HOST: {info['host']}"
    elif fwd and not _VTUN_HOST.startswith(fwd[: len(_VTUN_HOST)]):
        return NOT_THIS  # vtun's client answers the greeting with its HOST line and nothing else
    return Detection(TUNNEL_VTUN, evidence, info=info)


def _ygg_meta(b: bytes, done: bool) -> str | Result:
    """Yggdrasil's metadata block at the start of ``b``: the protocol version it names."""
    if len(b) < 6:
        return NOT_THIS if done or not _YGG_META.startswith(b[:4]) else NEED_MORE
    if not b.startswith(_YGG_META) or b[4] != 0:
        return NOT_THIS
    if 1 <= b[5] <= 4:  # up to 0.4: major 0, minor, then the 32-byte key
        if len(b) < 6 + _YGG_KEY:
            return NOT_THIS if done else NEED_MORE
        return f"0.{b[5]}"
    length = b[5]  # from 0.5: the remaining length (high byte 0 checked above), then TLVs
    if length < len(_YGG_TLV_MAJOR) + 6:
        return NOT_THIS
    if len(b) < 18:
        return NOT_THIS if done else NEED_MORE
    if b[6:12] != _YGG_TLV_MAJOR or b[12:16] != _YGG_TLV_MINOR:
        return NOT_THIS
    return f"0.{int.from_bytes(b[16:18], 'big')}"


def _yggdrasil(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    sides = []
    for data, who, done in (
        (fwd, "node", ctx.fwd_closed or ctx.fwd_full),
        (rev, "peer", ctx.rev_closed or ctx.rev_full),
    ):
        if not data:
            continue
        r = _ygg_meta(data, done)
        if not isinstance(r, str):
            return r
        sides.append((who, r))
    if not sides:
        return NEED_MORE
    ver = sides[0][1]
    who = " and ".join(w for w, _ in sides)
    return Detection(
        TUNNEL_YGGDRASIL,
        f"Yggdrasil peering metadata 'meta' (protocol {ver}) from the {who}",
        info={"tool": "yggdrasil", "protocol": ver},
    )


# =================================================================================================
# the detector
# =================================================================================================

_TLS_HANDSHAKE: Final = 0x16
_M: Final = ord("m")
_G: Final = ord("G")
_BRACE: Final = ord("{")
_F: Final = ord("F")
_H: Final = ord("H")
_V: Final = ord("V")


def _either(first: Result, fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """Two tools share a first byte (yamux and rathole 0, gost and rathole 1): the other is
    asked only when the first has no finding."""
    if isinstance(first, Detection):
        return first
    second = _rathole(fwd, rev, ctx)
    if isinstance(second, Detection) or first is NEED_MORE:
        return second if isinstance(second, Detection) else NEED_MORE
    return second


def detect_relays(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """frp, bore, chisel, rathole, gost, vtun or Yggdrasil from the first bytes either side sends."""
    if not fwd:
        if not rev:
            return NEED_MORE
        r0 = rev[0]  # tools whose server speaks first
        if r0 == _V:
            return _vtun(fwd, rev, ctx)
        if r0 == _M:
            return _yggdrasil(fwd, rev, ctx)
        if r0 == _BRACE:
            return _bore(fwd, rev, ctx)
        return NOT_THIS
    f0 = fwd[0]
    done = ctx.fwd_closed or ctx.fwd_full
    if f0 == _M:
        return _yggdrasil(fwd, rev, ctx)
    if f0 == 0:
        return _either(_yamux(fwd, done), fwd, rev, ctx)
    if f0 == 1:
        return _either(_gost(fwd, ctx), fwd, rev, ctx)
    if f0 in _FRP_MSGS or f0 == _F:
        return _frp_message(fwd, done, "")
    if f0 == _FRP_TLS_HEAD:
        return _frp_tls(fwd, done)
    if f0 == _TLS_HANDSHAKE:
        return _frp_over_tls13(fwd, rev, ctx)
    if f0 == _BRACE:
        return _bore(fwd, rev, ctx)
    if f0 == _G:
        if not b"GET ".startswith(fwd[:4]):
            return NOT_THIS
        return _upgrade(fwd, ctx) if len(fwd) >= 4 else _final(ctx.fwd_closed, ctx.fwd_full)
    if f0 == _H and rev[:1] == b"V":
        return _vtun(fwd, rev, ctx)
    return NOT_THIS
