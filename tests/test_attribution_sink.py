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


def _ev(fid: int, port: int, proto: str = "TCP") -> Event:
    return Event(float(fid), fid, "127.0.0.1", port, "127.0.0.1", 9, proto, "accept", "allowed", "default", "",
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


def test_a_live_local_flow_is_attributed_to_this_process(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    log = EventLog(str(tmp_path / "ev.jsonl"))
    sink = AttributedSink(log, timeout=2.0)
    sink.attributor.start()
    try:
        lp, rp = c.getsockname()[1], c.getpeername()[1]
        ev = _ev(7, lp)
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
