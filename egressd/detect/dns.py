"""DNS messages (RFC 1035): what a node asked for, and which addresses the answer gave.

Why the engine needs this: the policy names domains (pool lists, allowlists), but a flow
only carries addresses. Watching the node's own DNS answers lets the engine tie an address
to the *name the client asked for* (:func:`answers_by_ip`, following the CNAME chain back
to the question), so a later TCP connection to that address is judged by its domain.

Bounds and hostile input: a DNS message is at most 65535 bytes and every count in the
header is checked against the bytes present before anything is allocated (a question needs
at least 5 bytes, a resource record 11). Names follow RFC 1035 §4.1.4 compression, but a
pointer must jump strictly before the start of the label run it was reached from, so the
positions visited strictly decrease and no pointer loop can exist; the wire name is capped
at 255 bytes and labels at 63 (§2.3.4). Names already read are cached per message by
offset, so records that all point at one long name cost a lookup each, not a re-decode
(the "decompression bomb"). Anything malformed gives None, never an exception.
Names are lowercased without the trailing dot; label bytes that are not printable ASCII,
or are "." or "\\", are written as ``\\DDD`` (RFC 4343 §2.1), so a label cannot forge
a dot and a name compares equal to a policy domain only when its labels really are equal.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from egressd.detect.base import DNS, NEED_MORE, NOT_THIS, Detection, Result, StreamContext

HEADER_LEN: Final = 12
MAX_NAME_WIRE: Final = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
MAX_LABEL: Final = 63
MAX_TCP_MESSAGES: Final = 64  # messages returned per call: a head buffer holds a few queries, not hundreds
_MIN_QUESTION: Final = 5  # root name (1) + QTYPE + QCLASS
_MIN_RR: Final = 11  # root name (1) + TYPE + CLASS + TTL + RDLENGTH

TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_CNAME: Final = 5
TYPE_SOA: Final = 6
TYPE_NULL: Final = 10
TYPE_PTR: Final = 12
TYPE_MX: Final = 15
TYPE_TXT: Final = 16
TYPE_AAAA: Final = 28
TYPE_SRV: Final = 33
TYPE_DNAME: Final = 39
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1

# Opcodes a real message carries (RFC 1035, 1996 NOTIFY, 2136 UPDATE, 8490 DSO); 3 is
# unassigned and 1 (IQUERY) is obsolete but still parsed by resolvers.
_OPCODES: Final = frozenset({0, 1, 2, 4, 5, 6})

_TYPE_NAMES: Final = {
    TYPE_A: "A",
    TYPE_NS: "NS",
    TYPE_CNAME: "CNAME",
    TYPE_SOA: "SOA",
    TYPE_NULL: "NULL",
    TYPE_PTR: "PTR",
    TYPE_MX: "MX",
    TYPE_TXT: "TXT",
    TYPE_AAAA: "AAAA",
    TYPE_SRV: "SRV",
    TYPE_DNAME: "DNAME",
    TYPE_OPT: "OPT",
    43: "DS",
    46: "RRSIG",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    TYPE_ANY: "ANY",
}
_RCODE_NAMES: Final = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

_ADDR_LEN: Final = {TYPE_A: 4, TYPE_AAAA: 16}
# Types whose RDATA is exactly one (possibly compressed) domain name (RFC 1035 §3.3).
_NAME_RDATA: Final = frozenset({TYPE_NS, TYPE_CNAME, TYPE_PTR, TYPE_DNAME})

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_QFIXED = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_TCP_HEAD = struct.Struct("!HHHHHHH")  # RFC 7766 length prefix + the header

# Label bytes written as themselves: printable ASCII except "." and "\" (RFC 4343).
_PLAIN: Final = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C))


def type_name(qtype: int) -> str:
    """Mnemonic, or RFC 3597's ``TYPEnnn`` for the rest."""
    return _TYPE_NAMES.get(qtype, f"TYPE{qtype}")


def rcode_name(rcode: int) -> str:
    return _RCODE_NAMES.get(rcode, f"RCODE{rcode}")


