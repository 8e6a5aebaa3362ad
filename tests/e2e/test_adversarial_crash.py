"""The live daemon under faults: kill -9 mid-traffic and restart; its event log under crash,
rotation, truncation and a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egressd_lab import peers
from egressd_lab.harness import (
    BULK_V4,
    DNS_V4,
    NODE_V4,
    POOL_V4,
    PY,
    Ctl,
    adv_lab,
    inet_count,
    inet_counter,
    kill9,
    live,
    stratum,
    write_policy,
)
from egressd_lab.netns import Lab

pytestmark = live


@pytest.fixture
def alab() -> Iterator[Lab]:
    with adv_lab() as lb:
        yield lb


# A miner that connects now and sends its subscribe only when told to ("go").
HELD_MINER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)
print("connected", flush=True)
sys.stdin.readline()
try:
    s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
    s.settimeout(3)
    print("reply" if s.recv(4096) else "closed", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""

# One UDP socket (one flow) sending a DNS query for each name it is given.
DNS_ONE_SOCKET = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i, line in enumerate(sys.stdin):
    name = line.strip()
    q = struct.pack("!HHHHHH", 0x4000 + i, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    try:
        s.sendto(q, (sys.argv[1], 53))
        print("sent", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
"""

CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1.5); print('ok')"


# -- 4. kill -9 mid-traffic, then restart --------------------------------------------------------
@dataclass
class CrashRun:
    fail: str
    transfer_ok: bool = False
    transfer_err: str = ""
    down_stratum: dict[str, Any] = field(default_factory=dict)
    down_connect_ok: bool = False
    held_answer: str = ""
    held_events: list[dict[str, Any]] = field(default_factory=list)
    dns_before: int = 0
    dns_down: int = 0
    dns_after: int = 0
    pool_requests_down: int = 0
    pool_requests_after_restart: int = 0
    restarted_alive: bool = False


def run_crash(lb: Lab, tmp: Path, fail: str) -> CrashRun:
    res = CrashRun(fail)
    pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
    blob = peers.make_bulk_file(tmp / "www", 2 * 1024 * 1024)
    peers.start_http_server(lb, tmp, blob.path.parent, BULK_V4, 80)
    inet_counter(lb, ["-p", "udp", "-s", NODE_V4, "-d", DNS_V4, "--dport", "53"])
    pol = write_policy(tmp, top={"fail": fail})
    d = peers.start_egressd(lb, tmp, pol)

    # Pinned ALLOW before the kill: a rate-limited download that spans the outage (~5 s).
    curl = lb.spawn(
        "node",
        ["sh", "-c", f"curl -sS --limit-rate 400k --max-time 30 http://{BULK_V4}/blob.bin | sha256sum"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Pinned DENY before the kill: one UDP flow that asked a harmless name, then a pool's name.
    dns = Ctl(lb, "node", DNS_ONE_SOCKET, DNS_V4)
    assert dns.ask("lab-probe.example.net") == "sent"
    time.sleep(0.2)
    assert dns.ask("xmr.nanopool.org") == "sent"
    # Mid-classification at the kill: connected to the pool, nothing sent yet.
    held = Ctl(lb, "node", HELD_MINER, POOL_V4, "3333")
    assert held.line() == "connected"
    time.sleep(0.5)
    res.dns_before = inet_count(lb, "dpt:53")

    kill9(d)
    time.sleep(0.3)
    mark = pool.mark()
    res.down_stratum = stratum(lb, POOL_V4, 3333, timeout=2)
    res.down_connect_ok = lb.run_node([PY, "-c", CONNECT, POOL_V4, "3333"]).stdout.strip() == "ok"
    dns.ask("xmr.nanopool.org")
    time.sleep(0.2)
    res.dns_down = inet_count(lb, "dpt:53")
    res.pool_requests_down = len(pool.requests(mark))

    d2 = peers.start_egressd(lb, tmp, pol, name="egressd2")
    res.restarted_alive = d2.alive()
    mark = pool.mark()
    res.held_answer = held.ask("go")
    dns.ask("xmr.nanopool.org")
    time.sleep(0.3)
    res.dns_after = inet_count(lb, "dpt:53")
    res.held_events = [e for e in d2.events() if e.get("dest_port") == 3333]
    res.pool_requests_after_restart = len(pool.requests(mark))

    out, err = curl.communicate(timeout=40)
    lb.procs.remove(curl)
    res.transfer_ok = out.decode().split()[:1] == [blob.sha256]
    res.transfer_err = err.decode()
    held.close()
    dns.close()
    d2.stop()
    return res


@pytest.fixture(scope="module")
def crash_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashRun]:
    with adv_lab() as lb:
        res = run_crash(lb, tmp_path_factory.mktemp("crash_open"), "open")
    yield res  # the lab is gone: the next scenario may use the prefix


@pytest.fixture(scope="module")
def crash_closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashRun]:
    with adv_lab() as lb:
        res = run_crash(lb, tmp_path_factory.mktemp("crash_closed"), "closed")
    yield res  # the lab is gone: the next scenario may use the prefix


def test_killed_fail_open_daemon_lets_new_connections_pass(crash_open: CrashRun) -> None:
    """fail: open means exactly this: with egressd dead, new egress (a miner too) passes."""
    assert crash_open.down_connect_ok
    assert crash_open.down_stratum["handshake_complete"], crash_open.down_stratum


