"""The sans-IO engine: packets in, verdicts and events out. No sockets, files or clocks.

Both shells drive this one class: the daemon with packets from NFQUEUE, ``egressd test``
with packets from a capture. That is the whole guarantee of ``egressd test``: a capture
that replays to "drop" is dropped live, because it is the same code on the same bytes.

Per packet (the hot path): decode headers (``packet.decode``), find the flow, and — only
while the flow is still being classified — place the payload in the stream head and run
the detectors that have not yet given up. A flow's verdict is *pinned* (the shell tells
the kernel to stop sending it) as soon as every detector has decided, or after
``max_packets`` packets, so Python sees the first handful of packets of each connection,
never the bulk.

Judgement (docs/architecture.md, "The engine, per packet"): the policy decides provisionally on the
first packet from addresses, ports and the DNS-learned domain; it is asked again whenever a
detection or a new domain (TLS SNI, CONNECT target) arrives. Decisions only ever get
stricter: accept -> alert -> drop, never back, so a later, spoofable fact (an SNI naming an
allowed host) cannot undo a drop.

Nothing escapes ``feed``: a packet that cannot be decoded, or any internal error, is
counted and gets the policy's ``on_error`` verdict.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict, deque
from typing import Final

from egressd.defrag import Reassembler
from egressd.detect import base as d
from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, StreamContext, StreamDetector
from egressd.detect.dns import detect_dns_stream
from egressd.detect.dnstunnel import DnsTunnelTracker, detect_non_dns
from egressd.detect.http_tunnel import HttpTunnelDetector
from egressd.detect.icmp import ECHO_REQUESTS, EchoState
from egressd.detect.kinds import family_of
from egressd.detect.proxy import detect_proxy
from egressd.detect.relays import detect_relays
from egressd.detect.reverse_http import detect_pagekite, detect_reverse_http
from egressd.detect.ssh import detect_ssh
from egressd.detect.ssh_usage import UsageWatch
from egressd.detect.stratum import detect_jsonrpc, detect_stratum
from egressd.detect.tls import detect_tls
from egressd.detect.tor import detect_tor
from egressd.detect.tunnels import detect_datagram, detect_ip_protocol, detect_stream
from egressd.detect.unknown_encrypted import detect_unknown_encrypted
from egressd.detect.websocket import WebSocketDetector
from egressd.dnsnames import DnsNames, is_dns_port
from egressd.events import Event, ip_text
from egressd.flow import PENDING, PINNED_ACCEPT, PINNED_DROP, SETTLED, Flow, FlowTable, make_key
from egressd.packet import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Malformed,
    Packet,
    decode,
)
from egressd.policy import Decision, FlowFacts, Policy
from egressd.policy.model import CONTENT_CLASSIFIED, CONTENT_NONE, CONTENT_PENDING, CONTENT_UNCLASSIFIED
from egressd.protocols import eve_name
from egressd.stream import GREW, NOTHING, StreamHead
from egressd.verdict import (
    ALLOWED,
    ANSWERED,
    DENIED,
    DROP_PACKET,
    FIRST_PACKET,
    LATE,
    ON_ERROR,
    ON_OVERLOAD,
    PASS,
    PASS_MARK_SEEN,
    PIN_ALLOW,
    PIN_DENY,
    TRANSITIONS,
    UNDECIDED,
)

# Verdicts returned by feed() (egressd.verdict: what each does to the packet and to the
# connection's kernel state, and the one table of flow-state transitions).
__all__ = [
    "DIR_FRESH",
    "DIR_ORIGINAL",
    "DIR_REPLY",
    "DIR_UNKNOWN",
    "DROP_PACKET",
    "PASS",
    "PASS_MARK_SEEN",
    "PIN_ALLOW",
    "PIN_DENY",
    "Counters",
    "Engine",
]

# Direction hints from the shell. The daemon knows the conntrack direction of each packet;
# a capture does not, and the engine infers it from the flow's first packet.
DIR_UNKNOWN: Final = 0
DIR_ORIGINAL: Final = 1
DIR_REPLY: Final = 2
# Or'ed into the direction by the daemon when the kernel says the packet's connection started
# under its rules and nothing of it has been judged (netfilter.MARK_FRESH): the kernel no
# longer queues a dataless SYN, so this is how a first data segment is known to start its
# stream rather than to be a connection met mid-stream. A capture never sets it (it has the SYN).
DIR_FRESH: Final = 4
_DIR_MASK: Final = 3

_RANK: Final = {"accept": 0, "alert": 1, "drop": 2}

# Engine._pinned's peeks: every header field it needs in one unpack, at fixed offsets.
# IPv4 without options: total length, flags + fragment offset, protocol, addresses, then the
# transport header at byte 20; IPv6 without extension headers: payload length, next header
# (read before, to pick the struct), addresses, the transport header at byte 40. TCP adds
# its sequence number, data offset and flags, UDP its length.
_PEEK_V4_TCP: Final = struct.Struct("!2xH2xH4x4s4sHHI4xBB")
_PEEK_V4_UDP: Final = struct.Struct("!2xH2xH4x4s4sHHH")
_PEEK_V6_TCP: Final = struct.Struct("!4xH2x16s16sHHI4xBB")
_PEEK_V6_UDP: Final = struct.Struct("!4xH2x16s16sHHH")


# Order matters only for the evidence shown first; every detector sees the same bytes.
_PROTOCOL_DETECTORS: Final[tuple[tuple[str, StreamDetector], ...]] = (
    ("pagekite", detect_pagekite),  # before "proxy": PageKite's tunnel opens with a CONNECT
    ("proxy", detect_proxy),
    ("ssh", detect_ssh),
    ("stratum", detect_stratum),
    ("rpc", detect_jsonrpc),
    ("tls", detect_tls),
    ("tunnel", detect_stream),
    ("tor", detect_tor),
    ("relays", detect_relays),
)
# Tunnels recognised from how the stream is used rather than from one protocol's bytes; the
# WebSocket and HTTP-tunnel decoders run the protocol detectors on what they carry.
_TCP_DETECTORS: Final[tuple[tuple[str, StreamDetector], ...]] = (
    *_PROTOCOL_DETECTORS,
    ("reverse-http", detect_reverse_http),
    ("websocket", WebSocketDetector(_PROTOCOL_DETECTORS)),
    ("http-tunnel", HttpTunnelDetector(_PROTOCOL_DETECTORS)),
    ("unknown-encrypted", detect_unknown_encrypted),
)
_INNER_DETECTORS: Final = tuple(x for x in _TCP_DETECTORS if x[0] not in ("proxy", "pagekite"))
_DNS_STREAM: Final[tuple[str, StreamDetector]] = ("dns", detect_dns_stream)


def _priority(kind: str) -> int:
    """How much a finding matters when one flow has several (the event names the top one)."""
    return family_of(kind).rank


class Counters:
    """Monotonic counters the daemon exports (``egressd status``, Prometheus)."""

    __slots__ = (
        "accept_pinned",
        "detections",
        "dropped",
        "ended",
        "errors",
        "evicted",
        "flows",
        "fragments",
        "malformed",
        "midstream",
        "overload",
        "packets",
        "rules",
    )

    def __init__(self) -> None:
        self.packets = 0
        self.malformed = 0
        self.errors = 0
        self.flows = 0
        self.midstream = 0
        self.overload = 0
        self.evicted = 0
        self.fragments = 0
        self.dropped = 0
        self.ended = 0  # flows forgotten because conntrack said their connection ended
        self.accept_pinned = 0
        self.detections: dict[str, int] = {}
        self.rules: dict[str, int] = {}

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


class Engine:
    """Feed it packets, read verdicts back and drain ``events``."""

    def __init__(self, policy: Policy) -> None:
        self.counters = Counters()
        self.events: deque[Event] = deque()
        self._fid = 0
        self.dns = DnsNames(policy.settings.dns_cache)
        self._defrag = Reassembler()
        self._dnstun = DnsTunnelTracker()
        # tinc peers (address, port) seen on a meta connection: tinc's UDP data to the same
        # port has no cleartext of its own (nDPI does the same, its "DPI (cache)").
        self._tinc_peers: OrderedDict[tuple[bytes, int], str] = OrderedDict()
        # Relay ports a reverse-tunnel registration announced (localtunnel): connections to
        # them are the tunnel, idle or not.
        self._relay_ports: OrderedDict[tuple[bytes, int], str] = OrderedDict()
        self._overload_last = -1e18
        self._overload_pending = 0
        self.policy = policy
        self.table = FlowTable(policy.settings.max_flows)
        self._apply_settings(policy)

    # -- configuration ------------------------------------------------------------------
    def _apply_settings(self, policy: Policy) -> None:
        s = policy.settings
        self._head = s.head_bytes
        self._max_packets = s.max_packets
        self._idle = {PROTO_TCP: s.tcp_idle, PROTO_UDP: s.udp_idle}
        self.dns.cap = s.dns_cache
        self._error_verdict = ON_ERROR[policy.on_error]  # per packet: never pins the connection
        self._monitor = policy.mode == "monitor"
        self._needs_content = policy.needs_content()
        self._bare_default = policy.bare_is_default
        self.table.max_flows = s.max_flows
        # The settings that name a domain list (DOMAIN_SETTINGS): a name matching one is a
        # finding of its kind, recorded once per flow under its own detector slot.
        self._named_lists = (
            (policy.pool_domains, "pool", d.MINING_POOL_DOMAIN, "pool"),
            (policy.tunnel_service_domains, "tunnelsvc", d.TUNNEL_SERVICE_DOMAIN, "tunnel service"),
        )

    def reload(self, policy: Policy) -> None:
        """Swap the policy between two packets. Flows already pinned keep their verdict;
        flows still being classified are judged by the new policy from the next packet on."""
        self.policy = policy
        self._apply_settings(policy)
        self.table.shrink()

    # -- the hot path -------------------------------------------------------------------
    def feed(self, data: bytes, ts: float, direction: int = DIR_UNKNOWN) -> int:
        self.counters.packets += 1
        if self.table.done:
            v = self._pinned(data, ts)
            if v >= 0:
                return v
        try:
            p = decode(data)
            if type(p) is Malformed:
                self.counters.malformed += 1
                return self._error_verdict
            assert type(p) is Packet
            if p.frag_offset or p.more_frags:
                return self._fragment(data, p, ts, direction)
            return self._packet(p, ts, direction)
        except Exception:  # never let one packet stop the loop; it still gets a verdict
            self.counters.errors += 1
            return self._error_verdict

    def _pinned(self, data: bytes, ts: float) -> int:
        """The verdict of a packet of a pinned flow, read from the raw bytes; -1: decode it.

        A capture replays every packet of every flow, and most belong to flows already
        pinned, which only need their key found. This peeks the 5-tuple at fixed offsets for
        the plain layouts (IPv4 without options, IPv6 without extension headers; TCP or UDP;
        no fragment) and answers exactly what ``_packet`` would: the checks ``decode`` makes
        on these headers are repeated (a malformed packet goes the long way and gets
        ``on_error``). A SYN is answered here only when it repeats the flow's own SYN (the same
        sequence number: a retransmission, as ``_packet`` decides); any other SYN goes the
        long way (a reused 4-tuple is a new flow).

        One ``unpack_from`` per packet reads every field needed (the per-byte indexing it
        replaced was a fifth of this function's time); the struct is picked by the protocol
        byte, so a packet too short for it is sent the long way before it is read.
        """
        n = len(data)
        if n < 28:
            return -1
        b0 = data[0]
        if b0 == 0x45:
            proto = data[9]
            if proto == PROTO_TCP:
                if n < 40:
                    return -1  # too short for a TCP header: decode says why
                total, frag, src, dst, sport, dport, seq, doff, flags = _PEEK_V4_TCP.unpack_from(data)
                ulen = 8
            elif proto == PROTO_UDP:
                total, frag, src, dst, sport, dport, ulen = _PEEK_V4_UDP.unpack_from(data)
                seq = doff = flags = 0
            else:
                return -1
            if frag & 0x3FFF:
                return -1  # a fragment (MF or an offset)
            if total < 20:
                if total:
                    return -1
                total = n
            off = 20
        elif b0 >> 4 == 6:
            if n < 48:
                return -1
            proto = data[6]
            if proto == PROTO_TCP:
                if n < 60:
                    return -1
                plen, src, dst, sport, dport, seq, doff, flags = _PEEK_V6_TCP.unpack_from(data)
                ulen = 8
            elif proto == PROTO_UDP:
                plen, src, dst, sport, dport, ulen = _PEEK_V6_UDP.unpack_from(data)
                seq = doff = flags = 0
            else:
                return -1
            total = 40 + plen if plen else n
            off = 40
        else:
            return -1
        avail = (total if total <= n else n) - off
        if proto == PROTO_TCP:
            if avail < 20:
                return -1
            thl = (doff >> 4) * 4
            if thl < 20 or thl > avail:
                return -1
        elif avail < 8 or (ulen < 8 and ulen != 0):
            return -1
        # make_key, inlined: (src, sport) <= (dst, dport) without building the two tuples.
        if src < dst or (src == dst and sport <= dport):
            key = (proto, src, sport, dst, dport)
        else:
            key = (proto, dst, dport, src, sport)
        done = self.table.done
        flow = done.get(key)
        if flow is None:
            return -1
        state = flow.state
        if state != PINNED_ACCEPT and state != PINNED_DROP:
            return -1
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN and seq != flow.syn_seq:
            return -1  # a new connection on a remembered 4-tuple: _packet starts a new flow
        done.move_to_end(key)
        flow.last_ts = ts
        flow.bytes += total
        return PIN_ALLOW if state == PINNED_ACCEPT else PIN_DENY

    def _packet(self, p: Packet, ts: float, direction: int) -> int:
        key = make_key(p.proto, p.src, p.sport, p.dst, p.dport)
        flow = self.table.get(key)
        fresh = direction & DIR_FRESH
        if fresh:
            direction &= _DIR_MASK
        if flow is not None and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN and p.seq != flow.syn_seq:
            # A new connection on a 4-tuple we remember (the port was reused after TIME_WAIT,
            # or tcp_tw_reuse): the kernel sees a new connection, so must we. Answering it
            # from the old flow's pinned verdict would let it through unjudged. Live, the
            # kernel does not queue a dataless SYN: there the old flow is forgotten when
            # conntrack destroys the old connection (``end``), which happens before the new
            # connection's entry exists. "Fresh" alone cannot say it: two segments of one new
            # connection can both be queued before the first verdict is saved.
            self.table.discard(key)
            if flow.state == PENDING:
                self._report(flow, ts, "end")
            flow = None
        if flow is None:
            return self._new_flow(p, key, ts, direction, bool(fresh))
        flow.last_ts = ts
        flow.bytes += p.ip_len
        if flow.state == PINNED_DROP or flow.state == PINNED_ACCEPT:
            return TRANSITIONS[flow.state][LATE][1]
        from_orig = p.src == flow.src and p.sport == flow.sport
        if from_orig and p.src == p.dst and p.sport == p.dport:
            from_orig = direction != DIR_REPLY
        return self._inspect(flow, p, ts, from_orig)

    def _new_flow(
        self, p: Packet, key: tuple[int, bytes, int, bytes, int], ts: float, direction: int, fresh: bool = False
    ) -> int:
        room = self.table.make_room(ts, self._idle)
        if room is False:
            return self._overload(p, ts)
        if isinstance(room, Flow):
            self.counters.evicted += 1
            self._conclude(room)
            self._report(room, ts, "end")
        src, sport, dst, dport = p.src, p.sport, p.dst, p.dport
        midstream = False
        from_orig = True
        if p.proto == PROTO_TCP:
            syn = p.tcp_flags & (TCP_SYN | TCP_ACK)
            if direction == DIR_REPLY or syn == (TCP_SYN | TCP_ACK):
                from_orig = False
                midstream = syn != (TCP_SYN | TCP_ACK) and not fresh
            elif syn != TCP_SYN:
                midstream = not fresh
                if direction == DIR_UNKNOWN and p.sport < p.dport:
                    # A capture that starts mid-stream: guess that the lower port is the server,
                    # and say it was a guess (the event carries "midstream": true).
                    from_orig = False
        elif direction == DIR_REPLY:
            from_orig = False
            midstream = True
        if not from_orig:
            src, sport, dst, dport = dst, dport, src, sport
        self._fid += 1
        flow = Flow(self._fid, key, p.version, p.proto, src, sport, dst, dport, ts)
        flow.midstream = midstream
        if p.proto == PROTO_TCP and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            flow.syn_seq = p.seq
        flow.bytes = p.ip_len
        self.counters.flows += 1
        if midstream:
            self.counters.midstream += 1
        names = self.dns.names_for(dst, ts)
        if names:
            flow.domains = names
        self.table.add(flow)
        if not names and self._bare_default:
            # Nothing known but addresses and ports, and no rule decides on those alone:
            # judge() would say the default, without the facts being built for it.
            flow.decision = self.policy.default_decision
        else:
            flow.decision = self.policy.judge(self._facts(flow))
        v = self._settle(flow, ts, "first-packet")
        if v is not None:
            return v
        if p.proto == PROTO_TCP and self._relay_ports and (dst, dport) in self._relay_ports:
            self._record(flow, "reverse-http", Detection(d.TUNNEL_REVERSE_HTTP, self._relay_ports[(dst, dport)]))
            v = self._rejudge(flow, ts)
            if v is not None:
                return v
        if p.proto == PROTO_TCP:
            flow.fwd = StreamHead(self._head)
            flow.rev = StreamHead(self._head)
            flow.active_detectors = list(_TCP_DETECTORS)
            if is_dns_port(sport, dport):
                flow.active_detectors.append(_DNS_STREAM)
            return self._inspect(flow, p, ts, from_orig)
        if p.icmp_type in ECHO_REQUESTS and (p.proto == PROTO_ICMP) == (p.icmp_type == 8):
            # An echo flow is watched like a stream head: its data and its replies tell a ping
            # from a tunnel (detect/icmp.py), within max_packets.
            flow.icmp = EchoState()
            return self._inspect(flow, p, ts, from_orig)
        if p.proto == PROTO_UDP:
            if is_dns_port(sport, dport):
                return self._inspect(flow, p, ts, from_orig)
            # Other UDP is judged on its first datagram: a VPN handshake shows there, and
            # pinning at once keeps QUIC and the like out of Python.
            det = detect_datagram(p.payload, from_orig, sport, dport)
            if det is None and self._tinc_peers:
                peer = self._tinc_peers.get((dst, dport)) or self._tinc_peers.get((src, sport))
                if peer is not None:
                    det = Detection(d.TUNNEL_TINC, f"UDP with a tinc peer: {peer}")
            if det is not None:
                self._record(flow, "tunnel", det)
                v = self._rejudge(flow, ts)
                if v is not None:
                    return v
        elif p.proto != PROTO_TCP:
            det = detect_ip_protocol(p.proto, p.payload)
            if det is not None:
                self._record(flow, "tunnel", det)
                v = self._rejudge(flow, ts)
                if v is not None:
                    return v
        # Other protocols and UDP: the first packet decides.
        return self._pin_accept(flow, ts, "first-packet", bool(p.payload))

    def _inspect(self, flow: Flow, p: Packet, ts: float, from_orig: bool) -> int:
        if from_orig:
            flow.fwd_pkts += 1
        else:
            flow.rev_pkts += 1
        if p.proto == PROTO_UDP:
            return self._udp_dns(flow, p, ts, from_orig)
        if flow.icmp is not None:
            return self._icmp_echo(flow, flow.icmp, p, ts, from_orig)
        head, other = (flow.fwd, flow.rev) if from_orig else (flow.rev, flow.fwd)
        assert head is not None and other is not None
        placed = NOTHING
        flags = p.tcp_flags
        if flags & TCP_SYN:
            head.start(p.seq + 1)
            if flags & TCP_ACK:
                other.start(p.ack)
            if p.payload:  # TCP Fast Open: data in the SYN
                placed = head.add(p.seq + 1, p.payload, p.truncated)
        else:
            if flags & TCP_ACK and other.isn < 0 and not other.data:
                # The kernel does not queue a dataless SYN-ACK (netfilter.py): the peer's
                # initial sequence number is what this side acknowledges before the peer
                # has sent anything. Reply data, when queued, arrives before any ack of it.
                other.start(p.ack, tentative=True)
            if p.payload:
                placed = head.add(p.seq, p.payload, p.truncated)
        grew = placed == GREW
        closed_now = False
        if flags & TCP_RST:
            # A reset ends the connection for both sides.
            closed_now = not (head.closed and other.closed)
            head.closed = other.closed = True
        elif flags & TCP_FIN and not head.closed:
            head.closed = True
            closed_now = True
        if not head.data and not other.data:
            # Nothing to look at yet: a dataless connection ends here once both sides closed.
            if head.closed and other.closed:
                return self._pin_accept(flow, ts, "closed")
        elif grew or closed_now or (head.inconsistent and "stream" not in flow.detections):
            verdict = self._detect(flow, ts)
            if verdict is not None:
                return verdict
        # -- SSH usage (detect/ssh_usage.py): encrypted packet sizes, also past the head -----
        usage = flow.usage
        if usage is not None and p.payload and usage.watching:
            verdict = self._watch_usage(flow, usage, p, ts, from_orig)
            if verdict is not None:
                return verdict
            flow.credit += 1  # progress: the watcher's own bound (MAX_UNITS) ends the watch
        # -- end of SSH usage ---------------------------------------------------------------
        # Only packets that taught the detectors nothing count towards the limit: a sender
        # that cuts its handshake into 1-byte segments must not run the flow out of packets
        # before the handshake is complete. Each growing segment also buys one empty packet
        # (the ACK it elicits). Growth is bounded by the head size, so a flow is pinned
        # after at most 2 * head_bytes + max_packets packets whatever the peers do.
        if placed != NOTHING:  # held out-of-order bytes are progress too (bounded by the head)
            flow.credit += 1
        elif p.payload or not flow.credit:
            flow.stale += 1
            if flow.stale >= self._max_packets:
                return self._pin_accept(flow, ts, "packet-limit")
        else:
            flow.credit -= 1
        return self._accept(flow)

    # -- detection ----------------------------------------------------------------------
    def _detect(self, flow: Flow, ts: float) -> int | None:
        fwd, rev = flow.fwd, flow.rev
        assert fwd is not None and rev is not None
        ctx = StreamContext(flow.sport, flow.dport, fwd.closed, rev.closed, fwd.full, rev.full, self._head)
        changed = False
        fdata = fwd.data if not flow.inner_fwd else fwd.data[flow.inner_fwd :]
        rdata = rev.data if not flow.inner_rev else rev.data[flow.inner_rev :]
        for entry in list(flow.active_detectors):
            name, fn = entry
            r = fn(fdata, rdata, ctx)
            if r is NEED_MORE:
                continue
            if r is NOT_THIS:
                flow.active_detectors.remove(entry)
                continue
            assert isinstance(r, Detection)
            if not r.refine:
                flow.active_detectors.remove(entry)
            if flow.domains and r.info.get("unnamed_only"):
                continue  # a finding that only counts for a destination nobody named
            if self._record(flow, name, r):
                changed = True
                inner_kind = r.info.get("inner_kind")
                if inner_kind:  # a wrapper (WebSocket) names what it carries: judge that too
                    self._record(flow, name + ".inner", Detection(inner_kind, r.info.get("inner_evidence", "")))
            if name == "ssh":
                self._start_usage(flow, r)
            if name == "proxy" and r.inner_fwd >= 0:
                inner_f = r.inner_fwd
                inner_r = r.inner_rev if r.inner_rev >= 0 else len(rev.data)
                if (inner_f, inner_r) != (flow.inner_fwd, flow.inner_rev):
                    # The tunnelled stream starts here: look at it afresh with every other detector.
                    flow.inner_fwd, flow.inner_rev = inner_f, inner_r
                    keep = [e for e in flow.active_detectors if e[0] == "proxy"]
                    flow.active_detectors = keep + list(_INNER_DETECTORS)
                    for n, _ in _INNER_DETECTORS:
                        self._forget(flow, n)
                    if changed:  # a finding made before the wrapper (PageKite's CONNECT) counts now
                        v = self._rejudge(flow, ts)
                        if v is not None:
                            return v
                    return self._detect(flow, ts)
        if is_dns_port(flow.sport, flow.dport):
            changed |= self._tcp_dns(flow, fdata, rdata, ts)
        if (fwd.inconsistent or rev.inconsistent) and "stream" not in flow.detections:
            side = "originator" if fwd.inconsistent else "responder"
            changed |= self._record(
                flow,
                "stream",
                Detection(
                    d.STREAM_INCONSISTENT,
                    f"retransmission from the {side} overlaps earlier bytes with different content",
                ),
            )
        if changed:
            v = self._rejudge(flow, ts)
            if v is not None:
                return v
        ended = (fwd.full or fwd.closed) and (rev.full or rev.closed)
        if is_dns_port(flow.sport, flow.dport):
            # DNS over TCP: every query pipelined on the connection is judged, up to the head
            # (a harmless first lookup must not open the way for a pool's name).
            if ended or fwd.full or fwd.closed:
                return self._pin_accept(flow, ts, "classified")
        elif (not flow.active_detectors or ended) and not (_watching(flow) and not (fwd.closed and rev.closed)):
            return self._pin_accept(flow, ts, "classified")
        return None

    # -- SSH usage (hook; the logic lives in detect/ssh_usage.py) ----------------------------
    def _start_usage(self, flow: Flow, det: Detection) -> None:
        """Keep watching an SSH flow past NEWKEYS when the node is its SSH client."""
        if flow.usage is None and det.kind == d.SSH and det.info.get("role") != "inverted":
            flow.usage = UsageWatch()

    def _watch_usage(self, flow: Flow, usage: UsageWatch, p: Packet, ts: float, from_orig: bool) -> int | None:
        fwd, rev = flow.fwd, flow.rev
        assert fwd is not None and rev is not None
        head = fwd if from_orig else rev
        final = fwd.full or rev.full or fwd.closed or rev.closed
        off = (p.seq - head.isn) % (1 << 32) if head.isn >= 0 else -1
        length = p.payload_len if p.truncated else -1  # a GSO super-packet's copy stops early
        det = usage.feed(from_orig, off, p.payload, ts, fwd.data, rev.data, final, length) if off >= 0 else None
        if det is not None and self._record(flow, "ssh-usage", det):
            v = self._rejudge(flow, ts)
            if v is not None:
                return v
        if not usage.watching and not flow.active_detectors:
            return self._pin_accept(flow, ts, "classified")
        if fwd.closed and rev.closed:
            return self._pin_accept(flow, ts, "closed")
        return None

    # -- end of SSH usage hook ----------------------------------------------------------------

    def _tcp_dns(self, flow: Flow, fdata: bytes, rdata: bytes, ts: float) -> bool:
        """DNS over TCP (RFC 7766): query names are the flow's domains, answers teach names."""
        before = flow.domains
        seen = self.dns.observe(fdata, True, ts, tcp=True)
        changed = False
        for name, qtype in zip(seen.queries, seen.qtypes, strict=True):
            self._add_domain(flow, name)
            changed |= self._dns_tunnel(flow, name, qtype, ts)
        self.dns.observe(rdata, False, ts, tcp=True)
        return changed or flow.domains is not before

    def _dns_tunnel(self, flow: Flow, qname: str, qtype: int, ts: float) -> bool:
        """Account a query with the DNS-tunnel tracker (shared by all flows); True if it
        made a new finding on this flow."""
        det = self._dnstun.query(qname, qtype, ts)
        return det is not None and "dnstunnel" not in flow.detections and self._record(flow, "dnstunnel", det)

    def _record(self, flow: Flow, name: str, det: Detection) -> bool:
        """Keep the newest finding per detector; learn the domain it carries. True if new."""
        old = flow.detections.get(name)
        if old is not None and old.kind == det.kind and old.evidence == det.evidence and old.info == det.info:
            return False
        flow.detections[name] = det
        if old is None or old.kind != det.kind:
            self.counters.detections[det.kind] = self.counters.detections.get(det.kind, 0) + 1
        for anomaly in det.anomalies:  # each its own finding (keyed by detector and kind)
            self._record(flow, f"{name}:{anomaly.kind}", anomaly)
        port = det.info.get("tunnel_port")
        if port is not None and det.kind == d.TUNNEL_REVERSE_HTTP:
            relay = _packed_ip(det.info.get("tunnel_ip")) or flow.dst
            self._relay_ports[(relay, int(port))] = f"connection to the tunnel port of: {det.evidence}"
            while len(self._relay_ports) > 1024:
                self._relay_ports.popitem(last=False)
        if det.kind == d.TUNNEL_TINC and flow.proto == PROTO_TCP:
            self._tinc_peers[(flow.dst, flow.dport)] = f"{det.evidence} on flow {flow.fid}"
            while len(self._tinc_peers) > 1024:
                self._tinc_peers.popitem(last=False)
        host = det.info.get("sni") or _host_of(det.info.get("target"))
        if host:
            self._add_domain(flow, host)
        return True

    def _forget(self, flow: Flow, name: str) -> None:
        flow.detections.pop(name, None)

    def _add_domain(self, flow: Flow, host: str) -> None:
        host = host.lower().rstrip(".")
        if host in flow.domains:
            return
        flow.domains = (*flow.domains, host)
        for domains, slot, kind, what in self._named_lists:
            hit = domains.match(host)
            if hit is not None and slot not in flow.detections:
                det = Detection(kind, f"{host} matches {what} list entry {hit}", info={"domain": host})
                self._record(flow, slot, det)

    def _udp_dns(self, flow: Flow, p: Packet, ts: float, from_orig: bool) -> int:
        seen = self.dns.observe(p.payload, from_orig, ts, tcp=False)
        before = flow.domains
        tunnel = False
        for name, qtype in zip(seen.queries, seen.qtypes, strict=True):
            self._add_domain(flow, name)
            tunnel |= self._dns_tunnel(flow, name, qtype, ts)
        if from_orig and not seen.dns and "dnstunnel" not in flow.detections:
            # Not DNS on a DNS port: a tunnel's own framing (iodine raw mode, ptunnel-ng
            # --udp), or a VPN handshake there.
            det = detect_non_dns(p.payload) or detect_datagram(p.payload, True, flow.sport, flow.dport)
            if det is not None:
                tunnel = self._record(flow, "dnstunnel", det)
        changed = tunnel or flow.domains is not before
        if seen.detection is not None and "dns" not in flow.detections:
            flow.detections["dns"] = seen.detection
        if changed:
            v = self._rejudge(flow, ts)
            if v is not None:
                return v
            if flow.state == SETTLED:  # already reported: a stricter decision is a new event
                self._report(flow, ts, "detection")
        if not from_orig and flow.state == PENDING:
            # Answered: report it and move it where it may be evicted, but do not pin it.
            # Every later query on this socket is judged too (a harmless lookup first must not
            # open the way for a pool's name); the kernel's head bound caps how many.
            flow.state, v = TRANSITIONS[flow.state][ANSWERED]
            self.table.finish(flow)
            self._report(flow, ts, "classified")
            return v
        return self._accept(flow)

    def _icmp_echo(self, flow: Flow, echo: EchoState, p: Packet, ts: float, from_orig: bool) -> int:
        """An ICMP echo flow: each request and reply is looked at until a finding, until
        ``ECHO_HEAD`` replies echoed their requests (a ping), or ``max_packets`` in all."""
        det = echo.feed(p.icmp_type, p.payload, from_orig)
        if det is not None and self._record(flow, "icmp", det):
            v = self._rejudge(flow, ts)
            if v is not None:
                return v
            return self._pin_accept(flow, ts, "classified", True)
        if echo.settled:
            return self._pin_accept(flow, ts, "classified", True)
        if flow.fwd_pkts + flow.rev_pkts >= self._max_packets:
            return self._pin_accept(flow, ts, "packet-limit", True)
        return self._accept(flow)

    def _accept(self, flow: Flow) -> int:
        """Undecided: PASS_MARK_SEEN for the first packet of a fresh flow, PASS otherwise."""
        event = UNDECIDED if flow.midstream or flow.fwd_pkts + flow.rev_pkts > 1 else FIRST_PACKET
        flow.state, v = TRANSITIONS[flow.state][event]
        return v

    # -- judgement ----------------------------------------------------------------------
    def _facts(self, flow: Flow, content: str = CONTENT_PENDING) -> FlowFacts:
        dets = flow.detections
        return FlowFacts(
            flow.proto,
            flow.version,
            flow.src,
            flow.dst,
            flow.sport,
            flow.dport,
            flow.domains,
            tuple([x.kind for x in dets.values()]) if dets else (),  # a list is built faster than a generator runs
            content,
        )

    def _conclude(self, flow: Flow, payload: bool = False) -> None:
        """Inspection of ``flow`` has ended: judge it once more, now that its content is known.

        Only when the policy has ``content`` conditions (the shipped one does: a port-only
        alert must not fire on a flow without payload, or on one a detector recognised as
        something else). Like every judgement, it can only make the decision stricter.
        """
        if not self._needs_content:
            return
        if flow.detections:
            content = CONTENT_CLASSIFIED
        elif payload or (flow.fwd is not None and flow.fwd.data) or (flow.rev is not None and flow.rev.data):
            content = CONTENT_UNCLASSIFIED
        else:
            content = CONTENT_NONE
        new = self.policy.judge(self._facts(flow, content))
        old = flow.decision
        if old is None or _RANK[new.action] >= _RANK[old.action]:
            flow.decision = new

    def _rejudge(self, flow: Flow, ts: float) -> int | None:
        new = self.policy.judge(self._facts(flow))
        old = flow.decision
        if old is None or _RANK[new.action] >= _RANK[old.action]:
            flow.decision = new
        return self._settle(flow, ts, "detection")

    def _settle(self, flow: Flow, ts: float, reason: str) -> int | None:
        """A drop decision ends classification: enforced, it is pinned as a drop; in monitor
        mode the would-be drop is recorded at once and the flow pinned as accepted."""
        dec = flow.decision
        if dec is None or dec.action != "drop":
            return None
        if self._monitor:
            return self._pin_accept(flow, ts, reason)
        return self._pin_drop(flow, ts, reason)

    def _effective_drop(self, decision: Decision) -> bool:
        return decision.action == "drop" and not self._monitor

    def _pin_drop(self, flow: Flow, ts: float, reason: str) -> int:
        flow.state, v = TRANSITIONS[flow.state][DENIED]
        self.table.finish(flow)
        self.counters.dropped += 1
        self._report(flow, ts, reason)
        return v

    def _pin_accept(self, flow: Flow, ts: float, reason: str, payload: bool = False) -> int:
        self._conclude(flow, payload)
        dec = flow.decision
        if dec is not None and dec.action == "drop" and not self._monitor:
            return self._pin_drop(flow, ts, reason)  # a rule on the content now known drops it
        flow.state, v = TRANSITIONS[flow.state][ALLOWED]
        self.table.finish(flow)
        self.counters.accept_pinned += 1
        self._report(flow, ts, reason)
        return v

    def _overload(self, p: Packet, ts: float) -> int:
        """The table is full of flows still being classified: apply ``on_overload`` to the
        new flow without tracking it (never by forgetting one that is being judged).

        ``accept`` lets the packet pass *unpinned*: the connection stays queued and is judged
        (mid-stream) as soon as the table has room, so a flood cannot carry a miner through
        for the life of its connection. Events are rate-limited to one per second carrying the
        count since the last one: a flood must not become a disk-filling flood of log lines."""
        self.counters.overload += 1
        self._overload_pending += 1
        if ts - self._overload_last >= 1.0 or ts < self._overload_last:
            act = self.policy.on_overload
            self._fid += 1
            ev = Event(
                ts, self._fid, ip_text(p.src), p.sport, ip_text(p.dst), p.dport,
                eve_name(p.proto), act, "blocked" if act == "drop" else "allowed",
                "on_overload", "flow table full of flows still being classified", "overload", self.policy.mode,
            )  # fmt: skip
            ev.extra = {"overload_count": self._overload_pending}
            self.events.append(ev)
            self._overload_last = ts
            self._overload_pending = 0
        return ON_OVERLOAD[self.policy.on_overload]

    # -- fragments ----------------------------------------------------------------------
    def _fragment(self, data: bytes, p: Packet, ts: float, direction: int) -> int:
        """An IP fragment: held (bounded) until its datagram is whole, which is then judged
        like any packet. The fragments before the last one pass: without the last one the
        receiver cannot reassemble the datagram, so its verdict decides for all of them."""
        self.counters.fragments += 1
        done = self._defrag.add(data, p, ts)
        if done is None:
            return PASS
        whole, overlap = done
        q = decode(whole)
        if type(q) is not Packet:
            self.counters.malformed += 1
            return self._error_verdict
        v = self._packet(q, ts, direction)
        if overlap:
            flow = self.table.get(make_key(q.proto, q.src, q.sport, q.dst, q.dport))
            if flow is not None and "fragments" not in flow.detections:
                self._record(
                    flow, "fragments", Detection(d.FRAGMENT_OVERLAP, "IP fragments overlap with different bytes")
                )
                if flow.state == PENDING:
                    r = self._rejudge(flow, ts)
                    if r is not None:
                        return r
        return v

    # -- time and end of input ----------------------------------------------------------
    def end(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> bool:
        """The kernel says this connection is gone (a conntrack destroy event): forget its flow.

        Live, a flow's end comes from here rather than from queued FIN/RST segments (the
        kernel queues no packet of a pinned connection, nor of one without data). A flow
        still being classified is concluded and reported like an idle one. True when a flow
        was tracked under that tuple."""
        key = make_key(proto, src, sport, dst, dport)
        flow = self.table.active.pop(key, None)
        if flow is not None:
            self.counters.ended += 1
            self._conclude(flow)
            self._report(flow, now, "end")
            return True
        if self.table.done.pop(key, None) is not None:
            self.counters.ended += 1
            return True
        return False

    def forget_allowed(self) -> int:
        """Conntrack end events were lost: forget every flow pinned ALLOW. Returns how many.

        Why: a lost end may have been a connection whose 4-tuple is being reused right now,
        and its new first data segment must be judged, not answered from the old pinned
        accept (see ``end``). Which ends were lost cannot be known, so none of the allowed
        pins is trusted. It costs little: a pinned connection is decided in the kernel, so
        nothing of it reaches the engine again but a straggler queued before its pin, which
        is then judged afresh (met mid-stream). Flows pinned DROP are kept: answering a
        reused tuple with a drop errs on the closed side."""
        done = self.table.done
        gone = [k for k, f in done.items() if f.state == PINNED_ACCEPT]
        for k in gone:
            del done[k]
        return len(gone)

    def dataless_end(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> None:
        """A connection that never carried data ended (conntrack said so, and its mark says the
        kernel saw its SYN and no verdict was ever given): its flow record, judged as the
        engine would judge such a flow at its end (content ``none``; no flow is kept)."""
        names = self.dns.names_for(dst, now)
        version = 4 if len(src) == 4 else 6
        dec = self.policy.judge(FlowFacts(proto, version, src, dst, sport, dport, names, (), CONTENT_NONE))
        # "allowed": nothing of it was stopped, it carried nothing.
        self._untracked(dec, proto, src, sport, dst, dport, now, names, "allowed", "end", {"dataless": True})

    def kernel_dropped(
        self, decision: Decision, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float
    ) -> None:
        """The kernel refused a new connection by a compiled rule (egressd.kernelsets): record
        it as the engine would have, had it seen the first packet (no flow is kept)."""
        self.counters.dropped += 1
        names = self.dns.names_for(dst, now)
        self._untracked(
            decision, proto, src, sport, dst, dport, now, names, "blocked", "first-packet", {"kernel": True}, packets=1
        )

    def _untracked(
        self,
        dec: Decision,
        proto: int,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        now: float,
        names: tuple[str, ...],
        action: str,
        reason: str,
        extra: dict[str, object],
        packets: int = 0,
    ) -> None:
        """The event of a flow decided without the engine tracking it (no Flow, no detections):
        counted and numbered like any other flow's."""
        self.counters.flows += 1
        self.counters.rules[dec.rule] = self.counters.rules.get(dec.rule, 0) + 1
        self._fid += 1
        ev = Event(
            timestamp=now,
            flow_id=self._fid,
            src_ip=ip_text(src),
            src_port=sport,
            dest_ip=ip_text(dst),
            dest_port=dport,
            proto=eve_name(proto),
            verdict=dec.action,
            action=action,
            rule=dec.rule,
            rule_description=dec.description,
            reason=reason,
            mode=self.policy.mode,
            domain=names[0] if names else None,
            packets=packets,
            severity=dec.severity,
        )
        ev.extra = extra
        self.events.append(ev)

    def sweep(self, now: float) -> None:
        """Expire idle flows (the shell calls this about once a second, or at capture end)."""
        for f in self.table.expire(now, self._idle):
            self._conclude(f)
            self._report(f, now, "end")

    def finish(self, now: float) -> None:
        """End of input (a capture replay): report every flow still being classified."""
        for f in list(self.table.active.values()):
            self._conclude(f)
            drop = f.decision is not None and self._effective_drop(f.decision)
            f.state = TRANSITIONS[f.state][DENIED if drop else ALLOWED][0]
            self._report(f, now, "end")
        self.table.active.clear()

    # -- events -------------------------------------------------------------------------
    def _report(self, flow: Flow, ts: float, reason: str) -> None:
        dec = flow.decision
        if dec is None:
            return
        sig = (dec.action, dec.rule)
        if flow.reported == sig:
            return
        flow.reported = sig
        self.counters.rules[dec.rule] = self.counters.rules.get(dec.rule, 0) + 1
        primary: Detection | None = None
        for x in flow.detections.values():
            if primary is None or _priority(x.kind) < _priority(primary.kind):
                primary = x
        det = None
        if primary is not None:
            det = {
                "kind": primary.kind,
                "evidence": primary.evidence,
                "info": primary.info,
            }
        blocked = self._effective_drop(dec)
        ev = Event(
            timestamp=ts,
            flow_id=flow.fid,
            src_ip=ip_text(flow.src),
            src_port=flow.sport,
            dest_ip=ip_text(flow.dst),
            dest_port=flow.dport,
            proto=eve_name(flow.proto),
            verdict=dec.action,
            action="blocked" if blocked else "allowed",
            rule=dec.rule,
            rule_description=dec.description,
            reason=reason,
            mode=self.policy.mode,
            domain=flow.domains[0] if flow.domains else None,
            detection=det,
            detections=sorted({x.kind for x in flow.detections.values()}, key=_priority),
            midstream=flow.midstream,
            packets=flow.fwd_pkts + flow.rev_pkts,
            bytes=flow.bytes,
            severity=dec.severity,  # the rule's priority (egressd/policy/layers.py), 0 when unset
        )
        if self._monitor and dec.action == "drop":
            ev.extra = {"would_drop": True}
        self.events.append(ev)


def _packed_ip(text: str | None) -> bytes | None:
    """An address literal as the packet layer stores it, or None."""
    if not text:
        return None
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def _watching(flow: Flow) -> bool:
    return flow.usage is not None and flow.usage.watching


def _host_of(target: str | None) -> str | None:
    """ "host:port" or "[v6]:port" -> host when it is a name (addresses are not domains)."""
    if not target:
        return None
    host = target
    if host.startswith("["):
        return None
    if ":" in host:
        host = host.rsplit(":", 1)[0]
    if not host or host.replace(".", "").isdigit():
        return None
    return host
