"""What DNS tells the engine: the names a flow asks for, and the name behind each address.

Why a module of its own: following one DNS packet used to mean going back and forth between
the engine and ``detect/dns.py`` a dozen times (parse, learn the answers, collect the
questions, make the ``dns`` finding, test the port in two places that disagreed). Here the
engine makes one call per DNS datagram or DNS-over-TCP head, :meth:`DnsNames.observe`, and
one look-up per new flow, :meth:`DnsNames.names_for`; everything between is in this file.

What is learned, and from whom (the trust rules):

* answers name addresses: every A/AAAA reachable from a question through the answer
  section's CNAME chain (``answers_by_ip``: glue and unrelated records teach nothing);
* over UDP from either side (a capture may start after the query), over TCP only from the
  responder's head (the originator of a TCP connection is not a resolver);
* questions only from the originator: they are the flow's own names (a pool's name in a
  query is what ``drop-mining-pool-lookups`` drops).

Bounds: the address -> names cache is an LRU of at most ``dns_cache`` entries (the policy's
setting), each holding at most ``MAX_NAMES_PER_ADDRESS`` names, expiring at the record's
TTL plus ``TTL_GRACE`` seconds (a client may connect a little after the TTL ran out).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from egressd.detect import base as d
from egressd.detect.base import Detection
from egressd.detect.dns import answers_by_ip as _answers_by_ip
from egressd.detect.dns import iter_tcp_messages, parse_message

DNS_PORTS: Final = frozenset({53, 5353})  # DNS and multicast DNS: the one port test
MAX_NAMES_PER_ADDRESS: Final = 4  # CDNs put many names on one address; keep the latest few
TTL_GRACE: Final = 60.0


def is_dns_port(sport: int, dport: int) -> bool:
    """Is a flow between these ports DNS (either end on a DNS port)? The one test, for UDP and TCP."""
    return dport in DNS_PORTS or sport in DNS_PORTS


@dataclass(frozen=True, slots=True)
class DnsSeen:
    """What one observation taught about the flow it came from."""

    queries: tuple[str, ...]  # names the originator asked for, in order
    detection: Detection | None  # the ``dns`` finding (first question), when there is one
    qtypes: tuple[int, ...] = ()  # the record type of each query (the DNS-tunnel tracker uses them)
    dns: bool = True  # False: not one DNS message parsed (a tunnel's own framing on the port?)


NOTHING: Final = DnsSeen((), None)
NOT_DNS: Final = DnsSeen((), None, dns=False)


class DnsNames:
    """The address -> names cache and the reading of DNS messages (see the module doc)."""

    __slots__ = ("_cache", "cap")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._cache: OrderedDict[bytes, tuple[tuple[str, ...], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def names_for(self, ip: bytes, ts: float) -> tuple[str, ...]:
        """Names whose answers gave ``ip`` (newest first), or () when unknown or expired."""
        e = self._cache.get(ip)
        if e is None or e[1] < ts:
            return ()
        return e[0]

    def observe(self, data: bytes, from_orig: bool, ts: float, tcp: bool) -> DnsSeen:
        """Read one UDP payload, or one direction's DNS-over-TCP head (RFC 7766 framing).

        Learns the answers it may trust and returns the originator's questions. For TCP the
        engine passes the whole head each time (a query pipelined later must be seen too);
        re-learning an answer already known only refreshes it.
        """
        messages = iter_tcp_messages(data) if tcp else (data,)
        queries: list[str] = []
        qtypes: list[int] = []
        first: Detection | None = None
        parsed = False
        for raw in messages:
            msg = parse_message(raw)
            if msg is None:
                continue
            parsed = True
            if msg.is_response:
                if not tcp or not from_orig:
                    self._learn(_answers_by_ip(msg), ts)
            elif from_orig and msg.questions:
                if first is None:
                    q0 = msg.questions[0]
                    first = Detection(d.DNS, f"query {q0.name} type {q0.qtype}", info={"qname": q0.name})
                queries.extend(q.name for q in msg.questions)
                qtypes.extend(q.qtype for q in msg.questions)
        if not queries and first is None:
            return NOTHING if parsed else NOT_DNS
        return DnsSeen(tuple(queries), first, tuple(qtypes))

    def _learn(self, answers: list[tuple[bytes, str, int]], ts: float) -> None:
        cache = self._cache
        for ip, name, ttl in answers:
            names: tuple[str, ...] = (name,)
            old = cache.get(ip)
            if old is not None and old[1] >= ts and name not in old[0]:
                names = (name, *old[0])[:MAX_NAMES_PER_ADDRESS]
            cache[ip] = (names, ts + max(ttl, 0) + TTL_GRACE)
            cache.move_to_end(ip)
            while len(cache) > self.cap:
                cache.popitem(last=False)
