"""What the end-to-end tests and the live benchmarks share: when they can run, per-test
policies, the daemon's status and resources, load generators, counting at the far side.

Why one harness (and no tests in this file): the adversarial suite drives the real
``egressd run`` under exhaustion, faults and evasion, the daemon suite drives it with real
peers, the kernel-mechanism suite drives NFQUEUE directly, and ``bench/flood.py`` runs the
same generators for longer; each used to carry its own copy of these helpers. Everything here
is bounded in time and count, sends only between the lab's namespaces on documentation
addresses, and stops what it starts by pid.

Every lab here is named ``egadv<pid>*`` (a suffix ``s``/``d``/``m`` where a second lab must coexist
with a module's; ``egadvb<pid>`` for the bench), so two runs on one machine never share a lab.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressd import netfilter
from egressd.paths import default_policy
from egressd_lab import peers
from egressd_lab.netns import NODE_V4, SERVICES, Lab, have_netns
from egressd_lab.peers import PY

PREFIX = f"egadv{os.getpid() % 100000}"  # unique per run: two suites on one machine never share a lab
POOL_V4 = SERVICES["pool"][0]
BULK_V4 = SERVICES["bulk"][0]
PROXY_V4 = SERVICES["proxy"][0]
DNS_V4 = SERVICES["dns"][0]
EVIL_V4 = SERVICES["ssh_evil"][0]
SINK_V4 = SERVICES["tls"][0]  # a plain address for sinks that must match no rule


@functools.cache
def why_no_kernel() -> str | None:
    """Why the live suites cannot run here (None: they can): root, the tools, NFQUEUE support.

    NFQUEUE support is probed in a throwaway namespace (a kernel without it refuses the rule).
    """
    if not have_netns():
        return "needs root and iproute2 (network namespaces)"
    for tool in ("iptables-restore", "ip6tables-restore", "iptables-save", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt install iptables conntrack)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return "python netfilterqueue is not installed"
    if not (Path(PY).parent / "egressd").is_file():
        return "the egressd console script is not installed beside this interpreter (pip install -e .)"
    name = f"egdprobe{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    try:
        argv = ["ip", "netns", "exec", name, "iptables", "-w", "-A", "OUTPUT", "-j", "NFQUEUE", "--queue-num", "9"]
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            return f"no NFQUEUE support in this kernel: {p.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


WHY = why_no_kernel()
live = [pytest.mark.netns, pytest.mark.skipif(WHY is not None, reason=WHY or "")]


def need(*tools: str) -> None:
    """Skip the calling test (with the reason) when a tool it drives is missing."""
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} missing (make deps installs it)")


# -- the lab -------------------------------------------------------------------------------
@contextlib.contextmanager
def adv_lab(prefix: str = PREFIX) -> Iterator[Lab]:
    lb = Lab(prefix)
    try:
        yield lb.create()
    finally:
        lb.close()


# -- policies --------------------------------------------------------------------------------
def write_policy(
    directory: Path,
    *,
    top: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    prepend_rules: Sequence[dict[str, Any]] = (),
    without_rules: Sequence[str] = (),
    name: str = "policy.yaml",
) -> Path:
    """The shipped default policy with the given changes, written beside a copy of its lists."""
    src = default_policy()
    directory.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load(src.read_text())
    for inc in doc.get("include", []):
        dst = directory / inc
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / inc, dst)
    doc.update(top or {})
    doc.setdefault("settings", {}).update(settings or {})
    doc["rules"] = [*prepend_rules, *(r for r in doc["rules"] if r["name"] not in without_rules)]
    path = directory / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)  # a reload never reads a half-written file
    return path


def policy_copy(tmp: Path, edit: Callable[[str], str] = lambda s: s) -> Path:
    """A copy of the shipped rules directory (the default policy includes lists/) with
    ``edit`` applied to default.yaml as text (comments kept); returns the copy's default.yaml."""
    src = default_policy().parent
    dst = tmp / f"rules-{time.monotonic_ns()}"
    shutil.copytree(src, dst)
    pol = dst / "default.yaml"
    pol.write_text(edit(pol.read_text()))
    return pol


