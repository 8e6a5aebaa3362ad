"""Who is behind a flow: the attribution worker the daemon hands flows and events to.

Goal: every event names the process, its container or pod, and whether it holds a GPU —
without a verdict ever waiting for ``/proc``. Plan:

* Lookups start when conntrack announces a connection (its SYN left: ``ctevents``), or, when
  those events are unavailable, at a fresh flow's first packet (``prefetch``): the packet loop
  and the conntrack thread only append to a deque. The worker thread does the lookups:
  sock_diag (uid, inode, cgroup id), then the cgroup's processes' ``/proc/PID/fd``, the
  cgroup path, the GPU fds. One lookup per flow: results are cached by 4-tuple (for the
  events that follow) and by flow id (a flow's later events). Early lookups are bounded by a
  CPU budget, so a connection flood cannot make them a CPU sink.
* Events (``submit``) are written when their attribution is done or ``timeout`` has passed,
  in the order the engine made them, and say why when it failed:
  ``"process": {"unknown": "socket closed before lookup"}``, never nothing.
* Except a dropped flow's alert, which is written before its verdict (sink.py), from memory
  only (``at_drop``): the daemon asks sock_diag for the socket first, because the verdict
  resets it (one netlink round trip, ~8 µs measured, no ``/proc``; dropped flows only).
  When the lookup started at the flow's SYN is still running, the drop waits for it, at most
  ``DROP_WAIT`` and ``DROP_WAIT_BUDGET`` per second in all: since the fast path, a client that
  sends at once (a miner on a LAN, the demo's) is judged within a millisecond of its SYN,
  before the worker has read ``/proc``, and the alert, the one record of that decision, would
  name no process. The wait is the worker's lookup, never ``/proc`` on the loop; the packet
  being dropped is the one waiting, and the budget keeps a flood of drops from stalling the
  loop for longer than that.
* A drop with no lookup started for it (``_lookup_at_drop``) starts one at the head of the
  worker's queue and waits for it the same way: a UDP flow dropped at its first datagram
  (conntrack never confirms the entry, so it announces nothing: a DNS tunnel, a VPN
  handshake) and a TCP flow whose early lookup the budget skipped would otherwise be named
  by uid and cgroup only. Bounded like the early lookups (``prefetch_ok``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from egressd.attribution import respond as responder
from egressd.attribution.cgroup import CgroupIndex, cgroup_of, container_of, procs, unit_of, v2_mount
from egressd.attribution.ctevents import ConntrackNew
from egressd.attribution.gpu import Nvml, gpu_from_proc
from egressd.attribution.netns import Namespaces
from egressd.attribution.proc import Denied, describe, find_socket_owner, pids, start_time, user_name
from egressd.attribution.sockdiag import NotFound, SockDiag, SocketInfo
from egressd.events import Event
from egressd.packet import Packet, decode

Key = tuple[int, bytes, int, bytes, int]  # proto, local address, local port, remote address, remote port

_PROTOS: Final = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
CACHE: Final = 16384  # remembered results, by 4-tuple and by flow id (LRU)
KEY_TTL: Final = 120.0  # seconds a 4-tuple's result stands for a later event of that flow
PROC_TTL: Final = 5.0  # seconds a process's /proc description is reused
GPU_TTL: Final = 2.0  # seconds a (process, cgroup) GPU answer is reused
MAX_QUEUE: Final = 20000  # items waiting for the worker; beyond, events go out unattributed
MAX_PREFETCH_QUEUE: Final = 1024  # early lookups waiting; beyond, they are skipped (events still get one)
# Worker time per second (a flood bound: every new connection could cost a /proc search).
BUDGET: Final = 0.25  # all lookups; beyond it an event says "attribution budget spent"
PREFETCH_BUDGET: Final = 0.15  # the part early lookups may use, leaving the rest to events
SEE_RECORD: Final = "the flow was dropped before the lookup of its socket finished"
DROP_WAIT: Final = 0.02  # seconds a drop may wait for the lookup of its socket
DROP_WAIT_BUDGET: Final = 0.1  # seconds of such waits per second, in all
DENIED: Final = (
    "the socket's process cannot be read (needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, and a visible /proc)"
)


@dataclass(slots=True)
class Who:
    """The answer for one flow. ``process`` is the event's object (``{"unknown": why}`` when
    the process could not be named); the rest are facts for policy and responses."""

    process: dict[str, Any]
    container: dict[str, Any] | None = None
    gpu: dict[str, Any] | None = None
    pid: int | None = None
    started: int | None = None
    cgroup: str | None = None
    inode: int = 0  # the socket's: tells a cached answer from one about an earlier socket

    def facts(self) -> dict[str, Any]:
        """What ``process.*``/``container``/``pod``/``cgroup``/``gpu`` policy conditions read."""
        return {
            "name": self.process.get("name"),
            "executable": self.process.get("executable"),
            "user": self.process.get("user"),
            "uid": self.process.get("uid"),
            "cgroup": self.cgroup,
            "container": self.container,
            # True / False, or None when the fds could not be read (a gpu condition then fails)
            "gpu": None if self.gpu is not None and "unknown" in self.gpu else self.gpu is not None,
            "known": self.pid is not None or self.cgroup is not None,
        }


def lower_priority() -> None:
    """Attribution threads yield the CPU to the packet loop when both want it (nice +5; the
    thread's own nice value, so the loop keeps the daemon's)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)


