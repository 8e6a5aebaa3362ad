"""A two-namespace lab: a training "node" and the "internet", joined by one veth pair.

Why it exists: the demo (``make run``), the capture script (``pcaps/make.py``) and the
end-to-end tests all need the same thing — real programs talking over a real kernel path
that egressd can sit on, *without touching the host's own traffic*. Everything lives in
namespaces this module creates and removes, on documentation addresses only
(RFC 5737 / RFC 3849), so a mistake cannot reach a real network.

Layout::

    node ns                                   inet ns
    veth n0 198.51.100.2/24  <---------->  veth i0 198.51.100.1/24
            2001:db8:1::2/64                       2001:db8:1::1/64
    default via 198.51.100.1 / 2001:db8:1::1      lo: 203.0.113.0/24 service addresses
    lo: 198.51.100.3/32 (NODE_LOCAL_V4)               2001:db8:2::/64 service addresses
                                                  route 198.51.100.3/32 unreachable

Service addresses in the inet namespace (``SERVICES``) give each peer its own IP, so a
policy can allow one and not another. ``NODE_LOCAL_V4`` is where the node's own services
listen (what a real node binds on 127.0.0.1), so that no test needs a loopback address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

NODE_V4: Final = "198.51.100.2"
INET_V4: Final = "198.51.100.1"
NODE_V6: Final = "2001:db8:1::2"
INET_V6: Final = "2001:db8:1::1"
# The node's stand-in for 127.0.0.1: a /32 on the node's lo, for services only the node uses
# (the target of an ``ssh -R``, a web server a tunnel would expose). Traffic to it leaves on
# lo, which egressd's rules never judge, exactly as loopback traffic; the inet namespace has
# an unreachable route to it, so only the node reaches it, as only a node reaches its own
# 127.0.0.1. Not used by anything else in the lab (198.51.100.1/.2 are the veth ends).
NODE_LOCAL_V4: Final = "198.51.100.3"

# One address per peer role, all in 203.0.113.0/24 and 2001:db8:2::/64.
SERVICES: Final[dict[str, tuple[str, str]]] = {
    "ssh_allowed": ("203.0.113.10", "2001:db8:2::10"),
    "ssh_named": ("203.0.113.11", "2001:db8:2::11"),  # reachable by name only (git.example.org)
    "ssh_evil": ("203.0.113.20", "2001:db8:2::20"),
    "pool": ("203.0.113.30", "2001:db8:2::30"),
    "tls": ("203.0.113.40", "2001:db8:2::40"),
    "tls_pool": ("203.0.113.41", "2001:db8:2::41"),
    "proxy": ("203.0.113.50", "2001:db8:2::50"),
    "dns": ("203.0.113.53", "2001:db8:2::53"),
    "bulk": ("203.0.113.60", "2001:db8:2::60"),
}

ALLOWED_PREFIXES: Final = ("198.51.100.", "203.0.113.", "2001:db8:")


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)} -> exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def have_netns() -> bool:
    """Root with the ip tool: the precondition of everything here (tests skip without it)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass
class Lab:
    """Owns its two namespaces and every process it started; ``close()`` ends them all."""

    prefix: str
    node: str = ""
    inet: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node = f"{self.prefix}-node"
        self.inet = f"{self.prefix}-inet"

    # -- set-up ---------------------------------------------------------------------------
    def create(self) -> Lab:
        self.destroy_namespaces()
        _run(["ip", "netns", "add", self.node])
        _run(["ip", "netns", "add", self.inet])
        veth_n, veth_i = f"{self.prefix[:6]}n0", f"{self.prefix[:6]}i0"
        _run(
            [
                "ip",
                "link",
                "add",
                veth_n,
                "netns",
                self.node,
                "type",
                "veth",
                "peer",
                veth_i,
                "netns",
                self.inet,
            ]
        )
        n = ["ip", "netns", "exec", self.node]
        i = ["ip", "netns", "exec", self.inet]
        for ns, dev in ((n, veth_n), (i, veth_i)):
            _run([*ns, "ip", "link", "set", "lo", "up"])
            _run([*ns, "ip", "link", "set", dev, "up"])
        _run([*n, "ip", "addr", "add", f"{NODE_V4}/24", "dev", veth_n])
        _run([*i, "ip", "addr", "add", f"{INET_V4}/24", "dev", veth_i])
        _run([*n, "ip", "-6", "addr", "add", f"{NODE_V6}/64", "dev", veth_n, "nodad"])
        _run([*i, "ip", "-6", "addr", "add", f"{INET_V6}/64", "dev", veth_i, "nodad"])
        _run([*n, "ip", "addr", "add", f"{NODE_LOCAL_V4}/32", "dev", "lo"])
        _run([*i, "ip", "route", "add", "unreachable", f"{NODE_LOCAL_V4}/32"])
        _run([*n, "ip", "route", "add", "default", "via", INET_V4])
        _run([*n, "ip", "-6", "route", "add", "default", "via", INET_V6])
        for v4, v6 in SERVICES.values():
            _run([*i, "ip", "addr", "add", f"{v4}/32", "dev", "lo"])
            _run([*i, "ip", "-6", "addr", "add", f"{v6}/128", "dev", "lo", "nodad"])
        # Let the kernel account bytes/packets per conntrack entry from the first packet on
        # (connbytes depends on it; see docs/architecture.md).
        for ns in (n, i):
            _run([*ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"], check=False)
        self.wait_reachable()
        return self

    def wait_reachable(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _run(self.node_cmd(["ping", "-c1", "-W1", SERVICES["tls"][0]]), check=False).returncode == 0:
                return
            time.sleep(0.1)
        # IPv6 DAD is disabled (nodad), v4 should be instant; say what failed.
        raise LabError(f"lab {self.prefix}: {SERVICES['tls'][0]} unreachable from the node namespace")

    # -- running things ------------------------------------------------------------------
    def node_cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node, *argv]

    def inet_cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.inet, *argv]

    def run_node(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.node_cmd(argv), check=check, timeout=timeout)

    def run_inet(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.inet_cmd(argv), check=check, timeout=timeout)

    def spawn(self, ns: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``ns`` ("node" or "inet"); ``close()`` ends it by pid."""
        target = self.node if ns == "node" else self.inet
        p: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", target, *argv], start_new_session=True, **kw
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """End a process this lab started (its own process group, which it leads), by pid."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout)
        if p in self.procs:
            self.procs.remove(p)

    # -- tear-down -----------------------------------------------------------------------
    def destroy_namespaces(self) -> None:
        for ns in (self.node, self.inet):
            _run(["ip", "netns", "del", ns], check=False)

    def close(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p)
        self.destroy_namespaces()

    def __enter__(self) -> Lab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def lab(prefix: str | None = None) -> Iterator[Lab]:
    """``with lab() as l:`` — a fresh lab with a name unique to this process."""
    name = prefix or f"egd{os.getpid() % 100000}"
    lb = Lab(name)
    try:
        yield lb.create()
    finally:
        lb.close()
