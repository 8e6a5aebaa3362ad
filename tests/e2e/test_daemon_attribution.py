"""Who did it: the live daemon names the process, its container or pod, and the GPU it holds.

Real processes on the real kernel: a miner client run as uid 4242 inside cgroups laid out
like a Docker container and a Kubernetes pod (created under the v2 tree and removed after),
one holding an fd on an NVIDIA device path (a file bind-mounted at /dev/nvidia3 in a private
mount namespace), one in a pod network namespace routed through the node (FORWARD). Each
alert must name the exact pid, uid, container id / pod UID and device.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attribution_lab import (
    CLIENT_UID,
    MINER,
    SYSTEM_PY,
    Cgroups,
    as_client,
    in_cgroup,
    start_client,
    start_daemon_nsenter,
    with_fake_gpu,
)
from daemon_fixtures import NEEDS_KERNEL

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import policy_copy
from egressd_lab.netns import SERVICES, Lab

pytestmark = [*NEEDS_KERNEL, pytest.mark.skipif(shutil.which("nsenter") is None, reason="needs nsenter")]

POOL = SERVICES["pool"][0]
POOL6 = SERVICES["pool"][1]
EVIL_SSH = SERVICES["ssh_evil"][0]
DAEMON_UID = 4243  # an unprivileged daemon: not the client's uid, not root
POD_V4, POD_NODE_V4 = "203.0.113.130", "203.0.113.129"  # 203.0.113.128/26: no service address


class World:
    def __init__(self, lab: Lab, tmp: Path, cg: Cgroups, pod_ns: str) -> None:
        self.lab = lab
        self.tmp = tmp
        self.cg = cg
        self.pod_ns = pod_ns
        self.daemons: list[peers.Egressd] = []
        self.shared: peers.Egressd | None = None
        self.early_cgroup: tuple[str, str] = ("", "")
        self._n = 0

    def daemon(self, policy: Path | None = None) -> peers.Egressd:
        """A daemon of its own (one queue per namespace: any other daemon is stopped first)."""
        self.stop_daemons()
        self._n += 1
        d = start_daemon_nsenter(self.lab, self.tmp, policy or policy_copy(self.tmp), f"attr{self._n}")
        self.daemons.append(d)
        return d

    def unprivileged_daemon(self, caps: str) -> peers.Egressd:
        """A daemon as uid DAEMON_UID holding only ``caps``, files in a directory it owns."""
        self.stop_daemons()
        self._n += 1
        home = self.tmp / f"unpriv{self._n}"
        home.mkdir()
        os.chown(home, DAEMON_UID, DAEMON_UID)
        pol = policy_copy(self.tmp)
        d = start_daemon_nsenter(self.lab, home, pol, "d", as_user=(DAEMON_UID, caps))
        self.daemons.append(d)
        return d

    def default_daemon(self) -> peers.Egressd:
        """The daemon on the shipped policy, shared by the tests that only read its events."""
        if self.shared is None or not self.shared.alive() or self.shared not in self.daemons:
            self.shared = self.daemon()
        return self.shared

    def stop_daemons(self) -> None:
        for d in self.daemons:
            d.stop(signal.SIGTERM)
        self.daemons.clear()
        netfilter.remove(netns=self.lab.node)


def _sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="egressd-attr-"))
    os.chmod(tmp, 0o755)
    lab = Lab(f"at{os.getpid() % 100000}")
    cg: Cgroups | None = None
    pod = f"{lab.prefix}-pod"
    try:
        lab.create()
        peers.start_pool(lab, tmp, "v1", POOL, 3333, idle_timeout=3.0)
        peers.start_pool(lab, tmp, "v1", POOL6, 3333, idle_timeout=3.0)
        keys = peers.make_ssh_keys(tmp)
        peers.start_sshd(lab, tmp, keys, [(EVIL_SSH, 22)], name="sshd-attr")
        # A pod network namespace routed (and masqueraded) through the node, with a "pause"
        # process in it as Kubernetes has, so the namespace exists before any flow.
        dev_n, dev_p = f"{lab.prefix[:6]}p0", f"{lab.prefix[:6]}p1"
        _sh("ip", "netns", "add", pod)
        n, p = ["ip", "netns", "exec", lab.node], ["ip", "netns", "exec", pod]
        _sh("ip", "link", "add", dev_n, "netns", lab.node, "type", "veth", "peer", dev_p, "netns", pod)
        for ns, dev in ((n, dev_n), (p, dev_p)):
            _sh(*ns, "ip", "link", "set", "lo", "up")
            _sh(*ns, "ip", "link", "set", dev, "up")
        _sh(*n, "ip", "addr", "add", f"{POD_NODE_V4}/26", "dev", dev_n)
        _sh(*p, "ip", "addr", "add", f"{POD_V4}/26", "dev", dev_p)
        _sh(*p, "ip", "route", "add", "default", "via", POD_NODE_V4)
        _sh(*n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _sh(*n, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", f"{POD_V4}/26", "-j", "MASQUERADE")
        pause = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod}", "sleep", "600"], start_new_session=True)
        lab.procs.append(pause)  # type: ignore[arg-type]
        cg = Cgroups.create()
        w = World(lab, tmp, cg, pod)
        w.early_cgroup = cg.docker()  # exists before any daemon starts: indexed at its start
        yield w
        w.stop_daemons()
    finally:
        lab.close()
        subprocess.run(["ip", "netns", "del", pod], capture_output=True, check=False)
        if cg is not None:
            cg.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def daemon(world: World) -> peers.Egressd:
    """The daemon on the shipped default policy (started once, shared while it runs)."""
    return world.default_daemon()


RTT_MS = "30"  # the miner's wait between connect() and its subscribe: a pool's round trip


def _miner(
    w: World,
    cgroup: str,
    *extra: str,
    netns: str | None = None,
    mode: str = "stratum",
    delay: str = RTT_MS,
    pool: str = POOL,
) -> list[str]:
    argv = [SYSTEM_PY, "-c", MINER, pool, "3333", mode, delay, *extra]
    return in_cgroup(w.cg.mount, cgroup, as_client(netns or w.lab.node, argv))


WHO_FIELDS = ("process", "container", "gpu", "who_rule")


def _alert_and_who(d: peers.Egressd, pred: Any, timeout: float = 5.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one alert of the flow ``pred`` picks, and its who-fields."""
    alerts = d.wait_events(lambda e: e.get("event_type") == "alert" and pred(e), timeout)
    assert len(alerts) == 1, d.events()[-4:]
    return alerts[0], {k: alerts[0][k] for k in WHO_FIELDS if k in alerts[0]}


