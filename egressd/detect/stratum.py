"""Pool mining protocols: Stratum v1, EthereumStratum, CryptoNote/XMRig, getwork/GBT over HTTP.

Why JSON, really parsed: every one of these is JSON-RPC, and a miner that wants to slip past
a byte-pattern filter only has to write ``"m\\u0069ning.subscribe"``, reorder keys,
pretty-print, or put the method after a long params array; the pool's JSON parser does not
care, so neither may we. A cheap byte check picks the candidates (first non-blank byte
``{`` or ``[``, or an HTTP request/response line); only then is the bounded head handed to
``json``, and a match is on the *decoded* method string, compared exactly (case folded).
A method that is not a string matches nothing.

What counts (client side, the one the policy blocks): Stratum v1 ``mining.*`` requests;
EthereumStratum (``mining.hello``, ``mining.subscribe`` naming ``EthereumStratum/x``, and
the eth-proxy ``eth_submitLogin``/``eth_getWork``/``eth_submitWork``/``eth_submitHashrate``);
XMRig/CryptoNote ``login`` with a params object holding ``login`` and ``pass``/``agent``,
``submit`` with ``job_id``/``nonce``/``result``, ``keepalived``, ``getjob``; ``getwork`` /
``getblocktemplate`` in an HTTP body, or any request carrying the getwork extension headers
(``X-Mining-Extensions``, ``X-Mining-Hashrate``). Pool side: ``mining.notify`` and the other
pool-to-miner notifications, a subscribe result listing ``mining.*`` subscriptions, XMR job
objects (``blob`` + ``target``), a getwork work unit (``midstate`` + ``data``), an Ethereum
work package, and the pool-only HTTP headers (``X-Stratum``, ``X-Long-Polling``,
``X-Roll-NTime``, ``X-Is-P2pool``). Generic JSON-RPC (language servers, Ethereum node RPC,
Bitcoin Core RPC other than getwork/GBT) matches none of these.

Bounds: per direction at most the policy's ``head_bytes`` (``StreamContext.head``) are
considered and at most ``_MAX_MESSAGES`` messages decoded, only ones already complete; the
first message decides (later complete ones may only add a detection or info such as the
worker name). Stratum lines end in LF, so the first line is tried alone first; a
pretty-printed message (LFs inside) falls back to decoding the bounded head. While the first
message is a valid JSON prefix the answer is NEED_MORE, until the head is full or the
direction closed. Never raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from egressd.detect.base import (
    MINING_ETH,
    MINING_GETWORK,
    MINING_POOL,
    MINING_STRATUM,
    MINING_XMR,
    NEED_MORE,
    NOT_THIS,
    RPC_JSONRPC,
    Detection,
    Result,
    StreamContext,
    printable,
)

_MAX_MESSAGES: Final = 4  # complete messages decoded per direction
_MAX_BATCH: Final = 8  # elements of a JSON-RPC batch looked at
_MAX_WALK: Final = 16  # elements of a subscribe result looked at
_INFO_LEN: Final = 96
_EVIDENCE_LEN: Final = 96

_BOM: Final = b"\xef\xbb\xbf"
_BLANK: Final = b" \t\r\n"
_BLANK_STR: Final = " \t\r\n"
_DECODER: Final = json.JSONDecoder()

# Client requests, by decoded and case-folded method name.
_STRATUM_CLIENT: Final = frozenset(
    {
        "mining.subscribe",
        "mining.authorize",
        "mining.configure",
        "mining.extranonce.subscribe",
        "mining.suggest_target",
        "mining.suggest_difficulty",
        "mining.capabilities",
        "mining.submit",
        "mining.get_transactions",
        "mining.multi_version",
    }
)
_ETH_CLIENT: Final = frozenset(
    {"mining.hello", "eth_submitlogin", "eth_getwork", "eth_submitwork", "eth_submithashrate"}
)
_GETWORK: Final = frozenset({"getwork", "getblocktemplate"})
# Pool-to-miner notifications.
_POOL_METHODS: Final = frozenset(
    {
        "mining.notify",
        "mining.set_difficulty",
        "mining.set_target",
        "mining.set_extranonce",
        "mining.set_version_mask",
        "mining.set_goal",
    }
)
_CLIENT_KINDS: Final = (MINING_STRATUM, MINING_ETH, MINING_XMR, MINING_GETWORK)

_HTTP_REQUESTS: Final = (b"POST ", b"GET ", b"PUT ")
_HTTP_RESPONSE: Final = b"HTTP/"
_CLIENT_HEADERS: Final = (b"x-mining-extensions", b"x-mining-hashrate")
_POOL_HEADERS: Final = (b"x-stratum", b"x-long-polling", b"x-roll-ntime", b"x-is-p2pool")

# Per-direction outcomes.
_NEED: Final = 0
_NOT: Final = 1
# Not mining, but read: a complete JSON-RPC message (an object with "method", "result" or
# "error") whose method is none of the above. Reported as ``rpc.jsonrpc`` so that a port-only
# policy rule knows the content was inspected and found to be something else.
_RPC: Final = 2


@dataclass(slots=True)
class _Hit:
    """One direction's finding (the other outcomes are the ints _NEED and _NOT). Internal."""

    kind: str
    method: str
    evidence: str
    info: dict[str, str]


