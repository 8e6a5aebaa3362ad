"""Conntrack events (ctnetlink multicast): the kernel says when a connection starts or ends.

Why: the kernel rules no longer queue a connection's dataless SYN, nor the FIN/RST of one
the daemon has pinned or never seen (netfilter.py), so the daemon cannot learn a flow's end
from packets. Conntrack knows: it destroys its entry when the connection is over (after
TIME_WAIT or CLOSE, or when a new SYN takes over the 4-tuple) and announces it on the
``NFNLGRP_CONNTRACK_DESTROY`` group. The daemon forgets the flow then (``Engine.end``), so a
reused 4-tuple is judged afresh and the table holds live connections, not idle guesses.

One module, one parser, for every conntrack group egressd listens to (NEW starts process
attribution early; DESTROY ends flows): messages are parsed with ``struct`` (netlink header,
nfgenmsg, then nested attributes ``CTA_TUPLE_ORIG`` > ``CTA_TUPLE_IP`` / ``CTA_TUPLE_PROTO``).

Lost events: a socket that cannot keep up gets ENOBUFS and the events in between are gone.
Nothing is wrong then, only late: the engine's idle timeouts (``Engine.sweep``) still end
every flow, as they did before; ``overflows`` counts how often it happened. The socket is
opened before the kernel rules are installed (subscribe before traffic), so no connection
judged by the daemon can end unannounced for want of a listener.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from egressd import netlinkmsg as nl

NETLINK_NETFILTER: Final = 12
NFNLGRP_CONNTRACK_NEW: Final = 1
NFNLGRP_CONNTRACK_UPDATE: Final = 2
NFNLGRP_CONNTRACK_DESTROY: Final = 3
NFNL_SUBSYS_CTNETLINK: Final = 1
IPCTNL_MSG_CT_NEW: Final = 0
IPCTNL_MSG_CT_DELETE: Final = 2
MSG_NEW: Final = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_DELETE: Final = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
CTA_TUPLE_ORIG: Final = 1
CTA_MARK: Final = 8
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
SO_RCVBUFFORCE: Final = 33
RCVBUF: Final = 8 << 20  # ~40k destroy events of headroom: a burst of closes is not an overflow

_PORT: Final = struct.Struct(">H")

Tuple5 = tuple[int, bytes, int, bytes, int]  # proto, src, sport, dst, dport of the original direction


def parse(data: bytes) -> list[tuple[int, Tuple5, int]]:
    """(message type, original-direction 5-tuple, connmark) of each ctnetlink NEW/DELETE
    message in a datagram (``MSG_NEW`` or ``MSG_DELETE``; the mark is 0 when the kernel sent
    none). Anything else, or a truncated message, is skipped."""
    out: list[tuple[int, Tuple5, int]] = []
    for mtype, _seq, body, end in nl.messages(data):
        if mtype in (MSG_NEW, MSG_DELETE):
            t = _tuple(data, body + 4, end)  # after nfgenmsg
            if t is not None:
                out.append((mtype, t, _mark(data, body + 4, end)))
    return out


def _mark(data: bytes, off: int, end: int) -> int:
    for atype, a, b in nl.attrs(data, off, end):
        if atype == CTA_MARK and b - a >= 4:
            return int.from_bytes(data[a : a + 4], "big")
    return 0


def _tuple(data: bytes, off: int, end: int) -> Tuple5 | None:
    for atype, a, b in nl.attrs(data, off, end):
        if atype != CTA_TUPLE_ORIG:
            continue
        src = dst = b""
        proto = sport = dport = -1
        for t2, a2, b2 in nl.attrs(data, a, b):
            if t2 == CTA_TUPLE_IP:
                for t3, a3, b3 in nl.attrs(data, a2, b2):
                    if t3 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                        src = data[a3:b3]
                    elif t3 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                        dst = data[a3:b3]
            elif t2 == CTA_TUPLE_PROTO:
                for t3, a3, b3 in nl.attrs(data, a2, b2):
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


class Events:
    """A non-blocking ctnetlink socket subscribed to some of the conntrack groups.

    ``read()`` returns what arrived since the last call (bounded per call, so a flood of
    closes cannot hold the event loop), and counts ENOBUFS as ``overflows``. Needs
    CAP_NET_ADMIN in the namespace; opening raises OSError otherwise.
    """

    def __init__(self, *groups: int, rcvbuf: int = RCVBUF) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            for g in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.overflows = 0
        self.messages = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int = 256) -> list[tuple[int, Tuple5, int]]:
        out: list[tuple[int, Tuple5, int]] = []
        datagrams, lost = nl.drain(self.sock, budget)
        self.overflows += lost  # events were lost; the idle timeouts cover them
        for data in datagrams:
            got = parse(data)
            self.messages += len(got)
            out += got
        return out

    def close(self) -> None:
        self.sock.close()
