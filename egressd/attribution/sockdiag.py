"""The local socket behind a flow, by its 4-tuple, through netlink sock_diag (what ``ss`` uses).

Why sock_diag and not ``/proc/net/tcp``: one exact lookup (``SOCK_DIAG_BY_FAMILY`` without
``NLM_F_DUMP``) is a hash-table probe in the kernel and costs one netlink round trip, whatever
the number of sockets on the node; a scan of ``/proc/net/tcp`` reads every socket. The answer
carries what needs no privilege beyond the netlink socket itself: the owner uid, the socket
inode (the key to ``/proc/PID/fd``) and the cgroup-v2 id of the process that created the socket
(``INET_DIAG_CGROUP_ID``) — the container can be named even when ``/proc`` is hidden from us.

``destroy`` sends ``SOCK_DESTROY`` for the same 4-tuple (what ``ss -K`` does): the kernel aborts
the socket, and the local program's blocked ``connect()``/``recv()`` fails at once with
ECONNABORTED. It needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY.

Plain ``socket`` + ``struct``, no dependency. A :class:`SockDiag` is one netlink socket, bound
to the network namespace it was created in; it is not thread-safe (one per worker).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Final

from egressd import netlinkmsg as nl

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
SOCK_DESTROY: Final = 21
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
INET_DIAG_CGROUP_ID: Final = 21
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF

# inet_diag_req_v2 is family, protocol, ext, pad, states, then inet_diag_sockid: sport and
# dport (network order), src[16], dst[16], interface, cookie[2].
_SOCKID_PORTS: Final = struct.Struct(">HH")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode.
_MSG: Final = struct.Struct("=BBBB48sIIIII")
_ERR: Final = struct.Struct("=i")

TCP_STATES: Final = {
    1: "established",
    2: "syn-sent",
    3: "syn-recv",
    4: "fin-wait-1",
    5: "fin-wait-2",
    6: "time-wait",
    7: "close",
    8: "close-wait",
    9: "last-ack",
    10: "listen",
    11: "closing",
}
_ALL_STATES: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """What the kernel says about the local socket. ``inode`` is 0 for an orphaned socket
    (its program closed it or exited: the kernel still finishes the connection)."""

    uid: int
    inode: int
    cgroup_id: int  # 0 when the kernel did not report one
    state: str


class NotFound(Exception):
    """No socket has this 4-tuple in this network namespace (closed, or not ours)."""


_NOCOOKIE: Final = (INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)


def _sockid(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    pad = bytes(16 - len(src))
    return _SOCKID_PORTS.pack(sport, dport) + src + pad + dst + pad


def _request(msg_type: int, flags: int, seq: int, family: int, proto: int, sockid: bytes) -> bytes:
    body = struct.pack("=BBBxI", family, proto, 0, _ALL_STATES) + sockid + struct.pack("=III", 0, *_NOCOOKIE)
    return nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def parse_reply(data: bytes, seq: int) -> SocketInfo:
    """One reply to an exact lookup -> SocketInfo; raises NotFound or OSError from NLMSG_ERROR."""
    for mtype, mseq, body, end in nl.messages(data):
        if mseq != seq:
            continue
        if mtype == NLMSG_ERROR and body + _ERR.size <= end:
            (err,) = _ERR.unpack_from(data, body)
            if err in (-errno.ENOENT, -errno.ESRCH):
                raise NotFound()
            raise OSError(-err, os.strerror(-err))
        if mtype == SOCK_DIAG_BY_FAMILY and body + _MSG.size <= end:
            _fam, state, _t, _r, _id, _exp, _rq, _wq, uid, inode = _MSG.unpack_from(data, body)
            cgroup_id = 0
            for rtype, a, b in nl.attrs(data, body + _MSG.size, end):
                if rtype == INET_DIAG_CGROUP_ID and b - a >= 8:
                    (cgroup_id,) = struct.unpack_from("=Q", data, a)
            return SocketInfo(uid, inode, cgroup_id, TCP_STATES.get(state, str(state)))
    raise NotFound()


class SockDiag:
    """One NETLINK_SOCK_DIAG socket. ``timeout`` bounds every call (the kernel answers in
    microseconds; the bound is for a namespace being torn down under us)."""

    def __init__(self, timeout: float = 0.2) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self._seq = 0
        # The daemon's loop thread asks for dropped flows' sockets at once, the worker for
        # the rest: one request and its answer at a time per netlink socket.
        self._lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def _call(self, msg_type: int, flags: int, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
        with self._lock:
            return self._call_locked(msg_type, flags, proto, src, sport, dst, dport)

    def _call_locked(
        self, msg_type: int, flags: int, proto: int, src: bytes, sport: int, dst: bytes, dport: int
    ) -> bytes:
        family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
        if proto == socket.IPPROTO_UDP:
            # udp_diag looks the socket up as the receiver of a datagram from id.src:id.sport
            # to id.dst:id.dport (``__udp4_lib_lookup``), the reverse of TCP's exact lookup;
            # an unconnected socket bound to the local port is found that way too.
            src, sport, dst, dport = dst, dport, src, sport
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        req = _request(msg_type, flags, self._seq, family, proto, _sockid(family, src, sport, dst, dport))
        self.sock.send(req)
        while True:  # skip answers to earlier calls that timed out
            data = self.sock.recv(65536)
            if len(data) >= nl.NLMSGHDR.size and nl.NLMSGHDR.unpack_from(data, 0)[3] == self._seq:
                return data

    def lookup(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> SocketInfo:
        """The local socket with local address ``src:sport`` talking to ``dst:dport``.

        Raises NotFound when this namespace holds no such socket, OSError (including
        TimeoutError) when the kernel could not be asked."""
        data = self._call(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, proto, src, sport, dst, dport)
        return parse_reply(data, nl.NLMSGHDR.unpack_from(data, 0)[3])

    def destroy(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> None:
        """Abort the local socket (``ss -K``). Raises NotFound, or OSError (EPERM without
        CAP_NET_ADMIN, EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY)."""
        data = self._call(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, proto, src, sport, dst, dport)
        _len, mtype, _f, _s, _p = nl.NLMSGHDR.unpack_from(data, 0)
        if mtype == NLMSG_ERROR:
            (err,) = _ERR.unpack_from(data, nl.NLMSGHDR.size)
            if err == 0:
                return
            if err in (-errno.ENOENT, -errno.ESRCH):
                raise NotFound()
            raise OSError(-err, os.strerror(-err))