def _clean(value: str) -> str:
    """An info value as sent, escaped for logs and cut short."""
    return printable(value[:_INFO_LEN].encode("utf-8", "replace"), _INFO_LEN)


def _str_at(seq: object, index: int) -> str | None:
    if isinstance(seq, list) and len(seq) > index:
        item = seq[index]
        if isinstance(item, str):
            return item
    return None


def _is_eth_work(result: object) -> bool:
    """eth_getWork result: [header hash, seed hash, boundary(, block number)], 0x + 64 hex.

    The boundary is 2^256 / share difficulty, so it starts with zero nibbles; a list of
    three block or transaction hashes (node RPC) almost never does.
    """
    if not isinstance(result, list) or not 3 <= len(result) <= 4:
        return False
    for item in result[:3]:
        if not (isinstance(item, str) and len(item) == 66 and item[:2] in ("0x", "0X")):
            return False
    boundary = result[2]
    return isinstance(boundary, str) and boundary.startswith(("0x0000", "0X0000"))


def _lists_mining_subscription(result: object) -> bool:
    """Stratum subscribe result: [[["mining.notify", id], ...] or ["mining.notify", id], ...]."""
    if not isinstance(result, list):
        return False
    for item in result[:_MAX_WALK]:
        if not isinstance(item, list):
            continue
        name = _str_at(item, 0)
        if name is not None and name.lower().startswith("mining."):
            return True
        for sub in item[:_MAX_WALK]:
            name = _str_at(sub, 0)
            if name is not None and name.lower().startswith("mining."):
                return True
    return False


def _is_xmr_job(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("blob"), str) and "target" in obj


def _classify_request(msg: dict[str, object], method: str) -> tuple[str, dict[str, str]] | None:
    """Kind and info for a message carrying a string ``method``."""
    name = method.lower()
    params = msg.get("params")
    info: dict[str, str] = {}
    if name in _STRATUM_CLIENT:
        kind = MINING_STRATUM
        first = _str_at(params, 0)
        if name == "mining.subscribe":
            if isinstance(params, list) and any(
                isinstance(p, str) and p.lower().startswith("ethereumstratum/") for p in params[:4]
            ):
                kind = MINING_ETH
            if first is not None:
                info["agent"] = _clean(first)
        elif name in ("mining.authorize", "mining.submit") and first is not None:
            info["user"] = _clean(first)
        return kind, info
    if name in _ETH_CLIENT:
        first = _str_at(params, 0)
        if name in ("eth_submitlogin", "mining.hello") and first is not None:
            info["user" if name == "eth_submitlogin" else "agent"] = _clean(first)
        worker = msg.get("worker")
        if isinstance(worker, str) and worker:
            info["worker"] = _clean(worker)
        return MINING_ETH, info
    if name in _GETWORK:
        return MINING_GETWORK, info
    if name in _POOL_METHODS or (name == "job" and _is_xmr_job(params)):
        return MINING_POOL, info
    if name.startswith("mining."):
        return MINING_STRATUM, info  # the Stratum namespace; nothing else uses it
    if isinstance(params, dict):
        return _classify_xmr(name, params)
    return None


