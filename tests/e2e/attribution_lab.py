"""Helpers of the attribution end-to-end tests: cgroups laid out like runtimes, clients in them.

Why the daemon is started with ``nsenter --net`` and not ``ip netns exec``: the latter gives
the program a private mount namespace with ``/sys`` remounted for the target namespace, so
it would see no cgroup tree at all. On a node the daemon runs in the host's namespaces; here
it shares the host's mount namespace (``/proc``, ``/sys/fs/cgroup``) and only its network
namespace is the lab's node.

Cgroups are created under the v2 hierarchy (found in ``/proc/self/mountinfo``; on hybrid
hosts ``/sys/fs/cgroup/unified``) below a directory unique to the test run, and removed with
whatever processes the test left in them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.attribution.cgroup import v2_mount
from egressd_lab import peers
from egressd_lab.netns import Lab

CLIENT_UID = 4242
SYSTEM_PY = "/usr/bin/python3"  # stdlib only: uid 4242 needs nothing from the repository

# A miner as a test sees it: connect, wait ``delay_ms`` (the round trip to a pool on the
# internet: on a real network the first data segment follows the SYN by at least one), send a
# Stratum subscribe, report what happened, then stay alive (a real miner retries) until its
# stdin closes or 20 s pass.
MINER = r"""
import json, os, select, socket, sys, time
host, port, mode, delay_ms = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
gpu = None
if len(sys.argv) > 5:
    gpu = os.open(sys.argv[5], os.O_RDONLY)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(5)
rep = {"pid": os.getpid(), "uid": os.getuid()}
t = time.monotonic()
try:
    s.connect((host, port))
    rep["port"] = s.getsockname()[1]
    if mode == "exit":
        # Corked: the subscribe leaves the node only when exit closes the socket, so the
        # process is surely gone before egressd sees a byte of this flow. The report (pid and
        # port, which name the flow) goes out first: nothing is printed after the exit.
        print(json.dumps(rep), flush=True)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
        os._exit(0)
    time.sleep(delay_ms / 1000)
    if mode == "stratum":
        s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
    data = s.recv(4096)
    rep["result"] = "data" if data else "eof"
except OSError as e:
    import errno
    rep["result"] = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
rep["secs"] = round(time.monotonic() - t, 3)
print(json.dumps(rep), flush=True)
select.select([sys.stdin], [], [], 20)
"""


@dataclass
class Cgroups:
    """Test cgroups under one run-unique parent; ``close`` empties and removes them all."""

    mount: str
    parent: str  # path relative to the mount, e.g. /egressd-test-123
    made: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> Cgroups:
        mount = v2_mount()
        assert mount is not None, "no cgroup-v2 hierarchy mounted"
        cg = cls(mount, f"/egressd-test-{os.getpid()}-{secrets.token_hex(3)}")
        cg.make("")
        return cg

    def abs(self, rel: str) -> str:
        return f"{self.mount}{self.parent}{rel}"

    def make(self, rel: str) -> str:
        """Create ``parent + rel`` (and the levels above it); returns its cgroup path."""
        path = ""
        for part in [p for p in rel.split("/") if p] or [""]:
            path = f"{path}/{part}" if part else path
            d = self.abs(path)
            if not os.path.isdir(d):
                os.mkdir(d)
                self.made.append(path)
        return f"{self.parent}{rel}"

    def docker(self) -> tuple[str, str]:
        cid = secrets.token_hex(32)
        return self.make(f"/system.slice/docker-{cid}.scope"), cid

    def kubepod(self) -> tuple[str, str, str]:
        pod, cid = str(uuid.uuid4()), secrets.token_hex(32)
        u = pod.replace("-", "_")
        rel = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{cid}.scope"
        return self.make(rel), pod, cid

    def procs(self, path: str) -> list[int]:
        with open(f"{self.mount}{path}/cgroup.procs") as f:
            return [int(x) for x in f.read().split()]

    def events(self, path: str) -> dict[str, str]:
        with open(f"{self.mount}{path}/cgroup.events") as f:
            return dict(line.split() for line in f if line.strip())

    def close(self) -> None:
        """Thaw, kill what is left (by pid, only in our cgroups), remove deepest first."""
        for rel in sorted(self.made, key=len, reverse=True):
            d = self.abs(rel)
            with contextlib.suppress(OSError):
                Path(d, "cgroup.freeze").write_text("0")
            for _ in range(50):
                try:
                    pids = [int(x) for x in Path(d, "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            with contextlib.suppress(OSError):
                os.rmdir(d)


def in_cgroup(mount: str, path: str, argv: list[str]) -> list[str]:
    """``argv`` started inside cgroup ``path`` (the shell moves itself, then execs)."""
    return ["sh", "-c", f'echo $$ > "{mount}{path}/cgroup.procs" && exec "$@"', "sh", *argv]


def as_client(netns: str, argv: list[str], uid: int = CLIENT_UID) -> list[str]:
    """``argv`` in network namespace ``netns`` as ``uid`` (nsenter execs: the pid stays)."""
    return [
        "nsenter",
        f"--net=/run/netns/{netns}",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        *argv,
    ]


def with_fake_gpu(device: str, backing: Path, argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace where ``device`` (e.g. /dev/nvidia3) is a file
    bind-mounted over a fresh tmpfs /dev: the host's /dev is untouched."""
    script = (
        "mount --make-rprivate / && mount -t tmpfs -o size=64k,mode=755 egdgpu /dev && "
        f'touch "{device}" && mount --bind "{backing}" "{device}" && chmod 666 "{device}" && exec "$@"'
    )
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]


