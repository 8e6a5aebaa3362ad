"""A mining pool and a mining client that speak the wire protocols, for the lab and the captures.

Why write our own: the product must be shown stopping real mining traffic, but no mining
software belongs on a test box. These peers are written from the public protocol
descriptions, so what crosses the wire is what a miner and a pool exchange, message for
message, without hashing anything:

* ``v1``       Stratum v1 (slushpool's "Stratum mining protocol" document, BIP 310
               ``mining.configure`` version rolling, NiceHash ``mining.extranonce.subscribe``):
               subscribe -> authorize -> set_difficulty/notify -> submit.
* ``eth``      EthereumStratum/1.0.0 (NiceHash's spec): subscribe with the protocol name,
               authorize, set_difficulty + notify(job, seed hash, header hash), submit.
* ``ethproxy`` the "stratum proxy" dialect of Ethereum miners: eth_submitLogin, eth_getWork,
               eth_submitWork, eth_submitHashrate (JSON-RPC 2.0 lines).
* ``xmr``      the CryptoNote pool protocol XMRig speaks: login (the result carries the first
               job), submit, keepalived, and pushed ``job`` notifications.
* ``getwork``  HTTP POST JSON-RPC as bitcoind served it to miners: getwork (BIP 22's
               predecessor), getblocktemplate / submitblock (BIP 22/23). ``gbt`` is the same
               server, and a client that uses getblocktemplate instead of getwork.

The pool logs one JSON line per event (``--log``, flushed at once): listening, every
connection open and close (with how many bytes of an unfinished line it held), and every
*complete* request it received. A test that says "egressd cut the flow before the pool saw
a whole subscribe" reads that log. Everything is bounded: connections, line and body
length, idle time, lifetime; SIGTERM ends it.

The client runs one handshake, prints one JSON line and exits 0 only if the handshake
completed, so a test can assert on its exit code alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

VARIANTS: Final = ("v1", "eth", "ethproxy", "xmr", "getwork", "gbt")
DEFAULT_PORTS: Final[dict[str, int]] = {
    "v1": 3333,
    "eth": 4444,
    "ethproxy": 8008,
    "xmr": 3333,
    "getwork": 8332,
    "gbt": 8332,
}
ETH_PROTOCOL: Final = "EthereumStratum/1.0.0"

Json = dict[str, Any]


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``1.2.3.4:5``, ``[2001:db8::1]:5`` -> (host, port). IPv6 needs brackets."""
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':port' after ']' in {text!r}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError(f"IPv6 addresses need brackets: [{text}]:port")
    if not port:
        if default_port is None:
            raise ValueError(f"no port in {text!r}")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r} in {text!r}")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _list_params(req: Json) -> list[Any]:
    p = req.get("params")
    return p if isinstance(p, list) else []


def _hex(seed: str, nbytes: int) -> str:
    """Deterministic pseudo-random hex of ``nbytes`` bytes (jobs that look like jobs)."""
    out = b""
    i = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{seed}/{i}".encode()).digest()
        i += 1
    return out[:nbytes].hex()


# =================================================================================================
# Pool sessions: sans-IO, one per connection. ``handle(request) -> replies``.
# =================================================================================================
class PoolSession:
    """One miner's session. ``handle`` returns the messages to send, in order."""

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        self.jobs: set[str] = set()
        self.job_seq = 0

    def new_job_id(self) -> str:
        self.job_seq += 1
        jid = f"{self.conn_id:x}{self.job_seq:04x}"
        self.jobs.add(jid)
        return jid

    def handle(self, req: Json) -> list[Json]:
        raise NotImplementedError

    def safe_handle(self, req: Json) -> tuple[list[Json], str | None]:
        """``handle``, but a request shaped in a way no session expects gets an error reply
        instead of killing the connection task (a lab peer must survive odd clients)."""
        try:
            return self.handle(req), None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            why = f"unexpected request shape: {e!r}"
            return [{"id": req.get("id"), "result": None, "error": [20, why, None]}], why


