"""The adversarial load scenarios against the live daemon: flood, queue overflow, reload storm.

Why here and not in the test module: tests/e2e/test_adversarial_load.py runs 3-second slices
of each scenario and asserts on the results, ``bench/flood.py`` runs the same scenarios for
longer and prints the curves; one implementation keeps the two measuring the same thing.
Each function starts what it needs in the given lab (peers, the daemon) and returns what was
measured; everything is bounded in time and count.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd_lab import peers
from egressd_lab.harness import (
    BULK_V4,
    FLOOD,
    HOLD_SERVER,
    NODE_V4,
    POOL_V4,
    SINK_V4,
    UDP_PORTS_BURST,
    finish,
    inet_count,
    inet_counter,
    queue_rule_hits,
    rss_kb,
    spawn_inet_py,
    spawn_node_py,
    stratum,
    wait_status,
    write_policy,
)
from egressd_lab.netns import Lab

FLOOD_S = 3.0  # CI slice; bench/flood.py runs the long one
# The flood lasts at least FLOOD_S and in any case until the Stratum attempts made under it are
# over (a loaded machine makes them slowly), within FLOOD_MAX_S: whether the attempts met a
# running flood is decided by the order of events, not by a timing guess.
FLOOD_MAX_S = 60.0
MAX_FLOWS = 256


# -- 1. unique-tuple flood against a small flow table ----------------------------------------
@dataclass
class FloodRun:
    on_overload: str
    rss_before: int = 0
    rss_after: int = 0
    generator: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    status_mid: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    flood_running_after_attempts: bool = False
    pool_requests: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    log_bytes: int = 0


def run_flood(lb: Lab, tmp: Path, on_overload: str, seconds: float = FLOOD_S) -> FloodRun:
    """Hold-open TCP connections + unanswered DNS datagrams, all from fresh source ports, at a
    daemon whose table holds 256 flows; three Stratum handshakes start one second in."""
    res = FloodRun(on_overload)
    pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
    spawn_inet_py(lb, HOLD_SERVER, BULK_V4, "8080", str(max(seconds, FLOOD_MAX_S) + 20))
    peers.wait_listening(lb, "inet", [(BULK_V4, 8080)])
    pol = write_policy(tmp, top={"on_overload": on_overload}, settings={"max_flows": MAX_FLOWS})
    d = peers.start_egressd(lb, tmp, pol)
    time.sleep(1.2)  # one housekeeping tick: the daemon is fully warmed up
    res.rss_before = rss_kb(d.proc.pid)
    stop_file = tmp / f"flood-{on_overload}.stop"
    cap = max(seconds, FLOOD_MAX_S)
    t0 = time.monotonic()
    gen = spawn_node_py(lb, FLOOD, BULK_V4, "8080", "53", str(cap), "200000", "200000", str(stop_file))
    time.sleep(1.0)
    res.status_mid = d.status()
    res.attempts = [stratum(lb, POOL_V4, 3333, timeout=2) for _ in range(3)]
    res.flood_running_after_attempts = gen.poll() is None
    time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    stop_file.touch()
    res.generator = finish(lb, gen, timeout=cap + 30)
    res.status = wait_status(d, lambda s: s["kernel_queue"] is not None)
    res.rss_after = rss_kb(d.proc.pid)
    res.pool_requests = len(pool.requests())
    res.events = d.events()
    res.log_bytes = d.events_path.stat().st_size
    d.stop()
    return res



# -- queue overflow with a tiny queue ---------------------------------------------------------
BURST_PORT = 20000  # the burst goes to ports 20000..59999 of SINK_V4, one flow per datagram
BURST_MAX = 400_000


@dataclass
class QueueRun:
    fail: str
    sent: int = 0
    delivered: int = 0
    judged: int = 0
    rule_hits: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    pool_requests: int = 0


def run_queue_overflow(
    lb: Lab, tmp: Path, fail: str, seconds: float = FLOOD_S, queue_len: int = 8
) -> QueueRun:
    """UDP datagrams to distinct ports (each a new flow) as fast as one process sends them at a
    daemon with ``queue_len`` 8, for ``seconds``; meanwhile miners try Stratum with the request
    cut into 1-byte segments (every segment is one more chance to meet a full queue)."""
    res = QueueRun(fail)
    pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
    inet_counter(lb, ["-p", "udp", "-s", NODE_V4, "--dport", f"{BURST_PORT}:{BURST_PORT + 39999}"])
    pol = write_policy(tmp, top={"fail": fail, "on_overload": "drop"}, settings={"queue_len": queue_len})
    d = peers.start_egressd(lb, tmp, pol)
    st0 = wait_status(d, lambda s: s["kernel_queue"] is not None)
    hits0 = queue_rule_hits(lb)
    gen = spawn_node_py(lb, UDP_PORTS_BURST, SINK_V4, str(BURST_PORT), str(BURST_MAX), str(seconds))
    time.sleep(0.2)
    while gen.poll() is None:
        res.attempts.append(stratum(lb, POOL_V4, 3333, "--split", "1", "--split-delay", "0.001", timeout=2))
    res.sent = int(finish(lb, gen, timeout=seconds + 30))
    time.sleep(1.1)  # let the kernel counters in the status refresh once more
    res.status = d.status()
    res.delivered = inet_count(lb)
    res.rule_hits = queue_rule_hits(lb) - hits0
    res.judged = res.status["engine"]["packets"] - st0["engine"]["packets"]
    res.pool_requests = len(pool.requests())
    d.stop()
    return res



# -- reload storm ------------------------------------------------------------------------------
STORM_SIGHUPS = 300
STORM_RATE = 100.0  # SIGHUPs per second (bounded)
# The storm goes on past STORM_SIGHUPS until this many Stratum attempts and HTTP transfers have
# been made under it (a loaded machine makes fewer per second), within STORM_MAX_S: counts, not
# a timing, decide whether the storm tested anything.
STORM_MIN_ATTEMPTS = 5
STORM_MAX_S = 60.0


@dataclass
class StormRun:
    sent: int = 0
    seconds: float = 0.0
    handled_ok: int = 0
    handled_rejected: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    alive: bool = False
    http_ok: int = 0
    http_bad: list[str] = field(default_factory=list)
    stratum_done: int = 0
    stratum_blocked: int = 0
    pool_requests: int = 0
    quiet_sighup_handled: bool = False  # a SIGHUP sent once the storm is over was handled


def run_reload_storm(lb: Lab, tmp: Path, sighups: int = STORM_SIGHUPS, rate: float = STORM_RATE) -> StormRun:
    """SIGHUPs at ``rate`` while HTTP downloads (checked by sha256) and Stratum handshakes loop.
    Every 30th SIGHUP finds a broken policy file (must be rejected, the old one kept); every
    other 10th a different valid policy (an extra alert rule); files are replaced atomically."""
    res = StormRun()
    pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
    blob = peers.make_bulk_file(tmp / "www", 2 * 1024 * 1024)
    peers.start_http_server(lb, tmp, blob.path.parent, BULK_V4, 80)
    pol = write_policy(tmp)
    good, alt = pol.read_text(), write_policy(tmp, name="alt.yaml", prepend_rules=[ALT_RULE]).read_text()
    d = peers.start_egressd(lb, tmp, pol)
    stop = threading.Event()

    def http() -> None:
        while not stop.is_set():
            r = lb.run_node(
                ["sh", "-c", f"curl -sS --max-time 20 http://{BULK_V4}/blob.bin | sha256sum"], timeout=30
            )
            if r.stdout.split()[:1] == [blob.sha256]:
                res.http_ok += 1
            else:
                res.http_bad.append(r.stdout + r.stderr)

    def miners() -> None:
        while not stop.is_set():
            if stratum(lb, POOL_V4, 3333, timeout=3)["handshake_complete"]:
                res.stratum_done += 1
            else:
                res.stratum_blocked += 1

    threads = [threading.Thread(target=http), threading.Thread(target=miners)]
    for t in threads:
        t.start()
    t0 = time.monotonic()

    def enough() -> bool:
        attempts = res.stratum_done + res.stratum_blocked
        return attempts >= STORM_MIN_ATTEMPTS and res.http_ok + len(res.http_bad) >= STORM_MIN_ATTEMPTS

    try:
        i = 0
        while i < sighups or (not enough() and time.monotonic() - t0 < STORM_MAX_S):
            i += 1
            text = "rules: [ {name: broken\n" if i % 30 == 0 else alt if i % 10 == 0 else good
            swap = pol.with_suffix(".swap")
            swap.write_text(text)
            swap.replace(pol)
            d.send_signal(signal.SIGHUP)
            res.sent += 1
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        res.seconds = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    # Once the storm is over, a SIGHUP finds no other pending: it must be handled (the kernel
    # merges a standard signal only while one is pending, so this is the part that is not timing).
    pol.write_text(good)
    time.sleep(1.0)
    before = _reload_lines(d.stderr_text())
    d.send_signal(signal.SIGHUP)
    res.sent += 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not res.quiet_sighup_handled:
        res.quiet_sighup_handled = _reload_lines(d.stderr_text()) > before
        time.sleep(0.05)
    res.alive = d.alive()
    res.status = d.status()
    err = d.stderr_text()
    res.handled_ok = err.count("policy reloaded from")
    res.handled_rejected = err.count("reload rejected")
    res.pool_requests = len(pool.requests())
    d.stop()
    return res


def _reload_lines(err: str) -> int:
    return err.count("policy reloaded from") + err.count("reload rejected")


ALT_RULE = {
    "name": "alert-storm-marker",
    "description": "a second valid policy for the reload storm",
    "match": {"proto": "udp", "dst_port": 9},
    "action": "alert",
}