@dataclass
class Client:
    proc: subprocess.Popen[str]
    report: dict[str, Any]

    def finish(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_client(argv: list[str], timeout: float = 10.0) -> Client:
    """Start a MINER-style client; returns once it printed its report (or raises)."""
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert p.stdout is not None
    line = ""
    deadline = time.monotonic() + timeout
    import select

    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline()
            break
        if p.poll() is not None:
            break
    if not line:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        err = p.stderr.read() if p.stderr and p.poll() is not None else ""
        raise AssertionError(f"client printed no report (exit {p.poll()}): {err}")
    return Client(p, json.loads(line))


def start_daemon_nsenter(
    lab: Lab, tmp: Path, policy: Path, name: str, extra: list[str] | None = None, as_user: tuple[int, str] | None = None
) -> peers.Egressd:
    """``egressd run`` in the lab's node network namespace, host mount namespace.

    ``as_user`` (uid, caps such as "+net_admin"): run it unprivileged, holding exactly those
    capabilities (inheritable, ambient and bounding set), as the systemd unit does."""
    events, sock, err = tmp / f"{name}.events.jsonl", tmp / f"{name}.sock", tmp / f"{name}.stderr"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    user: list[str] = []
    if as_user is not None:
        uid, caps = as_user
        user = [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps=-all,{caps}",
            f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{caps}",
        ]  # fmt: skip
    argv = [
        "nsenter", f"--net=/run/netns/{lab.node}", *user, *peers.egressd_argv(), "run", "--policy", str(policy),
        "--events", str(events), "--status-socket", str(sock), *(extra or []),
    ]  # fmt: skip
    with open(err, "ab") as fh:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=fh, stdin=subprocess.DEVNULL, start_new_session=True
        )
    lab.procs.append(proc)
    d = peers.Egressd(lab, proc, policy, events, sock, err)
    deadline = time.monotonic() + 20
    while True:
        if not d.alive():
            raise AssertionError(f"egressd run exited ({proc.returncode}): {d.stderr_text()[-1500:]}")
        if sock.exists():
            with contextlib.suppress(OSError, ValueError):
                d.status(timeout=1.0)
                return d
        if time.monotonic() > deadline:
            d.stop(signal.SIGKILL)
            raise AssertionError(f"egressd did not answer: {d.stderr_text()[-1500:]}")
        time.sleep(0.05)
