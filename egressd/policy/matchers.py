"""Compiled matchers: what :meth:`Policy.judge` runs once per new flow and again per detection.

Goal: deciding a flow costs a handful of dictionary/set look-ups and at most one
``bisect`` per address, independent of how many addresses, ports or names the lists hold.
Everything that can be done once (parsing, merging, sorting) is done when the policy is
loaded; the per-flow path allocates nothing but the label suffixes of a domain walk.

Plan, per condition:

* addresses: every network is an integer interval ``[first, last]``. Intervals of one IP
  version are sorted and merged (overlapping or adjacent ones become one), so the starts are
  strictly increasing and disjoint; ``bisect_right`` on the starts names the only interval
  that can hold the address. O(log n), n = merged intervals.
* ports: a ``frozenset`` when the set is small (the usual case: a few ports), else merged
  intervals with ``bisect`` like addresses — ``1024-65535`` must not become 64k set entries.
* domains: exact names in a set; ``*.suffix`` wildcards in a dict keyed by the suffix, walked
  from the longest proper suffix of the name to the shortest, one label at a time. O(labels).
* detections: dotted kinds compared with :func:`egressd.detect.base.kind_matches`, so a rule
  naming ``mining`` matches ``mining.xmr``. A flow carries one or two detections and a rule
  names one or two kinds: a nested loop is the fastest thing here.

Why precompiled objects and not closures: attribute tests on ``__slots__`` objects are
cheaper than Python calls, and a compiled condition stays inspectable (the CLI prints it).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from egressd.detect.base import kind_matches
from egressd.protocols import PORT_PROTOS

if TYPE_CHECKING:
    from egressd.policy.model import FlowFacts

# What a flow's payload turned out to be (``FlowFacts.content``, the match key ``content``).
# Known only once inspection of the flow has ended (its verdict pinned, or the flow ended):
# while it is PENDING no ``content`` condition holds, so a rule that needs the content can
# never fire on the first packet, before any payload could be read.
CONTENT_PENDING: Final = "pending"  # still being inspected
CONTENT_NONE: Final = "none"  # no payload in either direction (a scan, a refused connection)
CONTENT_UNCLASSIFIED: Final = "unclassified"  # payload that no detector recognised
CONTENT_CLASSIFIED: Final = "classified"  # a detector recognised the payload (any kind)
CONTENT_VALUES: Final = (CONTENT_NONE, CONTENT_UNCLASSIFIED, CONTENT_CLASSIFIED)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Protocols that carry port numbers. A port condition never matches another protocol, so
# ``dst_port: 53`` cannot match an ICMP flow whose (absent) ports the engine reports as 0.

# Above this many ports a PortSet keeps intervals instead of a frozenset (memory bound).
_PORTSET_MAX_SET: Final = 4096


def _merge(intervals: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, merged, disjoint intervals as two parallel lists (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi in sorted(intervals):
        if ends and lo <= ends[-1] + 1:
            if hi > ends[-1]:
                ends[-1] = hi
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


def _in_intervals(starts: list[int], ends: list[int], value: int) -> bool:
    i = bisect_right(starts, value) - 1
    return i >= 0 and value <= ends[i]


class CidrSet:
    """A set of IPv4 and IPv6 networks; membership in O(log n) per address."""

    __slots__ = ("_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        nets = tuple(dict.fromkeys(networks))
        self.networks: tuple[IPNetwork, ...] = nets
        self._v4_starts, self._v4_ends = _merge(
            (int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == 4
        )
        self._v6_starts, self._v6_ends = _merge(
            (int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == 6
        )

    def contains(self, version: int, value: int) -> bool:
        """``value`` is the address as an integer (``int.from_bytes(packed, "big")``)."""
        if version == 4:
            return _in_intervals(self._v4_starts, self._v4_ends, value)
        return _in_intervals(self._v6_starts, self._v6_ends, value)

    def contains_address(self, packed: bytes) -> bool:
        """Convenience for callers holding a packed address (4 or 16 bytes)."""
        return self.contains(4 if len(packed) == 4 else 6, int.from_bytes(packed, "big"))

    def __len__(self) -> int:
        return len(self.networks)

    def __repr__(self) -> str:
        return f"CidrSet({[str(n) for n in self.networks]!r})"


class PortSet:
    """A set of ports given as inclusive ranges; a frozenset when small, intervals otherwise."""

    __slots__ = ("_ends", "_ports", "_starts", "ranges")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        starts, ends = _merge(ranges)
        self.ranges: tuple[tuple[int, int], ...] = tuple(zip(starts, ends, strict=True))
        self._starts = starts
        self._ends = ends
        total = sum(hi - lo + 1 for lo, hi in self.ranges)
        self._ports: frozenset[int] | None = None
        if total <= _PORTSET_MAX_SET:
            self._ports = frozenset(p for lo, hi in self.ranges for p in range(lo, hi + 1))

    def contains(self, port: int) -> bool:
        if self._ports is not None:
            return port in self._ports
        return _in_intervals(self._starts, self._ends, port)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __repr__(self) -> str:
        return f"PortSet({[f'{lo}-{hi}' if lo != hi else str(lo) for lo, hi in self.ranges]!r})"


class DomainSet:
    """Exact names and ``*.suffix`` wildcards.

    ``*.x.com`` matches ``a.x.com`` and ``a.b.x.com`` but not ``x.com`` (list both when you
    mean both) and not ``evilx.com`` (matching is by whole labels, never by string suffix).
    Entries must already be normalised (lower case, no trailing dot, A-labels); the loader
    does that. Names given to :meth:`match` are expected in the same form (the engine
    lowercases what it learns), and are not normalised again on the hot path.
    """

    __slots__ = ("_exact", "_memo", "_wild", "entries")

    MEMO_MAX: Final = 4096  # names remembered per set (cleared when full: bounded whatever the input)

    def __init__(self, entries: Iterable[str] = ()) -> None:
        uniq = tuple(dict.fromkeys(entries))
        self.entries: tuple[str, ...] = uniq
        self._exact: frozenset[str] = frozenset(e for e in uniq if not e.startswith("*."))
        self._wild: dict[str, str] = {e[2:]: e for e in uniq if e.startswith("*.")}
        # Wildcard answers by name: the same few names are asked about again and again (every
        # flow to a CDN name, every rule with a domain list), and the label walk was ~9 % of a
        # capture replay's time (py-spy, bench/replay.py's merged corpus).
        self._memo: dict[str, str | None] = {}

    def match(self, name: str) -> str | None:
        """The entry that matches ``name`` (exact first, then the longest wildcard), or None."""
        if name in self._exact:
            return name
        wild = self._wild
        if not wild:
            return None
        memo = self._memo
        if name in memo:
            return memo[name]
        hit = self._walk(name, wild)
        if len(memo) >= self.MEMO_MAX:
            memo.clear()
        memo[name] = hit
        return hit

    @staticmethod
    def _walk(name: str, wild: dict[str, str]) -> str | None:
        i = name.find(".")
        while i >= 0:
            hit = wild.get(name[i + 1 :])
            if hit is not None:
                return hit
            i = name.find(".", i + 1)
        return None

    def match_any(self, names: Iterable[str]) -> str | None:
        """The first entry matching any of ``names`` (a flow may carry several names)."""
        for name in names:
            hit = self.match(name)
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"DomainSet({list(self.entries)!r})"


class Match:
    """One compiled ``match:`` block: every present condition must hold (AND), and none of
    the ``not`` blocks may hold. ``None`` means "no condition on this field".

    The order of the tests in :meth:`test` is cheapest and most selective first: protocol
    and port are integer look-ups that reject most flows for most rules.
    """

    __slots__ = (
        "_kind_hits",
        "content",
        "domains",
        "dst",
        "dst_ports",
        "kinds",
        "needs_content",
        "nots",
        "protos",
        "src",
        "src_ports",
    )

    def __init__(
        self,
        *,
        protos: frozenset[int] | None = None,
        src: CidrSet | None = None,
        dst: CidrSet | None = None,
        src_ports: PortSet | None = None,
        dst_ports: PortSet | None = None,
        domains: DomainSet | None = None,
        kinds: tuple[str, ...] | None = None,
        content: frozenset[str] | None = None,
        nots: tuple[Match, ...] = (),
    ) -> None:
        self.protos = protos
        self.src = src
        self.dst = dst
        self.src_ports = src_ports
        self.dst_ports = dst_ports
        self.domains = domains
        self.kinds = kinds
        self.content = content
        self.nots = nots
        # A block that looks at the content, even under ``not``, holds for no flow whose
        # content is still pending: "not none" is not yet known either.
        self.needs_content = content is not None or any(n.uses_content for n in nots)
        # Whether a detection kind matches one of ``kinds``, by kind: a flow's few kinds
        # are asked about at every judgement, by every rule naming kinds, and the pattern
        # walk was the largest part of judging (bench/replay.py, py-spy). Kinds come from
        # the detectors' finite set; the memo is cleared if it ever grows past KIND_MEMO_MAX.
        self._kind_hits: dict[str, bool] = {}

    @property
    def is_catch_all(self) -> bool:
        """True when there is no condition at all: the block matches every flow."""
        return (
            self.protos is None
            and self.src is None
            and self.dst is None
            and self.src_ports is None
            and self.dst_ports is None
            and self.domains is None
            and self.kinds is None
            and self.content is None
            and not self.nots
        )

    @property
    def uses_content(self) -> bool:
        return self.content is not None or any(n.uses_content for n in self.nots)

    @property
    def uses_address(self) -> bool:
        return self.src is not None or self.dst is not None or any(n.uses_address for n in self.nots)

    KIND_MEMO_MAX: Final = 1024

    def _kind_hit(self, kind: str) -> bool:
        """Does ``kind`` match one of the block's patterns (remembered for the next flow)."""
        assert self.kinds is not None
        hit = any(kind_matches(pattern, kind) for pattern in self.kinds)
        if len(self._kind_hits) >= self.KIND_MEMO_MAX:
            self._kind_hits.clear()
        self._kind_hits[kind] = hit
        return hit

    def test(self, f: FlowFacts, src: int, dst: int) -> bool:
        """``src``/``dst`` are the flow's addresses as integers, converted once per judge()."""
        if self.protos is not None and f.proto not in self.protos:
            return False
        if self.dst_ports is not None and (f.proto not in PORT_PROTOS or not self.dst_ports.contains(f.dport)):
            return False
        if self.src_ports is not None and (f.proto not in PORT_PROTOS or not self.src_ports.contains(f.sport)):
            return False
        if self.kinds is not None:
            hits = self._kind_hits
            for kind in f.detections:
                hit = hits.get(kind)
                if hit is None:
                    hit = self._kind_hit(kind)
                if hit:
                    break
            else:
                return False
        if self.needs_content and (f.content == CONTENT_PENDING or (self.content and f.content not in self.content)):
            return False
        if self.dst is not None and not self.dst.contains(f.version, dst):
            return False
        if self.src is not None and not self.src.contains(f.version, src):
            return False
        if self.domains is not None and self.domains.match_any(f.domains) is None:
            return False
        for sub in self.nots:  # noqa: SIM110 - a plain loop is cheaper than all() on the hot path
            if sub.test(f, src, dst):
                return False
        return True
