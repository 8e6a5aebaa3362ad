"""TCP carried in HTTP bodies: httptunnel (``hts``/``htc``) and tools framed like it.

Why a body decoder and not just a URL: httptunnel's client opens two HTTP connections, a
``POST`` whose body carries the node's bytes up and a ``GET`` whose response body carries
the far side's bytes down, each with a fixed large ``Content-Length`` (102400 by default)
and the same request target ``/index.html?crap=<seconds>`` (``http.c``,
``tunnel.c`` tunnel_write_request/tunnel_read_request). The bodies are a sequence of
tunnel frames (``tunnel.h``): a type byte, and for the types without the 0x40 "simple"
bit a 2-byte big-endian length and that many bytes; ``TUNNEL_OPEN`` (1) starts a
connection, ``TUNNEL_DATA`` (2) carries data, ``TUNNEL_PADDING`` (3) and ``TUNNEL_PAD1``
(0x45) pad, ``TUNNEL_CLOSE``/``TUNNEL_DISCONNECT`` (0x46/0x47) end it.

So a flow is ``tunnel.http`` when its request target is httptunnel's (exact), and the
DATA frames of either body are joined and given to the protocol detectors, whose finding
(SSH, say) is named as what the tunnel carries. Bounded by the head buffers and
``MAX_FRAMES``; never raises.
"""

from __future__ import annotations

from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_HTTP,
    Detection,
    Result,
    StreamContext,
    StreamDetector,
    printable,
)

MAX_FRAMES: Final = 256
MAX_HEAD: Final = 8192
_OPEN: Final = 0x01
_DATA: Final = 0x02
_PADDING: Final = 0x03
_ERROR: Final = 0x04
_SIMPLE: Final = 0x40
_SIMPLE_TYPES: Final = frozenset({0x45, 0x46, 0x47})  # PAD1, CLOSE, DISCONNECT
_TARGET: Final = b"/index.html?crap="


def _request_target(fwd: bytes) -> bytes | None:
    eol = fwd.find(b"\r\n", 0, 512)
    if eol < 0:
        return None
    parts = fwd[:eol].split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"POST", b"PUT") or not parts[2].startswith(b"HTTP/1."):
        return None
    return parts[1]


def _frames(buf: bytes, pos: int) -> tuple[bytes, bool]:
    """DATA payloads of the frames from ``pos``; False when the bytes are not this framing."""
    out = bytearray()
    n = len(buf)
    for _ in range(MAX_FRAMES):
        if pos >= n:
            break
        t = buf[pos]
        if t in _SIMPLE_TYPES:
            pos += 1
            continue
        if t not in (_OPEN, _DATA, _PADDING, _ERROR):
            return bytes(out), False
        if pos + 3 > n:
            break
        length = int.from_bytes(buf[pos + 1 : pos + 3], "big")
        chunk = buf[pos + 3 : pos + 3 + length]
        if t == _DATA:
            out += chunk
        if len(chunk) < length:
            break
        pos += 3 + length
    return bytes(out), True


class HttpTunnelDetector:
    """Stream detector; the protocol detectors for the carried stream are given by the engine."""

    __slots__ = ("_inner",)

    def __init__(self, inner: tuple[tuple[str, StreamDetector], ...]) -> None:
        self._inner = inner

    def __call__(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
        if len(fwd) < 5:
            return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
        if not fwd.startswith((b"GET ", b"POST", b"PUT ")):
            return NOT_THIS
        target = _request_target(fwd)
        if target is None:
            return NOT_THIS if b"\r\n" in fwd[:512] or len(fwd) >= 512 or ctx.fwd_closed else NEED_MORE
        if not target.startswith(_TARGET) or not target[len(_TARGET) :].isdigit():
            return NOT_THIS
        info = {"tool": "httptunnel", "path": printable(target, 48)}
        evidence = f"httptunnel request {printable(fwd[: fwd.find(b' HTTP/')], 48)}"
        fend = fwd.find(b"\r\n\r\n", 0, MAX_HEAD)
        rend = rev.find(b"\r\n\r\n", 0, MAX_HEAD) if rev.startswith(b"HTTP/1.") else -1
        inner_f = _frames(fwd, fend + 4)[0] if fend >= 0 else b""
        inner_r = _frames(rev, rend + 4)[0] if rend >= 0 else b""
        if inner_f or inner_r:
            for name, fn in self._inner:
                r = fn(inner_f, inner_r, ctx)
                if isinstance(r, Detection):
                    info.update({"inner_kind": r.kind, "inner_detector": name, "inner_evidence": r.evidence})
                    evidence += f", carrying {r.kind}: {r.evidence}"
                    break
        # Keep looking (refine) until the carried protocol shows, unless nothing more will come.
        done = "inner_kind" in info or ((ctx.fwd_closed or ctx.fwd_full) and (ctx.rev_closed or ctx.rev_full))
        return Detection(TUNNEL_HTTP, evidence, info=info, refine=not done)
