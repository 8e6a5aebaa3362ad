"""The live daemon under exhaustion: a unique-tuple flood, a queue overflow, a reload storm.

Each scenario runs once per module (a fixture) and several tests read its results, so one
behaviour per test costs one flood, not one flood per assertion. Floods are short here (CI);
``bench/flood.py --seconds N`` runs the long versions and prints the curves.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd_lab import peers
from egressd_lab.harness import (
    BULK_V4,
    HOLD_SERVER,
    PY,
    SINK_V4,
    UDP_PORTS_BURST,
    adv_lab,
    live,
    spawn_inet_py,
    wait_status,
    write_policy,
)
from egressd_lab.load import (
    FLOOD_S,
    MAX_FLOWS,
    STORM_MIN_ATTEMPTS,
    FloodRun,
    QueueRun,
    StormRun,
    run_flood,
    run_queue_overflow,
    run_reload_storm,
)
from egressd_lab.netns import Lab

pytestmark = live


@pytest.fixture
def alab() -> Iterator[Lab]:
    with adv_lab() as lb:
        yield lb


@pytest.fixture(scope="module")
def flood_drop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FloodRun]:
    with adv_lab() as lb:
        res = run_flood(lb, tmp_path_factory.mktemp("flood_drop"), "drop")
    yield res  # the lab is gone: the next scenario may use the prefix


@pytest.fixture(scope="module")
def flood_accept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FloodRun]:
    with adv_lab() as lb:
        res = run_flood(lb, tmp_path_factory.mktemp("flood_accept"), "accept")
    yield res  # the lab is gone: the next scenario may use the prefix


def test_flood_keeps_daemon_rss_bounded(flood_drop: FloodRun) -> None:
    # What may grow is bounded by construction: the flow table (MAX_FLOWS = 256 here) and the
    # attribution caches (4,096 sockets, 16,384 results: about 10 MB when full, which a flood
    # of drops fills). 4-6 MB was usual; one CI run reached 8.6 MB, over the 8 MiB this test
    # used to allow, with nothing unbounded. A table or cache that kept the flood's flows would
    # cost about 1 kB for each of its 50,000+ tuples: far above 16 MiB.
    grew = flood_drop.rss_after - flood_drop.rss_before
    sent = json.loads(flood_drop.generator)
    flows = sent.get("syn", 0) + sent.get("dgrams", 0)
    assert flows > 20_000, flood_drop.generator  # a flood big enough that a leak would show
    assert grew < 16 * 1024, f"RSS {flood_drop.rss_before} -> {flood_drop.rss_after} kB ({flood_drop.generator})"


def test_flood_never_tracks_more_flows_than_max_flows(flood_drop: FloodRun) -> None:
    assert flood_drop.status_mid["flows_tracked"] <= MAX_FLOWS
    assert flood_drop.status["flows_tracked"] <= MAX_FLOWS


def test_flood_fills_the_table_and_counts_overload(flood_drop: FloodRun) -> None:
    assert flood_drop.status_mid["flows_tracked"] == MAX_FLOWS
    assert flood_drop.status["engine"]["overload"] > 0
    assert flood_drop.status["callback_errors"] == 0 and flood_drop.status["engine"]["errors"] == 0


def test_stratum_during_flood_is_dropped_with_on_overload_drop(flood_drop: FloodRun) -> None:
    assert flood_drop.flood_running_after_attempts, "the flood ended before the handshakes: not a test"
    assert not any(a["handshake_complete"] for a in flood_drop.attempts), flood_drop.attempts
    assert flood_drop.pool_requests == 0
    # Overload events are rate-limited (one a second, with a count), so the attempt may have
    # no event of its own; whatever was written about it says blocked.
    stratum_evs = [e for e in flood_drop.events if e.get("dest_port") == 3333]
    assert all(e["action"] == "blocked" for e in stratum_evs)
    assert flood_drop.status["engine"]["overload"] > 0


def test_on_overload_accept_passes_a_handshake_uninspected_and_records_it(flood_accept: FloodRun) -> None:
    """The documented trade-off of ``on_overload: accept``: a packet that finds the table full
    passes uninspected (unpinned: its connection is judged mid-stream once there is room). While
    a flood keeps the table full it therefore carries a miner past egressd; the trace is the
    rate-limited on_overload event with its count. The shipped policies use on_overload: drop."""
    assert flood_accept.flood_running_after_attempts
    assert all(a["handshake_complete"] for a in flood_accept.attempts), flood_accept.attempts
    assert flood_accept.pool_requests > 0
    over = [e for e in flood_accept.events if e.get("rule") == "on_overload"]
    assert over and all(e["action"] == "allowed" for e in over)
    assert sum(e.get("overload_count", 0) for e in over) > 0


def test_overload_events_are_rate_limited(flood_drop: FloodRun) -> None:
    n = len([e for e in flood_drop.events if e.get("rule") == "on_overload"])
    assert flood_drop.status["engine"]["overload"] > 10_000
    assert n <= 100 * FLOOD_S + 100, f"{n} overload events, {flood_drop.log_bytes} bytes in {FLOOD_S} s"


REFUSED = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
refused = 0
for i in range(n):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        refused += 1
    except OSError:
        pass
    s.close()
print(refused)
"""


