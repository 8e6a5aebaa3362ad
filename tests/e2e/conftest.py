"""Shared pieces of the kernel end-to-end tests: namespaces, a test-only NFQUEUE consumer, peers.

The consumer is deliberately *not* the daemon: it is a thread bound to the queue inside the
lab's node namespace that applies a verdict function to every packet, so each kernel
mechanism (pinning, reject, bypass, queue flags) is checked on its own, with nothing of
the engine in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from egressd import netfilter, nfq
from egressd_lab import peers
from egressd_lab.harness import why_no_kernel
from egressd_lab.netns import SERVICES, Lab, lab
from egressd_lab.peers import PY

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the *calling thread* into the named namespace (netns is per thread in Linux)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


_WHY = why_no_kernel()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/test_kernel_" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)
            if _WHY:
                item.add_marker(pytest.mark.skip(reason=_WHY))


# -- the lab -------------------------------------------------------------------------------
_counter = 0


@pytest.fixture
def klab() -> Iterator[Lab]:
    """A fresh node/inet namespace pair for one test (unique, short name; always removed)."""
    global _counter
    _counter += 1
    with lab(f"k{os.getpid() % 10000}x{_counter}") as lb:
        yield lb


def svc(name: str, v6: bool = False) -> str:
    return SERVICES[name][1 if v6 else 0]


# -- the test-only consumer ------------------------------------------------------------------
ALLOW, DENY, SEEN, ACCEPT, DROP = "allow", "deny", "seen", "accept", "drop"


@dataclass
class Seen:
    """One packet as the consumer saw it."""

    n: int  # 1-based order of arrival
    hook: int
    mark: int
    length: int  # bytes copied to user space
    ip_len: int  # the IP header's idea of the packet length (a GSO super-packet says > MTU)
    payload: bytes  # first 128 bytes of the IP packet


Verdict = Callable[[Seen], str]


@dataclass
class Consumer:
    """A thread bound to ``queue_num`` inside ``netns`` applying ``verdict`` to each packet."""

    netns: str
    queue_num: int
    verdict: Verdict
    fail_open: bool = True
    gso: bool = False
    max_len: int = 1024
    delay: float = 0.0  # seconds slept per packet: a deliberately slow consumer
    budget: int = 64
    packets: list[Seen] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    queue: nfq.Queue | None = None

    def _on_packet(self, pkt: Any) -> None:
        data = pkt.get_payload()
        ip_len = int.from_bytes(data[2:4], "big") if data[:1] and data[0] >> 4 == 4 else 0
        if data[:1] and data[0] >> 4 == 6:
            ip_len = 40 + int.from_bytes(data[4:6], "big")
        s = Seen(len(self.packets) + 1, pkt.hook, pkt.get_mark(), len(data), ip_len, data[:128])
        self.packets.append(s)
        if self.delay:
            time.sleep(self.delay)
        v = self.verdict(s)
        if v == ACCEPT:
            pkt.accept()
        elif v == DROP:
            pkt.drop()
        else:
            bits = {ALLOW: netfilter.MARK_ALLOW, DENY: netfilter.MARK_DENY, SEEN: netfilter.MARK_SEEN}[v]
            pkt.set_mark(netfilter.with_verdict(pkt.get_mark(), bits))
            pkt.repeat()

    def _run(self) -> None:
        try:
            enter_netns(self.netns)
            self.queue = nfq.Queue(
                self.queue_num,
                self._on_packet,
                fail_open=self.fail_open,
                gso=self.gso,
                max_len=self.max_len,
                on_error=self.errors.append,
            )
        except BaseException as e:
            self.errors.append(e)
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([self.queue], [], [], 0.05)
                if r:
                    self.queue.process(self.budget)
        except BaseException as e:
            self.errors.append(e)
        finally:
            self.queue.close()

    def start(self) -> Consumer:
        self._thread = threading.Thread(target=self._run, name=f"nfq-{self.queue_num}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("consumer did not bind in 10 s")
        if self.errors:
            raise self.errors[0]
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Consumer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def consumer(netns: str, queue_num: int, verdict: Verdict, **kw: Any) -> Iterator[Consumer]:
    c = Consumer(netns, queue_num, verdict, **kw)
    with c:
        yield c


# -- peers ------------------------------------------------------------------------------------
# A TCP server: accepts connections; each one gets ``send`` bytes, and whatever the client
# sends is read and its length written back as the last line. Bounded: exits after ``count``
# connections or ``life`` seconds.
TCP_SERVER = r"""
import socket, sys, time, threading
host, port, send, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
life = float(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(64); s.settimeout(life)
end = time.monotonic() + life
def serve(c):
    c.settimeout(max(0.1, end - time.monotonic()))
    try:
        if send:
            c.sendall(b"x" * send)
        got = 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += len(b)
            print("recv", len(b), b[:16], flush=True)
        c.sendall(f"{got}\n".encode())
    except OSError:
        pass
    finally:
        c.close()
threads = []
while len(threads) < count and time.monotonic() < end:
    try:
        c, _ = s.accept()
    except OSError:
        break
    threads.append(threading.Thread(target=serve, args=(c,), daemon=True))
    threads[-1].start()
for t in threads:
    t.join(max(0.0, end - time.monotonic()))
"""

UDP_ECHO = r"""
import socket, sys, time
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(0.2)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        d, a = s.recvfrom(65536)
    except OSError:
        continue
    s.sendto(d, a)
"""


# A UDP sink: prints one line per datagram received ("<len> <first bytes>"), for ``life`` s.
UDP_SINK = r"""
import socket, sys, time
host, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(0.2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        d = s.recv(65536)
    except OSError:
        continue
    print(len(d), d[:12], flush=True)
"""

# A UDP sender: ``count`` datagrams from one socket (one flow) as fast as it can.
UDP_BURST = r"""
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for i in range(count):
    try:
        s.sendto(b"dgram-%06d" % i, (host, port)); sent += 1
    except OSError:
        pass
print(sent)
"""


def start_udp_sink(lb: Lab, ns: str, host: str, port: int, life: float = 10.0) -> subprocess.Popen[bytes]:
    p = lb.spawn(ns, [PY, "-c", UDP_SINK, host, str(port), str(life)], stdout=subprocess.PIPE)
    wait_listening(lb, ns, port, udp=True)
    return p


def sink_count(lb: Lab, p: subprocess.Popen[bytes]) -> int:
    return len([ln for ln in server_output(lb, p).splitlines() if ln.strip()])


def udp_burst(lb: Lab, host: str, port: int, count: int) -> int:
    return int(lb.run_node([PY, "-c", UDP_BURST, host, str(port), str(count)], timeout=30).stdout)


T = Any


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread inside namespace ``name``; sockets it makes stay in that namespace."""
    box: list[Any] = []

    def run() -> None:
        try:
            enter_netns(name)
            box.append(("ok", fn()))
        except BaseException as e:
            box.append(("err", e))

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    kind, val = box[0]
    if kind == "err":
        raise val
    return val


def read_proc_queues(lb: Lab) -> str:
    return lb.run_node(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout


# -- a container behind the node (FORWARD) ---------------------------------------------------
CTR_NODE_V4, CTR_V4 = "203.0.113.129", "203.0.113.130"  # 203.0.113.128/26: not a service address
CTR_NODE_V6, CTR_V6 = "2001:db8:3::1", "2001:db8:3::2"


@dataclass
class Container:
    """A third namespace routed (and masqueraded, as Docker does) through the node."""

    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout, check=False)

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(self.cmd(argv), start_new_session=True, stdout=subprocess.DEVNULL)
        self.procs.append(p)
        return p


@pytest.fixture
def container(klab: Lab) -> Iterator[Container]:
    name = f"{klab.prefix}-ctr"
    dev_n, dev_c = f"{klab.prefix[:6]}c0", f"{klab.prefix[:6]}c1"
    ctr = Container(name)

    def sh(*argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True, timeout=30)

    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", dev_n, "netns", klab.node, "type", "veth", "peer", dev_c, "netns", name)
        n, c = ["ip", "netns", "exec", klab.node], ["ip", "netns", "exec", name]
        for ns, dev in ((n, dev_n), (c, dev_c)):
            sh(*ns, "ip", "link", "set", "lo", "up")
            sh(*ns, "ip", "link", "set", dev, "up")
        sh(*n, "ip", "addr", "add", f"{CTR_NODE_V4}/26", "dev", dev_n)
        sh(*c, "ip", "addr", "add", f"{CTR_V4}/26", "dev", dev_c)
        sh(*n, "ip", "-6", "addr", "add", f"{CTR_NODE_V6}/64", "dev", dev_n, "nodad")
        sh(*c, "ip", "-6", "addr", "add", f"{CTR_V6}/64", "dev", dev_c, "nodad")
        sh(*c, "ip", "route", "add", "default", "via", CTR_NODE_V4)
        sh(*c, "ip", "-6", "route", "add", "default", "via", CTR_NODE_V6)
        sh(*n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(*n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh(*n, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", f"{CTR_V4}/26", "-j", "MASQUERADE")
        sh(
            *n,
            "ip6tables",
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "2001:db8:3::/64",
            "-j",
            "MASQUERADE",
        )
        yield ctr
    finally:
        for p in ctr.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def start_tcp_server(
    lb: Lab, ns: str, host: str, port: int, send: int = 0, count: int = 1, life: float = 20.0
) -> subprocess.Popen[bytes]:
    """The server prints "recv N <first bytes>" per chunk received (read it after ``lb.stop``)."""
    p = lb.spawn(
        ns,
        [PY, "-c", TCP_SERVER, host, str(port), str(send), str(count), str(life)],
        stdout=subprocess.PIPE,
    )
    wait_listening(lb, ns, port)
    return p


def server_output(lb: Lab, p: subprocess.Popen[bytes]) -> str:
    lb.stop(p)
    assert p.stdout is not None
    return p.stdout.read().decode(errors="replace")


def start_udp_echo(lb: Lab, ns: str, host: str, port: int, life: float = 20.0) -> subprocess.Popen[bytes]:
    p = lb.spawn(ns, [PY, "-c", UDP_ECHO, host, str(port), str(life)])
    wait_listening(lb, ns, port, udp=True)
    return p


def wait_listening(lb: Lab, ns: str, port: int, udp: bool = False, timeout: float = 5.0) -> None:
    """Until something in ``ns`` listens on ``port`` (any address); bounded."""
    peers.wait_listening(lb, ns, [(None, port)], udp=udp, timeout=timeout)


def node_python(lb: Lab, code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in the node namespace; its stdout is the measurement."""
    return lb.run_node([PY, "-c", code, *args], timeout=timeout)


__all__ = [
    "ACCEPT",
    "ALLOW",
    "CTR_NODE_V4",
    "CTR_V4",
    "CTR_V6",
    "DENY",
    "DROP",
    "PY",
    "SEEN",
    "TCP_SERVER",
    "Consumer",
    "Container",
    "Seen",
    "consumer",
    "enter_netns",
    "in_netns",
    "node_python",
    "read_proc_queues",
    "server_output",
    "sink_count",
    "socket",
    "start_tcp_server",
    "start_udp_echo",
    "start_udp_sink",
    "svc",
    "udp_burst",
    "wait_listening",
]
