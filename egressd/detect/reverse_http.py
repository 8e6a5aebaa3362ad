"""Reverse HTTP tunnels: the node opens a connection and the *far side* sends HTTP requests.

Why this is a tunnel and never ordinary HTTP: in HTTP (RFC 9112 §2.1) the side that opened
the connection sends requests and the other side answers. Every "expose localhost" service
(localtunnel, and the same pattern in ngrok's and frp's plain-TCP modes, serveo-style
relays) inverts that: the node dials out once, the relay writes visitors' requests into
that connection and the node's local web server answers them. It is the HTTP analogue of
SSH role inversion (``ssh.reverse``), and as exact: the responder's first bytes form an
HTTP/1.x request line, or the HTTP/2 client preface, while the originator sent no request
of its own first.

Request line (RFC 9112 §3): ``method SP request-target SP HTTP/1.x CRLF``. The method is
one of RFC 9110's (plus WebDAV's and PATCH), the target starts with ``/``, ``*`` or an
absolute URI, and the line is complete (CRLF) within 8 KiB. A responder that sends
anything else first is not this; an originator that starts with a request is ordinary HTTP
(whatever its server then sends is a response or, after an Upgrade, another protocol).
When the originator answers the relayed request (``HTTP/1.x NNN``) that is said too.

A tunnel nobody visits shows no relayed request, so the set-up is named as well where a tool
has a fixed one: localtunnel's registration answer (JSON with the assigned ``port`` and
``max_conn_count``); the engine remembers the announced port, so the tunnel connections to it
are dropped on their first packet. PageKite's back-end announces itself the same way, with
the ``CONNECT PageKite:1`` request that opens its tunnel to the front-end.
"""

from __future__ import annotations

import json
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    TUNNEL_REVERSE_HTTP,
    Detection,
    Result,
    StreamContext,
    printable,
)

MAX_LINE: Final = 8192
MAX_CLIENT_FIRST: Final = 1024  # bytes the node may send before the relay's request
MAX_JSON: Final = 4096  # a registration answer is a small JSON object
_METHODS: Final = frozenset(
    {
        b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
        b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    }
)  # fmt: skip
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PAGEKITE: Final = b"CONNECT PageKite:"
_LONGEST_METHOD: Final = max(len(m) for m in _METHODS) + 1


def request_line(data: bytes) -> tuple[bytes, bytes] | int | None:
    """(method, target) of a complete HTTP/1.x request line at the start of ``data``;
    -1 while it may still become one; None when it cannot."""
    sp = data.find(b" ", 0, _LONGEST_METHOD)
    if sp < 0:
        if len(data) >= _LONGEST_METHOD:
            return None
        return -1 if any(m.startswith(data) for m in _METHODS) else None
    method = data[:sp]
    if method not in _METHODS:
        return None
    eol = data.find(b"\r\n", sp, MAX_LINE)
    if eol < 0:
        return -1 if len(data) < MAX_LINE else None
    parts = data[sp + 1 : eol].split(b" ")
    if len(parts) != 2 or not parts[1].startswith(b"HTTP/1.") or len(parts[1]) != 8:
        return None
    target = parts[0]
    if not target or not (target[:1] in (b"/", b"*") or b"://" in target[:16] or method == b"CONNECT"):
        return None
    return method, target


def _registration(rev: bytes, ctx: StreamContext) -> Result:
    """localtunnel's registration (``lib/Tunnel.js`` _init): the node's ``GET /?new`` (or
    ``/<subdomain>``) is answered with a JSON object naming the relay's port the client
    must open its tunnel connections to: ``id``, ``ip``, ``port``, ``url``, ``max_conn_count``.
    The relay needs no visitor for this to show: an idle tunnel is named from its set-up."""
    if not rev:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full else NEED_MORE
    if not rev.startswith(b"HTTP/1."):
        return NOT_THIS
    end = rev.find(b"\r\n\r\n", 0, MAX_LINE)
    if end < 0:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full or len(rev) >= MAX_LINE else NEED_MORE
    head = rev[:end].lower()
    if b" 200" not in head[:16] or b"application/json" not in head:
        return NOT_THIS
    body = rev[end + 4 : end + 4 + MAX_JSON]
    start = body.find(b"{")
    stop = body.rfind(b"}")
    if start < 0 or stop < start:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full or len(body) >= MAX_JSON else NEED_MORE
    try:
        obj = json.loads(body[start : stop + 1])
    except ValueError:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full or len(body) >= MAX_JSON else NEED_MORE
    if not isinstance(obj, dict) or not isinstance(obj.get("port"), int) or "max_conn_count" not in obj:
        return NOT_THIS
    port = obj["port"]
    if not 0 < port < 65536:
        return NOT_THIS
    info = {"tool": "localtunnel", "tunnel_port": str(port)}
    ip = obj.get("ip")
    if isinstance(ip, str) and len(ip) <= 45:
        info["tunnel_ip"] = ip
    url = obj.get("url")
    where = f" for {printable(url.encode(), 60)}" if isinstance(url, str) else ""
    return Detection(
        TUNNEL_REVERSE_HTTP,
        f"localtunnel registration{where}: the relay assigns tunnel port {port} "
        f"(max_conn_count {printable(str(obj.get('max_conn_count')).encode(), 8)})",
        info=info,
    )


