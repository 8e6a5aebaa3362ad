"""Between the engine's events and the event log: attribution, in order, never blocking.

The daemon hands every event here instead of writing it. Each becomes a :class:`Pending` on
the attribution worker; the sink writes events in the order the engine made them, each as
soon as it and every event before it are attributed or past their deadline — so a slow
``/proc`` delays the log by at most ``timeout``, and never a verdict. Responses (freeze,
kill) are written as events of their own right after the event that caused them.

One exception, kept from before attribution: the alert of a *dropped* flow is written (and
flushed) before the verdict, so that whatever happens to the daemon next, the reason for a
drop the program can observe is on disk (tests/e2e/test_adversarial_crash.py). It carries
what memory holds at that instant: everything when the lookup that conntrack started at the
SYN already named the process (on a real network the first data segment follows the SYN by a
round trip), else what sock_diag said (uid; cgroup, unit, container and pod when the cgroup
is indexed) and why the process is missing. One record per decision, as before; the worker
still finishes the lookup for ``respond:`` and ``egressd status``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import Any

from egressd.attribution.service import Attributor, Pending, apply, fill, final_who
from egressd.eventlog import EventLog
from egressd.events import Event


class ResponseEvent(Event):
    """``event_type: response``: what a ``respond:`` did (or why it refused), for one flow."""

    @property
    def event_type(self) -> str:
        return "response"

    def to_dict(self) -> dict[str, Any]:
        d = Event.to_dict(self)
        d["event_type"] = self.event_type
        d.pop("alert", None)
        return d


def response_event(ev: Event, resp: dict[str, Any]) -> ResponseEvent:
    r = ResponseEvent(
        time.time(), ev.flow_id, ev.src_ip, ev.src_port, ev.dest_ip, ev.dest_port, ev.proto,
        ev.verdict, ev.action, ev.rule, ev.rule_description, "response", ev.mode,
    )  # fmt: skip
    r.process = ev.process
    r.extra = {"response": resp}
    if ev.extra and "container" in ev.extra:
        r.extra["container"] = ev.extra["container"]
    return r


class AttributedSink:
    def __init__(self, log: EventLog, timeout: float = 0.5) -> None:
        self.log = log
        self.timeout = timeout
        self.pending: deque[Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.attributor = Attributor(self._wakeup, timeout)
        self.recent: deque[dict[str, Any]] = deque(maxlen=10)  # the last alerts and who was behind them

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # The packet loop shares the interpreter lock with the attribution threads: it gets
        # it back within 1 ms instead of Python's default 5 ms when a worker is busy.
        sys.setswitchinterval(0.001)
        self.attributor.start()

    def _wakeup(self) -> None:
        """From the worker: ask the loop to flush (coalesced: one call in flight at most)."""
        loop = self._loop
        if loop is not None and not self._scheduled:
            self._scheduled = True
            try:
                loop.call_soon_threadsafe(self.flush)
            except RuntimeError:  # the loop is closing
                self._scheduled = False

    def take(self, events: deque[Event], policy: Any, reply_drop: bool = False) -> None:
        """Move the engine's new events in. ``reply_drop``: the packet being dropped is a
        reply, so the local socket of a blocked flow is to be destroyed."""
        a = self.attributor
        wrote = False
        while events:
            ev = events.popleft()
            blocked = ev.action == "blocked"
            p = a.submit(ev, policy, destroy=reply_drop and blocked)
            if blocked:
                who, complete = a.at_drop(ev)
                rule = None
                if complete and hasattr(policy, "judge_who"):
                    rule = policy.judge_who(ev, who.facts())
                    p.who_rule = rule
                self.log.write(fill(ev, who, rule))
                self.recent.append(_summary(ev))
                p.written = who
                wrote = True
            self.pending.append(p)
        if wrote:
            self.log.flush()  # before the verdict: see the module docstring
        a.kick()

    def flush(self, final: bool = False) -> None:
        """Write every event at the head that is attributed or out of time."""
        self._scheduled = False
        now = time.monotonic()
        wrote = False
        q = self.pending
        while q:
            p = q[0]
            late = not p.done and (final or now >= p.deadline)
            if not p.done and not late:
                break
            q.popleft()
            if late:
                self.attributor.timeouts += 1
            if p.who is not None and not late:
                self.attributor.count(p.who)
            else:
                self.attributor.unknown += 1
            if p.written is not None:
                ev = p.event  # written before its verdict; the lookup's result goes to status
                self._complete_recent(p, late)
            else:
                ev = apply(p, late)
                self.log.write(ev)
                if ev.event_type == "alert":
                    self.recent.append(_summary(ev))
            for resp in p.responses if not late else []:
                self.log.write(response_event(ev, resp))
            wrote = True
        if wrote:
            self.log.flush()
        if q and self._loop is not None and not final:
            self._loop.call_later(max(0.01, q[0].deadline - now), self._timer)

    def _complete_recent(self, p: Pending, late: bool) -> None:
        """A drop's alert went out before its process was named: ``egressd status`` shows
        what the worker found afterwards (the event log keeps one record per decision)."""
        who = final_who(p, late)
        if p.local_socket is not None:
            self.attributor.destroyed += 1 if p.local_socket.get("destroyed") else 0
        if who.pid is None:
            return
        for r in reversed(self.recent):
            if r.get("flow_id") == p.event.flow_id and "pid" not in r.get("process", {}):
                r["process"] = who.process
                r["found_after_the_drop"] = True
                for key, val in (("container", who.container), ("gpu", who.gpu)):
                    if val is not None:
                        r[key] = val
                break

    def _timer(self) -> None:
        if not self._scheduled:
            self.flush()

    def status(self) -> dict[str, Any]:
        return {**self.attributor.status(), "recent_alerts": list(self.recent)}

    def close(self) -> None:
        """At shutdown: give the worker its timeout to finish, then write everything."""
        end = time.monotonic() + self.timeout
        while self.pending and not all(p.done for p in self.pending) and time.monotonic() < end:
            time.sleep(0.01)
        self.flush(final=True)
        self.attributor.stop()


def _summary(ev: Event) -> dict[str, Any]:
    """What ``egressd status`` shows of an alert: when, where to, which rule, and who."""
    d: dict[str, Any] = {
        "flow_id": ev.flow_id,
        "time": ev.timestamp,
        "dest": f"{ev.dest_ip}:{ev.dest_port}",
        "rule": ev.rule,
        "action": ev.action,
        "process": ev.process,
    }
    for key in ("container", "gpu", "who_rule"):
        if ev.extra and key in ev.extra:
            d[key] = ev.extra[key]
    return d