def _to_pool_from(port: int, pool: str = POOL) -> Any:
    return lambda e: e["dest_ip"] == pool and e["dest_port"] == 3333 and e["src_port"] == port


@pytest.mark.parametrize("pool", [POOL, POOL6], ids=["ipv4", "ipv6"])
def test_docker_container_client_alert_names_pid_uid_and_container(
    world: World, daemon: peers.Egressd, pool: str
) -> None:
    path, cid = world.cg.docker()
    c = start_client(_miner(world, path, pool=pool))
    try:
        assert c.report["result"] in ("ECONNRESET", "ECONNREFUSED"), c.report
        alert, who = _alert_and_who(daemon, _to_pool_from(c.report["port"], pool))
        assert (alert["rule"], alert["action"]) == ("drop-mining", "blocked")
        proc = who["process"]
        assert proc["pid"] == c.proc.pid == c.report["pid"]
        assert (proc["uid"], proc["name"]) == (CLIENT_UID, "python3")
        assert proc["executable"].startswith("/usr/bin/python3")
        cmd = proc["command_line"]
        assert cmd.startswith(f"{SYSTEM_PY} -c ") and len(cmd) <= 1024, cmd
        assert cmd.endswith(f"{pool} 3333 stratum {RTT_MS}") or cmd.endswith("…"), cmd
        assert proc["cgroup"] == path
        assert proc["ppid"] > 1
        assert who["container"] == {"id": cid, "runtime": "docker"}
        assert "gpu" not in who
    finally:
        c.finish()


def test_kubernetes_pod_client_alert_names_pod_uid_and_container(world: World, daemon: peers.Egressd) -> None:
    path, pod, cid = world.cg.kubepod()
    c = start_client(_miner(world, path))
    try:
        alert, who = _alert_and_who(daemon, _to_pool_from(c.report["port"]))
        assert alert["rule"] == "drop-mining"
        assert (who["process"]["pid"], who["process"]["uid"]) == (c.report["pid"], CLIENT_UID)
        assert who["container"] == {"id": cid, "runtime": "containerd", "pod_uid": pod}
        assert who["process"]["unit"] == f"cri-containerd-{cid}.scope"
    finally:
        c.finish()


