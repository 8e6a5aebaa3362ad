"""ICMP tunnels: echo requests and replies whose data is a protocol, not a ping.

Why it can be exact: RFC 792 (and RFC 4443 §4.2 for ICMPv6) says the data of an echo reply
is the data of the request, returned unchanged; a ping program fills the request with a
timestamp and a fixed pattern. A tunnel must put *its own* bytes in both directions, so:

* **The reply does not echo the request.** Every ICMP tunnel's far end answers the node's
  echo requests with echo replies that carry the downstream data (ptunnel, hans,
  icmptunnel, icmpsh). A reply with the id and sequence number of a request seen on this
  flow but other data (not the same bytes, nor a truncation of them) is a tunnel, whatever
  the tool. The kernel answers ordinary pings itself, byte for byte.
* **The requests carry changing data.** A ping program sends one payload over and over:
  only its first bytes (a send time stamp, 8 to 16 bytes in iputils, BSD, Windows, busybox,
  fping, Go's pro-bing) change per request. Requests on one identifier whose data differs
  past the first 24 bytes, three times over, are a channel (an exfiltration tool writing a
  file into pings is answered by the kernel's echo, so the reply test alone misses it).
* **A known tunnel header in the data**, checked by structure, not only by magic (ptunnel-ng
  lets the user change its magic):
  - ptunnel / ptunnel-ng (``ptunnel.h`` ``ping_tunnel_pkt_t``): 28 bytes, network order:
    magic, destination IP, destination port, state, ack, data_len, seq_no, id_no, then
    ``data_len`` bytes. ``data_len`` must equal what follows the header, the state's low
    bits a protocol state (0..4: start, ack, data, close, authenticate) and exactly one of
    its two top bits set (``kUser_flag`` from the client, ``kProxy_flag`` from the proxy).
  - hans (``client.cpp``/``server.cpp``): a 4-byte magic, ``hanc``/``hnc2``..``hnc4`` from
    the client and ``hans``/``hns2``..``hns4`` from the server, then a packet type 1..12.
  - a whole IP packet (icmptunnel, icmptx, hans' data after its header): an IPv4 header
    whose total length equals the data length and whose header checksum is right, or an
    IPv6 header whose payload length is the data length minus 40.

Benign look-alikes and why they stay clean: iputils/busybox/Windows ping data is a
timestamp and a counting or user pattern (``-p``), echoed back exactly; its first 28 bytes
cannot pass the ptunnel test because the state word would need a flag bit the timestamp
never has, nor the IPv4 test without a valid header checksum over its own bytes.

State per flow is bounded: the data of the last ``MAX_PENDING`` requests, kept to compare
with their replies. The head of an echo flow is ``ECHO_HEAD`` exactly echoed replies (or
``max_packets`` packets): a tunnel shows itself in its first request or reply, a ping by
then has shown it is one.
"""

from __future__ import annotations

import struct
from typing import Final

from egressd.detect.base import TUNNEL_ICMP, Detection, printable

MAX_PENDING: Final = 16
ECHO_HEAD: Final = 4  # exactly echoed replies after which an echo flow is pinned as a ping
MAX_TAILS: Final = 3  # distinct request payloads (past the time stamp) that make a flow a channel
_STAMP: Final = 24  # bytes a pinger may vary per request (iputils: a 16-byte timeval; others 8..24)
_MIN_TAIL: Final = 16
ECHO_REQUESTS: Final = frozenset({8, 128})
ECHO_REPLIES: Final = frozenset({0, 129})

_PT_HEADER: Final = 28
_PT = struct.Struct("!IIIIII")
_PT_USER: Final = 1 << 30
_PT_PROXY: Final = 1 << 31
_PT_STATES: Final = 5
_PT_MAGICS: Final = {0xD5200880: "ptunnel", 0xDEADC0DE: "ptunnel-ng"}
_HANS_CLIENT: Final = frozenset({b"hanc", b"hnc2", b"hnc3", b"hnc4"})
_HANS_SERVER: Final = frozenset({b"hans", b"hns2", b"hns3", b"hns4"})
_HANS_TYPES: Final = range(1, 13)