def set_key(text: str, key: str, value: str) -> str:
    """Replace a top-level ``key: ...`` line of a policy (the rest of the file unchanged)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(f"{key}:"):
            lines[i] = f"{key}: {value}\n"
            return "".join(lines)
    raise AssertionError(f"no top-level {key!r} in the policy")


# -- the daemon ------------------------------------------------------------------------------
def kill9(d: peers.Egressd) -> None:
    """SIGKILL by pid and reap: no clean-up runs, the kernel rules stay as they were."""
    d.stop(signal.SIGKILL, timeout=5.0)


def wait_status(d: peers.Egressd, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
    """Poll the status socket until ``pred`` holds (the kernel counters refresh once a second)."""
    deadline = time.monotonic() + timeout
    st = d.status()
    while not pred(st) and time.monotonic() < deadline:
        time.sleep(0.1)
        st = d.status()
    return st


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def rss_kb(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


# -- peers and clients -----------------------------------------------------------------------
def stratum(lb: Lab, host: str, port: int, *args: str, variant: str = "v1", timeout: float = 3.0) -> dict[str, Any]:
    """One miner handshake from the node to ``host:port``; its report (``handshake_complete`` says it all)."""
    return peers.stratum_client(lb, peers.hostport(host, port), variant, *args, timeout=timeout)[1]


# -- frames written below the IP layer (packet sockets) --------------------------------------
# One frame, built with scapy and written through an AF_PACKET socket bound to argv[1]: what a
# process with CAP_NET_RAW can do without ever meeting the IP layer's netfilter hooks.
# argv: dev dst_mac src dst l4(tcp|udp) sport dport payload [option...]; options:
#   bypass        PACKET_QDISC_BYPASS (the frame skips the qdisc layer: dev_direct_xmit)
#   mark=N        SO_MARK N on the socket (CAP_NET_RAW suffices since Linux 5.17)
#   proto=N       the socket's protocol (what the kernel believes the frame is) is N
#   vlan=N        an 802.1Q tag N around the IP packet
#   syn           TCP SYN carrying the payload (a TCP Fast Open server accepts it)
#   count=N       send it N times
#   ethertype=N   no IP at all: an Ethernet frame of type N carrying the payload
# Prints a JSON line: frames sent and the errors the kernel returned (a drop at the egress
# hook is ENOBUFS to the sender).
PACKET_SEND = r"""
import json, socket, struct, sys
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, conf, get_if_hwaddr
conf.verb = 0
dev, mac, src, dst, l4, sport, dport, data = sys.argv[1:9]
opts = dict((o.split("=", 1) + [""])[:2] for o in sys.argv[9:])
ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
if l4 == "udp":
    seg = UDP(sport=int(sport), dport=int(dport))
else:
    seg = TCP(sport=int(sport), dport=int(dport), flags="S" if "syn" in opts else "PA", seq=1000)
eth = Ether(dst=mac, src=get_if_hwaddr(dev))
if "ethertype" in opts:
    frame = bytes(Ether(dst=mac, src=get_if_hwaddr(dev), type=int(opts["ethertype"], 0)) / data.encode())
elif "vlan" in opts:
    frame = bytes(eth / Dot1Q(vlan=int(opts["vlan"])) / ip / seg / data.encode())
else:
    frame = bytes(eth / ip / seg / data.encode())
proto = int(opts.get("proto", "0"), 0)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
s.bind((dev, proto))
if "bypass" in opts:
    s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
if "mark" in opts:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("I", int(opts["mark"], 0)))
sent, errors = 0, []
for _ in range(int(opts.get("count", "1"))):
    try:
        s.send(frame); sent += 1
    except OSError as e:
        errors.append(e.strerror)
