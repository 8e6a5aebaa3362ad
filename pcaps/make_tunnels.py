"""Regenerate pcaps/tunnels/: real tunnel programs (and benign look-alikes) in the namespace lab.

Same method as ``pcaps/make.py`` (one lab, the servers in the "inet" namespace, tcpdump on
the node's veth limited to that capture's peers, the real client in the "node" namespace),
for the tunnels that are not SSH: localtunnel, SSH inside WebSocket (websockify), iodine,
dns2tcp, ptunnel-ng, OpenVPN over UDP (TLS and tls-crypt), tinc, Nebula, Tor, httptunnel,
Shadowsocks (+ simple-obfs), and benign traffic that looks like them (a WebSocket chat, long
legitimate DNS names, ping, a large HTTP upload, HTTPS to a bare IP).

After each capture, ``egressd test --expect`` must pass on it with the shipped default
policy, so an expectation can never silently refer to a flow the capture lacks; the
capture is moved into place only then. Run as root: ``pcaps/make_tunnels.py [NAME...]``.
Every program runs with a timeout; the lab is removed with everything in it on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from egressd_lab import capture, peers
from egressd_lab.capture import MakeError, node_veth
from egressd_lab.netns import NODE_V4, lab

HERE = Path(__file__).resolve().parent
OUT = HERE / "tunnels"
REPO = HERE.parent

PY = sys.executable
SYS_PY = "/usr/bin/python3"  # has python3-websockets (Debian) for the WebSocket peers
PEERS = str(HERE / "tunnel_peers.py")
LT = str(REPO / "build" / "lab-npm" / "node_modules" / ".bin" / "lt")

# Extra service addresses for these captures (documentation range, inet namespace loopback).
SSHD = "203.0.113.20"  # what most tunnels lead to
LT_SRV = "203.0.113.70"
WS_SRV = "203.0.113.71"
DNS_TUN = "203.0.113.72"
DNS_BENIGN = "203.0.113.73"
ICMP_SRV = "203.0.113.74"
OVPN = "203.0.113.75"
TINC = "203.0.113.76"
NEBULA = "203.0.113.77"
TOR = "203.0.113.78"
HTTPTUN = "203.0.113.79"
SS = "203.0.113.80"
WEB = "203.0.113.81"
WG = "203.0.113.82"
IKE = "203.0.113.83"
OBFS4 = "203.0.113.84"
PAGEKITE = "203.0.113.85"
EXTRA = (
    LT_SRV, WS_SRV, DNS_TUN, DNS_BENIGN, ICMP_SRV, OVPN, TINC, NEBULA, TOR, HTTPTUN, SS, WEB, WG, IKE, OBFS4, PAGEKITE,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[make_tunnels] {msg}", flush=True)


@dataclass
class Ctx(capture.Ctx):
    """What a recipe may use: the lab's (egressd_lab.capture) and the lab's TLS certificate."""

    cert: peers.Cert


@dataclass(frozen=True)
class Recipe:
    name: str
    bpf: str
    run: Callable[[Ctx], None]
    tools: tuple[str, ...] = ()
    # Keep only the TCP connection whose client's first bytes start so (a program that also
    # opens side connections to the same peer, such as PageKite's front-end probes).
    keep_flow: bytes = b""


def keep_only(path: Path, prefix: bytes) -> None:
    """Rewrite ``path`` with only the TCP connection whose client sent ``prefix`` first."""
    from egressd.packet import PROTO_TCP, Packet, decode
    from egressd.pcapio import Reader

    port = 0
    for _ts, raw in Reader(path):
        p = decode(raw)
        if isinstance(p, Packet) and p.proto == PROTO_TCP and p.payload.startswith(prefix):
            port = p.sport
            break
    if not port:
        raise MakeError(f"no connection starting with {prefix!r} in {path.name}")
    tmp = path.with_suffix(".kept.pcap")
    subprocess.run(["tcpdump", "-r", str(path), "-w", str(tmp), f"tcp port {port}"], check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    tmp.replace(path)


def _wait_port(c: Ctx, ns: str, port: int, udp: bool = False, timeout: float = 10.0) -> None:
    run = c.lab.run_node if ns == "node" else c.lab.run_inet
    deadline = time.monotonic() + timeout
    flag = "-Hlun" if udp else "-Hltn"
    while time.monotonic() < deadline:
        if run(["ss", flag, f"sport = :{port}"], timeout=5).stdout.strip():
            return
        time.sleep(0.1)
    raise MakeError(f"nothing listens on {'UDP' if udp else 'TCP'} port {port} in {ns} after {timeout} s")


def _ssh_echo(c: Ctx, *extra: str, host: str = SSHD) -> None:
    port = int(extra[1]) if extra[:1] == ("-p",) else 22
    opts = extra[2:] if extra[:1] == ("-p",) else extra
    p = c.node(peers.ssh_argv(c.keys, host, "echo tunnel-ok", options=opts, port=port), timeout=30)
    if "tunnel-ok" not in p.stdout:
        raise MakeError(f"ssh through the tunnel failed: {p.stderr}")


# =================================================================================================
# Recipes
# =================================================================================================
def _localtunnel(c: Ctx) -> None:
    srv = c.lab.spawn("inet", [SYS_PY, PEERS, "lt-server", LT_SRV, "--lifetime", "40"],
                      stdout=subprocess.PIPE, stderr=c.logfile("lt-server.log"))  # fmt: skip
    web = c.lab.spawn("node", [SYS_PY, "-m", "http.server", "8000", "--bind", "127.0.0.1"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(c.tmp))  # fmt: skip
    capture.wait_line(srv, "listening", 10, stream="stdout")
    _wait_port(c, "node", 8000)
    lt = c.lab.spawn("node", ["node", LT, "--host", f"http://{LT_SRV}", "--port", "8000", "--local-host",
                              "127.0.0.1"], stdout=c.logfile("lt.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        capture.wait_line(srv, "visitor 1:", 20, stream="stdout")
        time.sleep(0.5)
    finally:
        c.lab.stop(lt)
        c.lab.stop(web)
        c.lab.stop(srv)


def _ws_ssh(c: Ctx) -> None:
    ws = c.lab.spawn("inet", ["websockify", f"{WS_SRV}:8080", f"{SSHD}:22"],
                     stdout=c.logfile("websockify.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "inet", 8080)
        _ssh_echo(c, "-o", f"ProxyCommand={SYS_PY} {PEERS} ws-pipe ws://{WS_SRV}:8080/")
    finally:
        c.lab.stop(ws)


def _ncat_relay(c: Ctx) -> None:
    """The node dials a relay and hands the connection to its local web server (``ncat
    --sh-exec``): the relay's visitor request arrives on the node's own outbound connection,
    with no registration step to recognise (the generic reverse-HTTP case)."""
    srv = c.lab.spawn("inet", [SYS_PY, PEERS, "lt-server", LT_SRV, "--http-port", "8079", "--tunnel-port", "7001",
                               "--lifetime", "30"], stdout=subprocess.PIPE, stderr=c.logfile("relay.log"))  # fmt: skip
    web = c.lab.spawn("node", [SYS_PY, "-m", "http.server", "8000", "--bind", "127.0.0.1"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(c.tmp))  # fmt: skip
    cli = None
    try:
        capture.wait_line(srv, "listening", 10, stream="stdout")
        _wait_port(c, "node", 8000)
        cli = c.lab.spawn("node", ["ncat", "--sh-exec", "ncat 127.0.0.1 8000", LT_SRV, "7001"],
                          stdout=subprocess.DEVNULL, stderr=c.logfile("ncat-relay.log"))  # fmt: skip
        line = capture.wait_line(srv, "visitor 1:", 15, stream="stdout")
        if "HTTP/1" not in line:
            raise MakeError(f"the relayed request was not answered: {line}")
        time.sleep(0.3)
    finally:
        for p in (cli, web, srv):
            if p is not None:
                c.lab.stop(p)


def _pagekite(c: Ctx) -> None:
    """PageKite (Debian's pagekite): a front-end in the inet namespace, the node's back-end
    exposing its local web server as node.kite.example.net, and one visitor."""
    fe = c.lab.spawn("inet", ["pagekite", "--clean", "--nullui", "--nocrashreport", "--isfrontend", "--ports=8080",
                              "--protos=http", "--domain=http:*.kite.example.net:labsecret", "--logfile=stdio"],
                     stdout=c.logfile("pagekite-fe.log"), stderr=subprocess.STDOUT)  # fmt: skip
    web = c.lab.spawn("node", [SYS_PY, "-m", "http.server", "8000", "--bind", "127.0.0.1"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(c.tmp))  # fmt: skip
    be = None
    try:
        _wait_port(c, "inet", 8080)
        _wait_port(c, "node", 8000)
        be = c.lab.spawn("node", ["pagekite", "--clean", "--nullui", "--nocrashreport", f"--frontend={PAGEKITE}:8080",
                                  "--service_on=http:node.kite.example.net:127.0.0.1:8000:labsecret",
                                  "--logfile=stdio"],
                         stdout=c.logfile("pagekite-be.log"), stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            p = c.lab.run_inet(["curl", "-sS", "--max-time", "3", "-H", "Host: node.kite.example.net",
                                f"http://{PAGEKITE}:8080/", "-o", "/dev/null", "-w", "%{http_code}"])  # fmt: skip
            if p.stdout == "200":
                break
            if time.monotonic() > deadline:
                raise MakeError(f"no visitor got through PageKite: {p.stdout} {p.stderr}")
            time.sleep(0.5)
        time.sleep(0.5)
    finally:
        for proc in (be, web, fe):
            if proc is not None:
                c.lab.stop(proc)


def _ws_pipe_listener(c: Ctx, port: int, ws_host: str, ws_port: int) -> subprocess.Popen[bytes]:
    """socat on 127.0.0.1:``port`` in the node: each connection piped through one WebSocket."""
    p = c.lab.spawn("node", ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                             f"EXEC:{SYS_PY} {PEERS} ws-pipe {ws_host} {ws_port},pipes"],
                    stdout=subprocess.DEVNULL, stderr=c.logfile(f"socat-{port}.log"))  # fmt: skip
    _wait_port(c, "node", port)
    return p


def _ws_stratum(c: Ctx) -> None:
    """A miner whose Stratum goes through a WebSocket (the browser-miner pattern): the lab's
    Stratum client, its TCP piped into WebSocket frames, websockify in front of the pool."""
    pool = peers.start_pool(c.lab, c.tmp, "v1", WS_SRV, 3333, lifetime=60)
    ws = c.lab.spawn("inet", ["websockify", f"{WS_SRV}:8082", f"{WS_SRV}:3333"],
                     stdout=c.logfile("websockify-stratum.log"), stderr=subprocess.STDOUT)  # fmt: skip
    pipe = None
    try:
        _wait_port(c, "inet", 8082)
        pipe = _ws_pipe_listener(c, 3334, WS_SRV, 8082)
        rc, rep = peers.stratum_client(c.lab, "127.0.0.1:3334", "v1", timeout=8)
        if rc != 0 or not rep.get("handshake_complete"):
            raise MakeError(f"stratum through the WebSocket did not complete: {rep}")
    finally:
        for p in (pipe, ws, pool.proc):
            if p is not None:
                c.lab.stop(p)


def _ws_socks(c: Ctx) -> None:
    """curl through SOCKS5 whose TCP is carried in a WebSocket (microsocks behind websockify)."""
    socks = c.lab.spawn("inet", ["microsocks", "-i", WS_SRV, "-p", "1080"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    web = c.lab.spawn("inet", [SYS_PY, "-m", "http.server", "80", "--bind", WEB],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(c.tmp))  # fmt: skip
    ws = c.lab.spawn("inet", ["websockify", f"{WS_SRV}:8083", f"{WS_SRV}:1080"],
                     stdout=c.logfile("websockify-socks.log"), stderr=subprocess.STDOUT)  # fmt: skip
    pipe = None
    try:
        _wait_port(c, "inet", 8083)
        _wait_port(c, "inet", 80)
        pipe = _ws_pipe_listener(c, 1082, WS_SRV, 8083)
        out = c.node(["curl", "-sS", "--max-time", "10", "--socks5", "127.0.0.1:1082", f"http://{WEB}/",
                      "-o", "/dev/null", "-w", "%{http_code}"]).stdout  # fmt: skip
        if out != "200":
            raise MakeError(f"curl through SOCKS in a WebSocket: {out}")
    finally:
        for p in (pipe, ws, web, socks):
            if p is not None:
                c.lab.stop(p)


def _wireguard_go(c: Ctx) -> None:
    """wireguard-go (userspace WireGuard, Debian) at both ends; a ping through the tunnel."""

    def key() -> tuple[str, str]:
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True,
                             timeout=10).stdout  # fmt: skip
        return priv.strip(), pub.strip()

    (npriv, npub), (ipriv, ipub) = key(), key()
    env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
    procs = []
    try:
        for ns, dev, priv, peer_pub, addr, extra in (
            ("inet", "wgi", ipriv, npub, "10.95.0.1/24", ["listen-port", "51820"]),
            ("node", "wgn", npriv, ipub, "10.95.0.2/24", ["listen-port", "0"]),
        ):
            run = c.lab.run_inet if ns == "inet" else c.lab.run_node
            procs.append(c.lab.spawn(ns, ["wireguard-go", "-f", dev], env=env, stdout=c.logfile(f"wg-{dev}.log"),
                                     stderr=subprocess.STDOUT))  # fmt: skip
            deadline = time.monotonic() + 10
            while run(["ip", "link", "show", dev], timeout=5).returncode != 0:
                if time.monotonic() > deadline:
                    raise MakeError(f"wireguard-go did not create {dev}")
                time.sleep(0.1)
            (c.tmp / f"{dev}.key").write_text(priv + "\n")
            peer = ["peer", peer_pub, "allowed-ips", "10.95.0.0/24"]
            if ns == "node":
                peer += ["endpoint", f"{WG}:51820"]
            run(["wg", "set", dev, *extra, "private-key", str(c.tmp / f"{dev}.key"), *peer], check=True)
            run(["ip", "addr", "add", addr, "dev", dev], check=True)
            run(["ip", "link", "set", dev, "up"], check=True)
        p = c.node(["ping", "-c", "2", "-W", "3", "10.95.0.1"], ok=False)
        if " 0% packet loss" not in p.stdout and " 50% packet loss" not in p.stdout:
            raise MakeError(f"ping over wireguard-go: {p.stdout}")
    finally:
        for proc in procs:
            c.lab.stop(proc)


def _ike_scan(c: Ctx) -> None:
    """ike-scan (Debian): IKEv1 main mode and IKEv2 SA_INIT to UDP 500, and IKEv2 with the
    NAT-T marker to 4500; nothing answers (the messages are what a VPN client sends first)."""
    for extra in ([], ["--ikev2"], ["--ikev2", "--nat-t"]):
        c.node(["ike-scan", "-r", "1", "-t", "300", *extra, IKE], ok=False, timeout=20)


def _ws_chat(c: Ctx) -> None:
    srv = c.lab.spawn("inet", [SYS_PY, PEERS, "ws-chat-server", WS_SRV, "8081", "--lifetime", "30"],
                      stdout=subprocess.PIPE, stderr=c.logfile("ws-chat.log"))  # fmt: skip
    try:
        capture.wait_line(srv, "listening", 10, stream="stdout")
        out = c.node([SYS_PY, PEERS, "ws-chat-client", f"ws://{WS_SRV}:8081/chat"]).stdout
        if out.count("echo") != 3:
            raise MakeError(f"chat client: {out}")
    finally:
        c.lab.stop(srv)


def _iodine(raw: bool) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        srv = c.lab.spawn("inet", ["iodined", "-f", "-c", "-P", "labsecret", "-l", DNS_TUN, "-p", "53",
                                   "10.99.0.1/27", "t.tun.example.net"],
                          stdout=c.logfile("iodined.log"), stderr=subprocess.STDOUT)  # fmt: skip
        _wait_port(c, "inet", 53, udp=True)
        argv = ["iodine", "-f", "-P", "labsecret", *([] if raw else ["-r"]), DNS_TUN, "t.tun.example.net"]
        cli = c.lab.spawn("node", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            capture.wait_line(cli, "Server tunnel IP is", 30, stream="stdout")
            # Then the raw-mode probe and fragment-size autoprobe; the tunnel is up when a ping
            # through it is answered (iodine's own "setup complete" line is not always flushed).
            deadline = time.monotonic() + 30
            while c.node(["ping", "-c", "1", "-W", "1", "10.99.0.1"], ok=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise MakeError("no ping answered through the iodine tunnel within 30 s")
            p = c.node(["ping", "-c", "3", "-i", "0.3", "-W", "2", "10.99.0.1"], ok=False)
            if " 0% packet loss" not in p.stdout and " 33% packet loss" not in p.stdout:
                raise MakeError(f"ping through iodine: {p.stdout}")
        finally:
            c.lab.stop(cli)
            c.lab.stop(srv)

    return run


def _dns2tcp(c: Ctx) -> None:
    conf = c.tmp / "dns2tcpd.conf"
    conf.write_text(f"listen = {DNS_TUN}\nport = 53\nuser = nobody\nchroot = /tmp\n"
                    f"domain = d2t.example.net\nresources = ssh:{SSHD}:22\n")  # fmt: skip
    srv = c.lab.spawn("inet", ["dns2tcpd", "-F", "-d", "1", "-f", str(conf)],
                      stdout=c.logfile("dns2tcpd.log"), stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 53, udp=True)
    cli = c.lab.spawn("node", ["dns2tcpc", "-z", "d2t.example.net", "-r", "ssh", "-l", "2222", DNS_TUN],
                      stdout=c.logfile("dns2tcpc.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "node", 2222)
        _ssh_echo(c, "-p", "2222", host="127.0.0.1")
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


def _dns_benign(c: Ctx) -> None:
    """Long but ordinary names: DKIM and ACME TXT, CDN CNAME chains, cloud load balancers,
    a DNSBL hash lookup, an SPF include, a Kubernetes service; each asked a few times."""
    names = [
        ("selector1._domainkey.example.com", "TXT"),
        ("google._domainkey.mail.example.org", "TXT"),
        ("_acme-challenge.www.example.com", "TXT"),
        ("_acme-challenge.api.staging.example.net", "TXT"),
        ("e1234.dscb.akamaiedge.net", "A"),
        ("d1a2b3c4d5e6f7.cloudfront.net", "A"),
        ("my-internal-load-balancer-1234567890.us-west-2.elb.amazonaws.com", "A"),
        ("r3---sn-4g5e6nze.googlevideo.com", "A"),
        ("prod-eu-west-1-starscream-s3-bucket-artifacts.s3.eu-west-1.amazonaws.com", "AAAA"),
        ("_spf.google.com", "TXT"),
        ("_dmarc.example.com", "TXT"),
        ("training-data-loader.ml-team.svc.cluster.local.example.com", "A"),
        ("huggingface-co-lfs-us-1.s3-accelerate.dualstack.amazonaws.com", "A"),
        ("ec2-203-0-113-10.eu-central-1.compute.amazonaws.com", "A"),
        ("_sip._tls.example.com", "SRV"),
        ("2.0.0.127.zen.spamhaus.org", "A"),
    ]
    port = 41000
    for _ in range(2):
        for name, rtype in names:
            argv = ["dig", "-r", f"@{DNS_BENIGN}", "-b", f"{NODE_V4}#{port}", name, rtype, "+time=2", "+tries=1"]
            out = c.node(argv).stdout
            if "status: " not in out:
                raise MakeError(f"dig {name}: {out}")
            port += 1


def _ptunnel(c: Ctx) -> None:
    srv = c.lab.spawn("inet", ["ptunnel-ng", f"-r{SSHD}", "-R22", "-v1", "-o/dev/stdout"],
                      stdout=c.logfile("ptunnel-srv.log"), stderr=subprocess.STDOUT)  # fmt: skip
    time.sleep(1.0)
    cli = c.lab.spawn("node", ["ptunnel-ng", "-p", ICMP_SRV, "-l2222", f"-r{SSHD}", "-R22", "-v1",
                                   "-o/dev/stdout"],
                      stdout=c.logfile("ptunnel-cli.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "node", 2222)
        _ssh_echo(c, "-p", "2222", host="127.0.0.1")
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


def _ptunnel_udp(c: Ctx) -> None:
    """ptunnel-ng --udp: the same protocol over UDP to the proxy's port 53."""
    srv = c.lab.spawn("inet", ["ptunnel-ng", "--udp", f"-r{SSHD}", "-R22", "-v1", "-o/dev/stdout"],
                      stdout=c.logfile("ptunnel-udp-srv.log"), stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 53, udp=True)
    cli = c.lab.spawn("node", ["ptunnel-ng", "--udp", "-p", ICMP_SRV, "-l2222", f"-r{SSHD}", "-R22", "-v1",
                               "-o/dev/stdout"],
                      stdout=c.logfile("ptunnel-udp-cli.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "node", 2222)
        _ssh_echo(c, "-p", "2222", host="127.0.0.1")
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


def _ping(c: Ctx) -> None:
    c.node(["ping", "-c", "3", "-i", "0.2", ICMP_SRV])
    c.node(["ping", "-c", "2", "-i", "0.2", "-s", "1400", ICMP_SRV])
    c.node(["ping", "-c", "2", "-i", "0.2", "-p", "deadbeef", ICMP_SRV])
    c.node(["ping", "-c", "6", "-i", "0.2", "-s", "200", ICMP_SRV])  # more requests than any ICMP rule counts
    c.node(["ping", "-6", "-c", "2", "-i", "0.2", "2001:db8:1::1"])


def _openvpn(mode: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        t = c.tmp
        pki = t / "ovpn"
        if not pki.exists():
            pki.mkdir()
            sh = (f"cd {pki} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                  "-days 3650 -subj /CN=lab-ca -keyout ca.key -out ca.crt 2>/dev/null && "
                  "for n in server client; do openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                  "-nodes -subj /CN=$n -keyout $n.key -out $n.csr 2>/dev/null && openssl x509 -req -in $n.csr "
                  "-CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out $n.crt 2>/dev/null; done && "
                  "openvpn --genkey secret tc.key && openvpn --genkey secret ta.key && "
                  "openvpn --genkey tls-crypt-v2-server v2srv.key && "
                  "openvpn --tls-crypt-v2 v2srv.key --genkey tls-crypt-v2-client v2cli.key")  # fmt: skip
            subprocess.run(["sh", "-c", sh], check=True, timeout=60)
        proto = "tcp" if mode == "tcp" else "udp"
        common = ["--dev", "tun", "--port", "1194", "--ca", str(pki / "ca.crt"),
                  "--verb", "3", "--data-ciphers", "AES-256-GCM"]  # fmt: skip
        extra = {
            "tls-crypt": ["--tls-crypt", str(pki / "tc.key")],
            "tls-auth": ["--tls-auth", str(pki / "ta.key")],
        }.get(mode, [])
        srv_extra = ["--tls-crypt-v2", str(pki / "v2srv.key")] if mode == "tls-crypt-v2" else extra
        cli_extra = ["--tls-crypt-v2", str(pki / "v2cli.key")] if mode == "tls-crypt-v2" else extra
        srv = c.lab.spawn("inet", ["openvpn", "--mode", "server", "--tls-server", "--local", OVPN,
                                   "--ifconfig", "10.98.0.1", "10.98.0.2", "--proto",
                                   "tcp-server" if proto == "tcp" else "udp", "--cert", str(pki / "server.crt"),
                                   "--key", str(pki / "server.key"), "--dh", "none", *common, *srv_extra],
                          stdout=c.logfile(f"ovpn-srv-{mode}.log"), stderr=subprocess.STDOUT)  # fmt: skip
        _wait_port(c, "inet", 1194, udp=proto == "udp")
        cli = c.lab.spawn("node", ["openvpn", "--client", "--remote", OVPN, "--nobind", "--proto",
                                   "tcp-client" if proto == "tcp" else "udp", "--cert",
                                   str(pki / "client.crt"), "--key", str(pki / "client.key"),
                                   "--pull-filter", "ignore", "route", *common, *cli_extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            capture.wait_line(cli, "Peer Connection Initiated", 30, stream="stdout")
        finally:
            c.lab.stop(cli)
            c.lab.stop(srv)

    return run


def _tinc(c: Ctx) -> None:
    base = c.tmp / "tinc"
    for name, addr in (("node1", None), ("hub", TINC)):
        d = base / name
        (d / "hosts").mkdir(parents=True, exist_ok=True)
        conf = f"Name = {name}\nDeviceType = dummy\nAddressFamily = ipv4\n"
        conf += f"BindToAddress = {addr}\n" if addr else "ConnectTo = hub\n"
        (d / "tinc.conf").write_text(conf)
        (d / "hosts" / name).write_text((f"Address = {addr}\n" if addr else "") + "Subnet = 10.97.0.0/32\n")
        subprocess.run(["tincd", "-c", str(d), "-K", "2048"], input="\n\n", text=True, capture_output=True,
                       timeout=60, check=True)  # fmt: skip
    for a, b in (("node1", "hub"), ("hub", "node1")):
        shutil.copy(base / a / "hosts" / a, base / b / "hosts" / a)
    pid_hub, pid_node = c.tmp / "tinc-hub.pid", c.tmp / "tinc-node.pid"
    hub = c.lab.spawn("inet", ["tincd", "-c", str(base / "hub"), "-D", "-d", "3", "--pidfile", str(pid_hub)],
                      stdout=c.logfile("tinc-hub.log"), stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 655)
    cli = c.lab.spawn("node", ["tincd", "-c", str(base / "node1"), "-D", "-d", "3", "--pidfile", str(pid_node)],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        capture.wait_line(cli, "Connection with hub", 20, stream="stdout")
        time.sleep(2.0)
    finally:
        c.lab.stop(cli)
        c.lab.stop(hub)


def _nebula(c: Ctx) -> None:
    d = c.tmp / "nebula"
    d.mkdir(exist_ok=True)

    def cert(*a: str) -> None:
        subprocess.run(["nebula-cert", *a], cwd=d, check=True, capture_output=True, timeout=30)

    cert("ca", "-name", "lab")
    cert("sign", "-name", "lighthouse", "-ip", "10.96.0.1/24", "-out-crt", "lh.crt", "-out-key", "lh.key")
    cert("sign", "-name", "node", "-ip", "10.96.0.2/24", "-out-crt", "node.crt", "-out-key", "node.key")
    for who, extra in (
        ("lh", f"lighthouse:\n  am_lighthouse: true\nlisten:\n  host: {NEBULA}\n  port: 4242\n"),
        ("node", "static_host_map:\n  '10.96.0.1': ['" + NEBULA + ":4242']\nlighthouse:\n"
         "  am_lighthouse: false\n  hosts: ['10.96.0.1']\nlisten:\n  host: 0.0.0.0\n  port: 0\n"),
    ):  # fmt: skip
        cfg = (f"pki:\n  ca: {d}/ca.crt\n  cert: {d}/{who}.crt\n  key: {d}/{who}.key\n{extra}"
               f"tun:\n  dev: neb{who}\npunchy:\n  punch: false\nlogging:\n  level: info\n"
               "firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n"
               "  inbound:\n    - port: any\n      proto: any\n      host: any\n")  # fmt: skip
        (d / f"{who}.yaml").write_text(cfg)
    lh = c.lab.spawn("inet", ["nebula", "-config", str(d / "lh.yaml")], stdout=c.logfile("nebula-lh.log"),
                     stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 4242, udp=True)
    cli = c.lab.spawn("node", ["nebula", "-config", str(d / "node.yaml")], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(1.5)
        p = c.node(["ping", "-c", "2", "-W", "3", "10.96.0.1"], ok=False)
        if " 0% packet loss" not in p.stdout and " 50% packet loss" not in p.stdout:
            raise MakeError(f"ping over nebula: {p.stdout}")
    finally:
        c.lab.stop(cli)
        c.lab.stop(lh)


def _tor(c: Ctx) -> None:
    d = c.tmp / "tor"
    (d / "bridge").mkdir(parents=True, exist_ok=True)
    (d / "client").mkdir(parents=True, exist_ok=True)
    (d / "bridge.torrc").write_text(
        f"DataDirectory {d}/bridge\nORPort {TOR}:9001\nAddress {TOR}\nBridgeRelay 1\nAssumeReachable 1\n"
        "PublishServerDescriptor 0\nExitRelay 0\nSocksPort 0\nLog notice stdout\nUser root\n"
    )  # fmt: skip
    bridge = c.lab.spawn("inet", ["tor", "-f", str(d / "bridge.torrc")], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "inet", 9001, timeout=30)
        (d / "client.torrc").write_text(
            f"DataDirectory {d}/client\nUseBridges 1\nBridge {TOR}:9001\nSocksPort 127.0.0.1:9050\n"
            "Log info stdout\nUser root\n"
        )
        cli = c.lab.spawn("node", ["tor", "-f", str(d / "client.torrc")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)  # fmt: skip
        try:
            # The link handshake (TLS, VERSIONS, CERTS, AUTH_CHALLENGE, NETINFO) completes even
            # though this private bridge cannot build a circuit to anywhere.
            capture.wait_line(cli, "new bridge descriptor", 30, stream="stdout")
            time.sleep(1.0)
        finally:
            c.lab.stop(cli)
    finally:
        c.lab.stop(bridge)


def _tor_obfs4(c: Ctx) -> None:
    """Tor through an obfs4 bridge (obfs4proxy at both ends, Debian): the client's connection
    to the bridge's obfs4 port carries no plaintext at all."""
    d = c.tmp / "tor-obfs4"
    (d / "bridge").mkdir(parents=True, exist_ok=True)
    (d / "client").mkdir(parents=True, exist_ok=True)
    (d / "bridge.torrc").write_text(
        f"DataDirectory {d}/bridge\nORPort {OBFS4}:9001\nAddress {OBFS4}\nBridgeRelay 1\nAssumeReachable 1\n"
        "PublishServerDescriptor 0\nExitRelay 0\nSocksPort 0\nLog notice stdout\nUser root\n"
        "ServerTransportPlugin obfs4 exec /usr/bin/obfs4proxy\n"
        f"ServerTransportListenAddr obfs4 {OBFS4}:9443\nExtORPort auto\n"
    )  # fmt: skip
    bridge = c.lab.spawn("inet", ["tor", "-f", str(d / "bridge.torrc")], stdout=c.logfile("tor-obfs4-bridge.log"),
                         stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "inet", 9443, timeout=30)
        line = d / "bridge" / "pt_state" / "obfs4_bridgeline.txt"
        deadline = time.monotonic() + 20
        while not (line.exists() and (d / "bridge" / "fingerprint").exists()):
            if time.monotonic() > deadline:
                raise MakeError("the obfs4 bridge wrote no bridge line")
            time.sleep(0.2)
        cert = next(w for w in line.read_text().split() if w.startswith("cert="))
        fpr = (d / "bridge" / "fingerprint").read_text().split()[1]
        (d / "client.torrc").write_text(
            f"DataDirectory {d}/client\nUseBridges 1\nClientTransportPlugin obfs4 exec /usr/bin/obfs4proxy\n"
            f"Bridge obfs4 {OBFS4}:9443 {fpr} {cert} iat-mode=0\nSocksPort 127.0.0.1:9050\n"
            "Log info stdout\nUser root\n"
        )  # fmt: skip
        cli = c.lab.spawn("node", ["tor", "-f", str(d / "client.torrc")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)  # fmt: skip
        try:
            capture.wait_line(cli, "new bridge descriptor", 40, stream="stdout")
            time.sleep(1.0)
        finally:
            c.lab.stop(cli)
    finally:
        c.lab.stop(bridge)


def _httptunnel(c: Ctx) -> None:
    srv = c.lab.spawn("inet", ["hts", "-F", f"{SSHD}:22", f"{HTTPTUN}:8888", "--no-daemon"],
                      stdout=c.logfile("hts.log"), stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 8888)
    cli = c.lab.spawn("node", ["htc", "-F", "2222", f"{HTTPTUN}:8888", "--no-daemon"],
                      stdout=c.logfile("htc.log"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_port(c, "node", 2222)
        _ssh_echo(c, "-p", "2222", host="127.0.0.1")
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


def _shadowsocks(plugin: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        pl_s = ["--plugin", "obfs-server", "--plugin-opts", "obfs=http"] if plugin else []
        pl_c = ["--plugin", "obfs-local", "--plugin-opts", "obfs=http;obfs-host=www.example.com"] if plugin else []
        web = c.lab.spawn("inet", [SYS_PY, "-m", "http.server", "80", "--bind", WEB],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(c.tmp))  # fmt: skip
        srv = c.lab.spawn("inet", ["ss-server", "-s", SS, "-p", "8388", "-k", "labsecret", "-m",
                                   "chacha20-ietf-poly1305", *pl_s],
                          stdout=c.logfile("ss-server.log"), stderr=subprocess.STDOUT)  # fmt: skip
        _wait_port(c, "inet", 8388)
        cli = c.lab.spawn("node", ["ss-local", "-s", SS, "-p", "8388", "-l", "1081", "-b", "127.0.0.1", "-k",
                                   "labsecret", "-m", "chacha20-ietf-poly1305", *pl_c],
                          stdout=c.logfile("ss-local.log"), stderr=subprocess.STDOUT)  # fmt: skip
        try:
            _wait_port(c, "node", 1081)
            _wait_port(c, "inet", 80)
            out = c.node(["curl", "-sS", "--max-time", "10", "--socks5-hostname", "127.0.0.1:1081",
                          f"http://{WEB}/", "-o", "/dev/null", "-w", "%{http_code}"]).stdout  # fmt: skip
            if out != "200":
                raise MakeError(f"curl through shadowsocks: {out}")
        finally:
            c.lab.stop(cli)
            c.lab.stop(srv)
            c.lab.stop(web)

    return run


def _upload(c: Ctx) -> None:
    srv = c.lab.spawn("inet", [SYS_PY, PEERS, "upload-server", WEB, "8080", "--lifetime", "30"],
                      stdout=subprocess.PIPE, stderr=c.logfile("upload.log"))  # fmt: skip
    try:
        capture.wait_line(srv, "listening", 10, stream="stdout")
        blob = c.tmp / "upload.bin"
        blob.write_bytes(os.urandom(2 * 1024 * 1024))
        argv = ["curl", "-sS", "--max-time", "15", "-X", "POST", "-H", "Content-Type: application/octet-stream",
                "--data-binary", f"@{blob}", f"http://{WEB}:8080/upload", "-w", "%{http_code}"]  # fmt: skip
        out = c.node(argv).stdout
        if not out.endswith("200"):
            raise MakeError(f"upload: {out}")
    finally:
        c.lab.stop(srv)


def _https_bare_ip(c: Ctx) -> None:
    srv = c.lab.spawn("inet", ["openssl", "s_server", "-accept", f"{WEB}:443", "-cert", str(c.cert.cert),
                               "-key", str(c.cert.key), "-www", "-quiet"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_port(c, "inet", 443)
        out = c.node(["curl", "-sSk", "--max-time", "10", f"https://{WEB}/", "-o", "/dev/null", "-w",
                      "%{http_code}"]).stdout  # fmt: skip
        if out != "200":
            raise MakeError(f"https to a bare IP: {out}")
    finally:
        c.lab.stop(srv)


def _h(*addrs: str) -> str:
    return " or ".join(f"host {a}" for a in addrs)


RECIPES: list[Recipe] = [
    Recipe("reverse-http-localtunnel", _h(LT_SRV), _localtunnel, ("node",)),
    Recipe("reverse-http-ncat-relay", _h(LT_SRV), _ncat_relay, ("ncat",)),
    Recipe("reverse-http-pagekite", _h(PAGEKITE), _pagekite, ("pagekite",), keep_flow=b"CONNECT PageKite:"),
    Recipe("websocket-ssh-websockify", _h(WS_SRV), _ws_ssh, ("websockify",)),
    Recipe("websocket-stratum-websockify", _h(WS_SRV), _ws_stratum, ("websockify", "socat")),
    Recipe("websocket-socks5-websockify", _h(WS_SRV), _ws_socks, ("websockify", "socat", "microsocks")),
    Recipe("benign-websocket-chat", _h(WS_SRV), _ws_chat),
    Recipe("dns-iodine", _h(DNS_TUN), _iodine(raw=False), ("iodine", "iodined")),
    Recipe("dns-iodine-raw", _h(DNS_TUN), _iodine(raw=True), ("iodine", "iodined")),
    Recipe("dns-dns2tcp", _h(DNS_TUN), _dns2tcp, ("dns2tcpc", "dns2tcpd")),
    Recipe("benign-dns-long-names", _h(DNS_BENIGN), _dns_benign, ("dig",)),
    Recipe("icmp-ptunnel-ng", _h(ICMP_SRV), _ptunnel, ("ptunnel-ng",)),
    Recipe("dns-ptunnel-ng-udp", _h(ICMP_SRV), _ptunnel_udp, ("ptunnel-ng",)),
    Recipe("benign-ping", "icmp or icmp6", _ping, ("ping",)),
    Recipe("openvpn-udp", _h(OVPN), _openvpn("udp"), ("openvpn",)),
    Recipe("openvpn-udp-tls-crypt", _h(OVPN), _openvpn("tls-crypt"), ("openvpn",)),
    Recipe("openvpn-udp-tls-auth", _h(OVPN), _openvpn("tls-auth"), ("openvpn",)),
    Recipe("openvpn-udp-tls-crypt-v2", _h(OVPN), _openvpn("tls-crypt-v2"), ("openvpn",)),
    Recipe("openvpn-tcp", _h(OVPN), _openvpn("tcp"), ("openvpn",)),
    Recipe("wireguard-go", _h(WG), _wireguard_go, ("wireguard-go", "wg")),
    Recipe("ike-scan", _h(IKE), _ike_scan, ("ike-scan",)),
    Recipe("tinc", _h(TINC), _tinc, ("tincd",)),
    Recipe("nebula", _h(NEBULA), _nebula, ("nebula", "nebula-cert")),
    Recipe("tor-bridge", _h(TOR), _tor, ("tor",)),
    Recipe("tor-obfs4", _h(OBFS4), _tor_obfs4, ("tor", "obfs4proxy")),
    Recipe("httptunnel", _h(HTTPTUN), _httptunnel, ("hts", "htc")),
    Recipe("shadowsocks", _h(SS), _shadowsocks(""), ("ss-server", "ss-local")),
    Recipe("shadowsocks-simple-obfs-http", _h(SS), _shadowsocks("http"), ("obfs-server", "obfs-local")),
    Recipe("benign-http-upload", _h(WEB), _upload, ("curl",)),
    Recipe("benign-https-bare-ip", _h(WEB), _https_bare_ip, ("openssl", "curl")),
]


# -- relays.py's captures: vtun and yggdrasil (Debian's packages) ----------------------------------
VTUN = "203.0.113.120"
YGG = "203.0.113.121"
EXTRA = (*EXTRA, VTUN, YGG)


def _vtun(c: Ctx) -> None:
    """vtund 3.0 (Debian): a server in the inet namespace, a client in the node's, a TCP tun
    session "lab" with a shared password; the client's log says when the session stands."""
    conf = ('options {{ port 5000; timeout 10; }}\n'
            'lab {{ passwd Xlab0pw; type tun; proto tcp; compress no; encrypt no; keepalive no; '
            'device vtlab{who}; persist no; }}\n')  # fmt: skip
    for who in ("s", "c"):
        (c.tmp / f"vtund-{who}.conf").write_text(conf.format(who=who))
    srv = c.lab.spawn("inet", ["vtund", "-n", "-s", "-f", str(c.tmp / "vtund-s.conf"), "-L", VTUN],
                      stdout=c.logfile("vtund-s.log"), stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 5000)
    cli = c.lab.spawn("node", ["vtund", "-n", "-f", str(c.tmp / "vtund-c.conf"), "lab", VTUN],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(3.0)
        if cli.poll() is not None:
            raise MakeError(f"vtund client exited {cli.returncode}")
        up = c.lab.run_node(["ip", "-o", "link", "show", "vtlabc"], timeout=5)
        if up.returncode != 0:
            raise MakeError(f"vtund client: no tun device vtlabc, the session did not come up: {up.stderr}")
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


def _yggdrasil(c: Ctx) -> None:
    """yggdrasil 0.4 (Debian): a listening peer in the inet namespace, the node peering with it
    over plain TCP; no TUN, no admin socket, no multicast (so only the peering link is seen)."""
    confs = {}
    for who in ("srv", "node"):
        p = subprocess.run(["yggdrasil", "-genconf", "-json"], capture_output=True, text=True, timeout=30,
                           check=True)  # fmt: skip
        import json

        conf = json.loads(p.stdout)
        conf.update(IfName="none", AdminListen="none", MulticastInterfaces=[], NodeInfoPrivacy=True)
        if who == "srv":
            conf["Listen"] = [f"tcp://{YGG}:12345"]
        else:
            conf["Peers"] = [f"tcp://{YGG}:12345"]
        confs[who] = c.tmp / f"ygg-{who}.conf"
        confs[who].write_text(json.dumps(conf))
    srv = c.lab.spawn("inet", ["yggdrasil", "-useconffile", str(confs["srv"])],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    _wait_port(c, "inet", 12345)
    cli = c.lab.spawn("node", ["yggdrasil", "-useconffile", str(confs["node"])],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        capture.wait_line(cli, "Connected", 20, stream="stdout")
        time.sleep(1.0)
    finally:
        c.lab.stop(cli)
        c.lab.stop(srv)


RECIPES += [
    Recipe("vtun", _h(VTUN), _vtun, ("vtund",)),
    Recipe("yggdrasil", _h(YGG), _yggdrasil, ("yggdrasil",)),
]


def check(name: str, path: Path) -> None:
    expect = OUT / f"{name}.expect.yaml"
    p = subprocess.run([PY, "-m", "egressd.cli", "test", str(path), "--expect", str(expect), "--no-progress"],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO))  # fmt: skip
    if p.returncode != 0:
        raise MakeError(f"{name}: the capture does not replay as expected:\n{p.stdout}{p.stderr}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="regenerate pcaps/tunnels/*.pcap with real tunnel programs")
    ap.add_argument("names", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="keep the capture even if its expectation fails")
    args = ap.parse_args(argv)
    known = {r.name: r for r in RECIPES}
    if args.list:
        print("\n".join(known))
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown capture(s) {unknown}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else RECIPES
    if os.geteuid() != 0:
        raise MakeError("needs root (network namespaces, tcpdump)")
    for r in chosen:
        for tool in r.tools:
            if shutil.which(tool) is None:
                raise MakeError(f"{r.name}: {tool} is not installed (the Makefile's lab-deps target installs it)")
    os.environ["PYTHONPATH"] = str(REPO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    OUT.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="egressd-tunnels-") as td,
        contextlib.ExitStack() as files,
        lab(f"egdtun{os.getpid() % 10000}") as lb,
    ):
        tmp = Path(td)
        os.chmod(td, 0o755)
        c = Ctx(lb, tmp, files, peers.make_ssh_keys(tmp), peers.make_cert(tmp, ["tls.example.net"]))
        for a in EXTRA:
            lb.run_inet(["ip", "addr", "add", f"{a}/32", "dev", "lo"], check=True)
        peers.start_sshd(lb, tmp, c.keys, [(SSHD, 22)], name="sshd-inet")
        dns_args = [
            "--txt-record=selector1._domainkey.example.com,v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A",
            "--txt-record=_acme-challenge.www.example.com,LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0",
            "--txt-record=_spf.google.com,v=spf1 include:_netblocks.google.com ~all",
            "--address=/amazonaws.com/203.0.113.81", "--address=/akamaiedge.net/203.0.113.81",
            "--address=/cloudfront.net/203.0.113.81", "--address=/googlevideo.com/203.0.113.81",
            "--address=/example.com/203.0.113.81", "--address=/spamhaus.org/127.0.0.2",
            "--srv-host=_sip._tls.example.com,sip.example.com,5061",
        ]  # fmt: skip
        lb.spawn("inet", ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                          "--bind-interfaces", f"--listen-address={DNS_BENIGN}", "--port=53", "--user=root",
                          "--pid-file=", *dns_args],
                 stdout=c.logfile("dnsmasq.log"), stderr=subprocess.STDOUT)  # fmt: skip
        dev = node_veth(c)
        failed: list[str] = []
        for r in chosen:
            t0 = time.monotonic()
            for attempt in (1, 2):  # real programs are sometimes slow to set up: one retry
                try:
                    out = capture.record(c, r.name, r.bpf, dev, partial(r.run, c), buffer_kib=16384)
                    if r.keep_flow:
                        keep_only(out, r.keep_flow)
                    if not args.no_check:
                        check(r.name, out)
                    break
                except (MakeError, subprocess.SubprocessError) as e:
                    log(f"{r.name}: attempt {attempt} FAILED: {e}")
            else:
                failed.append(r.name)
                continue
            shutil.move(str(out), OUT / f"{r.name}.pcap")
            log(f"{r.name}.pcap: {(OUT / f'{r.name}.pcap').stat().st_size} bytes, {time.monotonic() - t0:.1f} s")
        if failed:
            log(f"failed: {failed}; logs were in {tmp}")
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MakeError as e:
        print(f"make_tunnels.py: {e}", file=sys.stderr)
        sys.exit(1)
