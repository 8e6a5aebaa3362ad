"""Netlink message framing, once: headers, attributes, their 4-byte alignment.

Why one module: egressd reads four netlink protocols (NFQUEUE through netfilterqueue, NFLOG in
``kernellog``, ctnetlink events in ``ctevents``, sock_diag in ``attribution.sockdiag``), and
each hand-written walk over ``nlmsghdr`` and ``nlattr`` is a place where a truncated or
hostile length can loop or read past the datagram. Every walk here stops at the first length
that is too short or reaches past its container, so a malformed message ends the walk; it
never raises and never runs past ``end``.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from typing import Final

NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
NLA: Final = struct.Struct("=HH")  # len, type (host order); rtattr has the same layout
NLA_TYPE_MASK: Final = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER


def align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, seq, body offset, end) of each netlink message in one datagram."""
    off = 0
    n = len(data)
    while off + NLMSGHDR.size <= n:
        length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size:
            return
        yield mtype, seq, off + NLMSGHDR.size, min(off + length, n)
        off += align(length)


def attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flag bits, value offset, value end) of each attribute in data[off:end]."""
    while off + NLA.size <= end:
        length, atype = NLA.unpack_from(data, off)
        if length < NLA.size or off + length > end:
            return
        yield atype & NLA_TYPE_MASK, off + NLA.size, off + length
        off += align(length)


def attr(atype: int, value: bytes) -> bytes:
    """One attribute, padded to the 4-byte boundary the next one starts at."""
    length = NLA.size + len(value)
    return NLA.pack(length, atype) + value + b"\0" * (align(length) - length)


def drain(sock: socket.socket, budget: int) -> tuple[list[bytes], int]:
    """Up to ``budget`` datagrams waiting on a non-blocking netlink socket, and how many
    overflows (ENOBUFS: the kernel dropped messages on a full buffer) the reads reported.

    Why here: the daemon's event sockets (NFLOG, conntrack ends) are read on the event loop
    the same way; an overflow is counted by the caller and reading goes on, since later
    messages still come."""
    out: list[bytes] = []
    overflows = 0
    for _ in range(budget):
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            overflows += 1
    return out, overflows