def test_refused_connections_do_not_exhaust_the_flow_table(alab: Lab, tmp_path: Path) -> None:
    """A SYN answered by RST ends the flow. Before 29dfeb3 such a flow stayed "being classified"
    until tcp_idle (300 s): max_flows refused connects put the node in on_overload for minutes."""
    spawn_inet_py(alab, HOLD_SERVER, BULK_V4, "8080", "30")
    peers.wait_listening(alab, "inet", [(BULK_V4, 8080)])
    d = peers.start_egressd(alab, tmp_path, write_policy(tmp_path, settings={"max_flows": MAX_FLOWS}))
    r = alab.run_node([PY, "-c", REFUSED, SINK_V4, "9", str(MAX_FLOWS + 100)], timeout=60)
    assert int(r.stdout) == MAX_FLOWS + 100, r.stderr  # a closed port: every SYN answered by RST
    ok = alab.run_node([PY, "-c", f"import socket; socket.create_connection(('{BULK_V4}', 8080), 3)"])
    st = d.status()
    assert ok.returncode == 0, f"a normal connection failed: overload={st['engine']['overload']}"
    assert st["engine"]["overload"] == 0


def test_reload_to_a_smaller_max_flows_shrinks_the_table(alab: Lab, tmp_path: Path) -> None:
    pol = write_policy(tmp_path, settings={"max_flows": 1024})
    d = peers.start_egressd(alab, tmp_path, pol)
    burst = [PY, "-c", UDP_PORTS_BURST, SINK_V4]
    assert alab.run_node([*burst, "30000", "400"]).stdout.strip() == "400"
    assert wait_status(d, lambda s: s["flows_tracked"] >= 400)["flows_tracked"] >= 400
    write_policy(tmp_path, settings={"max_flows": MAX_FLOWS})
    d.send_signal(signal.SIGHUP)
    assert d.wait_stderr("policy reloaded")
    assert alab.run_node([*burst, "31000", "50"]).stdout.strip() == "50"
    st = wait_status(d, lambda s: s["engine"]["flows"] >= 450)
    assert st["engine"]["flows"] >= 450
    assert st["flows_tracked"] <= MAX_FLOWS


# -- 2. queue overflow with a tiny queue ------------------------------------------------------
@pytest.fixture(scope="module")
def queue_closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueRun]:
    with adv_lab() as lb:
        res = run_queue_overflow(lb, tmp_path_factory.mktemp("queue_closed"), "closed")
    yield res  # the lab is gone: the next scenario may use the prefix


@pytest.fixture(scope="module")
def queue_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueRun]:
    with adv_lab() as lb:
        res = run_queue_overflow(lb, tmp_path_factory.mktemp("queue_open"), "open")
    yield res  # the lab is gone: the next scenario may use the prefix


def test_fail_closed_overflow_lets_nothing_uninspected_reach_the_receiver(queue_closed: QueueRun) -> None:
    q = queue_closed
    assert q.sent > 2 * q.judged, "the burst did not overflow the queue: not a test"
    # Every datagram that arrived was judged first (judged also counts the miners' packets).
    assert q.delivered <= q.judged
    assert q.pool_requests == 0


def test_fail_closed_overflow_is_reported_as_kernel_queue_drops(queue_closed: QueueRun) -> None:
    k = queue_closed.status["kernel_queue"]
    missing = queue_closed.sent - queue_closed.delivered
    assert k["queue_dropped"] + k["user_dropped"] >= 0.9 * missing, (k, queue_closed)


def test_fail_open_overflow_passes_the_excess_uninspected(queue_open: QueueRun) -> None:
    q = queue_open
    assert q.delivered == q.sent
    assert q.judged < q.sent / 2  # most of what arrived was never shown to egressd


def test_fail_open_overflow_is_reported_in_status(queue_open: QueueRun) -> None:
    k = queue_open.status["kernel_queue"]
    uninspected = queue_open.rule_hits - k["id_sequence"]
    assert uninspected > 1000  # measured: rule hits minus packets the kernel queued
    reported = k.get("uninspected", 0) + k["queue_dropped"] + k["user_dropped"]
    assert reported >= 0.9 * uninspected, k


# fail: open passes queue overflow uninspected, as specified (counted above); a flood that
# overflows the queue can therefore carry segments past the detectors. bench/flood.py measures
# it per queue_len and the README says when to choose fail: closed instead.


# -- 3. reload storm --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StormRun]:
    with adv_lab() as lb:
        res = run_reload_storm(lb, tmp_path_factory.mktemp("storm"))
    yield res  # the lab is gone: the next scenario may use the prefix


def test_reload_storm_daemon_survives_without_callback_errors(storm: StormRun) -> None:
    assert storm.alive
    assert storm.status["callback_errors"] == 0 and storm.status["engine"]["errors"] == 0


def test_reload_storm_blocks_every_stratum_attempt(storm: StormRun) -> None:
    assert storm.stratum_blocked >= STORM_MIN_ATTEMPTS
    assert storm.stratum_done == 0 and storm.pool_requests == 0


def test_reload_storm_keeps_every_allowed_transfer_intact(storm: StormRun) -> None:
    assert storm.http_ok >= STORM_MIN_ATTEMPTS and storm.http_bad == []


def test_reload_storm_counts_every_handled_sighup(storm: StormRun) -> None:
    """reloads/reload_failures equal what the daemon said it did; the only SIGHUPs not handled are
    ones the kernel merged (a standard signal sent while the previous one is still pending): a
    SIGHUP sent once the storm is over is always handled. How many the kernel merges depends on
    how fast a reload is on a loaded machine: bench/flood.py reports that share, no test times it."""
    st = storm.status
    assert st["reloads"] == storm.handled_ok
    assert st["reload_failures"] == storm.handled_rejected
    handled = storm.handled_ok + storm.handled_rejected
    assert 1 <= handled <= storm.sent
    assert storm.quiet_sighup_handled
    assert storm.handled_rejected >= 1  # the broken files were seen and refused
