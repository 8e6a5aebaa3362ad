"""The one event record, modelled on Suricata's EVE JSON so SIEMs ingest it unchanged.

Why a record of its own and not a dict built ad hoc: the daemon and ``egressd test`` must
write the *same* schema (a capture that replays to "drop" must explain itself exactly as the
live daemon would), and the console renderer, the expectation checker and the JSON writer
all read the same fields. Events are made only when a flow's decision is made or changes —
never per packet — so building one can afford a little work.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from egressd.detect.kinds import family_of

_iso_cache: list[object] = [-1, ""]


def _iso(t: float) -> str:
    """EVE timestamp; the seconds part is formatted once per second (events come in bursts)."""
    sec = int(t)
    if _iso_cache[0] != sec:
        _iso_cache[0] = sec
        _iso_cache[1] = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_iso_cache[1]}.{min(int((t - sec) * 1e6 + 0.5), 999999):06d}+0000"


def ip_text(packed: bytes) -> str:
    if len(packed) == 4:
        return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"
    if len(packed) == 16:
        return str(ipaddress.IPv6Address(packed))
    return packed.hex()


def severity_of(kind: str) -> int:
    """EVE severity of a detection kind (1 = high); "policy" (no detection) is 3."""
    return family_of(kind).severity if kind != "policy" else 3


def category_of(kind: str) -> str:
    return family_of(kind).category if kind != "policy" else "Policy Violation"


@dataclass(slots=True)
class Event:
    """One decision about one flow. ``to_dict`` gives the EVE-shaped record."""

    timestamp: float
    flow_id: int
    src_ip: str
    src_port: int
    dest_ip: str
    dest_port: int
    proto: str
    verdict: str  # the policy's action: accept | drop | alert
    action: str  # what happened to the traffic: allowed | blocked
    rule: str
    rule_description: str
    reason: str  # why now: first-packet | detection | domain | classified | end | overload | error
    mode: str = "enforce"
    domain: str | None = None
    detection: dict[str, Any] | None = None  # primary: {kind, evidence, info}
    detections: list[str] = field(default_factory=list)
    midstream: bool = False
    packets: int = 0
    bytes: int = 0
    process: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    severity: int = 0  # the deciding rule's ``priority`` or a who-rule's ``severity``; 0: by kind

    @property
    def event_type(self) -> str:
        if self.verdict != "accept" or (self.detection is not None and family_of(self.detection["kind"]).alert):
            return "alert"
        return "flow"

    def to_dict(self) -> dict[str, Any]:
        ts = _iso(self.timestamp)
        d: dict[str, Any] = {
            "timestamp": ts,
            "event_type": self.event_type,
            "flow_id": self.flow_id,
            "src_ip": self.src_ip,
            "src_port": self.src_port,
            "dest_ip": self.dest_ip,
            "dest_port": self.dest_port,
            "proto": self.proto,
            "verdict": self.verdict,
            "action": self.action,
            "rule": self.rule,
            "rule_description": self.rule_description,
            "reason": self.reason,
            "mode": self.mode,
        }
        if self.domain:
            d["domain"] = self.domain
        if self.detection is not None:
            d["detection"] = self.detection
            d["detections"] = self.detections
        if self.midstream:
            d["midstream"] = True
        d["flow"] = {"pkts": self.packets, "bytes": self.bytes}
        if d["event_type"] == "alert":
            kind = self.detection["kind"] if self.detection else "policy"
            d["alert"] = {
                "signature": f"egressd {self.rule}: {kind}",
                "category": category_of(kind),
                "severity": self.severity or severity_of(kind),
                "action": self.action,
            }
        if self.process is not None:
            d["process"] = self.process
        if self.extra:
            d.update(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True)
