"""Proxy wrappers that hide a tunnelled stream: HTTP CONNECT, SOCKS5, SOCKS4/4a.

Why offsets and not just a verdict: a CONNECT or SOCKS handshake says where the client is
going (``target``), but what matters for policy is what flows *inside* (Stratum to a pool,
SSH to a relay). The detection carries ``inner_fwd``/``inner_rev``, the offsets in each
direction's head where the tunnelled bytes begin, and the engine runs the other detectors
again from there. ``refine=True`` while an offset is still unknown (the proxy's reply has
not arrived); a refusal (non-2xx, SOCKS failure) settles it with ``inner_rev=-1``.

HTTP CONNECT (RFC 9110 §9.3.6): ``CONNECT host:port HTTP/1.x``, also ``[v6]:port`` and the
absolute-URI form some clients send (``CONNECT http://host:port/ HTTP/1.1``); the request
line is read leniently (extra tokens between target and version occur in the wild, as do
header lines without a colon), the head ends at CRLFCRLF (or LFLF). The proxy's 1xx interim
heads are skipped, then a 2xx opens the tunnel.

SOCKS5 (RFC 1928, RFC 1929 username/password): greeting ``05 N methods``, method selection
``05 M``, optional ``01 ulen user plen pass`` / ``01 status``, request
``05 cmd 00 atyp addr port``, reply of the same shape. Clients may pipeline (greeting and
request in one segment), so each direction is parsed on its own and checked against the
other. A bare greeting is only three bytes, too little to call; the detection waits for a
valid selection reply or a valid request behind it. SOCKS4/4a: ``04 cmd port ip userid\\0``
(``0.0.0.x`` + ``domain\\0`` for 4a), reply ``00 5a..5d port ip``; it waits for the reply's
first two bytes (or a closed/full direction) because the request alone is little structure.

Bounds: only the head is read; lines and names are capped (the head's ``StreamContext.head``, 255-byte names);
struct/indices are checked against the length first. First byte not ``C``, 4 or 5 is NOT
this at once. Never raises. Passwords are never copied into info.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    PROXY_CONNECT,
    PROXY_SOCKS,
    Detection,
    Result,
    StreamContext,
    printable,
)

_CONNECT: Final = b"CONNECT "
_MAX_INTERIM: Final = 4  # 1xx heads skipped before the final CONNECT reply
_U16 = struct.Struct("!H")

_SOCKS4: Final = 4
_SOCKS5: Final = 5
_RFC1929_VERSION: Final = 1
_AUTH_NONE: Final = 0
_AUTH_GSSAPI: Final = 1
_AUTH_USERPASS: Final = 2
_AUTH_REJECTED: Final = 0xFF
_AUTH_NAMES: Final = {
    _AUTH_NONE: "none",
    _AUTH_GSSAPI: "gssapi",
    _AUTH_USERPASS: "userpass",
    _AUTH_REJECTED: "none-acceptable",
}
_CMD_CONNECT: Final = 1
_CMD_NAMES: Final = {1: "connect", 2: "bind", 3: "udp-associate"}
_ATYP_IPV4: Final = 1
_ATYP_DOMAIN: Final = 3
_ATYP_IPV6: Final = 4
_SOCKS4_GRANTED: Final = 90
_SOCKS4_REPLIES: Final = frozenset({90, 91, 92, 93})
_NAME_OK: Final = frozenset(range(0x21, 0x7F))
_USERID_OK: Final = frozenset(range(0x20, 0x7F))

_INCOMPLETE: Final = -2  # parse helpers: need more bytes
_INVALID: Final = -3  # parse helpers: cannot be this


def detect_proxy(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """HTTP CONNECT or SOCKS handshake at the start of the flow, with the inner offsets."""
    if not fwd:
        return NOT_THIS if rev or ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    first = fwd[0]
    if first == 0x43:
        return _http_connect(fwd, rev, ctx)
    if first == _SOCKS5:
        return _socks5(fwd, rev, ctx)
    if first == _SOCKS4:
        return _socks4(fwd, rev, ctx)
    return NOT_THIS


# --- HTTP CONNECT ------------------------------------------------------------------------


def _head_end(data: bytes, start: int, limit: int) -> int:
    """Offset just after the blank line ending an HTTP head, or -1."""
    crlf = data.find(b"\r\n\r\n", start, limit)
    lf = data.find(b"\n\n", start, limit)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    return crlf + 4 if crlf >= 0 else -1


def _split_host_port(authority: bytes) -> tuple[bytes, bytes] | None:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port or b"")."""
    if authority.startswith(b"["):
        close = authority.find(b"]")
        if close < 0:
            return None
        host, rest = authority[1:close], authority[close + 1 :]
        if rest and not rest.startswith(b":"):
            return None
        return host, rest[1:]
    host, sep, port = authority.rpartition(b":")
    return (host, port) if sep else (authority, b"")


