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
import threading
import time
from collections.abc import Callable

from egressd.ctevents import MSG_NEW, NETLINK_NETFILTER, NFNLGRP_CONNTRACK_NEW, Tuple5, parse

__all__ = ["NETLINK_NETFILTER", "NFNLGRP_CONNTRACK_NEW", "ConntrackNew", "Tuple5", "parse_new"]


def parse_new(data: bytes) -> list[Tuple5]:
    """The original-direction 5-tuples of the ctnetlink NEW messages in one datagram.

    One ctnetlink parser serves the project (``egressd.ctevents``: NEW here, DESTROY for the
    daemon's flow ends); this is its NEW half."""
    return [t for mtype, t, _mark in parse(data) if mtype == MSG_NEW]


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