print(json.dumps({"sent": sent, "errors": errors}), flush=True)
"""


def mac_of(lb: Lab, ns: str, kind: str = "veth") -> str:
    """The MAC address of the namespace's interface of ``kind`` (the lab has one veth per side)."""
    run = lb.run_node if ns == "node" else lb.run_inet
    links = json.loads(run(["ip", "-j", "-d", "link", "show", "type", kind], check=True).stdout)
    (link,) = links
    return str(link["address"])


def send_frames(
    lb: Lab, dev: str, dst_mac: str, src: str, dst: str, l4: str, sport: int, dport: int, payload: str, *options: str
) -> dict[str, Any]:
    """``PACKET_SEND`` in the node namespace; its report (frames sent, errors seen)."""
    argv = [PY, "-c", PACKET_SEND, dev, dst_mac, src, dst, l4, str(sport), str(dport), payload, *options]
    r = lb.run_node(argv, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"the packet-socket sender failed: {r.stderr[-800:]}")
    rep: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return rep


def guard_drops(lb: Lab) -> int:
    """Frames the link guard of the node namespace dropped (its counter; 0 when there is none)."""
    return netfilter.guard_drops(netns=lb.node)


# -- counting what reaches the inet side ------------------------------------------------------
def inet_counter(lb: Lab, match: Sequence[str], action: str = "DROP") -> None:
    """Count (and by default drop) arriving packets in the inet namespace's raw PREROUTING."""
    lb.run_inet(["iptables", "-w", "-t", "raw", "-A", "PREROUTING", *match, "-j", action], check=True)


def inet_count(lb: Lab, contains: str = "") -> int:
    """Packets counted by the raw PREROUTING rules (only those whose listing has ``contains``)."""
    out = lb.run_inet(["iptables", "-w", "-t", "raw", "-L", "PREROUTING", "-n", "-v", "-x"]).stdout
    total = 0
    for line in out.splitlines()[2:]:
        cols = line.split()
        if cols and cols[0].isdigit() and contains in line:
            total += int(cols[0])
    return total


def queue_rule_hits(lb: Lab) -> int:
    """Packets the node's IPv4 NFQUEUE rules were hit by (netfilter.show()'s counters)."""
    return netfilter.queue_hits(netns=lb.node, families=(4,))


# -- load generators (run as a separate process in the node namespace) ------------------------
# Unique-tuple flood: as many new TCP connections (each from a new source port, held open
# until the end so each stays a flow being classified) and UDP datagrams (each from a new
# socket) as fit in ``seconds``, at most ``max_conns`` / ``max_dgrams``. Prints JSON counts.
FLOOD = r"""
import json, os, select, socket, sys, time
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, max_conns, max_dgrams = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
stop_file = sys.argv[7] if len(sys.argv) > 7 else None  # ends the flood early when it appears
end = time.monotonic() + seconds
held, pending = [], {}
out = {"syn": 0, "established": 0, "failed": 0, "dgrams": 0, "dgram_errors": 0}
rounds = 0
while time.monotonic() < end and (out["syn"] < max_conns or out["dgrams"] < max_dgrams):
    rounds += 1
    if stop_file is not None and rounds % 64 == 0 and os.path.exists(stop_file):
        break
    if out["syn"] < max_conns and len(pending) < 128:
        s = socket.socket(); s.setblocking(False)
        try:
            s.connect((host, tport))
        except BlockingIOError:
            pass
        except OSError:
            out["failed"] += 1; s.close(); s = None
        if s is not None:
            pending[s.fileno()] = s
        out["syn"] += 1
    if out["dgrams"] < max_dgrams:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.sendto(b"flood-%08d" % out["dgrams"], (host, uport)); out["dgrams"] += 1
        except OSError:
            out["dgram_errors"] += 1
        u.close()
    if pending:
        _, w, _ = select.select([], list(pending), [], 0)
        for fd in w:
            s = pending.pop(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                out["established"] += 1; held.append(s)
            else:
                out["failed"] += 1; s.close()
    if len(held) > 600:  # stay far below the fd limit (1024): close the oldest cleanly
        held.pop(0).close()
for s in held + list(pending.values()):
    s.close()
print(json.dumps(out), flush=True)
"""