class V1Session(PoolSession):
    """Stratum v1: replies ``{"id", "result", "error"}``; pushes have ``"id": null``."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(conn_id)
        self.subscribed = False
        self.authorized: set[str] = set()
        self.difficulty: float = 16384
        self.pushed = False

    def ok(self, req: Json, result: Any) -> Json:
        return {"id": req.get("id"), "result": result, "error": None}

    def err(self, req: Json, code: int, msg: str) -> Json:
        return {"id": req.get("id"), "result": None, "error": [code, msg, None]}

    def job(self) -> Json:
        jid = self.new_job_id()
        s = f"v1/{jid}"
        params = [
            jid,
            _hex(s + "prev", 32),
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff2003"
            + _hex(s + "cb1", 16),
            _hex(s + "cb2", 24) + "ffffffff0100f2052a010000001976a914" + _hex(s + "pk", 20) + "88ac00000000",
            [_hex(s + f"m{i}", 32) for i in range(2)],
            "20000000",
            "1703a30c",
            f"{int(time.time()):08x}",
            True,
        ]
        return {"id": None, "method": "mining.notify", "params": params}

    def after_auth(self) -> list[Json]:
        if self.pushed or not (self.subscribed and self.authorized):
            return []
        self.pushed = True
        return [{"id": None, "method": "mining.set_difficulty", "params": [self.difficulty]}, self.job()]

    def handle(self, req: Json) -> list[Json]:
        m = req.get("method")
        p = _list_params(req)
        if m == "mining.configure":
            exts = p[0] if p and isinstance(p[0], list) else []
            opts = p[1] if len(p) > 1 and isinstance(p[1], dict) else {}
            res: Json = {}
            if "version-rolling" in exts:
                mask = int(str(opts.get("version-rolling.mask", "1fffe000")), 16) & 0x1FFFE000
                res["version-rolling"] = True
                res["version-rolling.mask"] = f"{mask:08x}"
            if "minimum-difficulty" in exts:
                res["minimum-difficulty"] = True
            for e in exts:
                res.setdefault(e, False)
            return [self.ok(req, res)]
        if m == "mining.subscribe":
            self.subscribed = True
            sub = _hex(f"sub{self.conn_id}", 16)
            extranonce1 = f"{0x08000000 + self.conn_id:08x}"
            result = [[["mining.set_difficulty", sub], ["mining.notify", sub]], extranonce1, 4]
            return [self.ok(req, result), *self.after_auth()]
        if m == "mining.authorize":
            if p and isinstance(p[0], str):
                self.authorized.add(p[0])
            return [self.ok(req, True), *self.after_auth()]
        if m == "mining.extranonce.subscribe":
            return [self.ok(req, True)]
        if m == "mining.suggest_difficulty":
            if p and isinstance(p[0], int | float) and p[0] > 0:
                self.difficulty = p[0]
            return [self.ok(req, True)]
        if m == "mining.get_transactions":
            return [self.ok(req, [])]
        if m == "mining.submit":
            if not self.subscribed:
                return [self.err(req, 25, "Not subscribed")]
            if not p or p[0] not in self.authorized:
                return [self.err(req, 24, "Unauthorized worker")]
            if len(p) < 5 or p[1] not in self.jobs:
                return [self.err(req, 21, "Job not found")]
            return [self.ok(req, True)]
        return [self.err(req, 20, f"Unknown method {m!r}")]


class EthSession(V1Session):
    """EthereumStratum/1.0.0: v1's message shapes, Ethash job parameters."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(conn_id)
        self.difficulty = 2

    def job(self) -> Json:
        jid = self.new_job_id()
        seed = _hex(f"eth/seed/{self.conn_id}", 32)
        return {
            "id": None,
            "method": "mining.notify",
            "params": [jid, seed, _hex(f"eth/hdr/{jid}", 32), True],
        }

    def handle(self, req: Json) -> list[Json]:
        m = req.get("method")
        p = _list_params(req)
        if m == "mining.subscribe":
            if len(p) < 2 or p[1] != ETH_PROTOCOL:
                return [self.err(req, 20, f"this pool speaks {ETH_PROTOCOL} only")]
            self.subscribed = True
            result = [
                ["mining.notify", _hex(f"sub{self.conn_id}", 16), ETH_PROTOCOL],
                f"{self.conn_id & 0xFFFF:04x}",
            ]
            return [self.ok(req, result), *self.after_auth()]
        if m == "mining.submit":
            if not self.subscribed:
                return [self.err(req, 25, "Not subscribed")]
            if not p or p[0] not in self.authorized:
                return [self.err(req, 24, "Unauthorized worker")]
            if len(p) < 3 or p[1] not in self.jobs:
                return [self.err(req, 21, "Job not found")]
            return [self.ok(req, True)]
        if m == "mining.configure":
            return [self.err(req, 20, f"Unknown method {m!r}")]
        return super().handle(req)


