"""DNS tunnels: data carried in query names, and tunnel framing on port 53.

Why per zone and across flows, not per query: one odd name proves nothing. Hash lookups
(DNSBLs, antivirus reputation), DKIM and ACME TXT records and CDN names can each look long
or random once. A tunnel cannot stop at once: to move data it must send *many* distinct
names under the one zone its server is authoritative for, each packed with encoded bytes
(iodine: base32/64/128 or raw bytes in up to 255-byte names, NULL/PRIVATE/TXT answers;
dns2tcp: base64 labels and TXT; dnscat2: hex labels under its domain or a ``dnscat.``
prefix, TXT/CNAME/MX). So each query is scored on its own (``tunnel_score`` below:
label length, subdomain length, entropy, escaped bytes, record type),
and a zone becomes a tunnel when ``MIN_QUERIES`` *distinct* data-like names
(score >= ``DATA_SCORE``, at least ``MIN_DATA_CHARS`` characters left of the zone or an
escaped byte, no attribute-leaf label, not a digest lookup: see ``_data_score``) were asked
under it within ``WINDOW`` seconds. From then on
every query under that zone, on any flow, is the tunnel, so a tool that opens a new
socket (or retries through another resolver) is stopped on its first query.

What a single query shows exactly, without waiting:

* iodine's raw mode (``iodine/src/common.c`` ``raw_header``, ``common.h``
  ``RAW_HDR_CMD_*``): after its DNS handshake the client talks to the server's UDP port
  53 directly with ``10 d1 9e`` followed by a command nibble (1 login, 2 data, 3 ping) and the user id: not DNS at all.
* dnscat2 without a domain (``dnscat2/doc/protocol.md``): names ``dnscat.<hex>``, the
  tag then the hex-encoded packet, sent to any resolver.
* dns2tcp's control labels (``dns2tcp/common/requests.h``): ``=auth``, ``=connect``,
  ``=resources`` as the label before the zone; ``=`` never appears in a host name.

The zone is guessed as the last two labels (three when the second-level label is short, as
in ``co.uk``): a tunnel's names all share the zone its server answers for, so a guess that
is one label too short merely merges a tunnel with its siblings. State is bounded: at most
``MAX_ZONES`` zones (LRU), a handful of remembered names per zone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

from egressd.detect.base import TUNNEL_DNS, Detection, printable
from egressd.detect.dns import TYPE_ANY, TYPE_CNAME, TYPE_MX, TYPE_NULL, TYPE_TXT, type_name
from egressd.detect.icmp import classify_data

DATA_SCORE: Final = 0.5  # a query whose name looks like encoded data (see tunnel_score)
MIN_DATA_CHARS: Final = 48  # characters left of the zone before a name can count as data
_DIGEST_LENGTHS: Final = frozenset({32, 40, 56, 64})
MIN_QUERIES: Final = 4  # distinct data-like names under one zone before it is called a tunnel
WINDOW: Final = 120.0  # seconds over which they must arrive
MAX_ZONES: Final = 4096
_RECENT: Final = 8  # names remembered per zone (to count distinct ones)

_IODINE_RAW: Final = b"\x10\xd1\x9e"
_IODINE_RAW_CMDS: Final = frozenset({1, 2, 3})
_DNS2TCP_LABELS: Final = frozenset({"=auth", "=connect", "=resources"})


_HEX: Final = frozenset("0123456789abcdef")


def _is_hex(s: str) -> bool:
    return len(s) >= 16 and set(s) <= _HEX


def zone_of(labels: list[str]) -> str:
    if len(labels) <= 2:
        return ".".join(labels)
    n = 3 if len(labels[-2]) <= 3 and len(labels) > 3 else 2
    return ".".join(labels[-n:])


class _Zone:
    __slots__ = ("count", "example", "first_ts", "recent", "tunnel", "types")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.count = 0
        self.recent: list[int] = []
        self.example = ""
        self.types: set[str] = set()
        self.tunnel: Detection | None = None


class DnsTunnelTracker:
    """Zone -> evidence of data-carrying queries, shared by every flow of the engine."""

    __slots__ = ("_zones",)

    def __init__(self) -> None:
        self._zones: OrderedDict[str, _Zone] = OrderedDict()

    def query(self, qname: str, qtype: int, ts: float) -> Detection | None:
        """Account one query the node sent; a Detection when its zone is (now) a tunnel."""
        if not qname:
            return None
        labels = qname.split(".")
        if labels[0] == "dnscat" and len(labels) > 1 and _is_hex("".join(labels[1:3])):
            # dnscat2 without a domain (its protocol.md): "dnscat." + hex session data, sent
            # to whatever resolver is configured. The tag is the only stable part of the name.
            return self._mark("dnscat.", ts, f"dnscat2 query (dnscat. + hex data): {printable(qname.encode(), 80)}",
                              {"tool": "dnscat2"})  # fmt: skip
        zone = zone_of(labels)
        z = self._zones.get(zone)
        if z is not None:
            self._zones.move_to_end(zone)
            if z.tunnel is not None:
                return Detection(
                    TUNNEL_DNS,
                    f"query under {zone}, a zone already seen carrying data: {printable(qname.encode(), 80)}",
                    info={**z.tunnel.info, "qname": qname[:120]},
                )
        for label in labels[1:-2]:
            if label in _DNS2TCP_LABELS:
                return self._mark(zone, ts, f"dns2tcp control label {label} in {printable(qname.encode(), 80)}",
                                  {"tool": "dns2tcp", "zone": zone})  # fmt: skip
        score = self._data_score(labels, zone, qname, qtype)
        if score < DATA_SCORE:
            return None
        if z is None:
            z = self._zones[zone] = _Zone(ts)
            while len(self._zones) > MAX_ZONES:
                self._zones.popitem(last=False)
        if ts - z.first_ts > WINDOW:
            z.first_ts, z.count = ts, 0
            z.recent.clear()
        h = hash(qname)
        if h in z.recent:
            return None  # a retransmission of the same name is not more data
        z.recent.append(h)
        if len(z.recent) > _RECENT:
            z.recent.pop(0)
        z.count += 1
        z.types.add(type_name(qtype))
        if not z.example or score >= 0.9:
            z.example = qname
        if z.count < MIN_QUERIES:
            return None
        types = ",".join(sorted(z.types))
        return self._mark(
            zone, ts,
            f"{z.count} distinct data-carrying names under {zone} within {ts - z.first_ts:.1f} s "
            f"(types {types}), e.g. {printable(z.example.encode(), 80)} (score {score:.2f})",
            {"zone": zone, "queries": str(z.count), "types": types},
        )  # fmt: skip

    @staticmethod
    def _data_score(labels: list[str], zone: str, qname: str, qtype: int) -> float:
        """``tunnel_score`` for names that can carry a tunnel's payload, 0 for the rest:

        * a name with an underscore label is an attribute leaf (RFC 8552: ``_domainkey``,
          ``_acme-challenge``, ``_dmarc``, DNS-SD's ``_tcp``/``_udp``): DKIM selectors such as
          Amazon SES's are 32 random characters, and no tunnel tool writes such labels;
        * fewer than ``MIN_DATA_CHARS`` characters left of the zone and no escaped byte: too
          little to be a tunnel's data query (tools fill names towards 255 bytes), the size
          of a hash or a CDN's node name;
        * one hex label of a digest's length (MD5, SHA-1, SHA-256 halves) and nothing random
          beside it: a reputation lookup (Team Cymru's MHR, hash block lists).
        """
        if any(label.startswith("_") for label in labels):
            return 0.0
        sub = labels[: len(labels) - zone.count(".") - 1]
        text = ".".join(sub)
        if len(text) < MIN_DATA_CHARS and "\\" not in qname:
            return 0.0
        if sub and len(sub[0]) in _DIGEST_LENGTHS and set(sub[0]) <= _HEX and all(len(x) <= 16 for x in sub[1:]):
            return 0.0
        return tunnel_score(qname, qtype)

    def _mark(self, zone: str, ts: float, evidence: str, info: dict[str, str]) -> Detection:
        z = self._zones.get(zone)
        if z is None:
            z = self._zones[zone] = _Zone(ts)
            while len(self._zones) > MAX_ZONES:
                self._zones.popitem(last=False)
        det = Detection(TUNNEL_DNS, evidence, info=info)
        z.tunnel = det
        return det


def detect_non_dns(payload: bytes) -> Detection | None:
    """A datagram on a DNS port that is a known tunnel's own framing, not DNS: iodine's raw
    mode, or ptunnel-ng's ``--udp`` mode (its ICMP framing, sent to the proxy's port 53)."""
    # ptunnel-ng's UDP mode keeps the ICMP echo header (type 8/0, code 0, checksum, id, seq).
    inner = payload[8:] if len(payload) >= 36 and payload[0] in (0, 8) and payload[1] == 0 else payload
    pt = classify_data(inner)
    if pt is not None and pt.info.get("tool", "").startswith("ptunnel"):
        return Detection(TUNNEL_DNS, f"not DNS on port 53 but {pt.evidence}", info={**pt.info, "mode": "udp"})
    if len(payload) >= 4 and payload.startswith(_IODINE_RAW) and payload[3] >> 4 in _IODINE_RAW_CMDS:
        cmd = {1: "login", 2: "data", 3: "ping"}[payload[3] >> 4]
        return Detection(
            TUNNEL_DNS,
            f"iodine raw-mode {cmd} packet on port 53 (header 10 d1 9e, user {payload[3] & 0xF})",
            info={"tool": "iodine", "mode": "raw"},
        )
    return None


# --- per-query score ----------------------------------------------------------------------

_TUNNEL_TYPES: Final = {TYPE_NULL: 0.35, TYPE_TXT: 0.2, TYPE_ANY: 0.15, TYPE_CNAME: 0.05, TYPE_MX: 0.05}


def _entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def tunnel_score(qname: str, qtype: int) -> float:
    """How much a single query looks like data smuggled in DNS, 0..1 (not a verdict).

    DNS tunnels (iodine, dnscat2, dns2tcp, DNSExfiltrator) pack encoded bytes into the
    leftmost labels, so those labels are long, many, and close to random; downstream data
    comes back in record types that carry arbitrary bytes (NULL, TXT; ANY and CNAME/MX
    for some tools). The features and why each threshold:

    * longest label: hostnames a person or CDN picks rarely exceed ~20 characters; tunnel
      tools fill labels to the 63-byte limit. Scored linearly from 24 to 52 (weight 0.3).
    * length of the part left of the last two labels (the subdomain the tool controls):
      ordinary names stay under ~40; tunnels use 100-230. Linear from 40 to 120 (0.2).
    * entropy of that part (or of the longest label, when the part is short: some tools
      use no domain at all): English-like names give ~2.5-3.5 bits/char, hex ~4, base32
      ~5, base64/base128 more. Scored from 3.3 to 4.3 bits (0.25), and only over at least
      16 characters, because the entropy of a short string is biased low and says nothing.
    * a label byte that had to be escaped (binary, space, an embedded dot; iodine's raw and
      base128 upstream encodings): no hostname anyone resolves has one (0.3).
    * qtype: NULL 0.35 (no legitimate use in queries), TXT 0.2, ANY 0.15, CNAME/MX 0.05.

    The sum is clamped to 1. An iodine NULL query with 50+ random characters scores ~1;
    ``www.example.com A`` scores 0; a long CDN name (``a1234.dscb.akamaiedge.net``) stays
    low because its labels are short.
    """
    labels = qname.split(".") if qname else []
    sub = ".".join(labels[:-2])
    longest = max((len(label) for label in labels), default=0)
    score = 0.3 * _ramp(longest, 24, 52)
    score += 0.2 * _ramp(len(sub), 40, 120)
    compact = sub.replace(".", "")
    if len(compact) < 16:  # no subdomain to speak of (e.g. dnscat2 without a domain): the longest label
        compact = max(labels, key=len, default="")
    if len(compact) >= 16:
        score += 0.25 * _ramp(_entropy(compact), 3.3, 4.3)
    if "\\" in qname:  # a label byte escaped as \\DDD: binary, a space, an embedded dot
        score += 0.3
    score += _TUNNEL_TYPES.get(qtype, 0.0)
    return min(score, 1.0)


def _ramp(x: float, lo: float, hi: float) -> float:
    if x <= lo:
        return 0.0
    if x >= hi:
        return 1.0
    return (x - lo) / (hi - lo)