def _ipv4_checksum_ok(h: bytes) -> bool:
    s = 0
    for i in range(0, len(h), 2):
        s += (h[i] << 8) | h[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def classify_data(data: bytes) -> Detection | None:
    """Echo data that is a known tunnel's framing or a whole IP packet, or None."""
    n = len(data)
    if n >= _PT_HEADER:
        magic, _ip, port, state, _ack, dlen = _PT.unpack_from(data, 0)
        flags = state & (_PT_USER | _PT_PROXY)
        if dlen == n - _PT_HEADER and (state & 0x3FFFFFFF) < _PT_STATES and flags in (_PT_USER, _PT_PROXY):
            tool = _PT_MAGICS.get(magic, "ptunnel-style")
            side = "client" if flags == _PT_USER else "proxy"
            return Detection(
                TUNNEL_ICMP,
                f"{tool} header in echo data: magic 0x{magic:08x}, {side} state {state & 0x3FFFFFFF}, "
                f"data_len {dlen}, destination port {port}",
                info={"tool": tool, "magic": f"0x{magic:08x}"},
            )
    if n >= 5 and data[4] in _HANS_TYPES and (data[:4] in _HANS_CLIENT or data[:4] in _HANS_SERVER):
        return Detection(
            TUNNEL_ICMP,
            f"hans header in echo data: magic {data[:4].decode()}, type {data[4]}",
            info={"tool": "hans"},
        )
    if n >= 20 and data[0] >> 4 == 4 and data[0] & 0xF >= 5:
        ihl = (data[0] & 0xF) * 4
        if n >= ihl and int.from_bytes(data[2:4], "big") == n and _ipv4_checksum_ok(data[:ihl]):
            return Detection(
                TUNNEL_ICMP,
                f"echo data is a whole IPv4 packet (protocol {data[9]}, {n} bytes, valid header checksum)",
                info={"tool": "ip-over-icmp"},
            )
    if n >= 40 and data[0] >> 4 == 6 and int.from_bytes(data[4:6], "big") == n - 40:
        return Detection(
            TUNNEL_ICMP,
            f"echo data is a whole IPv6 packet (next header {data[6]}, {n} bytes)",
            info={"tool": "ip-over-icmp"},
        )
    return None


class EchoState:
    """One echo flow (node -> host, one identifier): the requests waiting for replies.

    ``settled`` once ``ECHO_HEAD`` replies returned their requests' data exactly: that is the
    head of an echo flow, as the first bytes are of a TCP one; the engine then pins it."""

    __slots__ = ("_pending", "_tails", "echoed")

    def __init__(self) -> None:
        self._pending: dict[int, bytes] = {}
        self._tails: set[bytes] = set()
        self.echoed = 0

    @property
    def settled(self) -> bool:
        return self.echoed >= ECHO_HEAD

    def feed(self, icmp_type: int, payload: bytes, from_originator: bool) -> Detection | None:
        """``payload`` is the ICMP message after type/code/checksum: id, sequence, data."""
        if len(payload) < 4:
            return None
        seq = int.from_bytes(payload[2:4], "big")
        data = payload[4:]
        det = classify_data(data)
        if det is not None:
            return det
        if icmp_type in ECHO_REQUESTS and from_originator:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[seq] = data
            tail = data[_STAMP:]
            if len(tail) >= _MIN_TAIL and len(self._tails) < MAX_TAILS:
                self._tails.add(tail)
                if len(self._tails) >= MAX_TAILS:
                    return Detection(
                        TUNNEL_ICMP,
                        f"{MAX_TAILS} echo requests on one identifier carry different data past their first "
                        f"{_STAMP} bytes (ping repeats one payload): {printable(tail, 24)}",
                        info={"tool": "changing-payload"},
                    )
            return None
        if icmp_type in ECHO_REPLIES and not from_originator:
            sent = self._pending.pop(seq, None)
            if sent is not None and sent.startswith(data):
                self.echoed += 1
            elif sent is not None:
                return Detection(
                    TUNNEL_ICMP,
                    f"echo reply seq {seq} does not echo its request ({len(sent)} bytes sent, {len(data)} "
                    f"returned: {printable(data, 24)})",
                    info={"tool": "echo-mismatch"},
                )
        return None
