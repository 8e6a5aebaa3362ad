"""Sockets of flows forwarded for containers with a network namespace of their own.

A Kubernetes pod or a ``docker run`` without ``--network host`` reaches the node through the
FORWARD chain: its socket lives in the pod's namespace, and the node's sock_diag cannot see
it. This module keeps one sock_diag socket per network namespace on the node (a netlink
socket stays bound to the namespace it was created in, so the worker thread enters each
namespace once with ``setns``, creates it, and comes back) and a map from the local addresses
of each namespace (``/proc/PID/net/fib_trie`` and ``if_inet6``: the namespace's own view) to
the namespace. A forwarded flow's source address then names the one namespace to ask.

Namespaces are found through ``/proc/PID/ns/net``: a namespace with no process in it has no
sockets to find. What may not be read is skipped (even root cannot read ``/proc/1/ns/*`` on
some hosts, and a process may exit mid-scan). Entering a namespace needs CAP_SYS_ADMIN;
without it only the node's own sockets are attributed, and ``egressd status`` says why.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import threading
import time
from typing import Final

from egressd.attribution.sockdiag import SockDiag

CLONE_NEWNET: Final = 0x40000000
MAX_NAMESPACES: Final = 4096
RESCAN: Final = 30.0  # seconds between scans for new namespaces (a miss triggers one sooner)
MISS_RESCAN: Final = 0.5

_LOOPBACK: Final = frozenset({bytes([127, 0, 0, 1]), bytes(15) + b"\x01"})

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def local_addresses(pid: int) -> set[bytes]:
    """The local (host-route) addresses of ``pid``'s network namespace, packed."""
    out: set[bytes] = set()
    last = ""
    try:
        with open(f"/proc/{pid}/net/fib_trie") as f:
            for line in f:
                s = line.strip()
                if s.startswith("|-- "):
                    last = s[4:]
                elif s.startswith("/32 host LOCAL") and last:
                    out.add(ipaddress.IPv4Address(last).packed)
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/net/if_inet6") as f:
            for line in f:
                h = line.split(" ", 1)[0]
                if len(h) == 32:
                    out.add(bytes.fromhex(h))
    except (OSError, ValueError):
        pass
    return out


class Namespaces:
    """sock_diag sockets in the node's other network namespaces, keyed by local address.

    ``refresh`` and the creation of sockets run on the attribution worker only (``setns``
    moves the calling thread); ``for_address`` is a dict look-up, safe from any thread."""

    def __init__(self) -> None:
        self.own = os.stat("/proc/thread-self/ns/net").st_ino
        self.by_ino: dict[int, SockDiag] = {}
        self.by_addr: dict[bytes, int] = {}
        self.unavailable: str | None = None
        self.skipped = 0  # namespaces that could not be read or entered at the last scan
        self._scanned = -1e18
        self._lock = threading.Lock()

    def for_address(self, addr: bytes) -> SockDiag | None:
        ino = self.by_addr.get(addr)
        return None if ino is None else self.by_ino.get(ino)

    def due(self, miss: bool) -> bool:
        return time.monotonic() - self._scanned >= (MISS_RESCAN if miss else RESCAN)

    def refresh(self) -> None:
        """Find namespaces (one pid each), open a sock_diag socket in the new ones, and map
        every namespace's local addresses to it. Unreadable ones are counted, not fatal."""
        self._scanned = time.monotonic()
        if self.unavailable is not None:
            return
        seen: dict[int, int] = {}
        skipped = 0
        try:
            names = os.listdir("/proc")
        except OSError:
            return
        for name in names:
            if not name.isdigit():
                continue
            try:
                ino = os.stat(f"/proc/{name}/ns/net").st_ino
            except OSError:
                skipped += 1
                continue
            if ino != self.own and ino not in seen:
                seen[ino] = int(name)
                if len(seen) >= MAX_NAMESPACES:
                    break
        by_addr: dict[bytes, int] = {}
        for ino, pid in seen.items():
            if ino not in self.by_ino:
                try:
                    self.by_ino[ino] = self._open_in(pid)
                except PermissionError as e:
                    self.unavailable = f"cannot enter other network namespaces: {e.strerror} (needs CAP_SYS_ADMIN)"
                    return
                except OSError:
                    skipped += 1
                    continue
            for a in local_addresses(pid):
                if a not in _LOOPBACK:  # every namespace has these; they are never forwarded
                    by_addr[a] = ino
        for ino in [i for i in self.by_ino if i not in seen]:
            self.by_ino.pop(ino).close()
        self.by_addr = by_addr
        self.skipped = skipped

    def _open_in(self, pid: int) -> SockDiag:
        """A sock_diag socket created inside ``pid``'s network namespace."""
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return SockDiag()
            finally:
                try:
                    _setns(home)
                except OSError as e:  # pragma: no cover - the kernel let us in, it lets us out
                    self.unavailable = f"could not return to the daemon's namespace: {e}"
                    raise
        finally:
            os.close(target)
            os.close(home)

    def close(self) -> None:
        for sd in self.by_ino.values():
            sd.close()
        self.by_ino.clear()