def test_gpu_holding_miner_names_the_device_at_top_severity(world: World, daemon: peers.Egressd) -> None:
    path, cid = world.cg.docker()
    backing = world.tmp / "fake-gpu"
    backing.write_bytes(b"")
    argv = [SYSTEM_PY, "-c", MINER, POOL, "3333", "stratum", RTT_MS, "/dev/nvidia3"]
    gpu_client = with_fake_gpu("/dev/nvidia3", backing, as_client(world.lab.node, argv))
    c = start_client(in_cgroup(world.cg.mount, path, gpu_client))
    try:
        alert, who = _alert_and_who(daemon, _to_pool_from(c.report["port"]))
        assert alert["rule"] == "drop-mining" and alert["alert"]["severity"] == 1
        assert who["process"]["pid"] == c.report["pid"]
        assert who["gpu"]["devices"] == ["/dev/nvidia3"]
        assert who["gpu"]["source"] == "proc-fd" and who["gpu"]["held_by"] == "process"
        assert who["container"]["id"] == cid
        assert who["who_rule"] == "gpu-mining-or-tunnel"
    finally:
        c.finish()


def test_pod_network_namespace_client_forwarded_through_the_node_is_attributed(
    world: World, daemon: peers.Egressd
) -> None:
    path, pod, cid = world.cg.kubepod()
    c = start_client(_miner(world, path, netns=world.pod_ns))
    try:
        assert c.report["result"] in ("ECONNRESET", "ECONNREFUSED"), c.report
        alert, who = _alert_and_who(
            daemon, lambda e: e["src_ip"] == POD_V4 and e["src_port"] == c.report["port"] and e["dest_port"] == 3333
        )
        assert alert["rule"] == "drop-mining"
        assert (who["process"]["pid"], who["process"]["uid"]) == (c.report["pid"], CLIENT_UID)
        assert who["container"] == {"id": cid, "runtime": "containerd", "pod_uid": pod}
    finally:
        c.finish()


def test_process_that_exits_right_after_connecting_event_says_what_was_found(
    world: World, daemon: peers.Egressd
) -> None:
    path, cid = world.cg.docker()
    p = subprocess.run(_miner(world, path, mode="exit"), capture_output=True, text=True, timeout=15)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.splitlines()[0])
    alert, who = _alert_and_who(daemon, _to_pool_from(report["port"]), timeout=10.0)
    assert alert["rule"] == "drop-mining"
    proc = who["process"]
    # The process is gone: no pid, and a reason.
    assert "pid" not in proc and proc.get("unknown"), proc
    if "container" in who:
        # What the socket and its cgroup still said when the lookup ran is there, exactly.
        assert "exited" in proc["unknown"], proc
        assert proc["uid"] == CLIENT_UID and proc["cgroup"] == path
        assert who["container"] == {"id": cid, "runtime": "docker"}
    else:
        # Seen once in ~5 full-suite runs: the socket and its cgroup were gone before either
        # lookup ran. The event must then say so rather than omit the process silently.
        assert proc.keys() <= {"unknown", "uid", "cgroup"}, proc


def test_dropped_before_its_process_was_named_the_alert_says_what_sock_diag_knew(
    world: World, daemon: peers.Egressd
) -> None:
    """No round trip between connect() and the subscribe (a lab, not the internet): the drop
    may come before the lookup started at the SYN names the process. The alert is written
    before the verdict all the same, with the socket's uid, cgroup and container and the
    reason; ``egressd status`` shows the process once the worker has it."""
    path, cid = world.early_cgroup
    c = start_client(_miner(world, path, delay="0"))
    try:
        alert, who = _alert_and_who(daemon, _to_pool_from(c.report["port"]))
        assert alert["rule"] == "drop-mining"
        proc = who["process"]
        assert proc["uid"] == CLIENT_UID and proc["cgroup"] == path
        assert who["container"] == {"id": cid, "runtime": "docker"}
        if "pid" in proc:  # the lookup won the race after all: then it is exact
            assert proc["pid"] == c.report["pid"]
        else:
            assert proc["unknown"].startswith("process not named in time"), proc
            recent: list[dict[str, Any]] = []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                recent = [
                    r for r in daemon.status()["attribution"]["recent_alerts"] if r["flow_id"] == alert["flow_id"]
                ]
                if recent and recent[0]["process"].get("pid") == c.report["pid"]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"status never named pid {c.report['pid']}: {recent}")
    finally:
        c.finish()


WG_CLIENT = r"""
import json, os, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected, as wireguard-go's
s.bind(("0.0.0.0", 0))
# A WireGuard handshake initiation (type 1, three zero bytes, 144 more): 148 bytes.
s.sendto(b"\x01\x00\x00\x00" + os.urandom(144), (sys.argv[1], 51820))
print(json.dumps({"pid": os.getpid(), "port": s.getsockname()[1]}), flush=True)
select.select([sys.stdin], [], [], 20)
"""


