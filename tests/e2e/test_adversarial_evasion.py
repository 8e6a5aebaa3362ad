"""Live evasion with real tools against ``egressd run`` on the shipped default policy.

The proxies, sshd and the pool run in the lab's inet namespace; every client runs in the node
namespace behind the daemon. Each blocked case has a control that shows the same path works
for allowed traffic, so "blocked" never means "the lab was broken".
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import (
    BULK_V4,
    DNS_V4,
    EVIL_V4,
    NODE_V4,
    POOL_V4,
    PREFIX,
    PROXY_V4,
    PY,
    Ctl,
    adv_lab,
    live,
    mac_of,
    need,
    send_frames,
    stratum,
    write_policy,
)
from egressd_lab.netns import SERVICES, Lab

pytestmark = live

SOCKS_V4 = "203.0.113.51"  # an extra documentation address in the inet namespace for microsocks
PROXY_PORTS = (80, 443, 53, 123)
ALLOWED_SSH = SERVICES["ssh_allowed"][0]
TLS_POOL_V4 = SERVICES["tls_pool"][0]
BULK_PORT = 8080  # ncat's proxy mode binds the wildcard address of each proxy port


@dataclass
class EvasionLab:
    lab: Lab
    tmp: Path
    d: peers.Egressd
    pool: peers.Pool
    keys: peers.SshKeys
    bulk: peers.BulkFile
    proxy: str  # "http" (ncat) or "socks5" (microsocks) on PROXY_PORTS


def _evasion_lab(lb: Lab, tmp: Path, proxy: str) -> EvasionLab:
    """Pool, sshd, an HTTP server and four proxies of one kind, behind a default-policy daemon.
    One kind per lab: ncat's proxy mode binds the wildcard address of its port."""
    pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
    keys = peers.make_ssh_keys(tmp)
    peers.start_sshd(lb, tmp, keys, [(EVIL_V4, 22), (ALLOWED_SSH, 22)])
    bulk = peers.make_bulk_file(tmp / "www", 64 * 1024)
    peers.start_http_server(lb, tmp, bulk.path.parent, BULK_V4, BULK_PORT)
    if proxy == "http":
        for port in PROXY_PORTS:
            peers.start_http_proxy(lb, tmp, PROXY_V4, port)
    else:
        lb.run_inet(["ip", "addr", "add", f"{SOCKS_V4}/32", "dev", "lo"], check=True)
        for port in PROXY_PORTS:
            argv = ["microsocks", "-i", SOCKS_V4, "-p", str(port)]
            lb.spawn("inet", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peers.wait_listening(lb, "inet", [(SOCKS_V4, p) for p in PROXY_PORTS])
    d = peers.start_egressd(lb, tmp, write_policy(tmp))
    return EvasionLab(lb, tmp, d, pool, keys, bulk, proxy)


@pytest.fixture(scope="module")
def ev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EvasionLab]:
    """The HTTP-proxy lab, also used by every test that needs no proxy."""
    for tool in ("ncat", "ssh", "curl"):
        need(tool)
    with adv_lab() as lb:
        yield _evasion_lab(lb, tmp_path_factory.mktemp("evasion_http"), "http")


@pytest.fixture(scope="module")
def ev_socks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EvasionLab]:
    for tool in ("microsocks", "ncat", "ssh", "curl"):
        need(tool)
    with adv_lab(PREFIX + "s") as lb:
        yield _evasion_lab(lb, tmp_path_factory.mktemp("evasion_socks"), "socks5")


def _lab_for(proxy: str, request: pytest.FixtureRequest) -> EvasionLab:
    lab: EvasionLab = request.getfixturevalue("ev" if proxy == "http" else "ev_socks")
    return lab


def _ssh(e: EvasionLab, host: str, proxy: str | None = None, port: int = 0) -> subprocess.CompletedProcess[str]:
    opts: list[str] = []
    if proxy is not None:
        addr = PROXY_V4 if proxy == "http" else SOCKS_V4
        opts = ["-o", f"ProxyCommand=ncat --proxy {addr}:{port} --proxy-type {proxy} %h %p"]
    return e.lab.run_node(peers.ssh_argv(e.keys, host, "echo", "tunnel-ok", options=opts), timeout=20)


