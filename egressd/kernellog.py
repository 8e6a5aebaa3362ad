"""What the kernel refused on its own (the compiled policy's drops), read back through NFLOG.

Why: a connection the compiled policy drops (egressd.kernelsets) is reset at its SYN by the
kernel and never reaches the queue, yet "why was this dropped?" must still be answered from
one event line, as for the engine's drops. Each compiled drop rule logs the SYN it refuses to
an NFLOG group (``--nflog-prefix "egd <rule index>"``), copying only the headers; the daemon
reads the group on its event loop and writes the same event the engine would have written
(rule, reason ``first-packet``, the DNS-learned name). The refusal does not wait for this:
NFLOG is asynchronous, so the reset leaves whatever the daemon is doing.

The same group carries the closes of connections being judged (prefix ``egd close``,
netfilter.CHAIN_CLOSE): their dataless FIN is evidence for the detectors ("this side
closed"), not something to stop, so it is logged rather than queued and never waits for a
verdict. Those are handed back whole (headers, and the mark that says their direction).

A netlink socket (``NFNL_SUBSYS_ULOG``), bound to one group with ``NFULNL_CFG_CMD_BIND``;
messages are parsed with ``struct``. Lost messages (ENOBUFS) lose events, not enforcement,
and are counted; a lost close leaves its flow to the conntrack end or the idle timeout.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from egressd import netlinkmsg as nl

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_TIMEOUT: Final = 3
NFULA_CFG_QTHRESH: Final = 4
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_COPY_PACKET: Final = 2
NFULA_MARK: Final = 2
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10
NLM_F_REQUEST: Final = 1
PREFIX: Final = "egd "
CLOSE_PREFIX: Final = b"egd close"  # netfilter.CLOSE_PREFIX
# IPv4 with options (60) or IPv6 (40), + a TCP header with options (60): a close is headers only.
COPY_RANGE: Final = 128

_NFGEN: Final = struct.Struct("=BBH")
_MSG_PACKET: Final = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET

Logged = tuple[int, int, bytes, int, bytes, int]  # rule index, proto, src, sport, dst, dport
Closed = tuple[bytes, int]  # the logged packet (from its IP header), its mark


def config_message(group: int, attrs: bytes, seq: int = 1) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    return (
        nl.NLMSGHDR.pack(
            nl.NLMSGHDR.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST, seq, 0
        )
        + body
    )


def _five_tuple(pkt: bytes) -> tuple[int, bytes, int, bytes, int] | None:
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 15) * 4
        proto, src, dst, l4 = pkt[9], pkt[12:16], pkt[16:20], ihl
    elif version == 6 and len(pkt) >= 40:
        proto, src, dst, l4 = pkt[6], pkt[8:24], pkt[24:40], 40
    else:
        return None
    sport = dport = 0
    if len(pkt) >= l4 + 4 and proto in (6, 17, 33, 132, 136):
        sport, dport = struct.unpack_from("!HH", pkt, l4)
    return proto, src, sport, dst, dport


def parse(data: bytes, closes: list[Closed] | None = None) -> list[Logged]:
    """The packets of one datagram logged with an ``egd <index>`` prefix; those logged as
    ``egd close`` are appended to ``closes`` (when given)."""
    out: list[Logged] = []
    for mtype, _seq, body, end in nl.messages(data):
        if mtype == _MSG_PACKET:
            prefix = b""
            payload = b""
            mark = 0
            for atype, a, b in nl.attrs(data, body + _NFGEN.size, end):
                if atype == NFULA_PREFIX:
                    prefix = data[a:b].rstrip(b"\0")
                elif atype == NFULA_PAYLOAD:
                    payload = data[a:b]
                elif atype == NFULA_MARK and b - a == 4:
                    mark = int.from_bytes(data[a:b], "big")
            if prefix == CLOSE_PREFIX:
                if closes is not None and payload:
                    closes.append((payload, mark))
                continue
            text = prefix.decode("ascii", "replace")
            t = _five_tuple(payload)
            if text.startswith(PREFIX) and text[len(PREFIX) :].isdigit() and t is not None:
                out.append((int(text[len(PREFIX) :]), *t))
    return out


class KernelLog:
    """A non-blocking NFLOG socket bound to one group (CAP_NET_ADMIN; OSError otherwise)."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.sendall(config_message(group, nl.attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))))
            mode = struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)
            self.sock.sendall(config_message(group, nl.attr(NFULA_CFG_MODE, mode), seq=2))
            # One message per logged packet, sent at once (no batching: an event is due now).
            self.sock.sendall(config_message(group, nl.attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1)), seq=3))
            self.sock.sendall(config_message(group, nl.attr(NFULA_CFG_TIMEOUT, struct.pack(">I", 0)), seq=4))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.overflows = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, closes: list[Closed] | None = None, budget: int = 256) -> list[Logged]:
        """Up to ``budget`` datagrams: the compiled drops; closes go to ``closes``."""
        out: list[Logged] = []
        datagrams, lost = nl.drain(self.sock, budget)
        self.overflows += lost
        for data in datagrams:
            out += parse(data, closes)
        return out

    def close(self) -> None:
        self.sock.close()