def _pagekite(fwd: bytes) -> Detection:
    """PageKite's back-end (``pagekite.py``, Debian's pagekite): its tunnel to a front-end
    opens with ``CONNECT PageKite:1 HTTP/1.0`` and ``X-PageKite:`` headers naming the kites
    (``proto:name:...``) whose visitors the front-end will send down this connection."""
    kites: list[str] = []
    for line in fwd[: fwd.find(b"\r\n\r\n", 0, MAX_LINE)].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-pagekite" and len(kites) < 4:
            parts = value.strip().split(b":")
            if len(parts) > 1:
                kites.append(printable(b":".join(parts[:2]), 60))
    what = ", ".join(kites) if kites else "kites not shown"
    return Detection(
        TUNNEL_REVERSE_HTTP,
        f"PageKite back-end tunnel (CONNECT PageKite:1) for {what}: the front-end sends visitors' requests down it",
        info={"tool": "pagekite"},
    )


def detect_pagekite(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """A stream detector of its own: the engine runs it before the proxy detector, which
    would otherwise take the CONNECT for a proxy request and look only past it."""
    if not fwd:
        return NOT_THIS if ctx.fwd_closed or rev else NEED_MORE
    if not _PAGEKITE.startswith(fwd[: len(_PAGEKITE)]):
        return NOT_THIS
    if len(fwd) < len(_PAGEKITE) or (
        b"\r\n\r\n" not in fwd[:MAX_LINE] and not (ctx.fwd_closed or ctx.fwd_full or len(fwd) >= MAX_LINE)
    ):
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    return _pagekite(fwd)


def detect_reverse_http(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    if fwd:
        r = request_line(fwd)
        if isinstance(r, tuple) and r[0] == b"GET":
            return _registration(rev, ctx)
        if r == -1 or isinstance(r, tuple) or fwd.startswith(_H2_PREFACE[: len(fwd)]):
            return NOT_THIS  # the originator speaks HTTP itself: ordinary (or not ours to call)
    if not rev:
        # Relay clients say little before the relay's first request (nothing for localtunnel,
        # a one-line hello for bore-style tools); a client that has sent more is not waiting
        # for requests, and the flow need not stay in Python for this detector.
        if ctx.rev_closed or ctx.rev_full or len(fwd) > MAX_CLIENT_FIRST:
            return NOT_THIS
        return NEED_MORE
    if rev.startswith(_H2_PREFACE):
        return Detection(TUNNEL_REVERSE_HTTP, "the responder opened HTTP/2 (client preface) on the node's connection",
                         info={"method": "PRI"})  # fmt: skip
    got = request_line(rev)
    if got is None:
        return NOT_THIS
    if got == -1:
        if _H2_PREFACE.startswith(rev):
            return NEED_MORE
        return NOT_THIS if ctx.rev_closed or ctx.rev_full else NEED_MORE
    assert isinstance(got, tuple)
    method, target = got
    line = rev[: rev.find(b"\r\n")]
    info = {"method": method.decode(), "path": printable(target, 64)}
    evidence = f"the responder sent an HTTP request on the node's connection: {printable(line, 80)}"
    if fwd.startswith(b"HTTP/1.") and fwd[8:9] == b" " and fwd[9:12].isdigit():
        status = fwd[: fwd.find(b"\r\n")] if b"\r\n" in fwd else fwd[:12]
        info["answer"] = printable(status, 40)
        evidence += f"; the node answered {printable(status, 40)}"
    return Detection(TUNNEL_REVERSE_HTTP, evidence, info=info)
