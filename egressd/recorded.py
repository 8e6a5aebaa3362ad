"""Recorded flows: one record per flow, from a capture (through the engine) or an event log.

``egressd learn``, ``explain``, ``report`` and ``diff`` all reason about *flows*, whichever
way they were recorded: a capture replayed through the engine, or the JSON lines a node's
``egressd run`` wrote (typically in ``mode: monitor`` for a week). This module turns both
into the same :class:`Flow` record, so those commands never care where a flow came from.

Why the engine is subclassed for captures: an event names one domain (the first), but a
policy judges with *every* name the engine tied to the flow (DNS answer, SNI, CONNECT host).
Explaining or learning from the event alone could disagree with what the engine did, so a
capture is replayed with an engine that also keeps each flow's complete :class:`FlowFacts`.
An event log only has what the events carry; records from one say so (``complete=False``).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from egressd.engine import Engine
from egressd.events import Event
from egressd.flow import Flow as EngineFlow
from egressd.pcapio import CaptureError
from egressd.policy import FlowFacts, Policy
from egressd.policy.matchers import CONTENT_CLASSIFIED, CONTENT_PENDING
from egressd.protocols import PROTOCOLS
from egressd.replay import replay

# Event names ("TCP", "IPv6-ICMP") and policy names ("icmpv6"), upper case -> number.
PROTO_NUMBERS: Final = {p.eve.upper(): p.number for p in PROTOCOLS} | {
    n.upper(): p.number for p in PROTOCOLS for n in p.names
}
MAX_EVENT_LINE: Final = 1 << 20  # a longer line is not an egressd event


def printable(text: str) -> str:
    """Text from recordings shown on a terminal: control characters (escape sequences in a
    hostile name) escaped, line breaks kept where the caller put them."""
    return "\n".join("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line) for line in text.split("\n"))


class InputError(Exception):
    """An input file is unusable (exit code 2): unreadable, not a capture, not events."""


@dataclass(slots=True)
class Flow:
    """One flow as last decided, with everything the engine knew about it."""

    source: str  # "file" or "file:line"
    proto: str  # as in events: TCP, UDP, ICMP, IPv6-ICMP ...
    src_ip: str
    src_port: int
    dest_ip: str
    dest_port: int
    domains: tuple[str, ...]
    detections: tuple[str, ...]
    verdict: str
    action: str
    rule: str
    mode: str
    first_ts: float
    last_ts: float
    evidence: str = ""
    primary: str = ""  # the primary detection kind, "" when none
    process: dict[str, Any] | None = None
    container: dict[str, Any] | None = None
    complete: bool = True  # False: from an event, which names only the first domain
    reason: str = ""  # why the last decision was made then (first-packet, detection, classified, ...)
    content: str = CONTENT_PENDING  # what the payload turned out to be, when known (FlowFacts.content)
    event: dict[str, Any] = field(default_factory=dict)
    _facts: tuple[tuple[str, ...], tuple[str, ...], FlowFacts] | None = field(default=None, repr=False, compare=False)

    @property
    def uninspected(self) -> bool:
        """Dropped (or would-dropped) by the policy default at its first packet: no detector
        ever saw its bytes, so nothing is known about what it carried. A node recorded in
        ``mode: monitor`` with ``default: drop`` logs every unlisted flow this way."""
        return self.verdict == "drop" and self.rule == "default" and self.reason == "first-packet"

    @property
    def blocked(self) -> bool:
        """Dropped, or would have been in monitor mode."""
        return self.verdict == "drop"

    def facts(self) -> FlowFacts:
        """The flow as the policy sees it (for judging it again under another policy).
        Kept once made (learn judges each flow several times); remade if names or kinds grew."""
        memo = self._facts
        if memo is not None and memo[0] is self.domains and memo[1] is self.detections:
            return memo[2]
        made = self._make_facts()
        self._facts = (self.domains, self.detections, made)
        return made

    def _make_facts(self) -> FlowFacts:
        src = ipaddress.ip_address(self.src_ip)
        dst = ipaddress.ip_address(self.dest_ip)
        proto = PROTO_NUMBERS.get(self.proto.upper())
        if proto is None:
            proto = int(self.proto) if self.proto.isdigit() else 0
        return FlowFacts(
            proto,
            dst.version,
            src.packed,
            dst.packed,
            self.src_port,
            self.dest_port,
            self.domains,
            self.detections,
            self.content,
        )

    def label(self) -> str:
        def ep(ip: str, port: int) -> str:
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

        return f"{self.proto} {ep(self.src_ip, self.src_port)} -> {ep(self.dest_ip, self.dest_port)}"


class _FactsEngine(Engine):
    """The engine, also keeping every reported flow's complete facts (see module docstring),
    with the content the engine judged it on once inspection ended (policies with ``content``
    conditions only; otherwise the content decides nothing and stays pending)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.flow_facts: dict[int, FlowFacts] = {}
        self._content: dict[int, str] = {}

    def _facts(self, flow: EngineFlow, content: str = CONTENT_PENDING) -> FlowFacts:
        if content != CONTENT_PENDING:
            self._content[flow.fid] = content
        return super()._facts(flow, content)

    def _report(self, flow: EngineFlow, ts: float, reason: str) -> None:
        self.flow_facts[flow.fid] = self._facts(flow, self._content.get(flow.fid, CONTENT_PENDING))
        super()._report(flow, ts, reason)