def test_killed_fail_closed_daemon_blocks_new_connections(crash_closed: CrashRun) -> None:
    assert not crash_closed.down_connect_ok
    assert not crash_closed.down_stratum["handshake_complete"]
    assert crash_closed.pool_requests_down == 0


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_allow_pinned_transfer_survives_kill_and_restart(mode: str, request: pytest.FixtureRequest) -> None:
    run: CrashRun = request.getfixturevalue(f"crash_{mode}")
    assert run.transfer_ok, run.transfer_err


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_deny_pinned_flow_stays_dead_while_down_and_after_restart(
    mode: str, request: pytest.FixtureRequest
) -> None:
    run: CrashRun = request.getfixturevalue(f"crash_{mode}")
    assert run.dns_before == 1, "only the harmless query of the flow may have left"
    assert run.dns_down == 1 and run.dns_after == 1


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_connection_open_across_restart_is_judged_midstream_and_blocked(
    mode: str, request: pytest.FixtureRequest
) -> None:
    run: CrashRun = request.getfixturevalue(f"crash_{mode}")
    assert run.restarted_alive
    assert run.held_answer.startswith("error"), run.held_answer
    assert run.pool_requests_after_restart == 0
    blocked = [e for e in run.held_events if e["action"] == "blocked"]
    assert blocked and blocked[0]["midstream"] is True and blocked[0]["rule"] == "drop-mining", (
        run.held_events
    )


# -- 5. the event log ---------------------------------------------------------------------------
# Sends a subscribe and, the moment the reset arrives, SIGKILLs the daemon: the narrowest
# window between a verdict the miner can observe and the event that explains it.
KILL_ON_RESET = r"""
import os, signal, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)
s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
s.settimeout(3)
try:
    s.recv(4096)
    print("answered", flush=True)
except ConnectionResetError:
    os.kill(int(sys.argv[3]), signal.SIGKILL)
    print("killed", flush=True)
"""


def test_alert_is_on_disk_after_kill_9(alab: Lab, tmp_path: Path) -> None:
    peers.start_pool(alab, tmp_path, "v1", POOL_V4, 3333)
    d = peers.start_egressd(alab, tmp_path, write_policy(tmp_path))
    assert stratum(alab, POOL_V4, 3333)["handshake_complete"] is False
    deadline = time.monotonic() + 2
    while not d.events() and time.monotonic() < deadline:
        time.sleep(0.01)
    kill9(d)
    evs = d.events()
    assert [e["rule"] for e in evs] == ["drop-mining"]


def test_alert_survives_kill_9_the_instant_the_miner_sees_the_reset(alab: Lab, tmp_path: Path) -> None:
    peers.start_pool(alab, tmp_path, "v1", POOL_V4, 3333)
    pol = write_policy(tmp_path)
    lost = 0
    for i in range(8):
        d = peers.start_egressd(alab, tmp_path, pol, name=f"egressd{i}")
        r = alab.run_node([PY, "-c", KILL_ON_RESET, POOL_V4, "3333", str(d.proc.pid)])
        assert r.stdout.strip() == "killed", r.stdout + r.stderr
        d.proc.wait(5)
        alab.procs.remove(d.proc)
        if not [e for e in d.events() if e.get("rule") == "drop-mining"]:
            lost += 1
    assert lost == 0, f"{lost} of 8 alerts lost"


def _decide(lb: Lab) -> None:
    """One decision the policy writes an event for (a blocked Stratum handshake)."""
    assert not stratum(lb, POOL_V4, 3333)["handshake_complete"]


def _lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert b"\0" not in raw, "the log has a hole"
    return [json.loads(x) for x in raw.splitlines()]


def test_event_log_follows_a_rename_within_two_seconds(alab: Lab, tmp_path: Path) -> None:
    peers.start_pool(alab, tmp_path, "v1", POOL_V4, 3333)
    d = peers.start_egressd(alab, tmp_path, write_policy(tmp_path))
    _decide(alab)
    time.sleep(0.2)
    rotated = d.events_path.with_suffix(".1")
    d.events_path.rename(rotated)
    time.sleep(2.1)
    _decide(alab)
    time.sleep(0.3)
    assert len(_lines(rotated)) == 1
    assert d.events_path.exists(), "no new file at the configured path"
    assert [e["rule"] for e in _lines(d.events_path)] == ["drop-mining"]


def test_event_log_follows_truncation_without_a_hole(alab: Lab, tmp_path: Path) -> None:
    peers.start_pool(alab, tmp_path, "v1", POOL_V4, 3333)
    d = peers.start_egressd(alab, tmp_path, write_policy(tmp_path))
    for _ in range(3):
        _decide(alab)
    time.sleep(0.2)
    os.truncate(d.events_path, 0)
    time.sleep(2.1)
    _decide(alab)
    time.sleep(0.3)
    assert [e["rule"] for e in _lines(d.events_path)] == ["drop-mining"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "egadv-full", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    return filler


def test_full_disk_does_not_stop_enforcement_and_is_reported(alab: Lab, tmp_path: Path) -> None:
    pool = peers.start_pool(alab, tmp_path, "v1", POOL_V4, 3333)
    with small_tmpfs(tmp_path / "full") as full:
        d = peers.start_egressd(alab, tmp_path, write_policy(tmp_path), events=full / "events.jsonl")
        _decide(alab)
        filler = _fill(full)
        st = d.status()
        for _ in range(10):  # the log's last page still has room for a few lines
            _decide(alab)
            st = d.status()
            if st["events"]["errors"]:
                break
        assert pool.requests() == []
        assert st["events"]["errors"] > 0 and "space" in st["events"]["last_error"].lower(), st["events"]
        assert d.alive()
        # Space again: the log resumes with whole lines.
        filler.unlink()
        _decide(alab)
        time.sleep(0.3)
        rules = [e["rule"] for e in _lines(d.events_path)]
        assert rules[0] == "drop-mining" and rules[-1] == "drop-mining"
        d.stop()