@dataclass(frozen=True, slots=True)
class Question:
    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    """One RR. ``rdata`` is the raw RDATA (packed address for A/AAAA); ``target`` is the
    decompressed name for CNAME/NS/PTR/DNAME, else None."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes
    target: str | None = None


@dataclass(frozen=True, slots=True)
class DnsMessage:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[ResourceRecord, ...]
    authority: tuple[ResourceRecord, ...]
    additional: tuple[ResourceRecord, ...]

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def _label_text(label: bytes) -> str:
    if not label.translate(None, _PLAIN):
        return label.decode("ascii")
    return "".join(chr(b) if b in _PLAIN else f"\\{b:03d}" for b in label)


def read_name(msg: bytes, pos: int, cache: dict[int, tuple[str, int]] | None = None) -> tuple[str, int] | None:
    """The name at ``pos`` and the offset just after it *in place* (after the first
    pointer, if any); None when malformed. Lowercased, no trailing dot, root is "".

    ``cache`` (one per message) maps the offset where a label run started to the name
    read from there and its wire length. Without it a message of 5000 records that all
    point at one 127-label name decodes 635,000 labels (~0.4 s); with it each pointer to
    an already-read run costs one lookup, so a message costs O(its length).
    """
    end = len(msg)
    labels: list[str] = []
    wire = 0
    after = -1
    run_start = pos  # start of the label run being read; pointers must go before it
    runs = [(pos, 0, 0)]  # each label run: (offset, index of its first label, wire before it)
    tail: str | None = None
    while True:
        if pos >= end:
            return None
        n = msg[pos]
        if n == 0:
            wire += 1
            break
        kind = n & 0xC0
        if kind == 0xC0:
            if pos + 2 > end:
                return None
            target = _U16.unpack_from(msg, pos)[0] & 0x3FFF
            if target >= run_start:
                return None
            if after < 0:
                after = pos + 2
            hit = cache.get(target) if cache is not None else None
            if hit is not None:
                tail, tail_wire = hit
                wire += tail_wire
                break
            pos = run_start = target
            runs.append((pos, len(labels), wire))
            continue
        if kind:  # 0x40 extended / 0x80 reserved label types (RFC 6891 §5)
            return None
        wire += n + 1
        if wire >= MAX_NAME_WIRE or pos + 1 + n > end:
            return None
        labels.append(_label_text(msg[pos + 1 : pos + 1 + n].lower()))
        pos += 1 + n
    if wire > MAX_NAME_WIRE:
        return None
    if tail:  # a cached non-root suffix: one more (already dotted) element
        labels.append(tail)
    if cache is not None:
        for start, index, wire_before in runs:
            cache.setdefault(start, (".".join(labels[index:]), wire - wire_before))
    return ".".join(labels), (after if after >= 0 else pos + 1)


def parse_message(msg: bytes) -> DnsMessage | None:
    """Parse a whole DNS message; None when anything in it is malformed or truncated.
    Bytes after the last record are tolerated (some stacks pad)."""
    if len(msg) < HEADER_LEN or len(msg) > 65535:
        return None
    ident, flags, qd, an, ns, ar = _HEADER.unpack_from(msg, 0)
    if qd * _MIN_QUESTION + (an + ns + ar) * _MIN_RR > len(msg) - HEADER_LEN:
        return None
    pos = HEADER_LEN
    cache: dict[int, tuple[str, int]] = {}
    questions: list[Question] = []
    for _ in range(qd):
        got = read_name(msg, pos, cache)
        if got is None or got[1] + 4 > len(msg):
            return None
        name, pos = got
        qtype, qclass = _QFIXED.unpack_from(msg, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    sections: list[tuple[ResourceRecord, ...]] = []
    for count in (an, ns, ar):
        records: list[ResourceRecord] = []
        for _ in range(count):
            got_rr = _read_rr(msg, pos, cache)
            if got_rr is None:
                return None
            rr, pos = got_rr
            records.append(rr)
        sections.append(tuple(records))
    return DnsMessage(ident, flags, tuple(questions), sections[0], sections[1], sections[2])


def _read_rr(msg: bytes, pos: int, cache: dict[int, tuple[str, int]]) -> tuple[ResourceRecord, int] | None:
    got = read_name(msg, pos, cache)
    if got is None:
        return None
    name, pos = got
    if pos + 10 > len(msg):
        return None
    rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(msg, pos)
    pos += 10
    rd_end = pos + rdlen
    if rd_end > len(msg):
        return None
    if ttl > 0x7FFFFFFF and rtype != TYPE_OPT:  # RFC 2181 §8: top bit set means zero
        ttl = 0
    target: str | None = None
    # Address sizes are fixed in class IN only (mDNS sets the cache-flush bit 0x8000).
    if (rclass & 0x7FFF) == CLASS_IN and _ADDR_LEN.get(rtype, rdlen) != rdlen:
        return None
    if rtype in _NAME_RDATA:
        got_target = read_name(msg, pos, cache)
        if got_target is None or got_target[1] != rd_end:
            return None
        target = got_target[0]
    return ResourceRecord(name, rtype, rclass, ttl, msg[pos:rd_end], target), rd_end


def answers_by_ip(m: DnsMessage) -> list[tuple[bytes, str, int]]:
    """(packed address, question name, TTL of the address record) for every A/AAAA answer
    reachable from a question through the answer section's CNAME chain.

    Only the answer section, only names reachable from what was asked: an address record
    for an unrelated name (a poisoning attempt, or glue) must not teach the engine that
    the address belongs to the asked domain. The chain walk is bounded by the number of
    answers and stops at a cycle.
    """
    if not m.is_response or not m.answers:
        return []
    cname: dict[str, str] = {}
    for rr in m.answers:
        if rr.rtype == TYPE_CNAME and rr.target is not None:
            cname.setdefault(rr.name, rr.target)
    out: list[tuple[bytes, str, int]] = []
    seen: set[tuple[bytes, str]] = set()
    for q in m.questions:
        names = {q.name}
        cur = q.name
        for _ in range(len(m.answers)):
            nxt = cname.get(cur)
            if nxt is None or nxt in names:
                break
            names.add(nxt)
            cur = nxt
        for rr in m.answers:
            if (
                rr.name in names
                and _ADDR_LEN.get(rr.rtype) == len(rr.rdata)
                and (rr.rclass & 0x7FFF) == CLASS_IN
                and (rr.rdata, q.name) not in seen
            ):
                seen.add((rr.rdata, q.name))
                out.append((rr.rdata, q.name, rr.ttl))
    return out


def iter_tcp_messages(buf: bytes) -> list[bytes]:
    """Complete messages of a DNS-over-TCP stream (RFC 7766 §8: a 2-byte length before
    each). Stops at the first incomplete one, at a zero length (not a DNS message, so the
    framing is lost), or after ``MAX_TCP_MESSAGES``."""
    out: list[bytes] = []
    pos = 0
    while len(out) < MAX_TCP_MESSAGES and pos + 2 <= len(buf):
        n = _U16.unpack_from(buf, pos)[0]
        if n == 0 or pos + 2 + n > len(buf):
            break
        out.append(buf[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


def _plausible(m: DnsMessage) -> bool:
    """Parsing is RFC-literal; *detecting* DNS also asks for a message a real stack would
    send, so 12 zero bytes on port 53 are not called DNS: a known opcode, and a query
    carries at least one question."""
    if m.opcode not in _OPCODES:
        return False
    return m.is_response or bool(m.questions) or m.opcode != 0


def _detection(m: DnsMessage, from_originator: bool) -> Detection:
    q = m.questions[0] if m.questions else None
    qname = q.name if q else ""
    qtype = type_name(q.qtype) if q else "-"
    rcode = rcode_name(m.rcode)
    shown = qname or "."
    if q is None and m.answers:  # mDNS announcements carry answers without a question
        shown, qtype = m.answers[0].name or ".", type_name(m.answers[0].rtype)
    if not m.is_response:
        evidence = f"query {shown} {qtype}"
    else:
        addrs = answers_by_ip(m)
        if addrs:
            evidence = f"answer {shown} -> {ipaddress.ip_address(addrs[0][0])}"
            if len(addrs) > 1:
                evidence += f" (+{len(addrs) - 1})"
        else:
            evidence = f"answer {shown} {qtype} {rcode}"
    info = {"qname": qname, "qtype": qtype, "rcode": rcode}
    if from_originator == m.is_response:
        # A node asks and its peer answers; the other way round is a DNS server on the
        # far side of an outbound flow, or a tunnel using DNS framing: worth a look.
        evidence += " (response from originator)" if m.is_response else " (query from responder)"
        info["odd_direction"] = "1"
    return Detection(kind=DNS, evidence=evidence, info=info)


def detect_dns_datagram(payload: bytes, from_originator: bool) -> Result:
    """One UDP datagram, sent by the flow's originator or by its responder."""
    m = parse_message(payload)
    if m is None or not _plausible(m):
        return NOT_THIS
    return _detection(m, from_originator)


def detect_dns_stream(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """DNS over TCP: the first complete message the originator sent. The header's
    plausibility is judged as soon as it arrives, so a non-DNS stream is let go early."""
    if not fwd and rev:  # the server spoke first: DNS over TCP never does
        return NOT_THIS
    if len(fwd) < 2 + HEADER_LEN:
        if len(fwd) >= 2 and _U16.unpack_from(fwd, 0)[0] < HEADER_LEN:
            return NOT_THIS
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    n, _ident, flags, qd, an, ns, ar = _TCP_HEAD.unpack_from(fwd, 0)
    if n < HEADER_LEN or (flags >> 11) & 0xF not in _OPCODES:
        return NOT_THIS
    if qd * _MIN_QUESTION + (an + ns + ar) * _MIN_RR > n - HEADER_LEN:
        return NOT_THIS
    if len(fwd) < 2 + n:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    m = parse_message(fwd[2 : 2 + n])
    if m is None or not _plausible(m):
        return NOT_THIS
    return _detection(m, from_originator=True)