def _from_event(ev: Event, facts: FlowFacts | None, source: str, first_ts: float) -> Flow:
    det = ev.detection or {}
    return Flow(
        source=source,
        proto=ev.proto,
        src_ip=ev.src_ip,
        src_port=ev.src_port,
        dest_ip=ev.dest_ip,
        dest_port=ev.dest_port,
        domains=facts.domains if facts is not None else ((ev.domain,) if ev.domain else ()),
        detections=facts.detections if facts is not None else tuple(ev.detections),
        verdict=ev.verdict,
        action=ev.action,
        rule=ev.rule,
        mode=ev.mode,
        first_ts=first_ts,
        last_ts=ev.timestamp,
        evidence=str(det.get("evidence", "")),
        primary=str(det.get("kind", "")),
        complete=facts is not None,
        reason=ev.reason,
        content=facts.content if facts is not None else CONTENT_PENDING,
        event=ev.to_dict(),
    )


def from_capture(path: str | Path, policy: Policy) -> list[Flow]:
    """Replay a capture through the engine; one record per flow (its final decision)."""
    eng = _FactsEngine(policy)
    res = replay(path, policy, engine=eng)
    if res.error is not None:
        raise InputError(str(res.error))  # it names the file already
    first: dict[int, float] = {}
    for e in res.events:
        first.setdefault(e.flow_id, e.timestamp)
    return [_from_event(e, eng.flow_facts.get(e.flow_id), str(path), first[e.flow_id]) for e in res.final_events()]


def _ts(value: object) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    raise ValueError(f"timestamp {value!r} is not ISO 8601")


def event_record(d: dict[str, Any], source: str) -> Flow:
    """One event (a parsed JSON line) as a flow record; ValueError when it is not an event."""
    try:
        det = d.get("detection") if isinstance(d.get("detection"), dict) else {}
        assert det is not None
        dets = d.get("detections") or ([det["kind"]] if det.get("kind") else [])
        ts = _ts(d["timestamp"])
        proc = d.get("process")
        cont = d.get("container")
        return Flow(
            source=source,
            proto=str(d["proto"]),
            src_ip=str(ipaddress.ip_address(d["src_ip"])),
            src_port=int(d["src_port"]),
            dest_ip=str(ipaddress.ip_address(d["dest_ip"])),
            dest_port=int(d["dest_port"]),
            domains=(str(d["domain"]).lower().rstrip("."),) if d.get("domain") else (),
            detections=tuple(str(k) for k in dets),
            verdict=str(d["verdict"]),
            action=str(d.get("action", "")),
            rule=str(d["rule"]),
            mode=str(d.get("mode", "enforce")),
            first_ts=ts,
            last_ts=ts,
            evidence=str(det.get("evidence", "")),
            primary=str(det.get("kind", "")),
            process=proc if isinstance(proc, dict) else None,
            container=cont if isinstance(cont, dict) else None,
            complete=False,
            reason=str(d.get("reason", "")),
            # Events do not say what the payload was; a detection at least says it was recognised.
            content=str(d.get("content") or (CONTENT_CLASSIFIED if dets else CONTENT_PENDING)),
            event=d,
        )
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"not an egressd event ({type(e).__name__}: {e})") from e


def iter_events(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, parsed event) of a JSON-lines event log; InputError on a bad line."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if len(line) > MAX_EVENT_LINE:
                raise InputError(f"{path}:{n}: a line longer than {MAX_EVENT_LINE} bytes is not an egressd event")
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(d, dict):
                raise InputError(f"{path}:{n}: not an egressd event (a JSON object per line)")
            if d.get("event_type") not in ("flow", "alert") or "rule" not in d:
                continue  # another tool's record in a shared log, or an egressd record of another kind
            yield n, d


def from_events(path: str | Path) -> list[Flow]:
    """One record per flow of an event log: its last decision, first and last time seen.

    A daemon numbers flows from 1 each time it starts, so a log spanning restarts repeats
    flow ids: a flow is its id *and* its 5-tuple, and a new run starts when the id goes down.
    """
    flows: dict[tuple[Any, ...], Flow] = {}
    run = 0
    last_id = -1
    for n, d in iter_events(path):
        try:
            rec = event_record(d, f"{path}:{n}")
        except ValueError as e:
            raise InputError(f"{path}:{n}: {e}") from e
        fid = d.get("flow_id", n)
        if isinstance(fid, int) and fid < last_id:
            run += 1
        last_id = fid if isinstance(fid, int) else last_id
        key = (run, fid, rec.proto, rec.src_ip, rec.src_port, rec.dest_ip, rec.dest_port)
        old = flows.get(key)
        if old is not None:
            rec.first_ts = old.first_ts
            rec.domains = tuple(dict.fromkeys((*old.domains, *rec.domains)))
            rec.detections = tuple(dict.fromkeys((*old.detections, *rec.detections)))
            rec.process = rec.process or old.process
            rec.container = rec.container or old.container
        flows[key] = rec
    return list(flows.values())


EVENT_SUFFIXES: Final = (".jsonl", ".json", ".ndjson", ".log")


def is_event_log(path: str | Path) -> bool:
    """A JSON-lines file (named so, or first non-blank byte '{'), as opposed to a capture."""
    if str(path).lower().endswith(EVENT_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(512).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def load_inputs(paths: list[str], policy: Policy) -> list[Flow]:
    """Captures (replayed under ``policy``) and event logs, in the order given."""
    out: list[Flow] = []
    for p in paths:
        if is_event_log(p):
            out.extend(from_events(p))
        else:
            try:
                out.extend(from_capture(p, policy))
            except CaptureError as e:  # pragma: no cover - replay reports it in the result
                raise InputError(f"{p}: {e}") from e
    return out
