"""``egressd test``'s shell: a capture file -> the engine -> decision events.

Thin on purpose (docs/architecture.md, "One engine, two shells"): everything that decides
lives in the engine, so this module only reads packets, hands them over with their capture
timestamps, and collects events. Each capture gets its own engine: flows and time do not
continue from one file into the next. Idle flows are swept as capture time advances, so a
long capture replays in bounded memory exactly as the daemon would run for that long.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from egressd.engine import Engine
from egressd.events import Event
from egressd.pcapio import CaptureError, Reader
from egressd.policy import Match, Policy

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

# Allocations between two young-generation garbage collections while a capture replays
# (CPython's default is 700). A replay allocates a few objects per packet and keeps tens of
# thousands of flows alive; at the default, collections took 5-10 % of bench/replay.py's
# time, for nothing: flows are freed by reference counting when the table drops them (no
# cycles to find). Cycles, if any, are still collected, only less often.
GC_YOUNG_THRESHOLD = 50_000


@contextmanager
def _fewer_collections() -> Iterator[None]:
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], GC_YOUNG_THRESHOLD), old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)


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
    with _fewer_collections():
        last_ts, res.error = _feed_all(reader, eng, progress)
        eng.finish(last_ts)
        res.packets = reader.stats.packets
        res.events = list(eng.events)
        _mark_unevaluated(res.events, policy)
    res.counters = eng.counters.as_dict()
    res.skipped = reader.stats.non_ip
    if progress is not None:
        progress(reader.size, reader.size)
    return res


def _feed_all(reader: Reader, eng: Engine, progress: ProgressFn | None) -> tuple[float, CaptureError | None]:
    """Every packet of the capture into the engine: (the last timestamp, the read error)."""
    next_sweep = 0.0
    ts = 0.0  # after the loop: the last packet's timestamp (the loop variable keeps it)
    feed = eng.feed
    try:
        if progress is None:
            # The loop bench/replay.py times: per packet, the engine and the sweep clock only
            # (the packet count is the reader's: stats.packets).
            for ts, data in reader:
                feed(data, ts)
                if ts >= next_sweep:
                    if next_sweep:
                        eng.sweep(ts)
                    next_sweep = ts + SWEEP_EVERY
        else:
            for n, (ts, data) in enumerate(reader, 1):
                feed(data, ts)
                if ts >= next_sweep:
                    if next_sweep:
                        eng.sweep(ts)
                    next_sweep = ts + SWEEP_EVERY
                if not n & 0x3FF:
                    progress(reader.offset, reader.size)
    except CaptureError as e:
        return ts, e
    return ts, None


def _mark_unevaluated(events: list[Event], policy: Policy) -> None:
    """A capture has no processes: rules on who is behind a flow (process, container, GPU)
    cannot be evaluated. Say so on every event whose flow conditions held for such a rule,
    instead of treating the rule as false (issue 8)."""
    if not policy.who_rules:
        return
    from egressd.policy.who import unevaluated

    rules = policy.who_rules
    # A who-rule that names detections holds for no event without one (Match.test), and
    # most events of a capture have none: when every who-rule names some (the shipped one
    # does), those events are skipped rather than each parsed back into flow facts.
    need_detection = all(r.match.kinds is not None for r in rules)
    # When the who-rules' flow conditions are detection kinds and nothing else, the answer
    # depends on an event's kinds alone: it is worked out once per set of kinds (parsing
    # every event back into flow facts was 4 % of a replay). Bounded like any memo here.
    by_kinds = all(_kinds_only(r.match) for r in rules)
    memo: dict[tuple[str, ...], list[str]] = {}
    for ev in events:
        if need_detection and not ev.detections:
            continue
        if by_kinds:
            kinds = tuple(ev.detections)
            names = memo.get(kinds)
            if names is None:
                if len(memo) >= _KINDS_MEMO_MAX:
                    memo.clear()
                names = memo[kinds] = unevaluated(rules, ev)
            names = list(names)  # each event its own list
        else:
            names = unevaluated(rules, ev)
        if names:
            ev.extra = {**(ev.extra or {}), "unevaluated_rules": names}


_KINDS_MEMO_MAX = 4096


def _kinds_only(m: Match) -> bool:
    """The block's only condition is on detection kinds (Match.test then reads nothing else)."""
    return (
        m.kinds is not None
        and m.protos is None
        and m.src is None
        and m.dst is None
        and m.src_ports is None
        and m.dst_ports is None
        and m.domains is None
        and m.content is None
        and not m.nots
    )
