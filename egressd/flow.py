"""The flow table: bidirectional flows keyed by 5-tuple, bounded whatever the input.

Goal: O(1) lookup per packet, memory bounded by ``max_flows`` entries whose heavy parts
(the two 8 KiB stream heads) exist only while a flow is being classified.

Plan: two LRU-ordered dicts. ``active`` holds flows still being classified (they own stream
buffers and detector state); ``done`` holds flows whose verdict is final (pinned in the
kernel, so the daemon will rarely see them again; a pcap replay still does). When the table
is full we evict, in this order: a finished flow (least recently used), then an active flow
that has been idle past its timeout. Only when neither exists is the table *overloaded*;
then the caller applies the policy's ``on_overload`` action to the new flow instead of
tracking it — we never make room by forgetting a flow that is still being judged, because
that is exactly how an attacker would get a flow past classification (flood the table,
then send the handshake).

Why a key normalised by address order: a packet and its reply must find the same flow
without knowing which side opened it; the flow itself remembers the originator.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from egressd.stream import StreamHead

if TYPE_CHECKING:
    from egressd.detect.base import Detection, StreamDetector
    from egressd.detect.icmp import EchoState
    from egressd.detect.ssh_usage import UsageWatch
    from egressd.policy import Decision

FlowKey = tuple[int, bytes, int, bytes, int]

# Decision states of a flow (what the engine has told the shell so far).
PENDING: Final = 0  # accepted provisionally, still being classified
PINNED_ACCEPT: Final = 1
PINNED_DROP: Final = 2
# Accepted and reported, kept on the cheap (evictable) side of the table, but not pinned:
# the flow's later packets are still judged. Used for DNS, where every later query on the
# same socket must be seen (a harmless first lookup must not open the way for a pool's).
SETTLED: Final = 3


def make_key(proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> FlowKey:
    if (src, sport) <= (dst, dport):
        return (proto, src, sport, dst, dport)
    return (proto, dst, dport, src, sport)


class Flow:
    __slots__ = (
        "active_detectors",
        "bytes",
        "credit",
        "decision",
        "detections",
        "domains",
        "dport",
        "dst",
        "fid",
        "first_ts",
        "fwd",
        "fwd_pkts",
        "icmp",
        "inner_fwd",
        "inner_rev",
        "key",
        "last_ts",
        "midstream",
        "proto",
        "reported",
        "rev",
        "rev_pkts",
        "sport",
        "src",
        "stale",
        "state",
        "syn_seq",
        "usage",
        "version",
    )

    def __init__(
        self,
        fid: int,
        key: FlowKey,
        version: int,
        proto: int,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        ts: float,
    ) -> None:
        self.fid = fid
        self.key = key
        self.version = version
        self.proto = proto
        self.src = src  # originator
        self.sport = sport
        self.dst = dst  # responder
        self.dport = dport
        self.first_ts = ts
        self.last_ts = ts
        self.midstream = False
        self.syn_seq = -1  # the originator's SYN sequence number: tells a new connection from a retransmission
        self.fwd: StreamHead | None = None
        self.rev: StreamHead | None = None
        self.fwd_pkts = 0
        self.rev_pkts = 0
        self.credit = 0  # empty packets (ACKs) earned by segments that grew a head
        self.stale = 0  # packets that added nothing to either head (see Engine._inspect)
        self.bytes = 0
        self.state = PENDING
        self.decision: Decision | None = None
        self.detections: dict[str, Detection] = {}  # by detector name
        self.domains: tuple[str, ...] = ()
        self.active_detectors: list[tuple[str, StreamDetector]] = []
        self.inner_fwd = 0
        self.icmp: EchoState | None = None  # ICMP echo flows: requests awaiting their replies
        self.inner_rev = 0
        self.reported: tuple[str, str] | None = None  # (action, rule) last written as an event
        self.usage: UsageWatch | None = None  # what an SSH session is used for (detect/ssh_usage.py)

    def release(self) -> None:
        """Drop what only classification needs, once the verdict is final."""
        self.fwd = None
        self.rev = None
        self.icmp = None
        self.active_detectors = []
        self.usage = None


class FlowTable:
    __slots__ = ("active", "done", "max_flows")

    def __init__(self, max_flows: int) -> None:
        self.max_flows = max_flows
        self.active: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.done: OrderedDict[FlowKey, Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self.active) + len(self.done)

    def get(self, key: FlowKey) -> Flow | None:
        f = self.active.get(key)
        if f is not None:
            self.active.move_to_end(key)
            return f
        f = self.done.get(key)
        if f is not None:
            self.done.move_to_end(key)
        return f

    def finish(self, flow: Flow) -> None:
        """Move a flow whose verdict is now final to the cheap side of the table."""
        if self.active.pop(flow.key, None) is not None:
            flow.release()
            self.done[flow.key] = flow

    def make_room(self, now: float, idle_of: dict[int, float]) -> Flow | bool | None:
        """Free one slot if the table is full.

        Returns True when there is room without eviction, an evicted *active* flow (the
        caller reports its end), None when a finished flow was evicted, or False when the
        table is overloaded: full of flows still being classified and none idle.
        """
        if len(self.active) + len(self.done) < self.max_flows:
            return True
        if self.done:
            self.done.popitem(last=False)
            return None
        key, oldest = next(iter(self.active.items()))
        if now - oldest.last_ts >= idle_of.get(oldest.proto, 60.0):
            del self.active[key]
            return oldest
        return False

    def shrink(self) -> None:
        """After a reload to a smaller max_flows: drop finished flows (oldest first) until
        the table fits. Flows still being classified are never dropped to make room."""
        while len(self.active) + len(self.done) > self.max_flows and self.done:
            self.done.popitem(last=False)

    def discard(self, key: FlowKey) -> None:
        self.active.pop(key, None)
        self.done.pop(key, None)

    def add(self, flow: Flow) -> None:
        self.active[flow.key] = flow

    def expire(self, now: float, idle_of: dict[int, float]) -> list[Flow]:
        """Remove flows idle past their timeout; returns the active ones (to be reported)."""
        ended: list[Flow] = []
        for table, is_active in ((self.active, True), (self.done, False)):
            # Oldest first (LRU order), up to the first flow still within its timeout: one
            # walk, then the deletions (a fresh iterator per expired flow cost more than the
            # deletions themselves in a capture replay's sweeps).
            gone: list[FlowKey] = []
            for key, f in table.items():
                if now - f.last_ts < idle_of.get(f.proto, 60.0):
                    break
                gone.append(key)
                if is_active:
                    ended.append(f)
            for key in gone:
                del table[key]
        return ended