def _place(process: dict[str, Any], cgroup: str | None) -> dict[str, Any] | None:
    """Where a socket's owner runs: its cgroup and systemd unit into ``process``; its container
    (or pod), if the cgroup path names one, returned for the event's ``container``."""
    if cgroup is None:
        return None
    process["cgroup"] = cgroup
    unit = unit_of(cgroup)
    if unit is not None:
        process["unit"] = unit
    ctr = container_of(cgroup)
    return ctr.as_dict() if ctr is not None else None


def unknown(why: str) -> Who:
    return Who({"unknown": why})


@dataclass(slots=True)
class Pending:
    """An event waiting for its attribution; the daemon writes it when ``done`` or late."""

    event: Event
    deadline: float
    policy: Any = None  # the Policy in force when the event was made (who-rules, respond)
    destroy: bool = False  # a drop decided on a reply: abort the local socket
    who: Who | None = None
    done: bool = False
    responses: list[dict[str, Any]] = field(default_factory=list)
    local_socket: dict[str, Any] | None = None
    who_rule: Any = None  # the rule on process facts that matched, if any
    written: Who | None = None  # a drop's alert went out before the verdict, with this


def key_of_event(ev: Event) -> Key | None:
    proto = _PROTOS.get(ev.proto)
    if proto is None:
        return None
    fam = socket.AF_INET6 if ":" in ev.src_ip else socket.AF_INET
    try:
        return (
            proto,
            socket.inet_pton(fam, ev.src_ip),
            ev.src_port,
            socket.inet_pton(fam, ev.dest_ip),
            ev.dest_port,
        )
    except OSError:
        return None