def _new_events(e: EvasionLab, since: int) -> list[dict[str, Any]]:
    time.sleep(0.2)
    return e.d.events(since)


# -- controls: the lab's paths work for allowed traffic -----------------------------------------
def test_control_direct_ssh_to_an_allowed_host_works(ev: EvasionLab) -> None:
    r = _ssh(ev, ALLOWED_SSH)
    assert "tunnel-ok" in r.stdout, r.stderr


@pytest.mark.parametrize("port", PROXY_PORTS)
@pytest.mark.parametrize("proxy", ["http", "socks5"])
def test_control_proxies_carry_an_allowed_http_download(proxy: str, port: int, request: pytest.FixtureRequest) -> None:
    ev = _lab_for(proxy, request)
    via = f"http://{PROXY_V4}:{port}" if proxy == "http" else f"socks5h://{SOCKS_V4}:{port}"
    r = ev.lab.run_node(
        [
            "sh",
            "-c",
            f"curl -sS --max-time 10 --proxy {via} http://{BULK_V4}:{BULK_PORT}/blob.bin | sha256sum",
        ],
        timeout=20,
    )
    assert r.stdout.split()[:1] == [ev.bulk.sha256], r.stderr


# -- Stratum and SSH ------------------------------------------------------------------------------
def test_stratum_split_into_one_byte_segments_is_blocked(ev: EvasionLab) -> None:
    mark, since = ev.pool.mark(), ev.d.mark()
    rep = stratum(ev.lab, POOL_V4, 3333, "--split", "1", "--split-delay", "0.002", timeout=5)
    assert not rep["handshake_complete"], rep
    assert ev.pool.requests(mark) == []
    assert [x["rule"] for x in _new_events(ev, since)] == ["drop-mining"]


@pytest.mark.parametrize("port", PROXY_PORTS)
@pytest.mark.parametrize("proxy", ["http", "socks5"])
def test_stratum_through_a_proxy_is_blocked(proxy: str, port: int, request: pytest.FixtureRequest) -> None:
    ev = _lab_for(proxy, request)
    mark, since = ev.pool.mark(), ev.d.mark()
    via = ["--via-connect", f"{PROXY_V4}:{port}"] if proxy == "http" else ["--via-socks5", f"{SOCKS_V4}:{port}"]
    rep = stratum(ev.lab, POOL_V4, 3333, *via)
    assert not rep["handshake_complete"], rep
    assert ev.pool.requests(mark) == []
    evs = [x for x in _new_events(ev, since) if x["action"] == "blocked"]
    assert evs and "mining.stratum" in evs[0]["detections"], evs


@pytest.mark.parametrize("port", PROXY_PORTS)
@pytest.mark.parametrize("proxy", ["http", "socks5"])
def test_ssh_through_a_proxy_is_blocked(proxy: str, port: int, request: pytest.FixtureRequest) -> None:
    ev = _lab_for(proxy, request)
    since = ev.d.mark()
    r = _ssh(ev, EVIL_V4, proxy, port)
    assert r.returncode != 0 and "tunnel-ok" not in r.stdout
    evs = [x for x in _new_events(ev, since) if x["action"] == "blocked"]
    assert evs and "ssh" in evs[0]["detections"], (evs, r.stderr)


# -- TCP Fast Open --------------------------------------------------------------------------------
TFO_SERVER = r"""
import json, socket, sys, time
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
s.bind((host, port)); s.listen(16); s.settimeout(0.2)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        c, a = s.accept()
    except OSError:
        continue
    c.settimeout(0.3)
    data = b""
    try:
        while True:
            b = c.recv(4096)
            if not b:
                break
            data += b
            c.sendall(b"ok\n")
    except OSError:
        pass
    print(json.dumps({"sport": a[1], "data": data.decode(errors="replace")}), flush=True)
    c.close()
"""

