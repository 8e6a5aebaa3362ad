"""New connections as the kernel's conntrack announces them, so their owner is named early.

Why: the first packet of a TCP flow that reaches egressd is its first data segment (the
kernel does not queue dataless handshakes), and a mining flow is usually dropped right there.
The drop resets the local socket, and the program closes it within microseconds — taking the
link from socket to process with it. Conntrack announces the connection when its SYN leaves
(``NFNLGRP_CONNTRACK_NEW``), one round trip before that first data segment: the attribution
worker starts the lookup then, off the verdict path, and the flow's event finds it cached.

A netlink socket subscribed to the group (CAP_NET_ADMIN), read by its own thread; the
messages are parsed with ``struct`` (ctnetlink: nfgenmsg, then nested attributes
``CTA_TUPLE_ORIG`` > ``CTA_TUPLE_IP`` / ``CTA_TUPLE_PROTO``). Overflow (ENOBUFS under a
connection flood) only loses early lookups: the flow is still looked up when its event comes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

NETLINK_NETFILTER: Final = 12
NFNLGRP_CONNTRACK_NEW: Final = 1
NFNL_SUBSYS_CTNETLINK: Final = 1
IPCTNL_MSG_CT_NEW: Final = 0
CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_TYPE_MASK: Final = 0x3FFF

_NLMSGHDR: Final = struct.Struct("=IHHII")
_NLA: Final = struct.Struct("=HH")
_PORT: Final = struct.Struct(">H")

Tuple5 = tuple[int, bytes, int, bytes, int]  # proto, src, sport, dst, dport of the original direction


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value offset, value end) of each netlink attribute in data[off:end]."""
    while off + _NLA.size <= end:
        length, atype = _NLA.unpack_from(data, off)
        if length < _NLA.size or off + length > end:
            return
        yield atype & NLA_TYPE_MASK, off + _NLA.size, off + length
        off += (length + 3) & ~3


def parse_new(data: bytes) -> list[Tuple5]:
    """The original-direction 5-tuples of the ctnetlink NEW messages in one datagram."""
    out: list[Tuple5] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        end = min(off + length, len(data))
        if mtype == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            t = _tuple(data, off + _NLMSGHDR.size + 4, end)  # after nfgenmsg
            if t is not None:
                out.append(t)
        off += (length + 3) & ~3
    return out


def _tuple(data: bytes, off: int, end: int) -> Tuple5 | None:
    for atype, a, b in _attrs(data, off, end):
        if atype != CTA_TUPLE_ORIG:
            continue
        src = dst = b""
        proto = sport = dport = -1
        for t2, a2, b2 in _attrs(data, a, b):
            if t2 == CTA_TUPLE_IP:
                for t3, a3, b3 in _attrs(data, a2, b2):
                    if t3 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                        src = data[a3:b3]
                    elif t3 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                        dst = data[a3:b3]
            elif t2 == CTA_TUPLE_PROTO:
                for t3, a3, b3 in _attrs(data, a2, b2):
                    if t3 == CTA_PROTO_NUM and b3 > a3:
                        proto = data[a3]
                    elif t3 == CTA_PROTO_SRC_PORT and b3 - a3 >= 2:
                        (sport,) = _PORT.unpack_from(data, a3)
                    elif t3 == CTA_PROTO_DST_PORT and b3 - a3 >= 2:
                        (dport,) = _PORT.unpack_from(data, a3)
        if src and dst and proto >= 0 and sport >= 0 and dport >= 0:
            return proto, src, sport, dst, dport
        return None
    return None


class ConntrackNew:
    """A thread reading NEW events and handing TCP/UDP tuples to ``on_new``."""

    def __init__(self, on_new: Callable[[Tuple5], None], gate: Callable[[], bool] = lambda: True) -> None:
        self.on_new = on_new
        self.gate = gate  # False: the early-lookup budget is spent; pause reading
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 1 << (NFNLGRP_CONNTRACK_NEW - 1)))
        # A small buffer: after a pause only a few hundred stale events are waiting.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.settimeout(0.5)
        self.overflows = 0
        self.seen = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="egressd-ct-new", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread.ident is not None:
            self._thread.join(1.0)
        self.sock.close()

    def _run(self) -> None:
        from egressd.attribution.service import lower_priority

        lower_priority()
        while not self._stop:
            if not self.gate():
                # Budget spent (a connection flood): stop reading for a while and let the
                # kernel drop events on the full socket buffer (one ENOBUFS), at no CPU cost.
                time.sleep(0.1)
                continue
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno == 105:  # ENOBUFS: events were lost; later ones still come
                    self.overflows += 1
                    continue
                return
            for t in parse_new(data):
                if t[0] in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                    self.seen += 1
                    self.on_new(t)
