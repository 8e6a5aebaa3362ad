"""WebSocket tunnels: decode RFC 6455 framing and run the other detectors on what is inside.

Why decode instead of matching the handshake: a WebSocket is an ordinary thing for a web
app to open (chat, dashboards, notebooks), and the handshake of a tunnel tool looks like
any other. What makes it a tunnel is the stream it carries: SSH, Stratum, SOCKS, TLS or a
VPN handshake inside the frames (wstunnel, chisel, websockify in front of sshd, browser
miners). So after a complete upgrade (the client's ``GET`` with ``Upgrade: websocket``
and ``Sec-WebSocket-Key``, the server's ``101``) each direction's frames are decoded into the
byte stream the application sees, and the stream detectors judge that stream exactly as
they judge a plain TCP head. A WebSocket whose inner stream every detector rejects (JSON
chat messages, say) is not a tunnel and gives no finding. wstunnel announces its target in
the upgrade itself (a JWT whose claims are its tunnel request). A handshake GET that carries a
body is not a WebSocket at all but the fake upgrade of HTTP obfuscators (simple-obfs):
``tunnel.http`` at once.

Framing (RFC 6455 §5.2): ``FIN RSV1-3 opcode | MASK len7 [len16|len64] [mask key] data``.
Client frames MUST be masked and server frames MUST NOT be (§5.1): a stream that breaks
this is not a WebSocket, and is let go. Data messages may be fragmented (opcode 0
continuations) and control frames (close 8, ping 9, pong 10; FIN set, at most 125 bytes,
§5.5) may sit between the fragments; only data frames add to the inner stream. With
``permessage-deflate`` accepted in the 101 (RFC 7692) a message with RSV1 set is raw
DEFLATE whose trailing ``00 00 ff ff`` was removed; it is inflated with one
decompressor per direction (context takeover is the default), its output capped.

Bounds: the heads are bounded by the engine; the decoded inner streams by ``INNER_MAX``;
the number of frames looked at by ``MAX_FRAMES``. A frame that runs past the head simply
ends the decoded stream (a partial frame contributes its unmasked prefix: the mask is
positional, so a prefix decodes exactly). Never raises.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_HTTP,
    TUNNEL_WEBSOCKET,
    Detection,
    Result,
    StreamContext,
    StreamDetector,
    printable,
)

INNER_MAX: Final = 8192  # decoded bytes kept per direction
MAX_FRAMES: Final = 256  # frames decoded per direction per call
MAX_HEAD: Final = 8192  # an HTTP head longer than this is not waited for

_OP_CONT: Final = 0
_OP_TEXT: Final = 1
_OP_BINARY: Final = 2
_CONTROL_MIN: Final = 8
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"
_BEARER: Final = b"authorization.bearer."
_MAX_MUX_HEADER: Final = 16
# First bytes of what the inner detectors recognise, looked for behind a multiplexing header:
# an SSH banner, a TLS handshake record, a JSON-RPC object, a SOCKS5 greeting.
_INNER_MAGICS: Final = (b"SSH-", b"\x16\x03\x01", b"\x16\x03\x03", b'{"', b"\x05\x01\x00", b"\x05\x02\x00")


def _head(data: bytes) -> int:
    """Offset just past the HTTP head (CRLFCRLF), -1 while incomplete."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    return -1 if end < 0 else end + 4