def test_a_udp_flow_dropped_at_its_first_datagram_names_its_process(world: World) -> None:
    """Conntrack never confirms the entry of a UDP flow dropped at its first datagram, so it
    announces nothing and no lookup starts before the drop; the drop starts one and waits for
    it (bounded). The operator's choice the shipped policy offers: VPN tunnels dropped."""

    def edit(text: str) -> str:
        anchor = "      detection: tunnel\n    action: alert\n"
        assert anchor in text
        return text.replace(anchor, "      detection: tunnel\n    action: drop\n", 1)

    d = world.daemon(policy_copy(world.tmp, edit))
    path, cid = world.cg.docker()
    c = start_client(in_cgroup(world.cg.mount, path, as_client(world.lab.node, [SYSTEM_PY, "-c", WG_CLIENT, POOL])))
    try:
        alert, who = _alert_and_who(
            d, lambda e: e["proto"] == "UDP" and e["dest_port"] == 51820 and e["src_port"] == c.report["port"]
        )
        assert (alert["rule"], alert["action"]) == ("alert-vpn-tunnels", "blocked"), alert
        assert (who["process"].get("pid"), who["process"].get("uid")) == (c.report["pid"], CLIENT_UID), who
        assert who["container"] == {"id": cid, "runtime": "docker"}
        assert d.status()["attribution"]["drop_waits"]["lookups_started_by_the_drop"] >= 1
    finally:
        c.finish()
        world.stop_daemons()


# -- containment (respond:) ---------------------------------------------------------------------
COUNTER = "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('x')\n    time.sleep(0.02)\n"


def _respond_policy(world: World, how: str) -> Path:
    def edit(text: str) -> str:
        anchor = "    match:\n      detection: mining\n    action: drop\n"
        assert anchor in text
        return text.replace(anchor, anchor + f"    respond: {how}\n", 1)

    return policy_copy(world.tmp, edit)


def _grows(path: Path, wait: float = 0.4) -> bool:
    before = path.stat().st_size if path.exists() else 0
    time.sleep(wait)
    return (path.stat().st_size if path.exists() else 0) > before


def _response(d: peers.Egressd, pid: int, timeout: float = 4.0) -> dict[str, Any]:
    got = d.wait_events(lambda e: e.get("event_type") == "response" and e["response"].get("pid") == pid, timeout)
    assert len(got) == 1, d.events()[-3:]
    return got[0]


@pytest.fixture
def responder_cgroups(world: World) -> Iterator[tuple[str, str]]:
    """The offender's cgroup and a sibling cgroup, each with a counter process (its file grows
    while it runs)."""
    off, _ = world.cg.docker()
    sib, _ = world.cg.docker()
    yield off, sib
    for path in (off, sib):
        with contextlib.suppress(OSError):
            Path(f"{world.cg.mount}{path}/cgroup.freeze").write_text("0")


