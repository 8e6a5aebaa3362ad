"""The event sink: every event is written, in order, attributed or with the reason it is not."""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from pathlib import Path

from egressd.attribution.sink import AttributedSink
from egressd.eventlog import EventLog
from egressd.events import Event


def _ev(fid: int, port: int, proto: str = "TCP", host: str = "198.51.100.7") -> Event:
    return Event(float(fid), fid, host, port, host, 9, proto, "accept", "allowed", "default", "",
                 "classified")  # fmt: skip


def test_events_never_lost_when_attribution_cannot_finish(tmp_path: Path) -> None:
    """Worker not started: every event still goes out at shutdown, in order, saying why."""
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=0.05)
    sink.take(deque([_ev(1, 1000), _ev(2, 1001), _ev(3, 1002, "ICMP")]), None)
    sink.flush(final=True)
    sink.attributor.stop(0.1)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [r["flow_id"] for r in rows] == [1, 2, 3]
    assert all(r["process"] == {"unknown": "attribution timed out"} for r in rows)
    assert sink.attributor.timeouts == 3


def test_a_live_local_flow_is_attributed_to_this_process(tmp_path: Path, own_netns: tuple[str, str]) -> None:
    host = own_netns[0]  # a network namespace of the test's own (tests/conftest.py)
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=2.0)
    sink.attributor.start()
    try:
        lp, rp = c.getsockname()[1], c.getpeername()[1]
        ev = _ev(7, lp, host=host)
        ev.dest_port = rp
        sink.take(deque([ev, _ev(8, 9, "ICMP")]), None)
        sink.close()
    finally:
        for s in (a, c, srv):
            s.close()
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert rows[0]["process"]["pid"] == os.getpid()
    assert rows[0]["process"]["uid"] == os.getuid()
    assert rows[1]["process"] == {"unknown": "no socket lookup for protocol ICMP"}


def _blocked(fid: int, lport: int, rport: int, host: str) -> Event:
    return Event(float(fid), fid, host, lport, host, rport, "TCP", "drop", "blocked", "drop-mining", "",
                 "classified")  # fmt: skip


def test_a_drop_waits_for_the_lookup_of_its_socket_and_names_the_process(
    tmp_path: Path, own_netns: tuple[str, str]
) -> None:
    # Since the fast path a client that sends at once is judged within a millisecond of its
    # SYN. The drop's alert (written before the verdict) waits, bounded, for the lookup the
    # conntrack NEW event started (flow 1); a drop nobody started a lookup for starts one
    # itself and waits for it the same way (flow 2); when the early-lookup budget is spent it
    # starts none, does not wait, and says why (flow 3).
    from egressd.attribution import service

    host = own_netns[0]
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    socks = [srv]
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=2.0)
    a = sink.attributor
    a.start()
    try:
        conns = []
        for _ in range(3):
            c = socket.create_connection(srv.getsockname())
            s, _ = srv.accept()
            socks += [c, s]
            conns.append((c.getsockname()[1], srv.getsockname()[1]))
        (lp1, rp), (lp2, _), (lp3, _) = conns
        key1 = (socket.IPPROTO_TCP, socket.inet_aton(host), lp1, socket.inet_aton(host), rp)
        a._on_ct_new(key1)  # what the conntrack thread does at the SYN
        sink.take(deque([_blocked(1, lp1, rp, host)]), None)  # at once: the worker may not have finished
        sink.take(deque([_blocked(2, lp2, rp, host)]), None)  # no lookup started: the drop starts one
        started = a.drop_lookups
        a._roll_window()
        a._pf_spent = service.PREFETCH_BUDGET  # the early lookups' budget for this second is spent
        sink.take(deque([_blocked(3, lp3, rp, host)]), None)
        st = a.status()["drop_waits"]
        sink.close()
    finally:
        for x in socks:
            x.close()
    log.close()
    rows = {r["flow_id"]: r for r in (json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines())}
    assert rows[1]["process"]["pid"] == os.getpid(), rows[1]
    assert rows[2]["process"]["pid"] == os.getpid(), rows[2]
    assert started == 1 and st["lookups_started_by_the_drop"] == 1
    assert rows[3]["process"]["unknown"] == f"process not named in time: {service.SEE_RECORD}", rows[3]
    assert rows[3]["process"]["uid"] == os.getuid()
    assert 1 <= st["waited"] <= 2 and st["named"] == st["waited"]
    assert service.DROP_WAIT <= 0.02 and service.DROP_WAIT_BUDGET <= 0.1


def test_a_udp_flow_dropped_at_its_first_datagram_names_its_process(
    tmp_path: Path, own_netns: tuple[str, str]
) -> None:
    # Conntrack announces no UDP entry it never confirmed (the first datagram is the one being
    # dropped), so no lookup was started at all: the drop's own lookup names the process.
    host = own_netns[0]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((host, 0))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected, as a DNS tunnel's
    u.bind((host, 0))
    u.sendto(b"x", peer.getsockname())
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=2.0)
    a = sink.attributor
    a.start()
    try:
        ev = Event(1.0, 1, host, u.getsockname()[1], host, peer.getsockname()[1], "UDP", "drop", "blocked",
                   "drop-covert-tunnels", "", "classified")  # fmt: skip
        sink.take(deque([ev]), None)
        st = a.status()["drop_waits"]
        sink.close()
    finally:
        u.close()
        peer.close()
    log.close()
    row = json.loads((tmp_path / "ev.jsonl").read_text().splitlines()[0])
    assert row["process"]["pid"] == os.getpid(), row
    assert st["lookups_started_by_the_drop"] == 1 and st["named"] == 1


def test_a_drop_does_not_wait_once_the_budget_is_spent(tmp_path: Path) -> None:
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=0.05)
    a = sink.attributor  # worker not started: an announced lookup never finishes
    key = (socket.IPPROTO_TCP, socket.inet_aton("198.51.100.7"), 40000, socket.inet_aton("198.51.100.7"), 9)
    a._on_ct_new(key)
    waits = [a._wait_for_lookup(key) for _ in range(8)]
    sink.flush(final=True)
    a.stop(0.1)
    log.close()
    # 20 ms each until 100 ms are spent in the second: five waits, then none.
    assert waits == [True] * 5 + [False] * 3, waits
    assert a.drop_waits == 5
