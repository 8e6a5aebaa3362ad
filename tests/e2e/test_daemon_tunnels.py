"""The live daemon against real tunnel programs: reverse HTTP, a DNS tunnel, an ICMP tunnel.

Each test runs the real client in the node namespace (localtunnel's ``lt`` from npm, ncat,
Debian's ``iodine`` and ``ptunnel-ng``) against its server in the inet namespace, with ``egressd run``
on the shipped default policy, and checks both what the program could do (its tunnel never
carried anything) and the event that explains it. The benign look-alikes run in the same
tests against the same daemon: a ping and an ordinary DNS lookup pass.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_fixtures import (
    NEEDS_KERNEL,
    DaemonLab,
    add_inet_addresses,
    events_to,
    local_hop_events,
    need_tools,
    wait_until,
)

from egressd_lab import peers
from egressd_lab.netns import NODE_LOCAL_V4, SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

REPO = Path(__file__).resolve().parents[2]
PEERS = str(REPO / "pcaps" / "tunnel_peers.py")
LT = REPO / "build" / "lab-npm" / "node_modules" / ".bin" / "lt"
SYS_PY = "/usr/bin/python3"
LT_SRV = "203.0.113.70"
WS_SRV = "203.0.113.71"
DNS_TUN = "203.0.113.72"
# iodined's own tunnel network (its dns0 and the addresses it hands out): documentation
# addresses too, in a block no other lab address uses (203.0.113.224/27).
DNS_TUN_NET = "203.0.113.225/27"
ICMP_SRV = "203.0.113.74"
SSHD = SERVICES["ssh_evil"][0]
# The node's own services (the web server a tunnel would expose, ptunnel-ng's local end) are
# dialled at the node's own address, the lab's stand-in for 127.0.0.1: the hop leaves on lo,
# which egressd never judges, as before (each test checks that no event names it).
LOCAL = NODE_LOCAL_V4
# The node's web server: ``python -m http.server`` without HTTPServer.server_bind's
# socket.getfqdn() of its own address. For 127.0.0.1 /etc/hosts answers that; for any other
# address it sends a PTR query to the host's nameserver (/etc/resolv.conf: not a lab
# address) and stalls the server's start until the query times out.
WEB_SERVER = r"""
import http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
Server((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


@pytest.fixture(scope="module")
def extra_addrs(dlab: DaemonLab) -> None:
    add_inet_addresses(dlab, LT_SRV, WS_SRV, DNS_TUN, ICMP_SRV)


def test_localtunnel_is_dropped_at_its_registration_and_never_opens_a_tunnel(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    need_tools("node", str(LT))
    log = dlab.tmp / "lt-server.out"
    with open(log, "wb") as fh:
        srv = dlab.lab.spawn("inet", [SYS_PY, PEERS, "lt-server", LT_SRV, "--lifetime", "20"], stdout=fh)
    lt = None
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 7000), 10), "lt-server did not start"
        lt = dlab.lab.spawn("node", ["node", str(LT), "--host", f"http://{LT_SRV}", "--port", "8000",
                                     "--local-host", LOCAL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        evs = events_to(daemon, LT_SRV, 80, timeout=10)
        assert evs, f"no event for the registration; events: {daemon.events()}"
        ev = evs[-1]
        assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == (
            "drop-covert-tunnels", "blocked", "tunnel.reverse-http",
        ), ev  # fmt: skip
        assert "localtunnel registration" in ev["detection"]["evidence"] and "7000" in ev["detection"]["evidence"]
        time.sleep(2.0)  # lt retries its registration; it must never learn the port
    finally:
        for p in (lt, srv):
            if p is not None:
                dlab.lab.stop(p)
    text = log.read_text()
    assert "visitor" not in text, f"a tunnel connection reached the relay: {text}"
    assert all(e["action"] == "blocked" for e in events_to(daemon, LT_SRV, 7000, timeout=0.1))
    assert local_hop_events(daemon) == []


def test_a_relay_sending_http_requests_down_the_nodes_connection_is_dropped(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    """``ncat --sh-exec`` hands an outbound connection to the node's web server: the generic
    reverse-HTTP case (no registration step); the relay's visitor gets no answer."""
    log = dlab.tmp / "relay.out"
    with open(log, "wb") as fh:
        srv = dlab.lab.spawn("inet", [SYS_PY, PEERS, "lt-server", LT_SRV, "--http-port", "8079", "--tunnel-port",
                                      "7001", "--lifetime", "20"], stdout=fh)  # fmt: skip
    web = dlab.lab.spawn("node", [SYS_PY, "-c", WEB_SERVER, LOCAL, "8000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(dlab.tmp))  # fmt: skip
    cli = None
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 7001), 10), "the relay did not start"
        assert wait_until(lambda: peers.listening(dlab.lab, "node", 8000), 10), "the node's web server did not start"
        cli = dlab.lab.spawn("node", ["ncat", "--sh-exec", f"ncat {LOCAL} 8000", LT_SRV, "7001"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        evs = events_to(daemon, LT_SRV, 7001, timeout=10)
        assert evs, f"no event for the relay connection; events: {daemon.events()}"
        ev = evs[-1]
        assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == (
            "drop-covert-tunnels", "blocked", "tunnel.reverse-http",
        ), ev  # fmt: skip
        assert "GET /visitor/1" in ev["detection"]["evidence"]
        assert wait_until(lambda: "visitor 1:" in log.read_text(), 8), log.read_text()
    finally:
        for p in (cli, web, srv):
            if p is not None:
                dlab.lab.stop(p)
    visits = [line for line in log.read_text().splitlines() if line.startswith("visitor")]
    assert visits and all(" b'' " in v for v in visits), f"a visitor got an answer through the tunnel: {visits}"
    assert local_hop_events(daemon) == []


def test_ssh_inside_a_websocket_is_dropped_even_to_the_allowed_bastion(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    """OpenSSH through websockify (the wstunnel/chisel pattern) to the allowlisted bastion: the
    WebSocket frames are decoded live, the SSH inside is found and the flow is dropped."""
    need_tools("websockify")
    bastion = SERVICES["ssh_allowed"][0]
    ws = dlab.lab.spawn("inet", ["websockify", f"{WS_SRV}:8080", f"{bastion}:22"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 8080, addr=WS_SRV), 10), "websockify did not start"
        proxy = f"ProxyCommand={SYS_PY} {PEERS} ws-pipe {WS_SRV} 8080"
        p, _ = dlab.run(dlab.peers.ssh(bastion, "echo", "tunnel-ok", options=["-o", proxy]), timeout=30)
        assert "tunnel-ok" not in p.stdout, p.stdout
        evs = events_to(daemon, WS_SRV, 8080, timeout=5)
        assert evs and evs[-1]["action"] == "blocked", evs
        assert "tunnel.websocket" in evs[-1]["detections"] and "ssh" in evs[-1]["detections"], evs[-1]
    finally:
        dlab.lab.stop(ws)
    # Without the WebSocket around it, the same SSH to the bastion is allowed.
    p, _ = dlab.run(dlab.peers.ssh(bastion, "echo", "direct-ok"), timeout=30)
    assert p.stdout.strip() == "direct-ok", p.stderr


def test_iodine_dns_tunnel_is_dropped_and_ordinary_dns_resolves(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    need_tools("iodine", "iodined")
    srv = dlab.lab.spawn("inet", ["iodined", "-f", "-c", "-P", "labsecret", "-l", DNS_TUN, "-p", "53",
                                  DNS_TUN_NET, "t.tun.example.net"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cli = None
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 53, addr=DNS_TUN, udp=True), 10)
        out = dlab.tmp / "iodine.out"
        with open(out, "wb") as fh:
            cli = dlab.lab.spawn("node", ["iodine", "-f", "-P", "labsecret", DNS_TUN, "t.tun.example.net"],
                                 stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
        evs = events_to(daemon, DNS_TUN, 53, timeout=10)
        drops = [e for e in evs if e["action"] == "blocked"]
        assert drops, f"no drop for the iodine flow; events: {evs}"
        assert (drops[0]["rule"], drops[0]["detection"]["kind"]) == ("drop-covert-tunnels", "tunnel.dns")
        time.sleep(3.0)
        assert "Connection setup complete" not in out.read_text(), out.read_text()
        # An ordinary lookup of a long, legitimate-looking name still resolves.
        p, _ = dlab.dig("tls.example.net")
        assert p.returncode == 0 and SERVICES["tls"][0] in p.stdout, p.stdout
    finally:
        for proc in (cli, srv):
            if proc is not None:
                dlab.lab.stop(proc)


def test_ptunnel_icmp_tunnel_is_dropped_and_ping_passes(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    need_tools("ptunnel-ng")
    ping, _ = dlab.run(["ping", "-c", "5", "-i", "0.2", "-W", "2", ICMP_SRV], timeout=15)
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
    pev = events_to(daemon, ICMP_SRV, 0, timeout=3)
    assert pev and all(e["action"] == "allowed" for e in pev), pev
    srv = dlab.lab.spawn("inet", ["ptunnel-ng", f"-r{SSHD}", "-R22", "-v0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cli = dlab.lab.spawn("node", ["ptunnel-ng", "-p", ICMP_SRV, "-l2222", f"-r{SSHD}", "-R22", "-v0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "node", 2222), 10), "ptunnel-ng client did not listen"
        # Read the SSH banner through the tunnel: with the tunnel dropped, none arrives.
        grab = f"import socket,sys; s=socket.create_connection(({LOCAL!r},2222),3); s.settimeout(4)\n"
        grab += "try: print(s.recv(64))\nexcept Exception as e: print('no-banner', type(e).__name__)"
        p, _ = dlab.run([sys.executable, "-c", grab], timeout=15)
        assert p.returncode == 0, p.stderr  # the client's listener took the connection: the grab is real
        assert "SSH-2.0" not in p.stdout, p.stdout
        evs = [e for e in daemon.events() if e["dest_ip"] == ICMP_SRV and e["action"] == "blocked"]
        assert evs, f"no ICMP drop; events: {daemon.events()}"
        assert (evs[0]["proto"], evs[0]["rule"], evs[0]["detection"]["kind"]) == (
            "ICMP", "drop-covert-tunnels", "tunnel.icmp",
        ), evs[0]  # fmt: skip
        assert local_hop_events(daemon) == []
    finally:
        dlab.lab.stop(cli)
        dlab.lab.stop(srv)
