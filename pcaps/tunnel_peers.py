"""Small peers for the tunnel captures (``pcaps/make_tunnels.py``), where no packaged program
plays the part. Each is the *server* side or a thin pipe; the tunnel clients themselves are
the real programs (localtunnel's ``lt``, OpenSSH, iodine, ...).

* ``lt-server``: the localtunnel server's protocol as the ``lt`` client expects it
  (localtunnel/lib/Tunnel.js + TunnelCluster.js): ``GET /?new`` answers JSON with the port
  the client must open ``max_conn_count`` raw TCP connections to; a visitor's HTTP request
  is then written *by the server* into one of those connections and the client answers it
  from the node's local web server. Here the "visitor" is the server itself: after each
  tunnel connection arrives it sends one GET and reads the answer.
* ``ws-pipe URL`` (or ``ws-pipe HOST PORT``): stdin/stdout over one WebSocket of binary messages (for ``ssh -o
  ProxyCommand=...`` through websockify, the wstunnel/chisel pattern).
* ``ws-chat-server`` / ``ws-chat-client``: a benign chat app: JSON text messages both ways
  (the ``websockets`` library negotiates permessage-deflate by default).
* ``upload-server``: accepts one large HTTP POST and answers 200 (a benign large upload).

Every server exits after ``--lifetime`` seconds; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time


def lt_server(host: str, http_port: int, tunnel_port: int, lifetime: float) -> None:
    tun = socket.create_server((host, tunnel_port))
    web = socket.create_server((host, http_port))
    deadline = time.monotonic() + lifetime

    def serve_tunnels() -> None:
        tun.settimeout(1.0)
        n = 0
        while time.monotonic() < deadline and n < 4:
            try:
                c, _ = tun.accept()
            except TimeoutError:
                continue
            n += 1
            c.settimeout(5.0)
            req = f"GET /visitor/{n} HTTP/1.1\r\nHost: node.lt.example.net\r\nUser-Agent: curl/7.88.1\r\n"
            req += "Accept: */*\r\nX-Forwarded-For: 203.0.113.99\r\n\r\n"
            got = b""
            err = ""
            try:
                c.sendall(req.encode())
                while b"\r\n\r\n" not in got and len(got) < 65536:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except OSError as e:  # a timeout, or the reset of a dropped tunnel
                err = type(e).__name__
            print(f"visitor {n}: {got[:40]!r} {err}", flush=True)
            time.sleep(0.2)
            c.close()

    threading.Thread(target=serve_tunnels, daemon=True).start()
    print("listening", flush=True)
    web.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            c, _ = web.accept()
        except TimeoutError:
            continue
        c.settimeout(5.0)
        req = c.recv(4096)
        body = json.dumps(
            {
                "id": "node",
                "ip": host,
                "port": tunnel_port,
                "max_conn_count": 1,
                "url": "http://node.lt.example.net",
            }
        ).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        c.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        print(f"new tunnel: {req[:30]!r}", flush=True)
        c.close()


def ws_pipe(url: str, lifetime: float) -> None:
    import websockets

    async def main() -> None:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            out = sys.stdout.buffer

            async def up() -> None:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        await ws.close()
                        return
                    await ws.send(data)

            async def down() -> None:
                async for msg in ws:
                    out.write(msg if isinstance(msg, bytes) else msg.encode())
                    out.flush()

            await asyncio.wait([asyncio.ensure_future(up()), asyncio.ensure_future(down())],
                               return_when=asyncio.FIRST_COMPLETED, timeout=lifetime)  # fmt: skip

    asyncio.run(main())


def ws_chat_server(host: str, port: int, lifetime: float) -> None:
    import websockets

    async def handler(ws: websockets.WebSocketServerProtocol) -> None:
        async for msg in ws:
            m = json.loads(msg)
            await ws.send(json.dumps({"type": "message", "from": "server", "echo": m.get("text", ""), "ts": 1}))

    async def main() -> None:
        async with websockets.serve(handler, host, port):
            print("listening", flush=True)
            await asyncio.sleep(lifetime)

    asyncio.run(main())


def ws_chat_client(url: str) -> None:
    import websockets

    lines = ["hello, is anyone there?", "the training run finished, loss 1.93", "ok, see you tomorrow"]

    async def main() -> None:
        async with websockets.connect(url) as ws:
            for i, text in enumerate(lines):
                await ws.send(json.dumps({"type": "message", "room": "ml-team", "seq": i, "text": text}))
                print(await asyncio.wait_for(ws.recv(), 5), flush=True)

    asyncio.run(main())


def upload_server(host: str, port: int, lifetime: float) -> None:
    srv = socket.create_server((host, port))
    srv.settimeout(lifetime)
    print("listening", flush=True)
    c, _ = srv.accept()
    c.settimeout(10.0)
    got = b""
    while b"\r\n\r\n" not in got:
        got += c.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if line.lower().startswith(b"expect:"):
            c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    while len(body) < length:
        chunk = c.recv(65536)
        if not chunk:
            break
        body += chunk
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("lt-server")
    p.add_argument("host")
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--tunnel-port", type=int, default=7000)
    p.add_argument("--lifetime", type=float, default=60)
    p = sub.add_parser("ws-pipe")
    p.add_argument("url", help="ws://host:port/path, or a host when a port follows")
    p.add_argument("port", nargs="?", type=int, help="(socat's EXEC cannot pass a ':' in an argument)")
    p.add_argument("--lifetime", type=float, default=30)
    p = sub.add_parser("ws-chat-server")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--lifetime", type=float, default=60)
    p = sub.add_parser("ws-chat-client")
    p.add_argument("url")
    p = sub.add_parser("upload-server")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--lifetime", type=float, default=60)
    a = ap.parse_args()
    if a.cmd == "lt-server":
        lt_server(a.host, a.http_port, a.tunnel_port, a.lifetime)
    elif a.cmd == "ws-pipe":
        ws_pipe(a.url if a.port is None else f"ws://{a.url}:{a.port}/", a.lifetime)
    elif a.cmd == "ws-chat-server":
        ws_chat_server(a.host, a.port, a.lifetime)
    elif a.cmd == "ws-chat-client":
        ws_chat_client(a.url)
    else:
        upload_server(a.host, a.port, a.lifetime)


if __name__ == "__main__":
    main()