class Attributor:
    """The worker and its caches. ``prefetch``/``submit``/``socket_now`` are called from the
    daemon's loop thread; everything else runs on the worker."""

    def __init__(self, on_done: Callable[[], None] | None = None, timeout: float = 0.5) -> None:
        self.timeout = timeout
        self.on_done = on_done
        self.node = SockDiag()  # created here, on the caller's thread: the daemon's namespace
        self.mount = v2_mount()
        self.cgroups = CgroupIndex(self.mount)
        self.nvml = Nvml()
        try:
            self.netns: Namespaces | None = Namespaces()
        except OSError:
            self.netns = None
        self._work: deque[tuple[bytes, bool] | Key | Pending] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._early: OrderedDict[Key, tuple[SocketInfo, str]] = OrderedDict()
        # Keys whose lookup the conntrack thread (or a drop) asked for and the worker has not
        # finished: a drop of such a flow may wait for it (``at_drop``).
        self._inflight: set[Key] = set()
        self._finished = threading.Condition()
        self._dw_window = 0.0
        self._dw_spent = 0.0
        self.drop_waits = 0  # drops that waited for the lookup of their socket
        self.drop_waits_named = 0  # ... and got the process named by it
        self.drop_lookups = 0  # lookups started by a drop (none was running for its flow)
        self._by_key: OrderedDict[Key, tuple[float, Who]] = OrderedDict()
        self._by_flow: OrderedDict[int, Who] = OrderedDict()
        # The processes that owned the last sockets of each cgroup: a job opens many
        # connections from the same few processes, so they are looked at first.
        self._owners: OrderedDict[int, deque[int]] = OrderedDict()
        self._procs: OrderedDict[tuple[int, int], tuple[float, dict[str, Any], str | None]] = OrderedDict()
        self._gpus: OrderedDict[tuple[int | None, str | None], tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="egressd-attribution", daemon=True)
        self.ct: ConntrackNew | None = None
        self.ct_unavailable: str | None = None
        try:
            self.ct = ConntrackNew(self._on_ct_new, self.prefetch_ok)  # created here: the daemon's namespace
        except OSError as e:
            self.ct_unavailable = f"conntrack events: {e.strerror or e}"
        # Counters for `egressd status` and the benchmark.
        self.lookups = 0
        self.attributed = 0  # events whose process was named
        self.partial = 0  # socket/cgroup known, process not
        self.unknown = 0
        self.timeouts = 0  # events written before their attribution finished
        self.inline = 0  # sock_diag asked on the loop thread for a dropped flow
        self.reasons: dict[str, int] = {}
        self.responses = 0
        self.prefetch_skipped = 0
        self.destroyed = 0  # local sockets aborted for drops decided on a reply
        self.budget_spent = 0  # events not looked up: the lookup budget was spent
        # Early lookups stop while the engine sheds new flows (on_overload): a flood is when
        # the packet loop needs the CPU most, and its flows are the least worth a /proc search.
        self.paused_until = 0.0
        self._pf_window = 0.0
        self._pf_spent = 0.0

    # -- loop-thread side ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.ct is not None:
            self.ct.start()

    def _on_ct_new(self, key: Key) -> None:
        """From the conntrack thread (its gate checked the budget): look the owner up now."""
        if len(self._work) < MAX_PREFETCH_QUEUE:
            with self._finished:
                self._inflight.add(key)
            self._work.append(key)
            self._wake.set()

    def prefetch_ok(self) -> bool:
        """Early lookups are a courtesy, bounded so that a connection flood cannot turn them
        into a CPU sink: at most PREFETCH_BUDGET s of worker time per second, and a short
        queue. Skipped flows are still looked up (once) when their event comes."""
        self._roll_window()
        if (
            self._pf_spent >= PREFETCH_BUDGET
            or len(self._work) >= MAX_PREFETCH_QUEUE
            or time.monotonic() < self.paused_until
        ):
            self.prefetch_skipped += 1
            return False
        return True

    def stop(self, wait: float = 1.0) -> None:
        self._stop = True
        self._wake.set()
        if self.ct is not None:
            self.ct.stop()
        if self._thread.ident is not None:
            self._thread.join(wait)
        self.node.close()
        if self.netns is not None and not self._thread.is_alive():
            self.netns.close()

    def kick(self) -> None:
        if self._work:
            self._wake.set()

    def _roll_window(self) -> None:
        now = time.monotonic()
        if now - self._pf_window >= 1.0:
            self._pf_window = now
            self._pf_spent = 0.0

    def prefetch(self, payload: bytes, reply: bool) -> None:
        """A fresh flow's first packet: name its socket's owner while it is surely alive.
        Only without conntrack events, which announce the flow a round trip earlier."""
        if self.ct is None and self.prefetch_ok():
            self._work.append((payload, reply))

    def submit(self, ev: Event, policy: Any, destroy: bool = False) -> Pending:
        p = Pending(ev, time.monotonic() + self.timeout, policy, destroy)
        if len(self._work) < MAX_QUEUE:
            self._work.append(p)
        else:
            p.who = unknown("attribution queue full")
            p.done = True
        return p

    def socket_now(self, ev: Event) -> SocketInfo | None:
        """sock_diag for a flow about to be dropped (see the module docstring). Never raises."""
        try:
            key = key_of_event(ev)
            if key is None:
                return None
            known = self._early.get(key)
            if known is not None:
                return known[0]
            self.inline += 1
            try:
                info = self.node.lookup(*key)
                where = "node"
            except NotFound:
                sd = self.netns.for_address(key[1]) if self.netns is not None else None
                if sd is None:
                    return None
                info = sd.lookup(*key)
                where = "netns"
            self._early[key] = (info, where)
            while len(self._early) > 4096:
                self._early.popitem(last=False)
            return info
        except Exception:  # the worker will try again, and say why if it fails too
            return None

    def at_drop(self, ev: Event) -> tuple[Who, bool]:
        """Who is behind a flow being dropped, from memory only (no /proc, no tree walk): the
        alert is written before the verdict. (who, complete): complete when the lookup
        started at the SYN already named the process of this very socket."""
        info = self.socket_now(ev)
        key = key_of_event(ev)
        if key is not None and info is not None:
            self._lookup_at_drop(key, info)
        waited = key is not None and self._wait_for_lookup(key)
        who = self._answer_for(key, info) if key is not None else None
        if who is not None:
            # The lookup started at the SYN (or by this drop), about this very socket: what it
            # found (or why not).
            if waited and who.pid is not None:
                self.drop_waits_named += 1
            return who, who.pid is not None
        if info is None:
            return unknown("socket not found when the flow was dropped"), False
        if info.state == "time-wait":
            return unknown("socket closed before the drop (time-wait)"), False
        path = self.cgroups.cached(info.cgroup_id)
        why = f"process not named in time: {SEE_RECORD}"
        if info.inode == 0:
            why = f"socket orphaned ({info.state}): its program closed it or exited before the drop"
        process: dict[str, Any] = {"unknown": why}
        process["uid"] = info.uid
        ctr = _place(process, path)
        return Who(process, ctr, None, None, None, path, info.inode), False

    def _answer_for(self, key: Key, info: SocketInfo | None) -> Who | None:
        """A finished lookup's answer about this very socket (the same inode; without the
        socket, only an answer that named a process), while it stands (``KEY_TTL``)."""
        hit = self._by_key.get(key)
        if hit is None or time.monotonic() - hit[0] >= KEY_TTL:
            return None
        who = hit[1]
        if (info is None and who.pid is not None) or (info is not None and info.inode == who.inode):
            return who
        return None

    def _lookup_at_drop(self, key: Key, info: SocketInfo) -> None:
        """Start the lookup a flow being dropped never got (module docstring), first in line."""
        if info.inode == 0 or info.state == "time-wait":
            return  # nobody holds the socket any more: /proc has nothing to find
        if self._answer_for(key, info) is not None:
            return  # already named (or not) for this very socket
        with self._finished:
            if key in self._inflight or not self.prefetch_ok():
                return
            self._inflight.add(key)
        self.drop_lookups += 1
        self._work.appendleft(key)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "attributed": self.attributed,
            "partial": self.partial,
            "unknown": self.unknown,
            "timeouts": self.timeouts,
            "inline_socket_lookups": self.inline,
            "drop_waits": {
                "waited": self.drop_waits,
                "named": self.drop_waits_named,
                "lookups_started_by_the_drop": self.drop_lookups,
            },
            "early_lookups_skipped": self.prefetch_skipped,
            "sockets_destroyed": self.destroyed,
            "budget_spent": self.budget_spent,
            "responses": self.responses,
            "reasons": dict(self.reasons),
            "queue": len(self._work),
            "cgroup_v2": self.mount,
            "conntrack_events": self.ct_unavailable
            or ({"seen": self.ct.seen, "overflows": self.ct.overflows} if self.ct is not None else None),
            "nvml": self.nvml.unavailable or ("available" if self.nvml._mod is not None else "not tried"),
            "netns": None
            if self.netns is None
            else {
                "namespaces": len(self.netns.by_ino),
                "addresses": len(self.netns.by_addr),
                "skipped": self.netns.skipped,
                "unavailable": self.netns.unavailable,
            },
        }

    def count(self, who: Who) -> None:
        if who.pid is not None:
            self.attributed += 1
        else:
            why = str(who.process.get("unknown", ""))
            if who.cgroup is not None:
                self.partial += 1
            else:
                self.unknown += 1
            self.reasons[why] = self.reasons.get(why, 0) + 1

    # -- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        lower_priority()
        self._safe(self.cgroups.refresh)  # index the cgroup tree once at start
        first = True
        while not self._stop:
            if not first:
                self._wake.wait(0.5)
                self._wake.clear()
            first = False
            if self.netns is not None and self.netns.due(False):
                self._safe(self.netns.refresh)
            finished = 0
            while self._work and not self._stop:
                item = self._work.popleft()
                if isinstance(item, Pending):
                    self._safe(lambda it=item: self._event(it))  # type: ignore[misc]
                    item.done = True
                    finished += 1
                    if finished >= 64 and self.on_done is not None:
                        self.on_done()  # a long burst: let the loop write what is done so far
                        finished = 0
                elif len(item) == 5:
                    self._safe(lambda it=item: self._prefetch_key(it))  # type: ignore[misc]
                else:
                    self._safe(lambda it=item: self._prefetch(*it))  # type: ignore[misc]
            if finished and self.on_done is not None:
                self.on_done()  # one wake-up of the packet loop per burst, not per event

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a bug here must cost one attribution, never the worker
            return

    def _prefetch(self, payload: bytes, reply: bool) -> None:
        p = decode(payload)
        if type(p) is not Packet or p.proto not in _PROTOS.values():
            return
        assert isinstance(p, Packet)
        key: Key = (p.proto, p.dst, p.dport, p.src, p.sport) if reply else (p.proto, p.src, p.sport, p.dst, p.dport)
        self._prefetch_key(key)

    def _prefetch_key(self, key: Key) -> None:
        try:
            self._lookup_key(key)
        finally:
            with self._finished:  # a drop may be waiting for this key (at_drop)
                self._inflight.discard(key)
                self._finished.notify_all()

    def _lookup_key(self, key: Key) -> None:
        now = time.monotonic()
        hit = self._by_key.get(key)
        if hit is not None and now - hit[0] < 1.0:
            return  # conntrack and the first packet both asked: one lookup per flow
        try:
            who = self._attribute(key, now + self.timeout, early=True)
        finally:
            self._pf_spent += time.monotonic() - now
        if who.cgroup is None and who.pid is None:
            # Not a local socket (an inbound connection), or gone: the event will say why.
            # An answer about an earlier connection on the same 4-tuple must not stand in.
            self._by_key.pop(key, None)
            return
        self._by_key[key] = (now, who)
        self._by_key.move_to_end(key)
        while len(self._by_key) > CACHE:
            self._by_key.popitem(last=False)

    def _wait_for_lookup(self, key: Key) -> bool:
        """On the loop thread, for a flow being dropped: wait (bounded, see the module
        docstring) for the lookup its SYN started. True when there was one to wait for."""
        now = time.monotonic()
        if now - self._dw_window >= 1.0:
            self._dw_window = now
            self._dw_spent = 0.0
        allowed = min(DROP_WAIT, DROP_WAIT_BUDGET - self._dw_spent)
        with self._finished:
            if key not in self._inflight or allowed <= 0:
                return False
            self.drop_waits += 1
            self._finished.wait_for(lambda: key not in self._inflight, allowed)
        self._dw_spent += time.monotonic() - now
        return True

    def _event(self, p: Pending) -> None:
        ev = p.event
        who = self._by_flow.get(ev.flow_id)
        key = key_of_event(ev)
        if who is None:
            hit = self._by_key.get(key) if key is not None else None
            now = time.monotonic()
            early = self._early.get(key) if key is not None else None
            if hit is not None and now - hit[0] < KEY_TTL and (early is None or early[0].inode == hit[1].inode):
                # Looked up at the SYN (conntrack) or the first packet, about this very socket.
                who = hit[1]
            elif key is None:
                who = unknown(f"no socket lookup for protocol {ev.proto}")
            else:
                self._roll_window()
                if self._pf_spent >= BUDGET:
                    self.budget_spent += 1
                    who = unknown(f"attribution budget spent ({BUDGET:g} s of lookups per second: a flood?)")
                else:
                    t0 = time.monotonic()
                    try:
                        who = self._attribute(key, p.deadline)
                    finally:
                        self._pf_spent += time.monotonic() - t0
            self._by_flow[ev.flow_id] = who
            while len(self._by_flow) > CACHE:
                self._by_flow.popitem(last=False)
        p.who = who
        if p.destroy and key is not None:
            p.local_socket = self._destroy(key)
        policy = p.policy
        if policy is None:
            return
        rule = policy.rule(ev.rule)
        action = getattr(rule, "respond", "") if rule is not None else ""
        judge_who = getattr(policy, "judge_who", None)
        if judge_who is not None:
            p.who_rule = judge_who(ev, who.facts())
            if p.who_rule is not None and not action:
                action = p.who_rule.respond
        if not action:
            return
        if getattr(policy, "mode", "enforce") == "monitor":
            p.responses.append({"action": action, "result": "refused", "reason": "monitor mode: would respond"})
        elif who.pid is None:
            p.responses.append({"action": action, "result": "refused", "reason": "no process was attributed"})
        elif action == "freeze":
            p.responses.append(responder.freeze(self.mount, who.pid, who.started))
        elif action == "kill":
            p.responses.append(responder.kill(who.pid, who.started))
        self.responses += len(p.responses)

    def _remember_owner(self, cgroup_id: int, pid: int) -> None:
        q = self._owners.get(cgroup_id)
        if q is None:
            q = self._owners[cgroup_id] = deque(maxlen=4)
            while len(self._owners) > 1024:
                self._owners.popitem(last=False)
        if pid in q:
            q.remove(pid)
        q.appendleft(pid)

    def _destroy(self, key: Key) -> dict[str, Any]:
        early = self._early.get(key)
        sd: SockDiag | None = self.node
        if early is not None and early[1] == "netns" and self.netns is not None:
            sd = self.netns.for_address(key[1])
        for cand in (sd, self.netns.for_address(key[1]) if self.netns is not None else None):
            if cand is None:
                continue
            try:
                cand.destroy(*key)
                return {"destroyed": True}
            except NotFound:
                continue
            except OSError as e:
                return {"destroyed": False, "reason": f"SOCK_DESTROY failed: {e.strerror or e}"}
        return {"destroyed": False, "reason": "the local socket was already gone"}

    def _find_socket(self, key: Key, early: bool = False) -> tuple[SocketInfo | None, str]:
        found = self._early.get(key)  # kept for the event and for SOCK_DESTROY; bounded LRU
        if found is not None:
            return found[0], ""
        try:
            return self.node.lookup(*key), ""
        except NotFound:
            pass
        except OSError as e:
            return None, f"sock_diag failed: {e.strerror or e}"
        ns = self.netns
        if ns is None:
            return None, "socket closed before lookup"
        sd = ns.for_address(key[1])
        if sd is None and not early and ns.due(True):
            ns.refresh()
            sd = ns.for_address(key[1])
        if sd is not None:
            try:
                return sd.lookup(*key), ""
            except (NotFound, OSError):
                pass
            return None, "socket closed before lookup"
        if ns.unavailable is not None:
            return None, f"socket closed before lookup, or in another network namespace that {ns.unavailable}"
        return None, "socket closed before lookup"

    def _attribute(self, key: Key, deadline: float, early: bool = False) -> Who:
        self.lookups += 1
        info, why = self._find_socket(key, early)
        if info is None:
            return unknown(why)
        if info.state == "time-wait":  # a kernel leftover: no owner, no uid, no cgroup
            return unknown("socket closed before lookup (time-wait)")
        cg = self.cgroups.path(info.cgroup_id)
        pid: int | None = None
        reason = ""
        if info.inode == 0:
            reason = f"socket orphaned ({info.state}): its program closed it or exited before lookup"
        else:
            recent = list(self._owners.get(info.cgroup_id, ()))
            try:
                pid = find_socket_owner(info.inode, recent, deadline) if recent else None
                cands = recent
                if pid is None:
                    members = procs(self.mount, cg) if self.mount is not None and cg is not None else []
                    cands = recent + [x for x in members if x not in recent]
                    pid = find_socket_owner(info.inode, cands[len(recent) :], deadline)
                if pid is None:
                    # Everything else, newest first: a short-lived client is most likely recent,
                    # and it must be found before it exits.
                    tried = set(cands)
                    rest = sorted((x for x in pids() if x not in tried), reverse=True)
                    pid = find_socket_owner(info.inode, rest, deadline)
                if pid is not None:
                    self._remember_owner(info.cgroup_id, pid)
            except Denied:
                reason = DENIED
            except TimeoutError:
                reason = "process lookup timed out"
            if pid is None and not reason:
                reason = "no process holds the socket any more: closed or exited before lookup"
        started = start_time(pid) if pid is not None else None
        desc, pcg = self._describe(pid, started) if pid is not None and started is not None else (None, None)
        if pid is not None and desc is None:
            reason = "process exited before lookup"
            pid = None
        pcg = pcg or cg
        if desc is not None:
            process = dict(desc)
        else:
            process = {"unknown": reason, "uid": info.uid}
            name = user_name(info.uid)
            if name is not None:
                process["user"] = name
            started = None
        ctr = _place(process, pcg)
        gpu = self._gpu(pid, pcg, deadline)
        if gpu is None and reason == DENIED:
            gpu = {"unknown": DENIED.replace("the socket's process", "the processes' fds")}
        return Who(process, ctr, gpu, pid, started, pcg, info.inode)

    def _describe(self, pid: int, started: int) -> tuple[dict[str, Any] | None, str | None]:
        """/proc facts of a process and its cgroup, cached for PROC_TTL by (pid, start time):
        a job opens many connections from the same processes."""
        now = time.monotonic()
        hit = self._procs.get((pid, started))
        if hit is not None and now - hit[0] < PROC_TTL:
            return hit[1], hit[2]
        desc = describe(pid)
        pcg = cgroup_of(pid)
        if desc is not None:
            self._procs[(pid, started)] = (now, desc, pcg)
            while len(self._procs) > CACHE:
                self._procs.popitem(last=False)
        return desc, pcg

    def _gpu(self, pid: int | None, pcg: str | None, deadline: float) -> dict[str, Any] | None:
        """GPU facts for (process, cgroup), cached for GPU_TTL: scanning every process of a
        large cgroup per connection would cost more than all the rest."""
        now = time.monotonic()
        key = (pid, pcg)
        hit = self._gpus.get(key)
        if hit is not None and now - hit[0] < GPU_TTL:
            return hit[1]
        members = procs(self.mount, pcg) if self.mount is not None and pcg is not None else []
        gpu = gpu_from_proc(pid, members, deadline + self.timeout)
        if gpu is None:
            holders = set(members) | ({pid} if pid is not None else set())
            nv = self.nvml.devices_for(holders) if holders else None
            if nv:
                gpu = {"devices": nv, "source": "nvml"}
        self._gpus[key] = (now, gpu)
        while len(self._gpus) > CACHE:
            self._gpus.popitem(last=False)
        return gpu


def final_who(p: Pending, timed_out: bool) -> Who:
    if (timed_out and not p.done) or p.who is None:
        return unknown("attribution timed out")
    return p.who


def apply(p: Pending, timed_out: bool) -> Event:
    """The event with its attribution (or the reason it has none) filled in."""
    return fill(p.event, final_who(p, timed_out), p.who_rule if p.done else None, p.local_socket)


def fill(ev: Event, who: Who, rule: Any, local_socket: dict[str, Any] | None = None) -> Event:
    ev.process = who.process
    extra = dict(ev.extra) if ev.extra else {}
    if who.container is not None:
        extra["container"] = who.container
    if who.gpu is not None:
        extra["gpu"] = who.gpu
    if local_socket is not None:
        extra["local_socket"] = local_socket
    if rule is not None:
        # A rule on who is behind the flow held: it names itself, may raise the severity and
        # turns an accepted flow's record into an alert (the verdict itself is unchanged).
        extra["who_rule"] = rule.name
        if rule.severity:
            ev.severity = rule.severity
        if ev.verdict == "accept":
            ev.verdict = "alert"
    ev.extra = extra or None
    return ev