def _classify_xmr(name: str, params: dict[str, object]) -> tuple[str, dict[str, str]] | None:
    """CryptoNote pool protocol (XMRig, xmr-stak): params is an object."""
    info: dict[str, str] = {}
    if name == "login":
        login = params.get("login")
        if not isinstance(login, str) or not ("pass" in params or "agent" in params):
            return None
        info["login"] = _clean(login)
        agent = params.get("agent")
        if isinstance(agent, str):
            info["agent"] = _clean(agent)
        return MINING_XMR, info
    if name == "submit" and "job_id" in params and "nonce" in params and "result" in params:
        return MINING_XMR, info
    if name in ("keepalived", "getjob"):
        return MINING_XMR, info
    return None


def _classify(msg: object) -> tuple[str, str, dict[str, str]] | None:
    """(kind, method, info) for one decoded message (or the first match in a batch)."""
    if isinstance(msg, list):
        for item in msg[:_MAX_BATCH]:
            got = _classify(item) if isinstance(item, dict) else None
            if got is not None:
                return got
        return None
    if not isinstance(msg, dict):
        return None
    method = msg.get("method")
    if isinstance(method, str):
        request = _classify_request(msg, method)
        return (request[0], method, request[1]) if request is not None else None
    if "method" in msg:
        return None  # a method that is not a string is no request at all
    result = msg.get("result")
    if _lists_mining_subscription(result):
        return MINING_POOL, "(subscribe result)", {}
    if isinstance(result, dict):
        if _is_xmr_job(result.get("job")) or _is_xmr_job(result):
            return MINING_POOL, "(job)", {}
        if "midstate" in result and "data" in result:
            return MINING_POOL, "(getwork result)", {}
        if "previousblockhash" in result and "coinbasevalue" in result:
            return MINING_POOL, "(getblocktemplate result)", {}
    if _is_eth_work(result):
        return MINING_POOL, "(eth work)", {}
    return None


def _looks_incomplete(text: str, err: json.JSONDecodeError) -> bool:
    """Could more bytes still make this a valid document? Biased to yes near the end.

    A premature "no" would lose a detection for good; a premature "yes" only waits for the
    next segment (and the head cap or the close ends that).
    """
    if err.msg.startswith("Unterminated string"):
        return True
    return len(text[err.pos :].strip(_BLANK_STR)) <= 16


def _decode_first(text: str, final: bool) -> tuple[object, int] | int:
    """The first JSON value of ``text`` (which starts with it): (value, end) or _NEED/_NOT."""
    nl = text.find("\n")
    if nl > 0:
        try:
            return _DECODER.raw_decode(text[:nl])
        except (ValueError, RecursionError):
            pass  # pretty-printed, or invalid: decide on the whole head below
    elif not final and text.rstrip(_BLANK_STR)[-1:] not in ("}", "]"):
        return _NEED
    try:
        return _DECODER.raw_decode(text)
    except json.JSONDecodeError as err:
        return _NEED if not final and _looks_incomplete(text, err) else _NOT
    except (ValueError, RecursionError):
        return _NOT