class EthProxySession(PoolSession):
    """eth-proxy dialect: JSON-RPC 2.0 lines, work as a 3-element result array."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(conn_id)
        self.login = ""

    def reply(self, req: Json, result: Any = None, error: Json | None = None) -> Json:
        out: Json = {"id": req.get("id"), "jsonrpc": "2.0", "result": result}
        if error is not None:
            out["error"] = error
        return out

    def work(self) -> list[str]:
        jid = self.new_job_id()
        return [
            "0x" + _hex(f"ethp/hdr/{jid}", 32),
            "0x" + _hex("ethp/seed", 32),
            "0x" + "00000000" + "ffff" * 14,
        ]

    def handle(self, req: Json) -> list[Json]:
        m = req.get("method")
        p = _list_params(req)
        if m == "eth_submitLogin":
            if not p or not isinstance(p[0], str):
                return [self.reply(req, None, {"code": -1, "message": "missing login"})]
            self.login = p[0]
            return [self.reply(req, True)]
        if not self.login:
            return [self.reply(req, None, {"code": -1, "message": "not logged in"})]
        if m == "eth_getWork":
            return [self.reply(req, self.work())]
        if m == "eth_submitWork":
            ok = len(p) >= 3 and any(p[1] == "0x" + _hex(f"ethp/hdr/{j}", 32) for j in self.jobs)
            return [self.reply(req, ok)]
        if m == "eth_submitHashrate":
            return [self.reply(req, True)]
        return [self.reply(req, None, {"code": -32601, "message": f"method {m!r} not found"})]


class XmrSession(PoolSession):
    """CryptoNote pool protocol (XMRig): login returns a session id and the first job."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(conn_id)
        self.session = ""

    def reply(self, req: Json, result: Any = None, error: Json | None = None) -> Json:
        return {"id": req.get("id"), "jsonrpc": "2.0", "error": error, "result": result}

    def job(self) -> Json:
        jid = self.new_job_id()
        return {
            "blob": "1010" + _hex(f"xmr/blob/{jid}", 74),
            "job_id": jid,
            "target": "b88d0600",
            "algo": "rx/0",
            "height": 3100000 + self.job_seq,
            "seed_hash": _hex("xmr/seed", 32),
            "id": self.session,
        }

    def handle(self, req: Json) -> list[Json]:
        m = req.get("method")
        p = req.get("params")
        p = p if isinstance(p, dict) else {}
        if m == "login":
            if not isinstance(p.get("login"), str) or not p["login"]:
                return [self.reply(req, None, {"code": -1, "message": "missing login"})]
            self.session = _hex(f"xmr/session/{self.conn_id}", 16)
            result = {
                "id": self.session,
                "job": self.job(),
                "extensions": ["algo", "nicehash", "connect", "tls", "keepalive"],
                "status": "OK",
            }
            return [self.reply(req, result)]
        if not self.session or p.get("id") != self.session:
            return [self.reply(req, None, {"code": -1, "message": "Unauthenticated"})]
        if m == "submit":
            if p.get("job_id") not in self.jobs:
                return [self.reply(req, None, {"code": -1, "message": "Invalid job id"})]
            return [self.reply(req, {"status": "OK"})]
        if m == "keepalived":
            return [self.reply(req, {"status": "KEEPALIVED"})]
        if m == "getjob":
            return [self.reply(req, self.job())]
        return [self.reply(req, None, {"code": -1, "message": "Invalid method"})]


class GetworkRpc(PoolSession):
    """bitcoind-style JSON-RPC 1.0 over HTTP: getwork, getblocktemplate, submitblock."""

    def reply(self, req: Json, result: Any = None, error: Json | None = None) -> Json:
        return {"result": result, "error": error, "id": req.get("id")}

    def handle(self, req: Json) -> list[Json]:
        m = req.get("method")
        p = _list_params(req)
        if m == "getwork":
            if p:  # a solution: the 128-byte block header we handed out, nonce filled in
                ok = (
                    isinstance(p[0], str)
                    and len(p[0]) == 256
                    and any(p[0][8:72] == _hex(f"gw/prev/{j}", 32) for j in self.jobs)
                )
                return [self.reply(req, ok)]
            jid = self.new_job_id()
            data = (
                "00000002"
                + _hex(f"gw/prev/{jid}", 32)
                + _hex(f"gw/merkle/{jid}", 32)
                + f"{int(time.time()):08x}1a0ffff000000000"
            )
            data += "00000080" + "00" * 40 + "80020000"  # SHA-256 padding of the 80-byte header
            result = {
                "midstate": _hex(f"gw/mid/{jid}", 32),
                "data": data,
                "hash1": "00" * 32 + "0000008000000000000000000000000000000000000000000000000000010000",
                "target": "ff" * 28 + "00000000",
            }
            return [self.reply(req, result)]
        if m == "getblocktemplate":
            jid = self.new_job_id()
            now = int(time.time())
            tmpl = {
                "capabilities": ["proposal"],
                "version": 0x20000000,
                "rules": ["csv", "!segwit", "taproot"],
                "vbavailable": {},
                "vbrequired": 0,
                "previousblockhash": _hex(f"gbt/prev/{jid}", 32),
                "transactions": [],
                "coinbaseaux": {},
                "coinbasevalue": 312500000,
                "longpollid": _hex(f"gbt/prev/{jid}", 32) + "1",
                "target": "0000000000000000000313a60000000000000000000000000000000000000000",
                "mintime": now - 3600,
                "mutable": ["time", "transactions", "prevblock"],
                "noncerange": "00000000ffffffff",
                "sigoplimit": 80000,
                "sizelimit": 4000000,
                "weightlimit": 4000000,
                "curtime": now,
                "bits": "170313a6",
                "height": 850000 + self.job_seq,
                "default_witness_commitment": "6a24aa21a9ed" + _hex(f"gbt/wc/{jid}", 32),
            }
            return [self.reply(req, tmpl)]
        if m == "submitblock":
            ok = bool(p) and isinstance(p[0], str) and len(p[0]) >= 160
            return [self.reply(req, None if ok else "rejected")]
        if m == "getmininginfo":
            return [self.reply(req, {"blocks": 850000, "difficulty": 8.6e13, "networkhashps": 6e20, "chain": "main"})]
        return [self.reply(req, None, {"code": -32601, "message": "Method not found"})]


SESSIONS: Final[dict[str, Callable[[int], PoolSession]]] = {
    "v1": V1Session,
    "eth": EthSession,
    "ethproxy": EthProxySession,
    "xmr": XmrSession,
    "getwork": GetworkRpc,
    "gbt": GetworkRpc,
}