TFO_CLIENT = r"""
import socket, struct, sys
s = socket.socket()
try:
    s.sendto(sys.argv[3].encode(), socket.MSG_FASTOPEN, (sys.argv[1], int(sys.argv[2])))
    s.settimeout(2)
    s.recv(100)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    print("ok syn_data=%d" % (1 if info[5] & 0x20 else 0), flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""

SUBSCRIBE = '{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'


def _tfo_server(e: EvasionLab, port: int) -> Path:
    log = e.tmp / f"tfo-{port}.jsonl"
    with open(log, "ab") as fh:
        e.lab.spawn("inet", [PY, "-c", TFO_SERVER, POOL_V4, str(port), "120"], stdout=fh)
    peers.wait_listening(e.lab, "inet", [(POOL_V4, port)])
    return log


def test_tcp_fast_open_syn_carrying_stratum_is_blocked(ev: EvasionLab) -> None:
    for lb_run in (ev.lab.run_node, ev.lab.run_inet):
        lb_run(["sysctl", "-qw", "net.ipv4.tcp_fastopen=3"], check=True)
    log = _tfo_server(ev, 4300)
    # First connection: fetches the server's cookie (its data goes after the handshake).
    first = ev.lab.run_node([PY, "-c", TFO_CLIENT, POOL_V4, "4300", "hello\n"]).stdout.strip()
    assert first.startswith("ok"), first
    # Second: the cookie is cached, so the request rides in the SYN itself.
    control = ev.lab.run_node([PY, "-c", TFO_CLIENT, POOL_V4, "4300", "hello again\n"]).stdout.strip()
    assert control == "ok syn_data=1", f"TFO did not put data in the SYN: {control}"
    since = ev.d.mark()
    r = ev.lab.run_node([PY, "-c", TFO_CLIENT, POOL_V4, "4300", SUBSCRIBE]).stdout.strip()
    time.sleep(0.5)
    got = [json.loads(x)["data"] for x in log.read_text().splitlines()]
    assert r.startswith("error"), r
    assert got == ["hello\n", "hello again\n"], got
    # The earlier, allowed connections' flow records come when conntrack ends them, which may
    # be after the mark: only the subscribe's own flow is judged here.
    evs = [x for x in _new_events(ev, since) if not (x["rule"] == "default" and x.get("action") == "allowed")]
    assert [x["rule"] for x in evs] == ["drop-mining"]
    assert evs[0]["flow"]["pkts"] == 1, "judged on the SYN itself"


# -- IPv4 fragments ---------------------------------------------------------------------------------
# A SYN carrying data, cut into IPv4 fragments by scapy and sent through a raw IP socket
# (IPPROTO_RAW: the packets take the IP output path and its netfilter hooks). argv[7] ==
# "packet" sends the same frames through scapy's default layer-3 socket instead, which on
# Linux is a packet socket (AF_PACKET): it writes frames to the device below netfilter.
FRAG_SYN = r"""
import socket, sys
from scapy.all import IP, TCP, conf, fragment, send
conf.verb = 0
src, dst, dport, sport, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
syn = TCP(sport=sport, dport=dport, flags="S", seq=1000)
pkt = IP(src=src, dst=dst, id=sport) / syn / sys.argv[5].encode()
frags = fragment(pkt, fragsize=size) if size else [pkt]
if len(sys.argv) > 7 and sys.argv[7] == "packet":
    try:
        send(frags)
    except OSError as e:  # a drop at the device's egress hook: ENOBUFS to the sender
        print(f"send: {e.strerror}", file=sys.stderr)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for f in frags:
        s.sendto(bytes(f), (dst, 0))