def _fields(head: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _has_token(value: bytes, token: bytes) -> bool:
    return any(t.strip().lower() == token for t in value.split(b","))


def _frames(buf: bytes, pos: int, masked: bool, deflate: bool) -> tuple[list[bytes], bool]:
    """The data messages from ``pos`` on, unmasked, fragments joined (and inflated); the last
    may be partial. False when the bytes break the framing rules (wrong masking, a reserved
    opcode, a bad control frame)."""
    out: list[bytes] = []
    total = 0
    inflater = zlib.decompressobj(-15) if deflate else None
    compressed = False  # the message in progress has RSV1 set
    msg = bytearray()  # the message in progress
    n = len(buf)
    frames = 0
    while pos + 2 <= n and frames < MAX_FRAMES and total < INNER_MAX:
        frames += 1
        b0, b1 = buf[pos], buf[pos + 1]
        fin, rsv, op = b0 & 0x80, b0 & 0x70, b0 & 0x0F
        if bool(b1 & 0x80) != masked:
            return out, False
        length = b1 & 0x7F
        hdr = 2
        if length == 126:
            if pos + 4 > n:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            hdr = 4
        elif length == 127:
            if pos + 10 > n:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            hdr = 10
            if length >> 63:
                return out, False
        key = b""
        if masked:
            if pos + hdr + 4 > n:
                break
            key = buf[pos + hdr : pos + hdr + 4]
            hdr += 4
        if op >= _CONTROL_MIN:
            if op > 10 or not fin or length > 125 or rsv:
                return out, False
            pos += hdr + length
            continue
        if op not in (_OP_CONT, _OP_TEXT, _OP_BINARY):
            return out, False
        if op == _OP_CONT:
            if rsv:
                return out, False  # RSV1 belongs to a message's first frame only
        else:
            if rsv & 0x30 or (rsv and inflater is None):
                return out, False  # no extension negotiated that would set them
            compressed = bool(rsv)
            msg.clear()
        start = pos + hdr
        avail = min(length, n - start)
        data = buf[start : start + avail]
        msg += _unmask(data, key) if masked else data
        whole = fin and avail == length
        if whole or avail < length:
            body = bytes(msg)
            if compressed and inflater is not None:
                if not whole:
                    break  # a compressed message is inflated only once complete
                try:
                    body = inflater.decompress(body + _DEFLATE_TAIL, INNER_MAX - total)
                except zlib.error:
                    return out, False
            out.append(body)
            total += len(body)
            msg.clear()
        if avail < length:
            break
        pos = start + length
    if msg and not compressed:
        out.append(bytes(msg))  # fragments of a message whose last frame has not come yet
    return out, True


def _header_len(messages: list[bytes]) -> int:
    """Where a known protocol's first bytes sit in the first message, when a multiplexing
    tunnel puts a small per-message header before them (a stream id, a type byte): 1..16."""
    first = next((m for m in messages if m), b"")
    for magic in _INNER_MAGICS:
        at = first.find(magic, 1, _MAX_MUX_HEADER + len(magic))
        if at > 0:
            return at
    return 0


def _wstunnel(protocols: bytes) -> Detection | None:
    """wstunnel (erebe/wstunnel, ``jwt.rs``): the tunnel's target rides in the upgrade as a
    subprotocol ``authorization.bearer.<JWT>`` whose claims are ``id``, ``p`` (the tunnel type:
    ``Tcp``, ``Udp``, ``Socks5``, ``ReverseTcp`` ...), ``r`` (remote host) and ``rp`` (remote
    port). Bearer tokens in subprotocols are common; these claim names are wstunnel's."""
    for token in protocols.split(b","):
        token = token.strip()
        if not token.lower().startswith(_BEARER) or len(token) > 4096:
            continue
        parts = token[len(_BEARER) :].split(b".")
        if len(parts) != 3:
            continue
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
        except (ValueError, binascii.Error):
            continue
        if not isinstance(claims, dict) or not isinstance(claims.get("p"), dict):
            continue
        host, port = claims.get("r"), claims.get("rp")
        if isinstance(host, str) and isinstance(port, int):
            kind = next(iter(claims["p"]), "?")
            target = f"{host[:64]}:{port}"
            return Detection(
                TUNNEL_WEBSOCKET,
                f"wstunnel upgrade: JWT claims tunnel {str(kind)[:16]} to {printable(target.encode(), 80)}",
                info={"tool": "wstunnel", "target": target, "tunnel": str(kind)[:16]},
            )
    return None


def _unmask(data: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key, repeating (RFC 6455 §5.3); one big-int XOR, no per-byte loop."""
    if not data:
        return data
    reps = (len(data) + 3) // 4
    stream = (key * reps)[: len(data)]
    x = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return x.to_bytes(len(data), "big")


class WebSocketDetector:
    """A stream detector (callable) holding the detectors it runs on the inner stream.

    The inner detectors are given at construction so that this module does not depend on
    the engine's table of detectors (the engine passes its own list)."""

    __slots__ = ("_inner",)

    def __init__(self, inner: tuple[tuple[str, StreamDetector], ...]) -> None:
        self._inner = inner

    def __call__(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
        if len(fwd) < 4:
            return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
        if not fwd.startswith(b"GET "):
            return NOT_THIS
        fend = _head(fwd)
        if fend < 0:
            return NOT_THIS if ctx.fwd_closed or len(fwd) > MAX_HEAD else NEED_MORE
        req = _fields(fwd[: fend - 4])
        if not _has_token(req.get(b"upgrade", b""), b"websocket") or b"sec-websocket-key" not in req:
            return NOT_THIS
        body = req.get(b"content-length", b"0")
        if body.isdigit() and int(body) > 0:
            # RFC 6455 §4.1: the opening handshake is a GET without a body. A body on it is
            # the "fake upgrade" of simple-obfs (obfs_http.c), which sends the first bytes of
            # the proxied (Shadowsocks) stream right there and never frames anything.
            line = printable(fwd[: fwd.find(b"\r\n")], 40)
            return Detection(
                TUNNEL_HTTP,
                f"fake WebSocket upgrade: the GET carries a {int(body)}-byte body"
                + ("" if b"sec-websocket-version" in req else " and no Sec-WebSocket-Version")
                + f" ({line})",
                info={"tool": "simple-obfs-style"},
            )
        tool = _wstunnel(req.get(b"sec-websocket-protocol", b""))
        if tool is not None:
            return tool
        rend = _head(rev)
        if rend < 0:
            return NOT_THIS if ctx.rev_closed or len(rev) > MAX_HEAD else NEED_MORE
        status = rev[: rev.find(b"\r\n")].split(b" ")
        if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or status[1] != b"101":
            return NOT_THIS
        resp = _fields(rev[: rend - 4])
        deflate = b"permessage-deflate" in resp.get(b"sec-websocket-extensions", b"").lower()
        msgs_f, ok_f = _frames(fwd, fend, True, deflate)
        msgs_r, ok_r = _frames(rev, rend, False, deflate)
        if not (ok_f and ok_r):
            return NOT_THIS
        final = (ctx.fwd_closed or ctx.fwd_full) and (ctx.rev_closed or ctx.rev_full)
        ictx = StreamContext(ctx.sport, ctx.dport, ctx.fwd_closed, ctx.rev_closed, ctx.fwd_full, ctx.rev_full)
        inner_f, inner_r = b"".join(msgs_f), b"".join(msgs_r)
        candidates = [(inner_f, inner_r, 0, 0)]
        kf, kr = _header_len(msgs_f), _header_len(msgs_r)
        if kf or kr:
            strip_f = b"".join(m[kf:] for m in msgs_f)
            strip_r = b"".join(m[kr:] for m in msgs_r)
            candidates.append((strip_f, strip_r, kf, kr))
        waiting = False
        for cand_f, cand_r, kf, kr in candidates:
            for name, fn in self._inner:
                r = fn(cand_f, cand_r, ictx)
                if r is NEED_MORE:
                    waiting = True
                    continue
                if r is NOT_THIS:
                    continue
                assert isinstance(r, Detection)
                return self._found(fwd, req, name, r, kf, kr)
        if waiting and not final and (inner_f or inner_r or not (ctx.fwd_closed or ctx.rev_closed)):
            return NEED_MORE
        return NOT_THIS

    @staticmethod
    def _found(fwd: bytes, req: dict[bytes, bytes], name: str, r: Detection, kf: int, kr: int) -> Detection:
        """The WebSocket finding, naming what it carries (the engine records the inner kind too)."""
        path = fwd[4 : fwd.find(b" ", 4)] if fwd.find(b" ", 4) > 0 else b"?"
        info = {
            "path": printable(path, 64),
            "inner_kind": r.kind,
            "inner_detector": name,
            "inner_evidence": r.evidence,
        }
        proto = req.get(b"sec-websocket-protocol")
        if proto:
            info["subprotocol"] = printable(proto.split(b",")[0], 32)
        for k, v in r.info.items():
            info.setdefault(k, v)
        mux = f" (after a {kf}/{kr}-byte header in each message)" if kf or kr else ""
        if mux:
            info["message_header"] = f"{kf}/{kr}"
        return Detection(
            TUNNEL_WEBSOCKET,
            f"WebSocket GET {info['path']} carries {r.kind}{mux}: {r.evidence}",
            confidence=r.confidence,
            info=info,
        )
