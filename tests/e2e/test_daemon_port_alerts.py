"""The live daemon on the default policy: a pool port alone is never a mining alert.

A refused connection to a pool port is an ordinary flow record; JSON-RPC that egressd read and
found not to be mining, on a pool port, is no alert either; payload no detector recognises on
a pool port still is (alert-mining-ports, after inspection). Real sockets from the node
namespace, a real responder in the far namespace, the real daemon on NFQUEUE.
"""

from __future__ import annotations

import subprocess

from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event

from egressd_lab import peers
from egressd_lab.netns import SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

ADDR = SERVICES["bulk"][0]  # its HTTP server listens on 80 only: other ports are free
JSONRPC_PORT = 4444
REFUSED_PORT = 3333

# Answers a JSON line with a JSON-RPC response (an Ethereum node's, say), anything else with
# a few opaque bytes.
RESPONDER = r"""
import socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            if line.startswith(b"{"):
                self.wfile.write(b'{"jsonrpc":"2.0","id":83,"result":"0x4b7"}\n')
            else:
                self.wfile.write(b"\x00\x07ok\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""

# Connects, sends one line, reads one line (or nothing), closes: prints what it read.
CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(bytes.fromhex(sys.argv[3]))
try:
    print(s.recv(4096).decode(errors="replace").strip())
except OSError as e:
    print("error", e)
s.close()
"""


def _exchange(dlab: DaemonLab, port: int, payload: bytes) -> str:
    p, _ = dlab.run([peers.PY, "-c", CLIENT, ADDR, str(port), payload.hex()], timeout=15)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_refused_connection_to_a_pool_port_is_a_flow_record_not_an_alert(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    p, _ = dlab.run([peers.PY, "-c", f"import socket; print(socket.socket().connect_ex(({ADDR!r}, {REFUSED_PORT})))"])
    assert p.stdout.strip() == "111", p.stdout  # ECONNREFUSED: nothing listens there
    ev = one_event(daemon, ADDR, REFUSED_PORT)
    assert (ev["event_type"], ev["verdict"], ev["rule"]) == ("flow", "accept", "note-mining-ports-without-payload")
    assert "alert" not in ev


def test_pool_port_content_decides_the_alert(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    server = dlab.lab.spawn(
        "inet",
        [peers.PY, "-c", RESPONDER, ADDR, str(JSONRPC_PORT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        peers.wait_listening(dlab.lab, "inet", [(ADDR, JSONRPC_PORT)])
        request = b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":83}\n'
        assert '"result":"0x4b7"' in _exchange(dlab, JSONRPC_PORT, request)
        rpc = one_event(daemon, ADDR, JSONRPC_PORT)
        assert (rpc["event_type"], rpc["verdict"], rpc["rule"]) == ("flow", "accept", "default"), rpc
        assert rpc["detection"]["kind"] == "rpc.jsonrpc"

        mark = daemon.mark()
        _exchange(dlab, JSONRPC_PORT, b"\x8a\x11\x02opaque\x00\x01\n")
        evs = daemon.wait_events(lambda e: e["dest_port"] == JSONRPC_PORT, since=mark)
        assert [(e["event_type"], e["verdict"], e["rule"]) for e in evs] == [("alert", "alert", "alert-mining-ports")]
    finally:
        dlab.lab.stop(server)