def _json_stream(data: bytes, start: int, final: bool, limit: int) -> _Hit | int:
    """Newline-delimited (or concatenated) JSON-RPC messages from ``start``."""
    text = data[start:limit].decode("utf-8", "replace")
    final = final or len(data) >= limit
    first = _decode_first(text, final)
    if isinstance(first, int):
        return first
    hit: _Hit | None = None
    value, end = first
    msg_start = 0
    for index in range(_MAX_MESSAGES):
        got = _classify(value)
        if got is not None:
            kind, method, info = got
            if hit is None:
                evidence = printable(text[msg_start : msg_start + _EVIDENCE_LEN].encode("utf-8", "replace"))
                hit = _Hit(kind, method, evidence, info)
            else:
                for key, val in info.items():
                    hit.info.setdefault(key, val)
        if index + 1 == _MAX_MESSAGES:
            break
        msg_start = len(text) - len(text[end:].lstrip(_BLANK_STR))
        if msg_start >= len(text) or text[msg_start] not in "{[":
            break
        try:
            value, end = _DECODER.raw_decode(text, msg_start)
        except (ValueError, RecursionError):
            break
    if hit is not None:
        return hit
    return _RPC if _is_rpc(first[0]) else _NOT


def _is_rpc(value: object) -> bool:
    """A JSON-RPC request, response or batch of them (1.0 and 2.0 alike)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return isinstance(value, dict) and ("method" in value or "result" in value or "error" in value)


def _headers(head: bytes) -> dict[bytes, bytes]:
    """Header fields of an HTTP head (lower-cased names; first occurrence wins)."""
    fields: dict[bytes, bytes] = {}
    for line in head.split(b"\n")[1:64]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    return fields


def _http(data: bytes, start: int, final: bool, request: bool, limit: int) -> _Hit | int:
    """An HTTP request (miner: body method, getwork headers) or response (pool headers/body)."""
    final = final or len(data) >= limit
    end = data.find(b"\r\n\r\n", start, limit)
    sep = 4
    lf = data.find(b"\n\n", start, limit)
    if lf >= 0 and (end < 0 or lf < end):
        end, sep = lf, 2
    if end < 0:
        return _NOT if final else _NEED
    head = data[start:end]
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if b" HTTP/" not in first_line and not first_line.startswith(_HTTP_RESPONSE):
        return _NOT
    fields = _headers(head)
    names = _CLIENT_HEADERS if request else _POOL_HEADERS
    header = next((n for n in names if n in fields), None)
    body_at = end + sep
    body = _body(data, body_at, fields, final, limit)
    if body == _NEED:
        return _NEED
    hit: _Hit | int = _NOT
    if isinstance(body, bytes):
        stripped = body.lstrip(_BLANK)
        if stripped[:1] in (b"{", b"["):
            hit = _json_stream(stripped, 0, True, limit)
            if hit == _RPC and header is None:
                return _RPC
    if isinstance(hit, _Hit):
        if request and hit.kind == MINING_POOL:
            hit = _NOT  # a request carrying a pool message is not a pool
        else:
            hit.info["transport"] = "http"
            if header is not None:
                hit.info["header"] = header.decode("ascii")
            return hit
    if header is None:
        return _NOT
    kind = MINING_GETWORK if request else MINING_POOL
    value = printable(fields[header], 64)
    evidence = printable(first_line, 48) + " " + header.decode("ascii") + ": " + value
    return _Hit(kind, "(http header)", evidence, {"transport": "http", "header": header.decode("ascii")})


def _body(data: bytes, at: int, fields: dict[bytes, bytes], final: bool, limit: int) -> bytes | int | None:
    """The first bytes of the message body (complete, or what the head holds), or _NEED/None."""
    length = fields.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            return None
        # A Content-Length longer than any head: parse what arrives (never int() a huge string).
        want = int(length) if len(length) <= 9 else 1 << 31
        if len(data) - at < want and not final:
            return _NEED
        return data[at : at + want]
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        eol = data.find(b"\n", at, at + 32)
        if eol < 0:
            return None if final else _NEED
        size = data[at:eol].split(b";", 1)[0].strip()
        try:
            want = int(size, 16)
        except ValueError:
            return None
        if len(data) - eol - 1 < want and not final:
            return _NEED
        return data[eol + 1 : eol + 1 + want]
    return data[at:limit] if len(data) > at else None


def _scan(data: bytes, final: bool, limit: int) -> _Hit | int:
    """One direction: _Hit, _NEED or _NOT."""
    start = 3 if data.startswith(_BOM) else 0
    rest = data[start:limit].lstrip(_BLANK)
    if not rest:
        return _NOT if final or len(data) >= limit else _NEED
    start = min(len(data), limit) - len(rest)
    first = rest[0]
    if first in b"{[":
        return _json_stream(data, start, final, limit)
    if rest.startswith(_HTTP_REQUESTS):
        return _http(data, start, final, request=True, limit=limit)
    if rest.startswith(_HTTP_RESPONSE):
        return _http(data, start, final, request=False, limit=limit)
    if not final and any(p.startswith(rest) for p in (*_HTTP_REQUESTS, _HTTP_RESPONSE, _BOM)):
        return _NEED
    return _NOT


def _pick(fwd: _Hit | int, rev: _Hit | int) -> _Hit | None:
    """The client side's finding wins (it names the method and the worker)."""
    hits = [h for h in (fwd, rev) if isinstance(h, _Hit)]
    if not hits:
        return None
    hits.sort(key=lambda h: h.kind not in _CLIENT_KINDS)
    best = hits[0]
    if len(hits) == 2 and hits[1].kind == MINING_POOL and best.kind != MINING_POOL:
        best.info.setdefault("pool_method", hits[1].method)
    return best


