#!/usr/bin/env python3
"""Live benchmark of ``egressd run``: what the daemon costs real traffic, as ratios from one run.

Why ratios, side by side: these machines are shared and noisy (docs/architecture.md: +-15 %, and veth
itself drops under bulk load), so a figure remembered from another run means nothing. Every
metric is measured "without" and "with" egressd interleaved (A B A B ...) in the same lab,
and the table reports the median of each side, the median of the per-round ratios and their
spread. Each "with" round gets a freshly started daemon (``egressd run`` on
rules/default.yaml, stopped with SIGTERM, which removes its rules), so rounds do not inherit
each other's flow table or conntrack marks.

What is measured (the lab: egressd_lab.netns, a "node" and an "inet" namespace on
documentation addresses; every load is generated in the node towards 203.0.113.60):

1. bulk TCP: one iperf3 stream node -> inet. Also how many packets Python judged against
   the TCP segments the node sent and received (/proc/net/snmp of the node namespace).
2. connections/s: one Python client doing blocking connect() + close() in a tight loop to an
   accept-and-close server in the inet namespace (16 ports round robin); close() is a normal
   FIN close, so egressd sees the whole life of each connection, as it would in production.
3. connect() latency: p50/p99 of each connect() (SYN out, SYN-ACK in: the two verdicts a
   client waits for), from loop 2 (the daemon saturated, so connect() also waits behind the
   other connections' packets) and from a paced loop of 1000 connections/s (the path's own
   latency); "added" is with minus without, paired per round.
4. verdicts/s when every packet goes to Python, against a bare netfilterqueue loop
   (``bind`` + ``pkt.accept()``, queue fed by one iptables rule) on the same traffic:
   a) "classifying": UDP datagrams carrying one fixed DNS query, to port 53, spread over
      128 flows. The engine keeps a DNS flow under inspection until its answer or
      ``max_packets`` queries, so with max_packets raised to 10000 (a copy of
      rules/default.yaml; nothing else changed) every datagram is decoded, looked up in
      the flow table, parsed as DNS and given a verdict with mark + repeat: the steady
      per-packet cost of a flow still being classified.
   b) "new flows": every datagram is a new UDP flow (64 sockets x 25000 destination ports),
      with the shipped policy: flow creation, policy judgement, pin, one event per flow.
   The sender is closed-loop (tiny SO_SNDBUF: a socket blocks until its queued datagrams got
   their verdicts), so the queue never overflows and the rate is what the handler sustains.
   Verdicts are counted from the kernel's own queue counters in the node namespace
   (packets queued minus dropped minus still pending), identically for both handlers.

5. attribution (issue 8): the request/response loop of 2 (a connection that carries no data
   is never judged, so it has no event whose process could be named) against two daemons in
   the same round,
   ``egressd run --no-attribution`` and ``egressd run`` (attribution on), both started with
   ``nsenter --net`` so they see the host's /proc and cgroup tree as on a node; plus the share
   of events whose process was named (status: attributed / all attributed events). Rows 1-4
   run the daemon with ``--no-attribution`` so they stay comparable with earlier runs.

Everything is bounded: each load has a time and a count cap, each process is stopped by pid,
and the namespaces are removed at the end, also on error or Ctrl-C.

Usage: bench/live.py [--quick] [--rounds N] [--only bulk,conn,verdicts,attr]   (as root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egressd_lab.netns import Lab

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
EGRESSD = str(VENV_BIN / "egressd")
PY_SPY = str(VENV_BIN / "py-spy")
DEFAULT_POLICY = ROOT / "rules" / "default.yaml"

TARGET_V4 = "203.0.113.60"  # the lab's "bulk" service address (RFC 5737 documentation range)
IPERF_PORT = 5201
CONN_PORTS = tuple(range(7001, 7017))  # 16 server ports: 16 x 64k distinct 5-tuples before any reuse
DNS_PORT = 53
ATTR_KEEP = 50  # connections held open by the paced attribution load (50 ms each at 1000/s)
NEWFLOW_PORTS = (20000, 45000)  # destination port range of the new-flow flood (no mining port in it)
BARE_QUEUE = 9
CLASSIFY_MAX_PACKETS = 10_000
FLOOD_FLOWS = 128
FLOOD_PER_FLOW_CAP = 9_000  # < max_packets: the engine never pins a flow of flood (a) during a run
NEWFLOW_SOCKETS = 64
FLOOD_SNDBUF = 4096  # the kernel doubles it: a few datagrams in flight per socket
CONN_CAP = 40_000  # connections per tight-loop run (the time cap usually ends a run first)
PACED_RATE = 1000.0  # connections/s of the latency-only loop
NEWFLOW_CAP = 200_000  # datagrams (= conntrack entries) per egressd run: inside nf_conntrack_max (262144)
UDP_CT_TIMEOUT = 5  # node namespace only: the new-flow runs' entries are gone before the next run


# ======================================================================================
# Workers: run inside a namespace as `live.py --worker NAME ...`. Standard library only,
# so they start fast and measure nothing but the traffic.
# ======================================================================================
def _percentile(sorted_vals: Sequence[int], q: float) -> int:
    if not sorted_vals:
        return 0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def worker_conn_server(addr: str, ports: Sequence[int], seconds: float) -> int:
    """accept(), answer a request, wait for EOF, close(), on every port until the time cap.

    One thread per port with a selector, so a connection the client holds open (the
    attribution rows keep 50 alive) never stalls the ones behind it in the accept queue.
    The bench stops the server by pid.
    """
    deadline = time.monotonic() + seconds

    def serve(port: int) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, None)
        answered: set[socket.socket] = set()
        while time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        c, _ = ls.accept()
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ, port)
                    continue
                c = key.fileobj  # type: ignore[assignment]
                try:
                    data = c.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data and c not in answered:
                    # A request (the request/response rows): 64 bytes back, then wait for EOF.
                    answered.add(c)
                    with contextlib.suppress(OSError):
                        c.send(REPLY)
                    continue
                if data:
                    continue
                # EOF: close only after the client's FIN, so the client is always the active
                # closer and keeps the TIME_WAIT (the kernel never hands its 5-tuple out again).
                sel.unregister(c)
                answered.discard(c)
                c.close()

    threads = [threading.Thread(target=serve, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()
    return 0


REQUEST = b"GET /x HTTP/1.0\r\nHost: bench\r\n" + b"X" * 30 + b"\r\n\r\n"  # 64 bytes
REPLY = b"HTTP/1.0 200 OK\r\n" + b"Y" * 43 + b"\r\n\r\n"  # 64 bytes
# Exactly 64: the server reads 64 and then waits for EOF; a byte left unread makes its close
# a reset (and a reset may overtake the reply).
assert len(REQUEST) == 64 and len(REPLY) == 64


def worker_conn_client(
    addr: str, ports: Sequence[int], seconds: float, count: int, rate: float, keep: int = 0, request: bool = False
) -> int:
    """connect() + close() in a loop; prints one JSON line: count, rate, connect() times.

    ``rate`` 0: back to back (the tight loop). Otherwise one connection every 1/rate s, so
    nothing queues behind earlier connections and connect() shows the path's own latency.
    ``keep`` > 0: each socket stays open until ``keep`` newer ones were opened (a connection
    then lives keep/rate seconds, as a job's connections do, instead of microseconds).
    """
    held: list[socket.socket] = []
    lat: list[int] = []
    fails = 0
    dsts = [(addr, p) for p in ports]
    k = len(dsts)
    perf = time.perf_counter_ns
    start = perf()
    deadline = start + int(seconds * 1e9)
    period = int(1e9 / rate) if rate > 0 else 0
    next_t = start
    n = 0
    while n < count:
        if period:
            next_t += period
            wait = next_t - perf()
            if wait > 0:
                time.sleep(wait / 1e9)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # One SYN retransmission at most (~3 s), so a lost SYN cannot hang the loop.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
        t0 = perf()
        try:
            s.connect(dsts[n % k])
        except OSError:
            fails += 1
        t1 = perf()
        if request:
            try:
                s.sendall(REQUEST)
                s.settimeout(3.0)
                if len(s.recv(64)) == 0:
                    fails += 1
            except OSError:
                fails += 1
        if keep:
            held.append(s)
            if len(held) > keep:
                held.pop(0).close()
        else:
            s.close()
        lat.append(t1 - t0)
        n += 1
        if t1 > deadline:
            break
    elapsed = (perf() - start) / 1e9
    for h in held:
        h.close()
    lat.sort()
    out = {
        "n": n,
        "fails": fails,
        "elapsed": elapsed,
        "rate": n / elapsed if elapsed > 0 else 0.0,
        "p50_us": _percentile(lat, 0.50) / 1000,
        "p99_us": _percentile(lat, 0.99) / 1000,
        "max_us": (lat[-1] if lat else 0) / 1000,
    }
    print(json.dumps(out), flush=True)
    return 0


def _dns_query(name: str) -> bytes:
    """A plain recursive query for ``name`` IN A (RFC 1035 section 4.1)."""
    qname = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def worker_flood(addr: str, mode: str, seconds: float, count: int) -> int:
    """Closed-loop UDP sender for the verdicts/s metric; prints one JSON line at the end.

    Small send buffers make each socket block until its queued datagrams have their
    verdict, so the sender runs at the rate the queue's reader sustains without flooding the
    queue past max_len. SIGTERM (from the bench) or a cap ends it.
    """
    stop = False

    def on_term(_sig: int, _frm: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    socks: list[socket.socket] = []
    n_socks = FLOOD_FLOWS if mode == "classify" else NEWFLOW_SOCKETS
    for _ in range(n_socks):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FLOOD_SNDBUF)
        if mode == "classify":
            s.connect((addr, DNS_PORT))
        else:
            s.bind(("0.0.0.0", 0))
        socks.append(s)
    payload = _dns_query("bench.example.org") if mode == "classify" else b"egressd-bench-newflow"
    sent = 0
    errors = 0
    print("start", flush=True)
    start = time.monotonic()
    deadline = start + seconds
    lo, hi = NEWFLOW_PORTS
    span = hi - lo
    if mode == "classify":
        cap = min(count, FLOOD_FLOWS * FLOOD_PER_FLOW_CAP)
        while sent < cap and not stop:
            for s in socks:
                try:
                    s.send(payload)
                except OSError:
                    errors += 1
            sent += len(socks)
            if (sent & 1023) < len(socks) and time.monotonic() > deadline:
                break
    else:
        cap = min(count, NEWFLOW_SOCKETS * span)
        port = lo
        while sent < cap and not stop:
            for s in socks:
                try:
                    s.sendto(payload, (addr, port))
                except OSError:
                    errors += 1
            sent += len(socks)
            port += 1
            if port >= hi:
                break  # every (socket, port) pair used once: no flow repeats
            if (port & 63) == 0 and time.monotonic() > deadline:
                break
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "errors": errors, "elapsed": elapsed, "capped": sent >= cap}), flush=True)
    return 0


def worker_nfq_bare(queue_num: int, seconds: float) -> int:
    """The reference handler: netfilterqueue's own C loop, ``accept()`` and nothing else.

    Ends on SIGTERM (the bench) or SIGALRM (the time cap); both default actions terminate.
    """
    from netfilterqueue import NetfilterQueue

    def cb(pkt: Any) -> None:
        pkt.accept()

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.alarm(max(1, int(seconds)))
    q = NetfilterQueue()
    q.bind(queue_num, cb, max_len=4096, sock_len=8 * 1024 * 1024)
    print("ready", flush=True)
    q.run()
    return 0


def run_worker(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="live.py --worker")
    p.add_argument("name", choices=("conn-server", "conn-client", "flood", "nfq-bare"))
    p.add_argument("--addr", default=TARGET_V4)
    p.add_argument("--ports", default=",".join(map(str, CONN_PORTS)))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--request", action="store_true", help="conn-client: 64-byte request, 64-byte reply")
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--mode", choices=("classify", "newflow"), default="classify")
    p.add_argument("--queue", type=int, default=BARE_QUEUE)
    a = p.parse_args(argv)
    ports = [int(x) for x in a.ports.split(",")]
    if a.name == "conn-server":
        return worker_conn_server(a.addr, ports, a.seconds)
    if a.name == "conn-client":
        return worker_conn_client(a.addr, ports, a.seconds, a.count, a.rate, min(max(a.keep, 0), 256), a.request)
    if a.name == "flood":
        return worker_flood(a.addr, a.mode, a.seconds, a.count)
    return worker_nfq_bare(a.queue, a.seconds)


# ======================================================================================
# The bench
# ======================================================================================
@dataclass
class Plan:
    """Durations and rounds: --quick stays under a minute, the default under a few."""

    rounds: int
    bulk_s: float
    conn_s: float
    flood_s: float
    warmup_s: float


QUICK = Plan(rounds=2, bulk_s=2.0, conn_s=1.5, flood_s=1.5, warmup_s=0.3)
FULL = Plan(rounds=5, bulk_s=5.0, conn_s=3.0, flood_s=3.0, warmup_s=0.5)


@dataclass
class Pair:
    """One metric's per-round values, without and with egressd (same index = same round)."""

    without: list[float] = field(default_factory=list)
    with_: list[float] = field(default_factory=list)


class BenchError(RuntimeError):
    """Something in the lab did not behave; the message says what."""


def _seg_counters(pid: int) -> tuple[int, int]:
    """(OutSegs, InSegs) of the TCP stack of ``pid``'s network namespace."""
    lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    tcp = [ln.split() for ln in lines if ln.startswith("Tcp:")]
    head, vals = tcp[0], tcp[1]
    d = dict(zip(head[1:], vals[1:], strict=True))
    return int(d["OutSegs"]), int(d["InSegs"])


def _verdicts(status: dict[str, Any]) -> dict[str, int]:
    """The engine's packet count less the closes it read from NFLOG: the queue verdicts.

    Why: since the closes of connections being judged are logged, not queued (docs/fast-path.md),
    "packets the engine read" and "packets that waited for a verdict" differ; the rows count
    the second, the one a connection pays for."""
    return {
        "packets": status["engine"]["packets"] - status.get("closes_logged", 0),
        "overload": status["engine"]["overload"],
    }


@dataclass
class QueueSample:
    t: float
    seq: int
    dropped: int
    pending: int


class Bench:
    def __init__(self, lb: Lab, plan: Plan, tmp: Path, profile_dir: Path | None = None) -> None:
        self.lab = lb
        self.profile_dir = profile_dir
        self.profiles: list[Path] = []
        self.plan = plan
        self.tmp = tmp
        self.anchor = 0  # a process living in the node namespace: /proc/<it>/net is the node's view
        self.results: dict[str, Pair] = {}
        self.info: dict[str, Pair] = {}
        self.classify_policy = tmp / "classify.yaml"
        self.trust_policy = tmp / "trust.yaml"
        self.warnings: list[str] = []

    # -- lab plumbing --------------------------------------------------------------------
    def setup(self) -> None:
        lb = self.lab
        total_cap = 1800  # no helper outlives half an hour, whatever happens to this process
        a = lb.spawn("node", ["sleep", str(total_cap)])
        self.anchor = a.pid
        # Node namespace only (these sysctls are per namespace; the host is untouched). No
        # 5-tuple may repeat during the connection runs: the kernel would reuse a TIME_WAIT
        # tuple (tcp_tw_reuse) or one whose TIME_WAIT was skipped (tcp_max_tw_buckets), and
        # egressd's engine still remembers that tuple's earlier, pinned flow and answers its
        # SYN without judging it, so the "with" run would be measured on a cheaper path.
        # Hence: no reuse, room for every TIME_WAIT, the full port range, 16 server ports.
        lb.run_node(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"], check=True)
        lb.run_node(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=0"], check=True)
        lb.run_node(["sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=1048576"], check=True)
        lb.run_node(["sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={UDP_CT_TIMEOUT}"], check=True)
        lb.run_inet(["sysctl", "-qw", "net.core.somaxconn=4096"], check=True)
        # The inet side swallows the UDP floods without ICMP errors coming back (no conntrack).
        lb.run_inet(["iptables", "-A", "INPUT", "-p", "udp", "-d", TARGET_V4, "-j", "DROP"], check=True)
        self._spawn_ready(
            "inet",
            [PYTHON, __file__, "--worker", "conn-server", "--seconds", str(total_cap)],
        )
        lb.spawn(
            "inet",
            ["iperf3", "-s", "-B", TARGET_V4, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._write_classify_policy()
        self._write_trust_policy()
        self._wait_port(TARGET_V4, IPERF_PORT)

    def _spawn_ready(self, ns: str, argv: list[str], timeout: float = 10.0) -> subprocess.Popen[bytes]:
        p = self.lab.spawn(ns, argv, stdout=subprocess.PIPE)
        assert p.stdout is not None
        line = _readline(p, timeout)
        if line.strip() not in (b"ready", b"start"):
            self.lab.stop(p)
            raise BenchError(f"{' '.join(argv)} did not start (said {line!r}, exit {p.poll()})")
        return p

    def _wait_port(self, host: str, port: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.lab.run_node([PYTHON, "-c", f"import socket; socket.create_connection(('{host}', {port}), 1)"])
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError(f"{host}:{port} not reachable from the node namespace")

    def _write_classify_policy(self) -> None:
        """rules/default.yaml with settings.max_packets raised, nothing else changed (checked)."""
        import yaml

        from egressd.policy import load_policy

        text = DEFAULT_POLICY.read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("include: [")]
        if len(lines) != 1 or "\nsettings:\n" not in text:
            raise BenchError(f"{DEFAULT_POLICY} changed shape: update _write_classify_policy")
        # The copy lives elsewhere: its includes name the shipped list files by absolute path.
        incs = yaml.safe_load(lines[0])["include"]
        text = text.replace(lines[0], f"include: [{', '.join(str(DEFAULT_POLICY.parent / i) for i in incs)}]")
        text = text.replace("\nsettings:\n", f"\nsettings:\n  max_packets: {CLASSIFY_MAX_PACKETS}\n", 1)
        self.classify_policy.write_text(text)
        base, new = load_policy(DEFAULT_POLICY), load_policy(self.classify_policy)
        if new.settings.max_packets != CLASSIFY_MAX_PACKETS or len(new.rules) != len(base.rules):
            raise BenchError("the derived classify policy does not differ from the default only in max_packets")

    def _write_trust_policy(self) -> None:
        """rules/default.yaml with one rule first: the connection server trusted by address and port."""
        import yaml

        from egressd import kernelsets
        from egressd.policy import load_policy

        doc = yaml.safe_load(DEFAULT_POLICY.read_text())
        doc["include"] = [str(DEFAULT_POLICY.parent / inc) for inc in doc.get("include", [])]
        trust = {
            "name": "trust-bench-server",
            "description": "the bench's connection server, trusted by address and port",
            "match": {"dst": f"{TARGET_V4}/32", "proto": "tcp", "dst_port": f"{CONN_PORTS[0]}-{CONN_PORTS[-1]}"},
            "action": "accept",
        }
        doc["rules"] = [trust, *doc["rules"]]
        self.trust_policy.write_text(yaml.safe_dump(doc, sort_keys=False))
        plan = kernelsets.compile_policy(load_policy(self.trust_policy))
        if not plan.entries or plan.entries[0].rule != "trust-bench-server":
            raise BenchError("the trust rule is not compiled into the kernel: the trusted row would measure nothing")

    def flush_conntrack(self) -> None:
        """Empty the node namespace's conntrack table (only the lab's own namespace).

        Why: a closed connection's entry stays 120 s in TIME_WAIT, and nf_conntrack_max
        (262144 here) counts them. On a quiet machine one round opens ~200k connections, so
        by the second round the table was full and new SYNs were dropped ("table full,
        dropping packet"; connect() p99 of 3 s, a few conn/s): the bench measured the table,
        not egressd. Called with no daemon running, so no daemon reads the flush's destroy
        events as load."""
        self.lab.run_node(["conntrack", "-F"])

    @contextlib.contextmanager
    def bare_on_our_rules(self) -> Iterator[None]:
        """egressd's own rules (``egressd rules install``: the queue, no compiled policy, no
        logged closes) with netfilterqueue's C accept loop as the listener instead of the
        daemon: what the kernel side costs with a consumer that does no work. The gap between
        this and the daemon is the daemon's per-packet work (Python), not the queue."""
        self.flush_conntrack()
        self.lab.run_node([EGRESSD, "rules", "install"], check=True)
        p = self._spawn_ready("node", [PYTHON, __file__, "--worker", "nfq-bare", "--queue", "0", "--seconds", "60"])
        try:
            yield
        finally:
            self.lab.stop(p)
            self.lab.run_node([EGRESSD, "rules", "remove"], check=True)

    @contextlib.contextmanager
    def conntrack_only(self) -> Iterator[None]:
        """Conntrack in the node namespace and nothing else: one stateful rule that never matches,
        with accounting on as egressd has it. What conntrack itself costs, apart from egressd."""
        self.flush_conntrack()
        rule = ["OUTPUT", "-m", "conntrack", "--ctstate", "UNTRACKED", "-j", "ACCEPT"]
        self.lab.run_node(["iptables", "-I", *rule], check=True)
        self.lab.run_node(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"], check=True)
        try:
            yield
        finally:
            self.lab.run_node(["iptables", "-D", *rule], check=True)

    # -- the daemon ----------------------------------------------------------------------
    @contextlib.contextmanager
    def daemon(self, policy: Path, label: str = "", attribution: bool | None = None) -> Iterator[Daemon]:
        """``attribution`` None: rows 1-4, attribution off. True/False: row 5, started with
        nsenter --net (host mount namespace: /proc and the cgroup tree as on a node)."""
        sock = self.tmp / "s.sock"
        self.flush_conntrack()
        log = (self.tmp / "daemon.log").open("ab")
        argv = [
            EGRESSD, "run", "--policy", str(policy), "--status-socket", str(sock),
            "--events", str(self.tmp / "ev.jsonl"),
        ]  # fmt: skip
        if not attribution:
            argv.append("--no-attribution")
        if attribution is None:
            p = self.lab.spawn("node", argv, stdout=log, stderr=log)
        else:
            p = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.lab.node}", *argv],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
            self.lab.procs.append(p)
        log.close()
        d = Daemon(p, str(sock))
        spy: subprocess.Popen[bytes] | None = None
        try:
            d.wait_ready(self.tmp / "daemon.log")
            time.sleep(0.2)  # let start-up work (imports, rule install) finish before load
            if self.profile_dir is not None and label:
                spy = self._start_py_spy(p.pid, label)
            yield d
        finally:
            if spy is not None:
                _stop_py_spy(spy)
            self.lab.stop(p)
            if p.returncode not in (0, None):
                print(f"warning: egressd exited {p.returncode} (see {self.tmp}/daemon.log)", file=sys.stderr)
        if self.lab.run_node(["iptables-save"]).stdout.count("EGRESSD"):
            raise BenchError("egressd left rules behind after SIGTERM")

    def _start_py_spy(self, pid: int, label: str) -> subprocess.Popen[bytes]:
        assert self.profile_dir is not None
        out = self.profile_dir / f"{label}.txt"
        # --nonblocking: the daemon is never paused (the samples cost the machine CPU, not the daemon time).
        argv = [PY_SPY, "record", "-p", str(pid), "-r", "250", "-f", "raw", "--nonblocking", "-d", "600"]
        spy = subprocess.Popen([*argv, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.profiles.append(out)
        time.sleep(0.3)  # attached before the load starts
        return spy

    # -- 1. bulk throughput --------------------------------------------------------------
    def bulk_once(self, d: Daemon | None) -> tuple[float, int, int, int]:
        """(Gbit/s, retransmits, packets Python judged, TCP segments in+out)."""
        st0 = d.status() if d else None
        o0, i0 = _seg_counters(self.anchor)
        t = self.plan.bulk_s
        r = self.lab.run_node(
            ["iperf3", "-c", TARGET_V4, "-p", str(IPERF_PORT), "-t", str(t), "-J", "--connect-timeout", "3000"],
            timeout=t + 20,
        )
        o1, i1 = _seg_counters(self.anchor)
        try:
            j = json.loads(r.stdout)
            bps = float(j["end"]["sum_received"]["bits_per_second"])
            retr = int(j["end"]["sum_sent"].get("retransmits", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"iperf3 failed (exit {r.returncode}): {r.stdout[-400:]} {r.stderr[-400:]}") from e
        judged = 0
        if d and st0:
            judged = d.status()["engine"]["packets"] - st0["engine"]["packets"]
        return bps / 1e9, retr, judged, (o1 - o0) + (i1 - i0)

    def bench_bulk(self) -> None:
        pair, judged, retr, ct, over_ct = Pair(), Pair(), Pair(), Pair(), Pair()
        for r in range(self.plan.rounds):
            g, rt, _, _ = self.bulk_once(None)
            pair.without.append(g)
            retr.without.append(rt)
            with self.conntrack_only():
                gc, _, _, _ = self.bulk_once(None)
            ct.without.append(g)
            ct.with_.append(gc)
            with self.daemon(DEFAULT_POLICY, f"bulk-r{r + 1}") as d:
                gw, rtw, j, segs = self.bulk_once(d)
            over_ct.without.append(gc)
            over_ct.with_.append(gw)
            pair.with_.append(gw)
            retr.with_.append(rtw)
            judged.without.append(segs)
            judged.with_.append(j)
            _progress(f"bulk round {r + 1}: {g:.2f} vs {gw:.2f} Gbit/s; Python judged {j} of {segs} segments")
        self.results["bulk"] = pair
        self.results["ct_bulk"] = ct
        self.results["over_ct_bulk"] = over_ct
        self.info["bulk_judged"] = judged
        self.info["bulk_retr"] = retr

    # -- 2./3. connections -----------------------------------------------------------------
    def conn_once(self, rate: float, request: bool = False, keep: int = 0) -> dict[str, float]:
        t = self.plan.conn_s
        cap = CONN_CAP if rate <= 0 else int(rate * t) + 1
        argv = [PYTHON, __file__, "--worker", "conn-client", "--seconds", str(t), "--count", str(cap)]
        if request:
            argv.append("--request")
        r = self.lab.run_node([*argv, "--rate", str(rate), "--keep", str(keep)], timeout=t + 30)
        try:
            res: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise BenchError(f"conn client failed (exit {r.returncode}): {r.stderr[-600:]}") from e
        return res

    def bench_conn(self) -> None:
        rate, p50, p99, per_conn, fails = Pair(), Pair(), Pair(), Pair(), Pair()
        pp50, pp99 = Pair(), Pair()
        rr, rr_trust, rr_judged, trust_judged = Pair(), Pair(), Pair(), Pair()
        ct_conn, ct_rr, over_ct_conn, over_ct_rr = Pair(), Pair(), Pair(), Pair()
        ct_pp99, over_ct_pp99, rr_closes, bare_rr = Pair(), Pair(), Pair(), Pair()
        for r in range(self.plan.rounds):
            pa = self.conn_once(PACED_RATE)
            a = self.conn_once(0)
            ra = self.conn_once(0, request=True)
            with self.conntrack_only():
                cpa = self.conn_once(PACED_RATE)
                ca = self.conn_once(0)
                cra = self.conn_once(0, request=True)
            with self.bare_on_our_rules():
                bra = self.conn_once(0, request=True)
            bare_rr.without.append(ra["rate"])
            bare_rr.with_.append(bra["rate"])
            with self.daemon(DEFAULT_POLICY, f"conn-r{r + 1}") as d:
                st0 = _verdicts(d.status())
                pb = self.conn_once(PACED_RATE)
                b = self.conn_once(0)
                st1 = _verdicts(d.status())
                rb = self.conn_once(0, request=True)
                st2 = _verdicts(d.status())
                closes = d.status().get("closes_logged", 0)
            with self.daemon(self.trust_policy, f"trust-r{r + 1}") as d:
                t0 = _verdicts(d.status())
                tb = self.conn_once(0, request=True)
                t1 = _verdicts(d.status())
            rr_closes.with_.append(closes / max(1, rb["n"]))
            ct_pp99.without.append(pa["p99_us"])
            ct_pp99.with_.append(cpa["p99_us"])
            over_ct_pp99.without.append(cpa["p99_us"])
            over_ct_pp99.with_.append(pb["p99_us"])
            judged = st1["packets"] - st0["packets"]
            n = pb["n"] + b["n"]
            rr.without.append(ra["rate"])
            rr.with_.append(rb["rate"])
            rr_trust.without.append(ra["rate"])
            rr_trust.with_.append(tb["rate"])
            rr_judged.with_.append((st2["packets"] - st1["packets"]) / max(1, rb["n"]))
            trust_judged.with_.append((t1["packets"] - t0["packets"]) / max(1, tb["n"]))
            ct_conn.without.append(a["rate"])
            ct_conn.with_.append(ca["rate"])
            ct_rr.without.append(ra["rate"])
            ct_rr.with_.append(cra["rate"])
            over_ct_conn.without.append(ca["rate"])
            over_ct_conn.with_.append(b["rate"])
            over_ct_rr.without.append(cra["rate"])
            over_ct_rr.with_.append(rb["rate"])
            _progress(
                f"conn round {r + 1}: request/response {ra['rate']:.0f} (conntrack only {cra['rate']:.0f}) vs "
                f"{rb['rate']:.0f} conn/s, trusted {tb['rate']:.0f}; dataless with conntrack only {ca['rate']:.0f}; "
                f"fails {ra['fails'] + rb['fails'] + tb['fails']:.0f}"
            )
            if st1["overload"]:
                self.warnings.append(f"conn round {r + 1}: {st1['overload']} new flows hit on_overload")
            rate.without.append(a["rate"])
            rate.with_.append(b["rate"])
            for pair, key, x, y in ((p50, "p50_us", a, b), (p99, "p99_us", a, b), (pp50, "p50_us", pa, pb)):
                pair.without.append(x[key])
                pair.with_.append(y[key])
            pp99.without.append(pa["p99_us"])
            pp99.with_.append(pb["p99_us"])
            fails.without.append(a["fails"] + pa["fails"])
            fails.with_.append(b["fails"] + pb["fails"])
            per_conn.with_.append(judged / n if n else 0.0)
            _progress(
                f"conn round {r + 1}: {a['rate']:.0f} vs {b['rate']:.0f} conn/s, p50 {a['p50_us']:.0f} vs "
                f"{b['p50_us']:.0f} us, p99 {a['p99_us']:.0f} vs {b['p99_us']:.0f} us; paced p50 "
                f"{pa['p50_us']:.0f} vs {pb['p50_us']:.0f} us, p99 {pa['p99_us']:.0f} vs {pb['p99_us']:.0f} us; "
                f"{judged / max(1, n):.1f} queue verdicts per connection"
            )
        self.results["conn"] = rate
        self.results["rr"] = rr
        self.results["rr_trust"] = rr_trust
        self.results["ct_conn"] = ct_conn
        self.results["ct_rr"] = ct_rr
        self.results["over_ct_conn"] = over_ct_conn
        self.results["over_ct_rr"] = over_ct_rr
        self.info["rr_judged"] = rr_judged
        self.info["rr_closes"] = rr_closes
        self.results["bare_rr"] = bare_rr
        self.results["ct_paced_p99"] = ct_pp99
        self.results["over_ct_paced_p99"] = over_ct_pp99
        self.info["trust_judged"] = trust_judged
        self.results["p50"] = p50
        self.results["p99"] = p99
        self.results["paced_p50"] = pp50
        self.results["paced_p99"] = pp99
        self.info["conn_judged"] = per_conn
        self.info["conn_fails"] = fails

    # -- 5. attribution -------------------------------------------------------------------
    def bench_attr(self) -> None:
        rate, share, named, held_share, held_n = Pair(), Pair(), Pair(), Pair(), Pair()
        for r in range(self.plan.rounds):
            with self.daemon(DEFAULT_POLICY, f"attr-off-r{r + 1}", attribution=False):
                a = self.conn_once(0, request=True)
            with self.daemon(DEFAULT_POLICY, f"attr-on-r{r + 1}", attribution=True) as d:
                b = self.conn_once(0, request=True)
                st = self._attr_settled(d)
            with self.daemon(DEFAULT_POLICY, f"attr-held-r{r + 1}", attribution=True) as d:
                self.conn_once(PACED_RATE, request=True, keep=ATTR_KEEP)
                sh = self._attr_settled(d)
            total = st["attributed"] + st["partial"] + st["unknown"]
            htotal = sh["attributed"] + sh["partial"] + sh["unknown"]
            rate.without.append(a["rate"])
            rate.with_.append(b["rate"])
            share.with_.append(st["attributed"] / total if total else 0.0)
            named.with_.append(float(total))
            held_share.with_.append(sh["attributed"] / htotal if htotal else 0.0)
            held_n.with_.append(float(htotal))
            _progress(
                f"attribution round {r + 1}: {a['rate']:.0f} vs {b['rate']:.0f} conn/s; tight loop: process named "
                f"for {st['attributed']} of {total} events (socket/cgroup only {st['partial']}, unknown "
                f"{st['unknown']}, timed out {st['timeouts']}); paced {PACED_RATE:.0f}/s held "
                f"{ATTR_KEEP / PACED_RATE * 1000:.0f} ms: {sh['attributed']} of {htotal}; reasons {st['reasons']} "
                f"{sh['reasons']}"
            )
        self.results["attr_conn"] = rate
        self.info["attr_share"] = share
        self.info["attr_events"] = named
        self.info["attr_held_share"] = held_share
        self.info["attr_held_events"] = held_n

    def _attr_settled(self, d: Daemon, timeout: float = 20.0) -> dict[str, Any]:
        """The attribution counters once every flow of the load has its event written (bounded)."""
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            st = d.status()
            a: dict[str, Any] = st["attribution"]
            done = a["attributed"] + a["partial"] + a["unknown"]
            if (done == last and not a["queue"]) or time.monotonic() > deadline:
                return a
            last = done
            time.sleep(1.5)  # past the flows' close and the attribution timeout

    # -- 4. verdicts/s ---------------------------------------------------------------------
    def _queue_sample(self, queue_num: int) -> QueueSample:
        from egressd import procstats

        s = procstats.find(procstats.read(f"/proc/{self.anchor}/net/netfilter/nfnetlink_queue"), queue_num)
        if s is None:
            raise BenchError(f"queue {queue_num} is not bound in the node namespace")
        return QueueSample(time.monotonic(), s.id_sequence, s.queue_dropped + s.user_dropped, s.queue_total)

    def flood_once(self, mode: str, queue_num: int, bare: bool) -> tuple[float, int, int]:
        """(verdicts/s in the window, packets dropped or passed unjudged, sender errors)."""
        plan = self.plan
        if mode == "classify":
            cap = FLOOD_FLOWS * FLOOD_PER_FLOW_CAP
        else:
            # The bare rule involves no conntrack: only egressd's runs create an entry per datagram.
            cap = NEWFLOW_SOCKETS * (NEWFLOW_PORTS[1] - NEWFLOW_PORTS[0]) if bare else NEWFLOW_CAP
        total = plan.warmup_s + plan.flood_s + 3.0  # the sender's own cap; the bench ends it first
        argv = [PYTHON, __file__, "--worker", "flood", "--mode", mode, "--seconds", str(total), "--count", str(cap)]
        p = self._spawn_ready("node", argv)
        try:
            time.sleep(plan.warmup_s)
            a = self._queue_sample(queue_num)
            time.sleep(plan.flood_s)
            b = self._queue_sample(queue_num)
            ended_early = p.poll() is not None
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=10)
        finally:
            self.lab.stop(p)
        try:
            sender = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            sender = {"errors": -1}
        if ended_early:
            raise BenchError(f"the {mode} sender finished inside the window (its caps are too small): {sender}")
        queued = (b.seq - a.seq) & 0xFFFFFFFF
        dropped = b.dropped - a.dropped
        verdicts = queued - dropped - (b.pending - a.pending)
        return verdicts / (b.t - a.t), dropped, int(sender.get("errors", 0))

    @contextlib.contextmanager
    def bare_queue(self) -> Iterator[None]:
        """The reference: netfilterqueue's C loop with accept(), fed by one rule for the flood."""
        p = self._spawn_ready("node", [PYTHON, __file__, "--worker", "nfq-bare", "--seconds", "120"])
        rule = ["OUTPUT", "-p", "udp", "-d", TARGET_V4, "-j", "NFQUEUE", "--queue-num", str(BARE_QUEUE)]
        try:
            self.lab.run_node(["iptables", "-I", *rule], check=True)
            try:
                yield
            finally:
                self.lab.run_node(["iptables", "-D", *rule], check=True)
        finally:
            self.lab.stop(p)

    def bench_verdicts(self, mode: str) -> None:
        pair, dropped = Pair(), Pair()
        policy = self.classify_policy if mode == "classify" else DEFAULT_POLICY
        for r in range(self.plan.rounds):
            with self.bare_queue():
                bare, bd, _ = self.flood_once(mode, BARE_QUEUE, bare=True)
            with self.daemon(policy, f"verdicts-{mode}-r{r + 1}") as d:
                vps, dd, _ = self.flood_once(mode, d.queue_num(), bare=False)
                st = d.status()
            pair.without.append(bare)
            pair.with_.append(vps)
            dropped.without.append(bd)
            dropped.with_.append(dd)
            _progress(
                f"verdicts/{mode} round {r + 1}: bare {bare:.0f}/s, egressd {vps:.0f}/s "
                f"(engine saw {st['engine']['packets']} packets, {st['engine']['flows']} flows; "
                f"queue overflow {bd} / {dd})"
            )
        self.results[f"v_{mode}"] = pair
        self.info[f"v_{mode}_dropped"] = dropped


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    sock: str

    def status(self) -> dict[str, Any]:
        from egressd.daemon import read_status

        return read_status(self.sock)

    def queue_num(self) -> int:
        return int(self.status()["queue_num"])

    def wait_ready(self, log: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"egressd exited {self.proc.returncode} at start:\n{_tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                self.status()
                return
            time.sleep(0.05)
        raise BenchError(f"egressd did not answer on its status socket within {timeout} s:\n{_tail(log)}")


def _stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """SIGINT makes py-spy write its output and exit; by pid, SIGKILL if it does not."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(15)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


def profile_summary(title: str, paths: Sequence[Path], top: int = 12) -> str:
    """Self time by line (the innermost frame of each sample) over py-spy raw outputs.

    A C call (netfilterqueue's verdict, a write) is charged to the Python line that made it:
    ``pkt.repeat()`` includes the kernel re-injecting the packet and everything that runs in
    that system call.
    """
    from collections import Counter

    self_t: Counter[str] = Counter()
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            for ln in path.read_text().splitlines():
                stack, _, n = ln.rpartition(" ")
                if stack and n.isdigit():
                    total += int(n)
                    self_t[stack.split(";")[-1]] += int(n)
    if not total:
        return f"{title}: no samples"
    out = [f"py-spy, {title} ({len(paths)} runs, {total} samples): self time by line"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    return "\n".join(out)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _readline(p: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else b""


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ======================================================================================
# Report
# ======================================================================================
def _ratios(p: Pair) -> list[float]:
    return [b / a for a, b in zip(p.without, p.with_, strict=False) if a]


def _diffs(p: Pair) -> list[float]:
    return [b - a for a, b in zip(p.without, p.with_, strict=False)]


def _spread(vals: list[float], fmt: str) -> str:
    if not vals:
        return "-"
    return f"{format(min(vals), fmt)}..{format(max(vals), fmt)}"


@dataclass
class Row:
    metric: str
    without: str
    with_: str
    ratio: str
    spread: str
    target: str
    result: str


def build_rows(res: dict[str, Pair], info: dict[str, Pair]) -> list[Row]:
    rows: list[Row] = []
    med = statistics.median

    def ratio_row(key: str, name: str, unit_fmt: str, target: float | None) -> None:
        p = res.get(key)
        if p is None or not p.without:
            return
        rs = _ratios(p)
        r = med(rs)
        verdict = "info" if target is None else ("PASS" if r >= target else "MISS")
        rows.append(
            Row(
                name,
                format(med(p.without), unit_fmt),
                format(med(p.with_), unit_fmt),
                f"{r:.2f}",
                _spread(rs, ".2f"),
                "-" if target is None else f">= {target:.2f}",
                verdict,
            )
        )

    ratio_row("bulk", "bulk TCP, 1 stream (Gbit/s)", ".2f", 0.98)
    if "bulk_judged" in info:
        j = info["bulk_judged"]
        frac = [w / s for s, w in zip(j.without, j.with_, strict=False) if s]
        rows.append(
            Row(
                "  Python-judged packets / TCP segments in+out",
                f"{med(j.without):.0f} seg",
                f"{med(j.with_):.0f} pkt",
                f"{med(frac):.5f}" if frac else "-",
                _spread(frac, ".5f"),
                "-",
                "info",
            )
        )
    ratio_row("conn", "connect + close, no data: conn/s", ".0f", 0.90)
    ratio_row("rr", "connect, 64 B request, 64 B reply, close: conn/s", ".0f", 0.60)
    if "rr_judged" in info:
        pc = info["rr_judged"].with_
        rows.append(Row("  queue verdicts per connection", "-", f"{med(pc):.1f}", "-", _spread(pc, ".1f"), "-", "info"))
    if info.get("rr_closes") and info["rr_closes"].with_:
        pc = info["rr_closes"].with_
        rows.append(
            Row("  closes logged (NFLOG) per connection", "-", f"{med(pc):.1f}", "-", _spread(pc, ".1f"), "-", "info")
        )
    ratio_row("rr_trust", "same, destination trusted by address: conn/s", ".0f", 0.95)
    if "trust_judged" in info:
        pc = info["trust_judged"].with_
        rows.append(Row("  queue verdicts per connection", "-", f"{med(pc):.1f}", "-", _spread(pc, ".1f"), "-", "info"))
    ratio_row("ct_bulk", "conntrack alone vs none: bulk TCP (Gbit/s)", ".2f", None)
    ratio_row("ct_conn", "conntrack alone vs none: no-data conn/s", ".0f", None)
    ratio_row("ct_rr", "conntrack alone vs none: request/response conn/s", ".0f", None)
    ratio_row("over_ct_conn", "egressd vs conntrack alone: no-data conn/s", ".0f", None)
    ratio_row("over_ct_rr", "egressd vs conntrack alone: request/response conn/s", ".0f", None)
    ratio_row("over_ct_bulk", "egressd vs conntrack alone: bulk TCP (Gbit/s)", ".2f", None)
    ratio_row("bare_rr", "egressd's rules + C accept loop vs none: request/response conn/s", ".0f", None)
    lat_rows = (
        ("p50", "connect() p50, tight loop (us)", None),
        ("p99", "connect() p99, tight loop (us)", 50.0),
        ("paced_p50", f"connect() p50, paced {PACED_RATE:.0f}/s (us)", None),
        ("paced_p99", f"connect() p99, paced {PACED_RATE:.0f}/s (us)", 50.0),
        ("ct_paced_p99", f"conntrack alone vs none: connect() p99, paced {PACED_RATE:.0f}/s (us)", None),
        ("over_ct_paced_p99", f"egressd vs conntrack alone: connect() p99, paced {PACED_RATE:.0f}/s (us)", None),
    )
    for key, name, target in lat_rows:
        p = res.get(key)
        if p is None or not p.without:
            continue
        ds = _diffs(p)
        added = med(ds)
        verdict = "info" if target is None else ("PASS" if added <= target else "MISS")
        rows.append(
            Row(
                name,
                f"{med(p.without):.0f}",
                f"{med(p.with_):.0f}",
                f"+{added:.0f} us" if added >= 0 else f"{added:.0f} us",
                _spread(ds, ".0f"),
                "-" if target is None else f"added <= {target:.0f} us",
                verdict,
            )
        )
    if "conn_judged" in info:
        pc = info["conn_judged"].with_
        rows.append(Row("  queue verdicts per connection", "-", f"{med(pc):.1f}", "-", _spread(pc, ".1f"), "-", "info"))
    ratio_row("v_classify", "verdicts/s, classifying (bare | egressd)", ".0f", None)
    ratio_row("v_newflow", "verdicts/s, new flows (bare | egressd)", ".0f", None)
    ratio_row("attr_conn", "request/response conn/s (attribution off | on)", ".0f", None)
    for key, label in (
        ("attr_share", "  process named, tight request/response loop"),
        ("attr_held_share", f"  process named, {PACED_RATE:.0f}/s, conn lives {ATTR_KEEP / PACED_RATE * 1000:.0f} ms"),
    ):
        sh = info.get(key)
        if sh is not None and sh.with_:
            n = info[key.replace("share", "events")].with_
            rows.append(
                Row(label, "-", f"{med(sh.with_):.1%}", "-", _spread(sh.with_, ".1%"), "-",
                    f"info ({med(n):.0f} events/round)")
            )  # fmt: skip
    return rows


def render_table(rows: list[Row]) -> str:
    head = Row("metric", "without", "with", "ratio", "spread", "target", "result")
    cols = [
        max(len(getattr(r, f)) for r in [head, *rows])
        for f in ("metric", "without", "with_", "ratio", "spread", "target", "result")
    ]

    def line(r: Row) -> str:
        vals = (r.metric, r.without, r.with_, r.ratio, r.spread, r.target, r.result)
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, cols, strict=True)))

    sep = "  ".join("-" * w for w in cols)
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


NOTES = """\
How to read it: "without" and "with" are medians over the rounds; "ratio" is the median of
the per-round ratios with/without (for connect() times: the median per-round difference,
"added"), "spread" its min..max over the rounds. Only ratios from one run mean anything.
Targets are informational (the bench never fails on a miss): those of the fast-path issue
(docs/fast-path.md). "without" has no conntrack at all; the "conntrack alone" rows put one
stateful rule (that never matches) in the node namespace, so conntrack's own cost and what
egressd adds on top of it are told apart. For the verdicts/s rows "without" is the bare
netfilterqueue accept loop on the same traffic: the ratio is the share of the bare ceiling
the daemon keeps when every packet is its work (classifying: decode + flow lookup + DNS
parse + mark/repeat per datagram; new flows: + flow creation, policy, pin and one event per
datagram)."""


def print_report(bench: Bench, plan: Plan, elapsed: float) -> None:
    rows = build_rows(bench.results, bench.info)
    print()
    print(f"egressd live benchmark: {plan.rounds} rounds, interleaved without/with, {elapsed:.0f} s")
    print(render_table(rows))
    extra: list[str] = []
    if "bulk_retr" in bench.info:
        rt = bench.info["bulk_retr"]
        extra.append(
            f"bulk TCP retransmits per run (median): without {statistics.median(rt.without):.0f}, "
            f"with {statistics.median(rt.with_):.0f}"
        )
    if "conn_fails" in bench.info:
        f = bench.info["conn_fails"]
        extra.append(f"failed connect() calls: without {sum(f.without):.0f}, with {sum(f.with_):.0f}")
    for mode in ("classify", "newflow"):
        k = f"v_{mode}_dropped"
        if k in bench.info:
            dr = bench.info[k]
            extra.append(
                f"verdicts/{mode}: queue overflow in the window (dropped, or passed unjudged when fail-open): "
                f"bare {sum(dr.without):.0f}, egressd {sum(dr.with_):.0f}"
            )
    for e in extra:
        print(e)
    for w in bench.warnings:
        print(f"warning: {w}")
    print()
    print(NOTES)


# ======================================================================================
def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--worker"]:
        return run_worker(args_list[1:])
    ap = argparse.ArgumentParser(
        description="Live benchmark of `egressd run` in a throw-away namespace lab (needs root)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (< 60 s): 2 rounds, short loads")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per metric (default 5, --quick 2)")
    ap.add_argument(
        "--only",
        default="bulk,conn,verdicts,attr",
        help="comma list of bulk, conn, verdicts, attr (default: all)",
    )
    ap.add_argument(
        "--lab-name", default=f"egbench{os.getpid() % 100000}", help="namespace prefix (default: egbench<pid>)"
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="record the daemon with py-spy during every 'with' run into DIR and summarise (perturbs timings)",
    )
    a = ap.parse_args(args_list)
    plan = QUICK if a.quick else FULL
    if a.rounds is not None:
        if not 1 <= a.rounds <= 50:
            ap.error("--rounds must be 1..50")
        plan = Plan(a.rounds, plan.bulk_s, plan.conn_s, plan.flood_s, plan.warmup_s)
    if a.py_spy is not None:
        if not Path(PY_SPY).exists():
            ap.error(f"--py-spy needs {PY_SPY} (pip install py-spy into the venv)")
        a.py_spy.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    unknown = only - {"bulk", "conn", "verdicts", "attr"}
    if unknown:
        ap.error(f"unknown --only item(s): {', '.join(sorted(unknown))}")

    from egressd_lab.netns import have_netns, lab

    if not have_netns():
        print("bench/live.py needs root and the ip tool (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "iptables") if not _which(t)]
    if missing or not Path(EGRESSD).exists():
        need = ", ".join(missing) or EGRESSD
        print(f"missing: {need} (apt install iperf3; the venv at {ROOT}/.venv)", file=sys.stderr)
        return 2

    # SIGTERM ends the bench like Ctrl-C: through the finally clauses that stop every process.
    # SIGINT too, explicitly: a shell that starts us in the background sets it to "ignore".
    def on_term(_sig: int, _frm: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    t0 = time.monotonic()
    steps: list[tuple[str, Callable[[Bench], None]]] = [
        ("bulk", Bench.bench_bulk),
        ("conn", Bench.bench_conn),
        ("verdicts", lambda b: b.bench_verdicts("classify")),
        ("verdicts", lambda b: b.bench_verdicts("newflow")),
        ("attr", Bench.bench_attr),
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="egressd-live-") as td, lab(a.lab_name) as lb:
            bench = Bench(lb, plan, Path(td), a.py_spy)
            bench.setup()
            for name, step in steps:
                if name in only:
                    step(bench)
            print_report(bench, plan, time.monotonic() - t0)
            groups: dict[str, list[Path]] = {}
            for prof in bench.profiles:
                groups.setdefault(prof.stem.rsplit("-r", 1)[0], []).append(prof)
            for title, paths in groups.items():
                print()
                print(profile_summary(title, paths))
    except KeyboardInterrupt:
        print("interrupted: processes stopped, namespaces removed", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"bench/live.py: {e}", file=sys.stderr)
        return 1
    return 0


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


if __name__ == "__main__":
    raise SystemExit(main())