# =================================================================================================
# Pool server
# =================================================================================================
class EventLog:
    """JSON lines, flushed per event: a test reads the file while the pool still runs."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out

    def __call__(self, event: str, **fields: Any) -> None:
        if self.out is None:
            return
        rec = {"ts": round(time.time(), 6), "event": event, **fields}
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.out.flush()


@dataclass
class PoolConfig:
    variant: str
    max_conns: int = 64
    max_line: int = 16384
    idle_timeout: float = 60.0
    lifetime: float = 3600.0


@dataclass
class _Conn:
    conn_id: int
    peer: str
    bytes_in: int = 0
    requests: int = 0
    methods: list[str] = field(default_factory=list)


class Pool:
    """The asyncio server. One task per connection; all state in the per-connection session."""

    def __init__(self, cfg: PoolConfig, log: EventLog) -> None:
        self.cfg = cfg
        self.log = log
        self.active = 0
        self.next_id = 0
        self.stopping = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_t = writer.get_extra_info("peername") or ("?", 0)
        peer = format_hostport(str(peer_t[0]), int(peer_t[1]))
        self.next_id += 1
        c = _Conn(self.next_id, peer)
        if self.active >= self.cfg.max_conns:
            self.log("refused", conn=c.conn_id, peer=peer, reason=f"{self.active} connections open (max)")
            writer.close()
            return
        self.active += 1
        self.log("open", conn=c.conn_id, peer=peer)
        partial = b""
        reason = "peer closed"
        try:
            if self.cfg.variant in ("getwork", "gbt"):
                partial, reason = await self._http(c, reader, writer)
            else:
                partial, reason = await self._lines(c, reader, writer)
        except (ConnectionError, OSError) as e:
            reason = f"connection error: {e}"
        finally:
            self.active -= 1
            self.log(
                "close", conn=c.conn_id, peer=peer, reason=reason, bytes_in=c.bytes_in,
                requests=c.requests, partial_bytes=len(partial), partial=partial[:256].decode("latin-1"),
            )  # fmt: skip
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read(self, c: _Conn, reader: asyncio.StreamReader) -> bytes:
        data = await asyncio.wait_for(reader.read(65536), self.cfg.idle_timeout)
        c.bytes_in += len(data)
        return data

    async def _lines(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, str]:
        session = SESSIONS[self.cfg.variant](c.conn_id)
        buf = b""
        while True:
            try:
                data = await self._read(c, reader)
            except TimeoutError:
                return buf, f"idle for {self.cfg.idle_timeout:g} s"
            if not data:
                return buf, "peer closed"
            buf += data
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1 :]
                if not line.strip():
                    continue
                c.requests += 1
                text = line.decode("utf-8", "replace")
                try:
                    req = json.loads(text)
                    if not isinstance(req, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    self.log("request", conn=c.conn_id, method=None, line=text, error=f"bad JSON: {e}")
                    return buf, "bad JSON"
                replies, problem = session.safe_handle(req)
                extra = {"error": problem} if problem else {}
                self.log("request", conn=c.conn_id, method=req.get("method"), id=req.get("id"), line=text, **extra)
                for reply in replies:
                    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
            if len(buf) > self.cfg.max_line:
                return buf, f"line longer than {self.cfg.max_line} bytes"

    async def _http(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, str]:
        rpc = GetworkRpc(c.conn_id)
        buf = b""
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buf) > self.cfg.max_line:
                    return buf, f"HTTP header longer than {self.cfg.max_line} bytes"
                try:
                    data = await self._read(c, reader)
                except TimeoutError:
                    return buf, f"idle for {self.cfg.idle_timeout:g} s"
                if not data:
                    return buf, "peer closed"
                buf += data
                continue
            head = buf[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for h in lines[1:]:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self.log("request", conn=c.conn_id, method=None, line=lines[0], error="not an HTTP/1.x request")
                await self._http_reply(writer, 400, {"error": "bad request"}, close=True)
                return b"", "bad HTTP request"
            if "chunked" in headers.get("transfer-encoding", "").lower():
                await self._http_reply(writer, 411, {"error": "length required"}, close=True)
                return b"", "chunked body"
            try:
                clen = int(headers.get("content-length", "0"))
            except ValueError:
                clen = -1
            if not 0 <= clen <= 4 * self.cfg.max_line:
                await self._http_reply(writer, 413, {"error": "bad Content-Length"}, close=True)
                return b"", f"Content-Length {headers.get('content-length')!r}"
            while len(buf) < head_end + 4 + clen:
                try:
                    data = await self._read(c, reader)
                except TimeoutError:
                    return buf, f"idle for {self.cfg.idle_timeout:g} s"
                if not data:
                    return buf, "peer closed"
                buf += data
            body = buf[head_end + 4 : head_end + 4 + clen].decode("utf-8", "replace")
            buf = buf[head_end + 4 + clen :]
            c.requests += 1
            if parts[0] != "POST":
                self.log("request", conn=c.conn_id, method=None, http=lines[0], line=body)
                await self._http_reply(writer, 405, {"error": "use POST"}, close=False)
                continue
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.log("request", conn=c.conn_id, method=None, http=lines[0], line=body, error=f"bad JSON: {e}")
                await self._http_reply(writer, 400, {"result": None, "error": "parse error", "id": None}, close=True)
                return buf, "bad JSON"
            (reply,), problem = rpc.safe_handle(req)
            self.log(
                "request", conn=c.conn_id, method=req.get("method"), id=req.get("id"), http=lines[0],
                agent=headers.get("user-agent", ""), line=body, **({"error": problem} if problem else {}),
            )  # fmt: skip
            close = headers.get("connection", "").lower() == "close"
            await self._http_reply(writer, 200, reply, close=close)
            if close:
                return buf, "client asked to close"

    async def _http_reply(self, writer: asyncio.StreamWriter, status: int, obj: Json, close: bool) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 411: "Length Required"}.get(
            status, "Request Entity Too Large"
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Long-Polling: /LP\r\nX-Roll-NTime: expire=120\r\nServer: bitcoin-json-rpc/v25.0.0\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()


async def _serve(host: str, port: int, cfg: PoolConfig, log: EventLog, out: TextIO) -> int:
    pool = Pool(cfg, log)
    server = await asyncio.start_server(pool.handle, host, port, reuse_address=True, backlog=cfg.max_conns)
    sock = server.sockets[0].getsockname()
    where = format_hostport(str(sock[0]), int(sock[1]))
    loop = asyncio.get_running_loop()
    got: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        got.append(sig.name)
        pool.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    # Announced only now, so that whoever waits for this line may signal us at once.
    log("listening", listen=where, variant=cfg.variant)
    out.write(json.dumps({"listening": where, "variant": cfg.variant}) + "\n")
    out.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pool.stopping.wait(), cfg.lifetime)
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)
    log("exit", reason=got[0] if got else f"lifetime {cfg.lifetime:g} s reached")
    return 0


# =================================================================================================
# Client
# =================================================================================================
class ClientError(Exception):
    """The handshake could not go on; the message says where it stopped."""


class _Wire:
    """A blocking socket with a deadline, a line reader, and split sending for the first write."""

    def __init__(self, sock: socket.socket, deadline: float, split: int, split_delay: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.split = split
        self.split_delay = split_delay
        self.buf = b""
        self.first_sent = False

    def _timeout(self, what: str) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientError(f"timed out {what}")
        self.sock.settimeout(left)

    def send(self, data: bytes, what: str) -> None:
        try:
            if self.split > 0 and not self.first_sent:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(0, len(data), self.split):
                    self._timeout(f"sending {what}")
                    self.sock.sendall(data[i : i + self.split])
                    time.sleep(self.split_delay)
            else:
                self._timeout(f"sending {what}")
                self.sock.sendall(data)
        except OSError as e:
            raise ClientError(f"sending {what}: {e}") from e
        self.first_sent = True

    def recv_more(self, what: str) -> None:
        self._timeout(f"waiting for {what}")
        try:
            data = self.sock.recv(65536)
        except TimeoutError as e:
            raise ClientError(f"timed out waiting for {what}") from e
        except OSError as e:
            raise ClientError(f"waiting for {what}: {e}") from e
        if not data:
            raise ClientError(f"connection closed by the peer while waiting for {what}")
        self.buf += data
        if len(self.buf) > 1 << 20:
            raise ClientError(f"more than 1 MiB without an answer while waiting for {what}")

    def line(self, what: str) -> bytes:
        while (nl := self.buf.find(b"\n")) < 0:
            self.recv_more(what)
        line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
        return line

    def until(self, marker: bytes, what: str) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            self.recv_more(what)
        out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker) :]
        return out

    def exactly(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            self.recv_more(what)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


@dataclass
class ClientConfig:
    variant: str
    host: str
    port: int
    timeout: float = 10.0
    split: int = 0
    split_delay: float = 0.02
    via_connect: tuple[str, int] | None = None
    via_socks5: tuple[str, int] | None = None
    user: str = "lab.worker1"
    password: str = "x"
    configure: bool = False


@dataclass
class ClientReport:
    variant: str
    target: str
    connected: bool = False
    handshake_complete: bool = False
    error: str | None = None
    steps: list[str] = field(default_factory=list)
    job_id: str | None = None
    elapsed: float = 0.0

    def as_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


class JsonLineClient:
    """Request/response over JSON lines, keeping the notifications that arrive in between."""

    def __init__(self, wire: _Wire, spaced: bool = False) -> None:
        self.wire = wire
        self.next_id = 0
        self.notifications: list[Json] = []
        # cpuminer/cgminer write '{"id": 1, "method": ...}', ethminer/XMRig write it compact.
        self.separators = (", ", ": ") if spaced else (",", ":")

    def call(self, msg: Json, what: str) -> Json:
        self.next_id += 1
        msg = {"id": self.next_id, **msg}
        self.wire.send(json.dumps(msg, separators=self.separators).encode() + b"\n", what)
        while True:
            raw = self.wire.line(f"the {what} reply")
            try:
                reply = json.loads(raw)
            except ValueError as e:
                raise ClientError(f"the pool sent a line that is not JSON after {what}: {raw[:80]!r}") from e
            if not isinstance(reply, dict):
                raise ClientError(f"the pool sent a non-object after {what}: {raw[:80]!r}")
            if reply.get("id") == msg["id"] and "method" not in reply:
                if reply.get("error"):
                    raise ClientError(f"the pool refused {what}: {reply['error']}")
                return reply
            self.notifications.append(reply)

    def wait_notification(self, method: str, what: str) -> Json:
        while True:
            for n in self.notifications:
                if n.get("method") == method:
                    self.notifications.remove(n)
                    return n
            raw = self.wire.line(what)
            with contextlib.suppress(ValueError):
                msg = json.loads(raw)
                if isinstance(msg, dict):
                    self.notifications.append(msg)


def _connect(cfg: ClientConfig, deadline: float) -> socket.socket:
    hop = cfg.via_connect or cfg.via_socks5 or (cfg.host, cfg.port)
    try:
        infos = socket.getaddrinfo(hop[0], hop[1], type=socket.SOCK_STREAM)
    except OSError as e:
        raise ClientError(f"cannot resolve {hop[0]}: {e}") from e
    last: Exception | None = None
    for family, stype, proto, _name, addr in infos:
        s = socket.socket(family, stype, proto)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            s.connect(addr)
            return s
        except OSError as e:
            last = e
            s.close()
    raise ClientError(f"cannot connect to {format_hostport(hop[0], hop[1])}: {last}")


def _via_connect(wire: _Wire, cfg: ClientConfig) -> None:
    target = format_hostport(cfg.host, cfg.port)
    wire.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: egressd-lab\r\n\r\n".encode(), "CONNECT")
    wire.first_sent = False  # --split applies to the pool's first message, not the proxy's
    head = wire.until(b"\r\n\r\n", "the proxy's CONNECT reply")
    status = head.split(b"\r\n", 1)[0]
    parts = status.split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or parts[1] != b"200":
        raise ClientError(f"the proxy refused CONNECT {target}: {status.decode('latin-1')!r}")


def _via_socks5(wire: _Wire, cfg: ClientConfig) -> None:
    wire.send(b"\x05\x01\x00", "SOCKS5 greeting")
    wire.first_sent = False
    if wire.exactly(2, "the SOCKS5 method choice") != b"\x05\x00":
        raise ClientError("the SOCKS5 proxy wants authentication")
    try:
        ip = ipaddress.ip_address(cfg.host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        name = cfg.host.encode("idna")
        addr = b"\x03" + bytes([len(name)]) + name
    wire.send(b"\x05\x01\x00" + addr + struct.pack("!H", cfg.port), "SOCKS5 CONNECT")
    wire.first_sent = False
    head = wire.exactly(4, "the SOCKS5 reply")
    if head[1] != 0:
        raise ClientError(f"the SOCKS5 proxy refused the connection (reply code {head[1]})")
    alen = {1: 4, 4: 16}.get(head[3])
    if alen is None:
        alen = wire.exactly(1, "the SOCKS5 bound address")[0]
    wire.exactly(alen + 2, "the SOCKS5 bound address")


def _v1(rpc: JsonLineClient, cfg: ClientConfig, rep: ClientReport) -> None:
    if cfg.configure:
        opts = {"version-rolling.mask": "1fffe000", "version-rolling.min-bit-count": 2}
        rpc.call({"method": "mining.configure", "params": [["version-rolling"], opts]}, "mining.configure")
        rep.steps.append("configure")
    sub = rpc.call({"method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}, "mining.subscribe")
    res = sub.get("result")
    if not (isinstance(res, list) and len(res) >= 3):
        raise ClientError(f"unexpected mining.subscribe result: {str(res)[:120]}")
    rep.steps.append("subscribe")
    auth = rpc.call({"method": "mining.authorize", "params": [cfg.user, cfg.password]}, "mining.authorize")
    if auth.get("result") is not True:
        raise ClientError(f"mining.authorize was not accepted: {auth}")
    rep.steps.append("authorize")
    job = rpc.wait_notification("mining.notify", "a mining.notify job")
    jid = job["params"][0]
    rep.job_id = str(jid)
    rep.steps.append("notify")
    ntime = job["params"][7]
    params = [cfg.user, jid, "00000001", ntime, "b2957c02"]
    sub_r = rpc.call({"method": "mining.submit", "params": params}, "mining.submit")
    if sub_r.get("result") is not True:
        raise ClientError(f"mining.submit was not accepted: {sub_r}")
    rep.steps.append("submit")


def _eth(rpc: JsonLineClient, cfg: ClientConfig, rep: ClientReport) -> None:
    sub = rpc.call({"method": "mining.subscribe", "params": ["ethminer/0.19.0", ETH_PROTOCOL]}, "mining.subscribe")
    res = sub.get("result")
    if not (isinstance(res, list) and len(res) >= 2 and isinstance(res[0], list) and ETH_PROTOCOL in res[0]):
        raise ClientError(f"the pool does not speak {ETH_PROTOCOL}: {str(res)[:120]}")
    rep.steps.append("subscribe")
    rpc.call({"method": "mining.extranonce.subscribe", "params": []}, "mining.extranonce.subscribe")
    auth = rpc.call({"method": "mining.authorize", "params": [cfg.user, cfg.password]}, "mining.authorize")
    if auth.get("result") is not True:
        raise ClientError(f"mining.authorize was not accepted: {auth}")
    rep.steps.append("authorize")
    job = rpc.wait_notification("mining.notify", "a mining.notify job")
    jid = job["params"][0]
    rep.job_id = str(jid)
    rep.steps.append("notify")
    r = rpc.call({"method": "mining.submit", "params": [cfg.user, jid, "6a909d9bbc0f"]}, "mining.submit")
    if r.get("result") is not True:
        raise ClientError(f"mining.submit was not accepted: {r}")
    rep.steps.append("submit")


_WALLET_ETH: Final = "0xb85150eb365e7df0941f0cf08235f987ba91506a"
_WALLET_XMR: Final = "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A"


def _ethproxy(rpc: JsonLineClient, cfg: ClientConfig, rep: ClientReport) -> None:
    base = {"jsonrpc": "2.0", "worker": "rig1"}
    login = rpc.call({**base, "method": "eth_submitLogin", "params": [_WALLET_ETH, cfg.password]}, "eth_submitLogin")
    if login.get("result") is not True:
        raise ClientError(f"eth_submitLogin was not accepted: {login}")
    rep.steps.append("login")
    work = rpc.call({**base, "method": "eth_getWork", "params": []}, "eth_getWork").get("result")
    if not (isinstance(work, list) and len(work) >= 3):
        raise ClientError(f"unexpected eth_getWork result: {str(work)[:120]}")
    rep.job_id = str(work[0])
    rep.steps.append("getwork")
    rpc.call(
        {**base, "method": "eth_submitHashrate", "params": ["0x" + "0" * 56 + "05f5e100", "0x" + "ab" * 32]},
        "eth_submitHashrate",
    )
    r = rpc.call(
        {**base, "method": "eth_submitWork", "params": ["0x1f2e3d4c5b6a7988", work[0], "0x" + "cd" * 32]},
        "eth_submitWork",
    )
    if r.get("result") is not True:
        raise ClientError(f"eth_submitWork was not accepted: {r}")
    rep.steps.append("submit")


def _xmr(rpc: JsonLineClient, cfg: ClientConfig, rep: ClientReport) -> None:
    params = {
        "login": _WALLET_XMR,
        "pass": cfg.password,
        "agent": "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0",
        "algo": ["rx/0", "cn/r", "cn/2", "rx/wow", "argon2/chukwav2"],
        "rigid": "rig1",
    }
    r = rpc.call({"jsonrpc": "2.0", "method": "login", "params": params}, "login").get("result")
    if not (isinstance(r, dict) and isinstance(r.get("job"), dict) and r.get("id")):
        raise ClientError(f"unexpected login result: {str(r)[:120]}")
    rep.steps.append("login")
    session, job = r["id"], r["job"]
    rep.job_id = str(job.get("job_id"))
    sub = {"id": session, "job_id": job.get("job_id"), "nonce": "2b030000", "result": _hex("xmr/result", 32)}
    s = rpc.call({"jsonrpc": "2.0", "method": "submit", "params": sub}, "submit").get("result")
    if not (isinstance(s, dict) and s.get("status") == "OK"):
        raise ClientError(f"submit was not accepted: {s}")
    rep.steps.append("submit")
    rpc.call({"jsonrpc": "2.0", "method": "keepalived", "params": {"id": session}}, "keepalived")
    rep.steps.append("keepalived")


def _http_call(wire: _Wire, cfg: ClientConfig, req: Json, what: str) -> Json:
    body = json.dumps(req, separators=(",", ":")).encode()
    auth = base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode()
    head = (
        f"POST / HTTP/1.1\r\nHost: {format_hostport(cfg.host, cfg.port)}\r\nAuthorization: Basic {auth}\r\n"
        "User-Agent: cgminer/4.12.1\r\nContent-Type: application/json\r\n"
        "X-Mining-Extensions: longpoll midstate rollntime submitold\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    wire.send(head.encode() + body, what)
    resp = wire.until(b"\r\n\r\n", f"the HTTP reply to {what}").decode("latin-1")
    status = resp.split("\r\n", 1)[0]
    clen = 0
    for h in resp.split("\r\n")[1:]:
        k, _, v = h.partition(":")
        if k.strip().lower() == "content-length" and v.strip().isdigit():
            clen = int(v.strip())
    data = wire.exactly(clen, f"the HTTP body of the {what} reply")
    if " 200 " not in status + " ":
        raise ClientError(f"{what}: HTTP status {status!r}")
    try:
        out = json.loads(data)
    except ValueError as e:
        raise ClientError(f"{what}: the reply body is not JSON: {data[:80]!r}") from e
    if not isinstance(out, dict):
        raise ClientError(f"{what}: the reply is not a JSON object")
    if out.get("error"):
        raise ClientError(f"{what}: the pool answered with an error: {out['error']}")
    return out


def _getwork(wire: _Wire, cfg: ClientConfig, rep: ClientReport) -> None:
    work = _http_call(wire, cfg, {"method": "getwork", "params": [], "id": 0}, "getwork").get("result")
    if not (isinstance(work, dict) and isinstance(work.get("data"), str) and len(work["data"]) == 256):
        raise ClientError(f"unexpected getwork result: {str(work)[:120]}")
    rep.steps.append("getwork")
    rep.job_id = work["data"][8:24]
    solved = work["data"][:152] + "1d3c2b1a" + work["data"][160:]
    r = _http_call(wire, cfg, {"method": "getwork", "params": [solved], "id": 1}, "getwork submit")
    if r.get("result") is not True:
        raise ClientError(f"the getwork solution was not accepted: {r}")
    rep.steps.append("submit")


def _gbt(wire: _Wire, cfg: ClientConfig, rep: ClientReport) -> None:
    params = [{"capabilities": ["coinbasetxn", "workid", "coinbase/append"], "rules": ["segwit"]}]
    t = _http_call(wire, cfg, {"method": "getblocktemplate", "params": params, "id": 0}, "getblocktemplate")
    tmpl = t.get("result")
    if not (isinstance(tmpl, dict) and "previousblockhash" in tmpl):
        raise ClientError(f"unexpected getblocktemplate result: {str(tmpl)[:120]}")
    rep.steps.append("getblocktemplate")
    rep.job_id = str(tmpl["previousblockhash"])[:16]
    block = "00000020" + tmpl["previousblockhash"] + _hex("gbt/merkle", 32) + f"{tmpl['curtime']:08x}"
    block += tmpl["bits"] + "1d3c2b1a" + "01" + _hex("gbt/coinbase", 100)
    r = _http_call(wire, cfg, {"method": "submitblock", "params": [block], "id": 1}, "submitblock")
    if r.get("result") is not None:
        raise ClientError(f"submitblock was rejected: {r.get('result')}")
    rep.steps.append("submit")


_RUNNERS: Final[dict[str, Callable[[JsonLineClient, ClientConfig, ClientReport], None]]] = {
    "v1": _v1,
    "eth": _eth,
    "ethproxy": _ethproxy,
    "xmr": _xmr,
}


def run_client(cfg: ClientConfig) -> ClientReport:
    """Run one handshake; never raises (the report carries the error)."""
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    rep = ClientReport(cfg.variant, format_hostport(cfg.host, cfg.port))
    sock: socket.socket | None = None
    try:
        sock = _connect(cfg, deadline)
        wire = _Wire(sock, deadline, cfg.split, cfg.split_delay)
        if cfg.via_connect:
            _via_connect(wire, cfg)
        elif cfg.via_socks5:
            _via_socks5(wire, cfg)
        rep.connected = True
        if cfg.variant == "getwork":
            _getwork(wire, cfg, rep)
        elif cfg.variant == "gbt":
            _gbt(wire, cfg, rep)
        else:
            _RUNNERS[cfg.variant](JsonLineClient(wire, spaced=cfg.variant == "v1"), cfg, rep)
        rep.handshake_complete = True
    except ClientError as e:
        rep.error = str(e)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        rep.error = f"unexpected message shape from the pool: {e!r}"
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        rep.elapsed = round(time.monotonic() - t0, 3)
    return rep


# =================================================================================================
# CLI
# =================================================================================================
def _hostport_arg(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m egressd_lab.stratum", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool", help="serve one protocol variant as a pool")
    p.add_argument("--listen", type=_hostport_arg, required=True, help="ADDR:PORT ([v6]:port; port 0 = any)")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--log", help="append one JSON line per event to this file")
    p.add_argument("--max-conns", type=int, default=64)
    p.add_argument("--max-line", type=int, default=16384, help="longest request line / HTTP header, bytes")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds anyway")
    c = sub.add_parser("client", help="run one miner handshake against a pool")
    c.add_argument("--connect", required=True, help="HOST:PORT of the pool ([v6]:port)")
    c.add_argument("--variant", choices=VARIANTS, required=True)
    c.add_argument("--timeout", type=float, default=10.0, help="for the whole handshake, seconds")
    c.add_argument("--split", type=int, default=0, help="send the first message in N-byte segments")
    c.add_argument("--split-delay", type=float, default=0.02, help="pause between split segments, seconds")
    c.add_argument("--configure", action="store_true", help="v1: send BIP 310 mining.configure first")
    c.add_argument("--user", default="lab.worker1")
    c.add_argument("--password", default="x")
    via = c.add_mutually_exclusive_group()
    via.add_argument("--via-connect", type=_hostport_arg, metavar="PROXY:PORT", help="through an HTTP CONNECT proxy")
    via.add_argument("--via-socks5", type=_hostport_arg, metavar="PROXY:PORT", help="through a SOCKS5 proxy")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "pool":
        host, port = args.listen
        cfg = PoolConfig(args.variant, args.max_conns, args.max_line, args.idle_timeout, args.lifetime)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(args.log, "a", encoding="utf-8")) if args.log else None
            return asyncio.run(_serve(host, port, cfg, EventLog(out), sys.stdout))
    try:
        host, port = parse_hostport(args.connect, DEFAULT_PORTS[args.variant])
    except ValueError as e:
        print(json.dumps({"connected": False, "handshake_complete": False, "error": str(e)}))
        return 2
    ccfg = ClientConfig(
        args.variant, host, port, args.timeout, args.split, args.split_delay,
        args.via_connect, args.via_socks5, args.user, args.password, args.configure,
    )  # fmt: skip
    rep = run_client(ccfg)
    print(rep.as_json(), flush=True)
    return 0 if rep.handshake_complete else 1


if __name__ == "__main__":
    sys.exit(main())