print(len(frags), flush=True)
"""


@pytest.mark.parametrize("fragsize", [8, 24])
def test_fragmented_syn_carrying_stratum_is_blocked(ev: EvasionLab, fragsize: int) -> None:
    """A raw IP socket sends a SYN whose data is a Stratum subscribe, cut into IPv4 fragments
    (8 bytes: the first fragment holds only the ports). The server accepts data in a SYN
    without a cookie, so a fragment train that got through would reach the application (the
    control shows one does). Measured: conntrack reassembles locally sent fragments before
    the filter hook (and the output path re-fragments them as sent), so egressd is handed
    the whole datagram: its own fragment counter stays at 0."""
    ev.lab.run_inet(["sysctl", "-qw", "net.ipv4.tcp_fastopen=0x203"], check=True)
    port = 4400 + fragsize
    log = _tfo_server(ev, port)
    frag0 = ev.d.status()["engine"]["fragments"]
    n = ev.lab.run_node([PY, "-c", FRAG_SYN, NODE_V4, POOL_V4, str(port), "40001", "hello-frag\n", str(fragsize)])
    assert int(n.stdout) >= 2, n.stderr
    time.sleep(0.6)
    control = [json.loads(x)["data"] for x in log.read_text().splitlines()]
    assert control == ["hello-frag\n"], "the fragmented SYN+data did not reach the server: not a test"
    since = ev.d.mark()
    n = ev.lab.run_node([PY, "-c", FRAG_SYN, NODE_V4, POOL_V4, str(port), "40002", SUBSCRIBE, str(fragsize)])
    assert int(n.stdout) > 2, n.stderr
    time.sleep(0.6)
    got = [json.loads(x)["data"] for x in log.read_text().splitlines()]
    assert got == ["hello-frag\n"], got
    evs = _new_events(ev, since)
    assert [x["rule"] for x in evs] == ["drop-mining"], evs
    assert ev.d.status()["engine"]["fragments"] == frag0, "the queue saw fragments (the kernel did not reassemble)"


def _packet_socket_syn(e: EvasionLab, port: int, sport: int, data: str, sender: str) -> None:
    """A SYN carrying ``data`` written as a frame through a packet socket: scapy's ``send()``
    (on Linux a packet socket), or a raw AF_PACKET socket with PACKET_QDISC_BYPASS."""
    if sender == "scapy-send":
        n = e.lab.run_node([PY, "-c", FRAG_SYN, NODE_V4, POOL_V4, str(port), str(sport), data, "0", "packet"])
        assert n.stdout.strip() == "1", n.stderr
    else:
        uplink = json.loads(e.lab.run_node(["ip", "-j", "link", "show", "type", "veth"], check=True).stdout)[0]
        send_frames(e.lab, uplink["ifname"], mac_of(e.lab, "inet"), NODE_V4, POOL_V4, "tcp", sport, port, data,
                    "syn", "bypass")  # fmt: skip


@pytest.mark.parametrize("sender", ["scapy-send", "qdisc-bypass"])
def test_packet_socket_cannot_carry_stratum_past_egressd(ev: EvasionLab, sender: str) -> None:
    """A process with CAP_NET_RAW in the node's namespace (Docker grants NET_RAW by default)
    writes a SYN carrying a Stratum subscribe as a whole frame: it never meets the IP hooks.
    The daemon's link guard (on the node's default-route interface) drops it on the way out;
    the control, with the guard taken away, shows the same frame reaches the server."""
    ev.lab.run_inet(["sysctl", "-qw", "net.ipv4.tcp_fastopen=0x203"], check=True)
    port = 4498 if sender == "scapy-send" else 4499
    log = _tfo_server(ev, port)
    guarded = ev.d.status()["link_guard"]["ifaces"]
    assert guarded, ev.d.status()["link_guard"]
    netfilter.remove_guard(netns=ev.lab.node)
    try:
        _packet_socket_syn(ev, port, 40003, "hello-frame\n", sender)
        time.sleep(0.6)
    finally:
        netfilter.install_guard(guarded, netns=ev.lab.node)
    control = [json.loads(x)["data"] for x in log.read_text().splitlines()]
    assert control == ["hello-frame\n"], "the frame did not reach the server without the guard: not a test"
    since = ev.d.mark()
    _packet_socket_syn(ev, port, 40004, SUBSCRIBE, sender)
    time.sleep(0.6)
    got = [json.loads(x)["data"] for x in log.read_text().splitlines()]
    assert got == ["hello-frame\n"], f"the server got {got} and egressd judged {len(ev.d.events(since))} flows"


# -- DNS ------------------------------------------------------------------------------------------------
@pytest.fixture
def dlab() -> Iterator[Lab]:
    """A fresh lab per DNS test, under its own prefix (the module's proxy labs are still up)."""
    with adv_lab(PREFIX + "d") as lb:
        yield lb


def _dns_lab(lb: Lab, tmp: Path, **policy: Any) -> tuple[peers.Egressd, peers.Peer]:
    dns = peers.start_dnsmasq(lb, tmp, peers.lab_dns_names(), [DNS_V4])
    return peers.start_egressd(lb, tmp, write_policy(tmp, **policy)), dns


def _dig(lb: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lb.run_node(["dig", "+tcp", "+time=2", "+tries=1", f"@{DNS_V4}", *args], timeout=20)


def test_pool_lookup_over_dns_over_tcp_is_blocked(dlab: Lab, tmp_path: Path) -> None:
    need("dig", "dnsmasq")
    d, dns = _dns_lab(dlab, tmp_path)
    r = _dig(dlab, "+short", "xmr.nanopool.org")
    assert "203.0.113.30" not in r.stdout
    time.sleep(0.2)
    evs = [e for e in d.events() if e["proto"] == "TCP" and e["dest_port"] == 53]
    assert evs and evs[0]["rule"] == "drop-mining-pool-lookups", evs
    assert "query[A] xmr.nanopool.org" not in dns.log_text()


def test_stratum_to_a_pool_named_over_dns_over_tcp_is_blocked_by_name(dlab: Lab, tmp_path: Path) -> None:
    """A site rule that trusts its resolver lets the lookup through; the answer, read from the
    TCP stream, teaches egressd the pool's address, so a connection to it is dropped on its
    first packet, before any protocol is visible: plain Stratum, and TLS to the TLS pool
    without SNI (where no detector could see anything)."""
    need("dig", "dnsmasq", "openssl")
    trust: dict[str, Any] = {"name": "accept-lab-resolver", "description": "the site's resolver"}
    trust.update(match={"dst": f"{DNS_V4}/32"}, action="accept")
    d, _ = _dns_lab(dlab, tmp_path, prepend_rules=[trust])
    assert _dig(dlab, "+short", "xmr.nanopool.org").stdout.split() == [POOL_V4]
    assert _dig(dlab, "+short", "xmr-eu1.nanopool.org").stdout.split() == [TLS_POOL_V4]
    peers.start_pool(dlab, tmp_path, "v1", POOL_V4, 3333)
    rep = stratum(dlab, POOL_V4, 3333)
    assert not rep["handshake_complete"] and not rep["connected"], rep
    cert = peers.make_cert(tmp_path, ["xmr-eu1.nanopool.org"])
    peers.start_tls_server(dlab, tmp_path, cert, TLS_POOL_V4)
    tls = dlab.run_node(
        ["openssl", "s_client", "-connect", f"{TLS_POOL_V4}:443", "-noservername", "-brief"],
        timeout=10,
    )
    assert "CONNECTION ESTABLISHED" not in tls.stdout + tls.stderr
    time.sleep(0.2)
    evs = [e for e in d.events() if e["dest_port"] in (3333, 443)]
    assert {e["rule"] for e in evs} == {"drop-mining-pool-names"}, evs
    assert {e["reason"] for e in evs} == {"first-packet"}


def test_pool_lookup_pipelined_after_a_harmless_one_over_tcp_is_blocked(dlab: Lab, tmp_path: Path) -> None:
    need("dig", "dnsmasq")
    _dns_lab(dlab, tmp_path)
    r = _dig(dlab, "+keepopen", "+short", "tls.example.net", "xmr.nanopool.org")
    assert SERVICES["tls"][0] in r.stdout, "the harmless lookup must work"
    assert POOL_V4 not in r.stdout


DNS_SAME_SOCKET = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
for i, line in enumerate(sys.stdin):
    name = line.strip()
    q = struct.pack("!HHHHHH", 0x5000 + i, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    s.sendto(q, (sys.argv[1], 53))
    try:
        a = s.recv(512)
        print("answer", ".".join(str(b) for b in a[-4:]), flush=True)
    except OSError:
        print("none", flush=True)
"""


def test_pool_lookup_after_a_harmless_one_on_the_same_udp_socket_is_blocked(dlab: Lab, tmp_path: Path) -> None:
    need("dnsmasq")
    _dns_lab(dlab, tmp_path)
    c = Ctl(dlab, "node", DNS_SAME_SOCKET, DNS_V4)
    try:
        assert c.ask("tls.example.net") == f"answer {SERVICES['tls'][0]}"
        assert c.ask("xmr.nanopool.org") == "none"
    finally:
        c.close()


def test_pool_lookup_on_a_fresh_udp_socket_is_blocked(dlab: Lab, tmp_path: Path) -> None:
    """The control of the test above: the same lookup alone is dropped."""
    need("dnsmasq")
    _dns_lab(dlab, tmp_path)
    c = Ctl(dlab, "node", DNS_SAME_SOCKET, DNS_V4)
    try:
        assert c.ask("xmr.nanopool.org") == "none"
    finally:
        c.close()
