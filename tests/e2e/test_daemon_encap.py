"""The live daemon against real encapsulations in UDP: xl2tpd, the kernel's VXLAN, quicktun, fastd.

Each test runs the real program (or the kernel's own VXLAN device) in the node namespace
against its peer in the inet namespace, with ``egressd run`` on the shipped default policy,
which alerts on VPN tunnels (``alert-vpn-tunnels``) and lets them pass. So each test checks
both that the tunnel works through the daemon (a ping through it is answered, xl2tpd's call
is established) and the alert event that names it, with its evidence. A benign datagram sent
in between (a QUIC Initial to 443) raises no tunnel finding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, Event, add_inet_addresses, events_to, need_tools

from egressd_lab import capture, peers
from egressd_lab.netns import NODE_V4

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

# Service addresses of these tests (documentation range, inet namespace loopback); the same
# as pcaps/make_tunnels.py's encapsulation recipes.
L2TP_SRV = "203.0.113.110"
VXLAN_PEER = "203.0.113.111"
QT_SRV = "203.0.113.112"
FASTD_SRV = "203.0.113.113"
QUIC_SINK = "203.0.113.114"


@pytest.fixture(scope="module")
def extra_addrs(dlab: DaemonLab) -> None:
    add_inet_addresses(dlab, L2TP_SRV, VXLAN_PEER, QT_SRV, FASTD_SRV, QUIC_SINK)


def _alerts(daemon: peers.Egressd, addr: str, port: int, count: int = 1) -> list[Event]:
    evs = events_to(daemon, addr, port, timeout=5, count=count)
    assert evs, f"no event for {addr}:{port}; events: {daemon.events()}"
    return evs


def _assert_alerted(ev: Event, kind: str, *evidence: str) -> None:
    assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == ("alert-vpn-tunnels", "allowed", kind), ev
    assert ev["event_type"] == "alert", ev
    for text in evidence:
        assert text in ev["detection"]["evidence"], ev


def _ping(dlab: DaemonLab, addr: str) -> None:
    p, _ = dlab.run(["ping", "-c", "3", "-i", "0.3", "-W", "2", addr], timeout=15)
    assert p.returncode == 0 and " 0% packet loss" in p.stdout, p.stdout + p.stderr


def _benign_quic(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    """A QUIC Initial's first bytes (long header, version 1) to 443: not an encapsulation."""
    code = (f"import os,socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto(bytes([0xc3,0,0,0,1,8]) + os.urandom(1194), ('{QUIC_SINK}', 443))")  # fmt: skip
    p, _ = dlab.run([sys.executable, "-c", code], timeout=10)
    assert p.returncode == 0, p.stderr
    ev = _alerts(daemon, QUIC_SINK, 443)[0]
    assert not [k for k in ev.get("detections") or [] if k.startswith("tunnel")], ev


@pytest.fixture
def workdir(dlab: DaemonLab) -> Iterator[Path]:
    d = dlab.tmp / f"encap-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _listening(dlab: DaemonLab, port: int, addr: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if peers.listening(dlab.lab, "inet", port, addr=addr, udp=True):
            return True
        time.sleep(0.1)
    return False


