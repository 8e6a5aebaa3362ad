"""What the two capture scripts share: the recipe context, tcpdump around a recipe, waits.

Why one module: ``pcaps/make.py`` (SSH, Stratum, TLS, DNS) and ``pcaps/make_tunnels.py`` (real
tunnel programs) record captures the same way, in the same lab: a recipe runs real programs in
the namespaces while tcpdump records the node's veth, and a failed step must say which program
failed and what it printed. Each script adds only its own peers to the context.
"""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from egressd_lab import peers
from egressd_lab.netns import Lab


class MakeError(RuntimeError):
    """A step of a capture failed; the message says which program and what it printed."""


@dataclass
class Ctx:
    """What a capture recipe may use: the lab, a temp dir (with the files to close) and the
    lab's SSH keys."""

    lab: Lab
    tmp: Path
    files: contextlib.ExitStack
    keys: peers.SshKeys

    def logfile(self, name: str) -> IO[bytes]:
        """A file in the temp dir for a client's output (read it when a step fails)."""
        return self.files.enter_context(open(self.tmp / name, "wb"))

    def ssh_argv(self, host: str, *options: str, port: int = 22) -> list[str]:
        return peers.ssh_argv(self.keys, host, options=options, port=port)

    def node(self, argv: list[str], timeout: float = 20.0, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = self.lab.run_node(argv, timeout=timeout)
        if ok and p.returncode != 0:
            raise MakeError(f"{' '.join(argv)} -> exit {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}")
        return p


def wait_line(p: subprocess.Popen[bytes], needle: str, timeout: float, stream: str = "stderr") -> str:
    """Read ``p``'s stdout/stderr until a line contains ``needle``; bounded by ``timeout``."""
    f = p.stdout if stream == "stdout" else p.stderr
    assert f is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = f.readline()
        if not line:
            break
        seen += line
        if needle.encode() in line:
            return line.decode(errors="replace")
    raise MakeError(f"{p.args!r}: no {needle!r} within {timeout} s; it printed {seen[-500:]!r}")


def node_veth(c: Ctx) -> str:
    """The node namespace's one veth: where every capture is recorded."""
    out = c.lab.run_node(["ip", "-o", "link", "show", "type", "veth"], timeout=5).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    if len(names) != 1:
        raise MakeError(f"expected one veth in the node namespace, found {names}")
    return names[0]


def record(c: Ctx, name: str, bpf: str, dev: str, run: Callable[[], None], buffer_kib: int | None = None) -> Path:
    """tcpdump on ``dev`` (filter ``bpf``) while ``run`` runs; the capture file, or MakeError if
    tcpdump dropped packets or captured none.

    --immediate-mode: hand each packet over at once (TPACKET_V3 otherwise holds a block up to a
    second, and stopping tcpdump would lose the end of the conversation). ``buffer_kib``: a
    larger capture buffer (-B), for programs that write hundreds of tiny segments in a burst."""
    out = c.tmp / f"{name}.pcap"
    argv = ["tcpdump", "-i", dev, "--immediate-mode", "-U"]
    if buffer_kib is not None:
        argv += ["-B", str(buffer_kib)]
    argv += ["-s", "65535", "-n", "-Z", "root", "-w", str(out), bpf]
    td = c.lab.spawn("node", argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_line(td, "listening on", 10.0)
        run()
        time.sleep(0.5)  # the last ACKs and FINs
    finally:
        c.lab.stop(td, signal.SIGINT)
    if td.stderr is not None:
        tail = td.stderr.read().decode(errors="replace")
        lines = [x.strip() for x in tail.splitlines()]
        if "0 packets dropped by kernel" not in lines or "0 packets captured" in lines:
            raise MakeError(f"tcpdump for {name} dropped packets or captured none: {tail.strip()}")
    return out
