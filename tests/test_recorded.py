"""Recorded flows: one record per flow from an event log, across daemon restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from egressd.recorded import InputError, from_events, is_event_log


def ev(fid: int, sport: int, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "timestamp": f"2026-12-05T06:00:{fid:02d}.000000+0000", "event_type": "flow", "flow_id": fid,
        "src_ip": "198.51.100.2", "src_port": sport, "dest_ip": "203.0.113.40", "dest_port": 443,
        "proto": "TCP", "verdict": "accept", "action": "allowed", "rule": "default",
        "rule_description": "", "reason": "first-packet", "mode": "enforce",
    }  # fmt: skip
    e.update(kw)
    return e


def write(tmp_path: Path, evs: list[dict[str, Any]]) -> Path:
    p = tmp_path / "events.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    return p


def test_later_events_of_a_flow_update_it_and_keep_its_first_time(tmp_path: Path) -> None:
    log = write(tmp_path, [
        ev(1, 40000),
        ev(1, 40000, domain="a.example.org", reason="detection", timestamp="2026-12-05T06:00:09.000000+0000",
           detection={"kind": "tls", "evidence": "sni", "info": {}}, detections=["tls"]),
    ])  # fmt: skip
    [f] = from_events(log)
    assert f.domains == ("a.example.org",) and f.detections == ("tls",) and f.reason == "detection"
    assert f.last_ts - f.first_ts == pytest.approx(8.0)


def test_a_restarted_daemon_numbering_flows_from_1_again_makes_new_flows(tmp_path: Path) -> None:
    log = write(tmp_path, [ev(1, 40000), ev(2, 40001), ev(1, 40000), ev(2, 40002)])
    flows = from_events(log)
    assert len(flows) == 4  # the second run's flow 1 is another flow, same 5-tuple or not


def test_other_records_are_skipped_and_a_broken_line_is_named(tmp_path: Path) -> None:
    log = tmp_path / "mixed.jsonl"
    log.write_text(json.dumps({"event_type": "stats"}) + "\n" + json.dumps(ev(1, 40000)) + "\n{oops\n")
    with pytest.raises(InputError, match=r"mixed\.jsonl:3: not JSON"):
        from_events(log)
    log.write_text(json.dumps({"event_type": "stats"}) + "\n" + json.dumps(ev(1, 40000)) + "\n")
    assert len(from_events(log)) == 1


def test_event_logs_are_told_from_captures(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.txt").write_text('  {"x": 1}\n')
    (tmp_path / "c.pcap").write_bytes(b"\xd4\xc3\xb2\xa1")
    assert is_event_log(tmp_path / "a.jsonl") and is_event_log(tmp_path / "b.txt")
    assert not is_event_log(tmp_path / "c.pcap")