def test_xl2tpd_tunnel_is_established_and_alerted_as_l2tp(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None, workdir: Path
) -> None:
    need_tools("xl2tpd", "pppd")
    d = workdir
    ppp = d / "options"
    ppp.write_text("noauth\nnodefaultroute\nnoipdefault\nlcp-echo-interval 0\nnodetach\n")
    (d / "srv.conf").write_text(f"[global]\nlisten-addr = {L2TP_SRV}\nport = 1701\n\n[lns default]\n"
                                "ip range = 203.0.113.218-203.0.113.222\nlocal ip = 203.0.113.217\n"
                                "require authentication = no\n"
                                f"length bit = yes\nhostname = lab-lns\npppoptfile = {ppp}\n")  # fmt: skip
    (d / "cli.conf").write_text(f"[global]\nport = 1701\n\n[lac lab]\nlns = {L2TP_SRV}\nautodial = yes\n"
                                f"require authentication = no\nlength bit = yes\nhostname = lab-lac\n"
                                f"pppoptfile = {ppp}\n")  # fmt: skip
    srv = dlab.lab.spawn("inet", ["xl2tpd", "-D", "-c", str(d / "srv.conf"), "-p", str(d / "srv.pid"),
                                  "-C", str(d / "srv.ctl")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cli = None
    try:
        assert _listening(dlab, 1701, L2TP_SRV), "xl2tpd (LNS) does not listen"
        cli = dlab.lab.spawn("node", ["xl2tpd", "-D", "-c", str(d / "cli.conf"), "-p", str(d / "cli.pid"),
                                      "-C", str(d / "cli.ctl")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        capture.wait_line(cli, "Call established", 20, stream="stdout")  # passed, as an alert
        ev = _alerts(daemon, L2TP_SRV, 1701)[0]
        _assert_alerted(ev, "tunnel.l2tp", "L2TPv2 control message SCCRQ", "lab-lac", "xelerance.com")
        _benign_quic(dlab, daemon)
    finally:
        for p in (cli, srv):
            if p is not None:
                dlab.lab.stop(p)


def test_kernel_vxlan_passes_and_each_of_its_flows_is_alerted(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    devs = (("inet", VXLAN_PEER, NODE_V4, "203.0.113.193/29"), ("node", NODE_V4, VXLAN_PEER, "203.0.113.194/29"))
    try:
        for ns, local, remote, addr in devs:
            run = dlab.lab.run_inet if ns == "inet" else dlab.lab.run_node
            run(["ip", "link", "add", "vxe0", "type", "vxlan", "id", "42", "local", local, "remote", remote,
                 "dstport", "4789"], check=True)  # fmt: skip
            run(["sysctl", "-qw", "net.ipv6.conf.vxe0.disable_ipv6=1"], check=True)
            run(["ip", "addr", "add", addr, "dev", "vxe0"], check=True)
            run(["ip", "link", "set", "vxe0", "up"], check=True)
        _ping(dlab, "203.0.113.193")
        # ARP and the echo requests hash to different source ports: two flows at least.
        evs = _alerts(daemon, VXLAN_PEER, 4789, count=2)
        for ev in evs:
            _assert_alerted(ev, "tunnel.vxlan", "VXLAN header (flags 08, VNI 42)")
        assert any("ARP request" in e["detection"]["evidence"] for e in evs), evs
        assert any("IPv4 protocol 1 203.0.113.194 -> 203.0.113.193" in e["detection"]["evidence"] for e in evs), evs
    finally:
        dlab.lab.run_node(["ip", "link", "del", "vxe0"])
        dlab.lab.run_inet(["ip", "link", "del", "vxe0"])


def test_quicktun_raw_passes_and_is_alerted_as_ip_in_udp(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None
) -> None:
    need_tools("quicktun")
    mode = {"IF_QT_PROTOCOL": "raw", "IF_QT_TUN_MODE": "1", "IFACE": "qte0"}
    srv_env = {**os.environ, **mode, "IF_QT_LOCAL_ADDRESS": QT_SRV, "IF_QT_LOCAL_PORT": "2998"}
    cli_env = {**os.environ, **mode, "IF_QT_LOCAL_PORT": "2998", "IF_QT_REMOTE_ADDRESS": QT_SRV,
               "IF_QT_REMOTE_PORT": "2998"}  # fmt: skip
    procs = [dlab.lab.spawn("inet", ["quicktun"], env=srv_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(dlab.lab.spawn("node", ["quicktun"], env=cli_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))  # fmt: skip
        for ns, addr, peer in (("inet", "203.0.113.201", "203.0.113.202"), ("node", "203.0.113.202", "203.0.113.201")):
            run = dlab.lab.run_inet if ns == "inet" else dlab.lab.run_node
            deadline = time.monotonic() + 10
            while run(["ip", "link", "show", "qte0"], timeout=5).returncode != 0:
                assert time.monotonic() < deadline, f"quicktun did not create qte0 in {ns}"
                time.sleep(0.1)
            run(["sysctl", "-qw", "net.ipv6.conf.qte0.disable_ipv6=1"], check=True)
            run(["ip", "addr", "add", addr, "peer", peer, "dev", "qte0"], check=True)
            run(["ip", "link", "set", "qte0", "up"], check=True)
        _ping(dlab, "203.0.113.201")
        ev = _alerts(daemon, QT_SRV, 2998)[0]
        _assert_alerted(ev, "tunnel.ip-in-udp", "IPv4 protocol 1 203.0.113.202 -> 203.0.113.201")
    finally:
        for p in procs:
            dlab.lab.stop(p)


def test_fastd_passes_and_its_handshake_is_alerted_with_its_protocol(
    dlab: DaemonLab, daemon: peers.Egressd, extra_addrs: None, workdir: Path
) -> None:
    need_tools("fastd")
    d = workdir
    keys = {}
    for who in ("srv", "node"):
        out = subprocess.run(["fastd", "--generate-key"], capture_output=True, text=True, timeout=30,
                             check=True).stdout  # fmt: skip
        keys[who] = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    for who, peer, extra, remote in (
        ("srv", "node", f"bind {FASTD_SRV}:10000;\n", ""),
        ("node", "srv", "", f"  remote {FASTD_SRV}:10000;\n"),
    ):
        (d / f"{who}.conf").write_text(
            f'interface "fde{who}";\nmode tun;\nmethod "salsa2012+umac";\nsecret "{keys[who]["Secret"]}";\n'
            f'mtu 1400;\n{extra}peer "{peer}" {{\n  key "{keys[peer]["Public"]}";\n{remote}}}\n'
        )
    procs = [dlab.lab.spawn("inet", ["fastd", "-c", str(d / "srv.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]  # fmt: skip
    try:
        assert _listening(dlab, 10000, FASTD_SRV), "fastd does not listen"
        procs.append(dlab.lab.spawn("node", ["fastd", "-c", str(d / "node.conf")], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT))  # fmt: skip
        # The handshake went through the daemon: the server's response was authenticated. fastd
        # calls the connection established only on the first packet after it (a keepalive can
        # take 10 s): the ping below is that packet, and proves the tunnel carries data.
        capture.wait_line(procs[1], "authenticated as <srv>", 20, stream="stdout")
        for ns, addr, peer in (("inet", "203.0.113.209", "203.0.113.210"), ("node", "203.0.113.210", "203.0.113.209")):
            run = dlab.lab.run_inet if ns == "inet" else dlab.lab.run_node
            dev = "fdesrv" if ns == "inet" else "fdenode"
            run(["ip", "addr", "add", addr, "peer", peer, "dev", dev], check=True)
            run(["ip", "link", "set", dev, "up"], check=True)
        _ping(dlab, "203.0.113.209")
        ev = _alerts(daemon, FASTD_SRV, 10000)[0]
        _assert_alerted(ev, "tunnel.fastd", "fastd handshake init", "ec25519-fhmqvc")
    finally:
        for p in procs:
            dlab.lab.stop(p)
