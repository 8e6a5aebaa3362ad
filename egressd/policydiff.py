"""``egressd diff OLD NEW CAPTURE...``: which recorded flows a policy change opens or closes.

A pull request to an allowlist is reviewed as YAML, but what matters is its effect on traffic.
This replays each capture under both policies — each replay through its own engine, exactly
as ``egressd test`` does — and lists the flows whose verdict or deciding rule differs, with
the evidence (names, detections) that made the difference. Exit codes are for CI: 0 nothing
changes, 1 something does, 2 an input is unusable.

Flows of the two replays are paired by 5-tuple and the order in which that 5-tuple appeared
(a port reused later in the capture is another flow): the engine's flow ids are not used,
since both replays see the same packets but ids are only an implementation detail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from egressd.policy import Policy
from egressd.recorded import Flow, from_capture, from_events, is_event_log, printable

Key = tuple[str, str, int, str, int, int]


@dataclass(frozen=True, slots=True)
class Change:
    capture: str
    before: Flow | None
    after: Flow | None

    @property
    def flow(self) -> Flow:
        f = self.after or self.before
        assert f is not None
        return f

    @property
    def domains(self) -> tuple[str, ...]:
        """Names seen under either policy: a flow dropped at its first packet shows none of
        the names (SNI) the other replay saw, and the reviewer needs them."""
        both = [*(self.before.domains if self.before else ()), *(self.after.domains if self.after else ())]
        return tuple(dict.fromkeys(both))

    @property
    def detections(self) -> tuple[str, ...]:
        both = [*(self.before.detections if self.before else ()), *(self.after.detections if self.after else ())]
        return tuple(dict.fromkeys(both))

    @property
    def evidence(self) -> str:
        return (self.after.evidence if self.after else "") or (self.before.evidence if self.before else "")

    @property
    def kind(self) -> str:
        """opens (was blocked, now passes), closes (the reverse), or rule (same fate, other rule)."""
        was = self.before is not None and self.before.blocked
        now = self.after is not None and self.after.blocked
        if was and not now:
            return "opens"
        if now and not was:
            return "closes"
        return "rule"

    def as_dict(self) -> dict[str, Any]:
        f = self.flow

        def side(x: Flow | None) -> dict[str, str] | None:
            return None if x is None else {"verdict": x.verdict, "action": x.action, "rule": x.rule}

        return {
            "capture": self.capture,
            "change": self.kind,
            "proto": f.proto,
            "src_ip": f.src_ip,
            "src_port": f.src_port,
            "dest_ip": f.dest_ip,
            "dest_port": f.dest_port,
            "domains": list(self.domains),
            "detections": list(self.detections),
            "evidence": self.evidence,
            "before": side(self.before),
            "after": side(self.after),
        }


def _keyed(flows: Iterable[Flow]) -> dict[Key, Flow]:
    seen: dict[tuple[str, str, int, str, int], int] = {}
    out: dict[Key, Flow] = {}
    for f in sorted(flows, key=lambda f: f.first_ts):
        five = (f.proto, f.src_ip, f.src_port, f.dest_ip, f.dest_port)
        n = seen.get(five, 0)
        seen[five] = n + 1
        out[(*five, n)] = f
    return out


def _differs(a: Flow | None, b: Flow | None) -> bool:
    if a is None or b is None:
        return a is not b
    return (a.verdict, a.action, a.rule) != (b.verdict, b.action, b.rule)


def _judged(flows: list[Flow], policy: Policy) -> list[Flow]:
    """Recorded flows as ``policy`` judges their recorded facts."""
    out = []
    for f in flows:
        dec = policy.judge(f.facts())
        blocked = dec.action == "drop" and policy.mode == "enforce"
        out.append(dataclasses.replace(f, verdict=dec.action, rule=dec.rule,
                                       action="blocked" if blocked else "allowed"))  # fmt: skip
    return out


def diff_events(path: str, old: Policy, new: Policy) -> tuple[list[Change], int]:
    """An event log instead of a capture: each recorded flow judged under both policies on
    the facts its events carry (names: the first only; detections: those recorded). Coarser
    than a replay — the engine also re-judges a flow as facts arrive, and decisions only get
    stricter — but it covers a week of a node's traffic, which no capture does."""
    flows = from_events(path)
    before, after = _judged(flows, old), _judged(flows, new)
    changes = [Change(path, b, a) for b, a in zip(before, after, strict=True) if _differs(b, a)]
    return changes, len(flows)


def diff_capture(path: str, old: Policy, new: Policy) -> tuple[list[Change], int]:
    """(changed flows in capture order, number of flows); InputError when unusable.
    An event log (JSON lines) is compared with :func:`diff_events`."""
    if is_event_log(path):
        return diff_events(path, old, new)
    before = _keyed(from_capture(path, old))
    after = _keyed(from_capture(path, new))
    keys = sorted(set(before) | set(after), key=lambda k: (before.get(k) or after[k]).first_ts)
    changes = [Change(path, before.get(k), after.get(k)) for k in keys if _differs(before.get(k), after.get(k))]
    return changes, len(keys)


def describe(x: Flow | None) -> str:
    if x is None:
        return "(no decision)"
    fate = x.verdict if x.action != "allowed" or x.verdict != "drop" else "drop (monitor: allowed)"
    return f"{fate} by {x.rule}"


def render_text(changes: list[Change], flows: int, captures: int) -> str:
    lines = []
    for c in changes:
        f = c.flow
        ev = []
        if c.domains:
            ev.append("names " + ", ".join(c.domains))
        if c.detections:
            ev.append("detections " + ", ".join(c.detections))
        if c.evidence:
            ev.append(f"evidence {c.evidence[:80]}")
        lines.append(f"{c.capture}: {f.label()}" + (f"  ({'; '.join(ev)})" if ev else ""))
        lines.append(f"    {c.kind}: {describe(c.before)} -> {describe(c.after)}")
    opened = sum(1 for c in changes if c.kind == "opens")
    closed = sum(1 for c in changes if c.kind == "closes")
    lines.append(
        f"{len(changes)} of {flows} flow(s) change ({opened} opened, {closed} closed, "
        f"{len(changes) - opened - closed} decided by another rule) in {captures} capture(s)"
    )
    return printable("\n".join(lines)) + "\n"