def _counter(world: World, cgroup: str, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    f = world.tmp / name
    p = subprocess.Popen(in_cgroup(world.cg.mount, cgroup, [SYSTEM_PY, "-c", COUNTER, str(f)]), start_new_session=True)
    world.lab.procs.append(p)
    deadline = time.monotonic() + 5
    while not f.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return p, f


def test_respond_freeze_freezes_exactly_the_offending_cgroup(world: World, responder_cgroups: tuple[str, str]) -> None:
    off, sib = responder_cgroups
    d = world.daemon(_respond_policy(world, "freeze"))
    try:
        _, mate_file = _counter(world, off, "mate")  # another process of the offender's cgroup
        _, sib_file = _counter(world, sib, "sibling")  # a process of a sibling cgroup
        # Not start_client: the freeze may well come before the miner prints its report.
        miner = subprocess.Popen(_miner(world, off), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        world.lab.procs.append(miner)
        try:
            r = _response(d, miner.pid)  # nsenter, setpriv and python exec: the pid stays
            assert r["response"] == {"action": "freeze", "pid": miner.pid, "cgroup": off, "result": "done"}
            assert r["rule"] == "drop-mining" and r["process"]["pid"] == miner.pid
            assert world.cg.events(off)["frozen"] == "1"
            assert world.cg.events(sib)["frozen"] == "0"
            assert not _grows(mate_file), "a process of the frozen cgroup kept running"
            assert _grows(sib_file), "a process of a sibling cgroup stopped"
            assert d.status()["pid"] == d.proc.pid  # the daemon answers: not frozen
            parent = off.rsplit("/", 1)[0]
            assert world.cg.events(parent)["frozen"] == "0"  # never a cgroup above the offender's
        finally:
            Path(f"{world.cg.mount}{off}/cgroup.freeze").write_text("0")
            assert miner.stdin is not None and miner.stdout is not None
            miner.stdin.close()
            assert miner.wait(10) == 0
            # Thawed, it carries on: its connect() had been reset by the drop.
            assert json.loads(miner.stdout.readline())["result"] in ("ECONNRESET", "ECONNREFUSED")
    finally:
        world.stop_daemons()


def test_respond_kill_kills_exactly_the_offender(world: World, responder_cgroups: tuple[str, str]) -> None:
    off, _ = responder_cgroups
    d = world.daemon(_respond_policy(world, "kill"))
    try:
        mate, mate_file = _counter(world, off, "mate-k")
        miner = subprocess.Popen(_miner(world, off), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        world.lab.procs.append(miner)
        try:
            r = _response(d, miner.pid)
            assert r["response"] == {"action": "kill", "pid": miner.pid, "signal": "SIGKILL", "result": "done"}
            assert miner.wait(3) == -signal.SIGKILL
            assert mate.poll() is None and _grows(mate_file), "another process of the cgroup was killed"
            assert d.alive()
        finally:
            if miner.poll() is None:
                miner.kill()
                miner.wait(5)
    finally:
        world.stop_daemons()


# -- the reply-side gap -----------------------------------------------------------------------------
SSH_WAITER = r"""
import errno, json, socket, sys, time
s = socket.create_connection((sys.argv[1], 22), timeout=5)
t = time.monotonic()
try:
    data = s.recv(4096)
    res = "data" if data else "eof"
except OSError as e:
    res = errno.errorcode.get(e.errno, "") if e.errno else type(e).__name__
print(json.dumps({"result": res, "secs": round(time.monotonic() - t, 3), "port": s.getsockname()[1]}), flush=True)
"""


def test_drop_decided_on_a_reply_aborts_the_local_socket_at_once(world: World, daemon: peers.Egressd) -> None:
    """The client only reads: the first bytes are the server's SSH banner, a reply, and the
    drop is decided on it. Without SOCK_DESTROY the client would wait for its own timeout
    (here 5 s, socket.timeout); with it, recv() fails with ECONNABORTED."""
    path, _ = world.cg.docker()
    argv = in_cgroup(world.cg.mount, path, as_client(world.lab.node, [SYSTEM_PY, "-c", SSH_WAITER, EVIL_SSH]))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["result"] == "ECONNABORTED", (rep, p.stderr)
    alert, who = _alert_and_who(daemon, lambda e: e["src_port"] == rep["port"] and e["dest_port"] == 22)
    assert (alert["rule"], alert["action"]) == ("drop-ssh-unlisted", "blocked")
    assert who["process"]["uid"] == CLIENT_UID
    assert daemon.status()["attribution"]["sockets_destroyed"] >= 1


# -- least privilege --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("caps", "named"),
    [("+net_admin", False), ("+net_admin,+sys_ptrace,+dac_read_search", True)],
    ids=["net_admin-only", "with-ptrace-and-dac-read-search"],
)
def test_unprivileged_daemon_attributes_what_its_capabilities_allow(world: World, caps: str, named: bool) -> None:
    """CAP_NET_ADMIN alone: uid, cgroup and container still come from sock_diag's cgroup id
    and the cgroup tree, and the event says why the process is not named. With the two
    read-only capabilities of the systemd unit: the process is named."""
    d = world.unprivileged_daemon(caps)
    path, cid = world.cg.docker()
    c = start_client(_miner(world, path))
    try:
        alert, ev = _alert_and_who(d, _to_pool_from(c.report["port"]))
        assert alert["rule"] == "drop-mining"
        assert ev["container"] == {"id": cid, "runtime": "docker"}
        proc = ev["process"]
        assert (proc["uid"], proc["cgroup"]) == (CLIENT_UID, path)
        if named:
            assert proc["pid"] == c.report["pid"] and proc["executable"].startswith(SYSTEM_PY)
        else:
            assert "pid" not in proc and "CAP_SYS_PTRACE" in proc["unknown"], proc
            assert "CAP_DAC_READ_SEARCH" in ev["gpu"]["unknown"]  # not "no GPU": it could not look
    finally:
        c.finish()
        world.stop_daemons()