# The last head scanned on each side, and what _scan said of it. The engine calls
# detect_stratum and detect_jsonrpc one after the other on the very same head objects, and
# when only one side of a flow grew, the other side's head is the very same object as at the
# previous call (a head is replaced, never changed, when it grows): either way the parse is
# reused instead of decoding the JSON or the HTTP head again. _scan is a function of
# (head, final, limit) alone. Identity, not equality: the references held here keep those
# objects alive, so an identical id means the same bytes.
_last_side: list[tuple[bytes | None, bool, int, _Hit | int]] = [(None, False, 0, _NOT), (None, False, 0, _NOT)]


def _scan_side(side: int, data: bytes, final: bool, limit: int) -> _Hit | int:
    head, was_final, was_limit, got = _last_side[side]
    if head is data and was_final == final and was_limit == limit:
        return got
    got = _scan(data, final, limit)
    _last_side[side] = (data, final, limit, got)
    return got


def _scan_both(fwd: bytes, rev: bytes, ctx: StreamContext) -> tuple[_Hit | int, _Hit | int]:
    return (
        _scan_side(0, fwd, ctx.fwd_closed or ctx.fwd_full, ctx.head),
        _scan_side(1, rev, ctx.rev_closed or ctx.rev_full, ctx.head),
    )


def detect_stratum(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """Mining-pool JSON-RPC from either side of the flow."""
    f, r = _scan_both(fwd, rev, ctx)
    hit = _pick(f, r)
    if hit is None:
        return NEED_MORE if f == _NEED or r == _NEED else NOT_THIS
    info = {"method": _clean(hit.method), **hit.info}
    return Detection(kind=hit.kind, evidence=hit.evidence, info=info)


def detect_jsonrpc(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """JSON-RPC that is *not* mining, read in full from both sides: ``rpc.jsonrpc``.

    The other half of :func:`detect_stratum`, on the same parse: once neither side can still
    show a miner's or a pool's message and at least one side sent a complete JSON-RPC
    message, the flow is known to be something else, and a port-only rule must not call it
    mining (an Ethereum or Bitcoin node's RPC on a port pools also use).
    """
    f, r = _scan_both(fwd, rev, ctx)
    if isinstance(f, _Hit) or isinstance(r, _Hit):
        return NOT_THIS  # mining: detect_stratum reports it
    if f == _NEED or r == _NEED:
        return NEED_MORE
    if f != _RPC and r != _RPC:
        return NOT_THIS
    data = fwd if f == _RPC else rev
    start = len(data) - len(data.lstrip(_BLANK))
    return Detection(kind=RPC_JSONRPC, evidence=printable(data[start : start + _EVIDENCE_LEN]))