# A burst of UDP datagrams, every one a new flow (16 source sockets x 40000 destination
# ports from ``base``: up to 640k distinct tuples): at most ``count`` datagrams, for at most
# ``seconds``. Prints how many were sent.
UDP_PORTS_BURST = r"""
import socket, sys, time
host, base, count = sys.argv[1], int(sys.argv[2]), min(int(sys.argv[3]), 640000)
end = time.monotonic() + (float(sys.argv[4]) if len(sys.argv) > 4 else 60.0)
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
sent = 0
for i in range(count):
    if i % 256 == 0 and time.monotonic() > end:
        break
    try:
        socks[i // 40000].sendto(b"burst-%06d" % i, (host, base + i % 40000)); sent += 1
    except OSError:
        pass
print(sent, flush=True)
"""

# A TCP listener that accepts and holds connections (a flood target), bounded in life.
HOLD_SERVER = r"""
import socket, sys, time, select
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(4096); s.setblocking(False)
end = time.monotonic() + life
conns = []
while time.monotonic() < end:
    r, _, _ = select.select([s], [], [], 0.2)
    if r:
        try:
            while True:
                c, _ = s.accept(); conns.append(c)
                if len(conns) > 600:
                    conns.pop(0).close()
        except BlockingIOError:
            pass
"""


class Ctl:
    """A helper process driven line by line over stdin/stdout (bounded waits, stopped by pid)."""

    def __init__(self, lb: Lab, ns: str, code: str, *args: str) -> None:
        self.lb = lb
        self.proc = lb.spawn(
            ns,
            [PY, "-u", "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def line(self, timeout: float = 10.0) -> str:
        """The next line the process prints ("" at EOF or timeout)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            ch = os.read(fd, 1)
            if not ch:
                break
            buf += ch
        return buf.decode(errors="replace").strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, text: str, timeout: float = 10.0) -> str:
        self.send(text)
        return self.line(timeout)

    def close(self) -> None:
        self.lb.stop(self.proc)


def spawn_node_py(lb: Lab, code: str, *args: str) -> subprocess.Popen[bytes]:
    return lb.spawn("node", [PY, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def spawn_inet_py(lb: Lab, code: str, *args: str) -> subprocess.Popen[bytes]:
    return lb.spawn("inet", [PY, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(lb: Lab, p: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """Wait for a bounded generator to end by itself (stopped by pid if it overruns)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lb.stop(p)
        out, err = p.communicate()
    if p in lb.procs:
        lb.procs.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"generator exited {p.returncode}: {err.decode(errors='replace')[-800:]}")
    return out.decode(errors="replace")


__all__ = [
    "BULK_V4",
    "DNS_V4",
    "EVIL_V4",
    "FLOOD",
    "HOLD_SERVER",
    "NODE_V4",
    "PACKET_SEND",
    "POOL_V4",
    "PREFIX",
    "PROXY_V4",
    "PY",
    "SINK_V4",
    "UDP_PORTS_BURST",
    "WHY",
    "Ctl",
    "adv_lab",
    "finish",
    "guard_drops",
    "inet_count",
    "inet_counter",
    "kill9",
    "live",
    "mac_of",
    "need",
    "policy_copy",
    "proc_status",
    "queue_rule_hits",
    "rss_kb",
    "send_frames",
    "set_key",
    "spawn_inet_py",
    "spawn_node_py",
    "stratum",
    "wait_status",
    "why_no_kernel",
    "write_policy",
]