def _connect_target(target: bytes) -> str | None:
    """The CONNECT target as ``host:port`` (``[v6]:port``), or None if it is not one."""
    default = b""
    scheme, sep, rest = target.partition(b"://")
    if sep:
        default = {b"http": b"80", b"https": b"443"}.get(scheme.lower(), b"")
        target = rest.split(b"/", 1)[0].rsplit(b"@", 1)[-1]
    parts = _split_host_port(target)
    if parts is None:
        return None
    host, port = parts
    port = port or default
    if not host or any(b not in _NAME_OK for b in host) or (port and not port.isdigit()):
        return None
    if port and not 0 < int(port[:6]) < 65536:
        return None
    shown = host.decode("ascii")
    if b":" in host:
        shown = f"[{shown}]"
    return f"{shown}:{port.decode('ascii')}" if port else shown


def _http_connect(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    fwd_final = ctx.fwd_closed or ctx.fwd_full
    if not fwd.startswith(_CONNECT):
        if len(fwd) < len(_CONNECT) and _CONNECT.startswith(fwd) and not fwd_final:
            return NEED_MORE
        return NOT_THIS
    eol = fwd.find(b"\n", 0, ctx.head)
    if eol < 0:
        return NOT_THIS if fwd_final or len(fwd) >= ctx.head else NEED_MORE
    line = fwd[:eol].rstrip(b"\r")
    tokens = line.split()
    if len(tokens) < 3 or not tokens[-1].startswith(b"HTTP/1."):
        return NOT_THIS
    target = _connect_target(tokens[1])
    if target is None:
        return NOT_THIS
    info = {"target": target, "version": printable(tokens[-1], 16)}
    inner_fwd = _head_end(fwd, eol - 1 if eol > 0 else 0, ctx.head)
    if inner_fwd >= 0:
        head = fwd[:inner_fwd].lower()
        auth = head.find(b"\nproxy-authorization:")
        if auth >= 0:
            scheme = head[auth + 21 : head.find(b"\n", auth + 1)].split()
            info["proxy_auth"] = printable(scheme[0], 16) if scheme else "present"
    inner_rev, reply_open = _connect_reply(rev, ctx.rev_closed or ctx.rev_full, info, ctx.head)
    fwd_open = inner_fwd < 0 and not fwd_final and len(fwd) < ctx.head
    return Detection(
        kind=PROXY_CONNECT,
        evidence=printable(line, 96),
        info=info,
        refine=fwd_open or reply_open,
        inner_fwd=inner_fwd,
        inner_rev=inner_rev,
    )


def _connect_reply(rev: bytes, final: bool, info: dict[str, str], limit: int) -> tuple[int, bool]:
    """(inner_rev, still waiting) from the proxy's reply head(s); fills ``status``."""
    pos = 0
    for _ in range(_MAX_INTERIM + 1):
        if len(rev) - pos < 12:
            if rev[pos : pos + 5] != b"HTTP/"[: len(rev) - pos]:
                info["status"] = "invalid"
                return -1, False
            return -1, not final
        if not rev.startswith(b"HTTP/1.", pos) or rev[pos + 8] != 0x20 or not rev[pos + 9 : pos + 12].isdigit():
            info["status"] = "invalid"
            return -1, False
        status = int(rev[pos + 9 : pos + 12])
        info["status"] = str(status)
        end = _head_end(rev, pos, limit)
        if end < 0:
            waiting = not final and len(rev) < limit
            return -1, waiting and 100 <= status < 300
        if 100 <= status < 200:
            pos = end
            continue
        return (end, False) if 200 <= status < 300 else (-1, False)
    return -1, False


# --- SOCKS5 -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Socks:
    """Parsed SOCKS handshake facts. Internal."""

    info: dict[str, str] = field(default_factory=dict)
    inner_fwd: int = -1
    inner_rev: int = -1
    request_ok: bool = False
    request_at: int = -1  # where the SOCKS5 request starts (after any authentication)
    open: bool = False  # an offset could still be learned


def _socks_addr(data: bytes, pos: int, atyp: int) -> tuple[str, int] | int:
    """(address text, offset after port) for a SOCKS5 address, or _INCOMPLETE/_INVALID."""
    if atyp == _ATYP_IPV4:
        end = pos + 4
        if len(data) < end + 2:
            return _INCOMPLETE
        host = str(ipaddress.IPv4Address(data[pos:end]))
    elif atyp == _ATYP_IPV6:
        end = pos + 16
        if len(data) < end + 2:
            return _INCOMPLETE
        host = f"[{ipaddress.IPv6Address(data[pos:end])}]"
    elif atyp == _ATYP_DOMAIN:
        if len(data) <= pos:
            return _INCOMPLETE
        length = data[pos]
        end = pos + 1 + length
        if length == 0:
            return _INVALID
        if len(data) < end + 2:
            return _INCOMPLETE
        name = data[pos + 1 : end]
        if any(b not in _NAME_OK for b in name):
            return _INVALID
        host = name.decode("ascii")
    else:
        return _INVALID
    (port,) = _U16.unpack_from(data, end)
    return f"{host}:{port}", end + 2


def _socks5(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    fwd_final = ctx.fwd_closed or ctx.fwd_full
    rev_final = ctx.rev_closed or ctx.rev_full
    if len(fwd) < 2:
        return NOT_THIS if fwd_final else NEED_MORE
    count = fwd[1]
    methods = fwd[2 : 2 + count]
    if count == 0 or _AUTH_REJECTED in methods:
        return NOT_THIS
    if len(methods) < count:
        return NOT_THIS if fwd_final else NEED_MORE
    # The server's method selection must pick one of the offered methods (or none).
    if rev and (rev[0] != _SOCKS5 or (len(rev) >= 2 and rev[1] not in methods and rev[1] != _AUTH_REJECTED)):
        return NOT_THIS
    saw_selection = len(rev) >= 2
    pos = 2 + count
    if saw_selection:
        selected = rev[1]
    elif len(fwd) > pos and fwd[pos] == _SOCKS5:
        selected = _AUTH_NONE  # request pipelined right behind the greeting
    elif len(fwd) > pos and fwd[pos] == _RFC1929_VERSION and _AUTH_GSSAPI not in methods:
        selected = _AUTH_USERPASS
    else:
        selected = -1
    s = _Socks(info={"version": "5"})
    if selected >= 0:
        s.info["auth"] = _AUTH_NAMES.get(selected, f"0x{selected:02x}")
    if selected == -1:
        if len(fwd) > pos and fwd[pos] != _RFC1929_VERSION:
            return NOT_THIS  # something follows the greeting that is neither request nor auth
        # A bare greeting (or auth bytes that could be GSS-API): the selection will tell.
        return NOT_THIS if fwd_final and rev_final else NEED_MORE
    if selected not in (_AUTH_NONE, _AUTH_USERPASS):
        # Refused, or a method whose messages we do not read (GSS-API): no target to learn.
        return _socks_result(s, fwd, saw_selection)
    rpos = 2
    if selected == _AUTH_USERPASS:
        pos = _rfc1929(fwd, pos, s)
        rpos = _rfc1929_status(rev, s) if saw_selection else _INCOMPLETE
    if pos >= 0:
        _socks5_request(fwd, pos, s)
    if s.request_ok and rpos >= 0:
        _socks5_reply(rev, rpos, s)
    elif s.request_ok and rpos == _INCOMPLETE:
        s.open = True
    if not (s.request_ok or saw_selection):
        if pos == _INVALID or not s.open:
            return NOT_THIS
        return NOT_THIS if fwd_final else NEED_MORE
    if s.open and _socks_stalled(s, fwd_final, rev_final):
        s.open = False
    return _socks_result(s, fwd, saw_selection)


def _socks_stalled(s: _Socks, fwd_final: bool, rev_final: bool) -> bool:
    """Nothing more can arrive in the direction whose bytes are still missing."""
    if not s.request_ok:
        return fwd_final
    return rev_final


def _rfc1929(fwd: bytes, pos: int, s: _Socks) -> int:
    """RFC 1929 request ``01 ulen user plen pass``: offset after it, or a parse code."""
    if len(fwd) <= pos:
        s.open = True
        return _INCOMPLETE
    if fwd[pos] != _RFC1929_VERSION:
        return _INVALID
    if len(fwd) < pos + 2:
        s.open = True
        return _INCOMPLETE
    ulen = fwd[pos + 1]
    plen_at = pos + 2 + ulen
    if len(fwd) <= plen_at:
        s.open = True
        return _INCOMPLETE
    s.info["user"] = printable(fwd[pos + 2 : plen_at], 64)
    end = plen_at + 1 + fwd[plen_at]
    if len(fwd) < end:
        s.open = True
        return _INCOMPLETE
    return end


def _rfc1929_status(rev: bytes, s: _Socks) -> int:
    """Offset after the server's ``01 status`` (2 after the selection), or a parse code."""
    if len(rev) < 4:
        s.open = True
        return _INCOMPLETE
    if rev[2] != _RFC1929_VERSION:
        s.info["auth_status"] = "invalid"
        return _INVALID
    s.info["auth_status"] = "success" if rev[3] == 0 else "failure"
    return 4 if rev[3] == 0 else _INVALID


def _socks5_request(fwd: bytes, pos: int, s: _Socks) -> None:
    if len(fwd) < pos + 4:
        s.open = True
        return
    ver, cmd, rsv, atyp = fwd[pos : pos + 4]
    if ver != _SOCKS5 or cmd not in _CMD_NAMES or rsv != 0:
        return
    addr = _socks_addr(fwd, pos + 4, atyp)
    if addr == _INCOMPLETE:
        s.open = True
        return
    if isinstance(addr, int):
        return
    s.request_ok = True
    s.request_at = pos
    s.info["command"] = _CMD_NAMES[cmd]
    s.info["target"] = addr[0]
    if cmd == _CMD_CONNECT:
        s.inner_fwd = addr[1]


def _socks5_reply(rev: bytes, pos: int, s: _Socks) -> None:
    if len(rev) < pos + 4:
        s.open = True
        return
    ver, rep, _rsv, atyp = rev[pos : pos + 4]
    if ver != _SOCKS5:
        s.info["reply"] = "invalid"
        return
    addr = _socks_addr(rev, pos + 4, atyp)
    if addr == _INCOMPLETE:
        s.open = True
        return
    s.info["reply"] = "succeeded" if rep == 0 else f"error {rep}"
    if isinstance(addr, int):
        return
    if rep == 0 and s.inner_fwd >= 0:
        s.inner_rev = addr[1]


def _socks_result(s: _Socks, fwd: bytes, saw_selection: bool) -> Result:
    if not (s.request_ok or saw_selection):
        return NOT_THIS
    if s.inner_rev >= 0 or (s.request_ok and s.inner_fwd < 0):
        s.open = False  # tunnel open, or a BIND/UDP ASSOCIATE with no stream to follow
    return Detection(
        kind=PROXY_SOCKS,
        evidence=_socks5_evidence(fwd, s),
        info=s.info,
        refine=s.open,
        inner_fwd=s.inner_fwd,
        inner_rev=s.inner_rev,
    )


def _socks5_evidence(fwd: bytes, s: _Socks) -> str:
    """Greeting and request bytes; never the RFC 1929 password that may sit between them."""
    greeting = fwd[: 2 + fwd[1]]
    if s.request_at < 0:
        return printable(greeting, 48)
    end = s.inner_fwd if s.inner_fwd >= 0 else s.request_at + 4
    return printable(greeting, 24) + " " + printable(fwd[s.request_at : end], 48)


# --- SOCKS4 / 4a --------------------------------------------------------------------------


def _socks4(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    fwd_final = ctx.fwd_closed or ctx.fwd_full
    rev_final = ctx.rev_closed or ctx.rev_full
    if len(fwd) < 9:
        if len(fwd) >= 2 and fwd[1] not in (1, 2):
            return NOT_THIS
        return NOT_THIS if fwd_final else NEED_MORE
    cmd = fwd[1]
    if cmd not in (1, 2):
        return NOT_THIS
    (port,) = _U16.unpack_from(fwd, 2)
    ip = fwd[4:8]
    user_end = fwd.find(b"\x00", 8, 8 + 256)
    if user_end < 0:
        if len(fwd) >= 8 + 256 or fwd_final or any(b not in _USERID_OK for b in fwd[8:]):
            return NOT_THIS
        return NEED_MORE
    userid = fwd[8:user_end]
    if port == 0 or ip == b"\x00\x00\x00\x00" or any(b not in _USERID_OK for b in userid):
        return NOT_THIS
    end = user_end + 1
    version = "4"
    if ip[:3] == b"\x00\x00\x00":  # SOCKS4a: the server resolves the name that follows
        name_end = fwd.find(b"\x00", end, end + 256)
        if name_end < 0:
            if len(fwd) >= end + 256 or fwd_final or any(b not in _NAME_OK for b in fwd[end:]):
                return NOT_THIS
            return NEED_MORE
        name = fwd[end:name_end]
        if not name or any(b not in _NAME_OK for b in name):
            return NOT_THIS
        host = name.decode("ascii")
        end = name_end + 1
        version = "4a"
    else:
        host = str(ipaddress.IPv4Address(ip))
    info = {"version": version, "command": _CMD_NAMES[cmd], "target": f"{host}:{port}"}
    if userid:
        info["user"] = printable(userid, 64)
    if len(rev) < 2:
        if not (rev_final or fwd_final):
            return NEED_MORE
        return Detection(PROXY_SOCKS, printable(fwd[:end], 48), info=info, inner_fwd=-1)
    if rev[0] not in (0, _SOCKS4) or rev[1] not in _SOCKS4_REPLIES:
        return NOT_THIS
    info["reply"] = "granted" if rev[1] == _SOCKS4_GRANTED else f"rejected {rev[1]}"
    granted = rev[1] == _SOCKS4_GRANTED and cmd == _CMD_CONNECT
    inner_rev = 8 if granted and len(rev) >= 8 else -1
    return Detection(
        kind=PROXY_SOCKS,
        evidence=printable(fwd[:end], 48),
        info=info,
        refine=granted and inner_rev < 0 and not rev_final,
        inner_fwd=end if cmd == _CMD_CONNECT else -1,
        inner_rev=inner_rev,
    )
