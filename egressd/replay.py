"""``egressd test``'s shell: a capture file -> the engine -> decision events.

Thin on purpose (docs/architecture.md, "One engine, two shells"): everything that decides
lives in the engine, so this module only reads packets, hands them over with their capture
timestamps, and collects events. Each capture gets its own engine: flows and time do not
continue from one file into the next. Idle flows are swept as capture time advances, so a
long capture replays in bounded memory exactly as the daemon would run for that long.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from egressd.engine import Engine
from egressd.events import Event
from egressd.pcapio import CaptureError, Reader
from egressd.policy import Policy

ProgressFn = Callable[[int, int], None]  # (bytes read so far, file size)


@dataclass
class ReplayResult:
    path: str
    events: list[Event] = field(default_factory=list)
    packets: int = 0
    error: CaptureError | None = None
    counters: dict[str, object] = field(default_factory=dict)
    skipped: int = 0  # non-IP frames

    def final_events(self) -> list[Event]:
        """The last decision per flow: decisions only get stricter, so the last one stands."""
        last: dict[int, Event] = {}
        for e in self.events:
            last[e.flow_id] = e
        return sorted(last.values(), key=lambda e: (e.timestamp, e.flow_id))


SWEEP_EVERY = 1.0  # capture seconds between idle sweeps


def replay(
    path: str | Path, policy: Policy, progress: ProgressFn | None = None, engine: Engine | None = None
) -> ReplayResult:
    """``engine``: a fresh engine on ``policy`` to use instead of a plain one (egressd.recorded
    passes one that also keeps each flow's complete facts)."""
    res = ReplayResult(str(path))
    eng = engine if engine is not None else Engine(policy)
    try:
        reader = Reader(path)
    except CaptureError as e:
        res.error = e
        return res
    next_sweep = 0.0
    ts = 0.0  # after the loop: the last packet's timestamp (the loop variable keeps it)
    feed = eng.feed
    try:
        if progress is None:
            # The loop ``bench/replay.py`` times: per packet, the engine and the sweep clock
            # only. The packet count is the reader's (stats.packets).
            for ts, data in reader:
                feed(data, ts)
                if ts >= next_sweep:
                    if next_sweep:
                        eng.sweep(ts)
                    next_sweep = ts + SWEEP_EVERY
        else:
            n = 0
            for ts, data in reader:
                feed(data, ts)
                if ts >= next_sweep:
                    if next_sweep:
                        eng.sweep(ts)
                    next_sweep = ts + SWEEP_EVERY
                n += 1
                if not n & 0x3FF:
                    progress(reader.offset, reader.size)
    except CaptureError as e:
        res.error = e
    eng.finish(ts)
    res.packets = reader.stats.packets
    res.events = list(eng.events)
    _mark_unevaluated(res.events, policy)
    res.counters = eng.counters.as_dict()
    res.skipped = reader.stats.non_ip
    if progress is not None:
        progress(reader.size, reader.size)
    return res


def _mark_unevaluated(events: list[Event], policy: Policy) -> None:
    """A capture has no processes: rules on who is behind a flow (process, container, GPU)
    cannot be evaluated. Say so on every event whose flow conditions held for such a rule,
    instead of treating the rule as false (issue 8)."""
    if not policy.who_rules:
        return
    from egressd.policy.who import unevaluated

    for ev in events:
        names = unevaluated(policy.who_rules, ev)
        if names:
            ev.extra = {**(ev.extra or {}), "unevaluated_rules": names}
