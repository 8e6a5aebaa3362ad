"""The process holding a socket inode, and what ``/proc`` says about it.

Plan: the socket's cgroup (from sock_diag) names a handful of candidate pids
(``cgroup.procs``); their ``/proc/PID/fd`` links are read until one is ``socket:[inode]``.
Only when that fails (the process moved cgroups after opening the socket, or the cgroup is
unknown) are all of ``/proc``'s processes scanned, under a deadline. OpenSnitch's full scan
per connection is what makes it judge ~180 conn/s; here the scan is off the verdict path and
usually touches one cgroup.

Reading another user's ``/proc/PID/fd`` and ``/proc/PID/exe`` needs ptrace-read access
(CAP_SYS_PTRACE, or being root); without it the fields that need it are absent and the
event says why. ``stat``, ``status`` and ``cmdline`` are world-readable unless the kernel
mounts ``/proc`` with ``hidepid`` (systemd's ``ProtectProc=invisible``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import time
from collections.abc import Iterable
from typing import Any, Final

CMDLINE_MAX: Final = 1024  # characters of the command line kept in an event
FD_MAX: Final = 65536  # fds looked at per process (a bound on a pathological process)


def pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def fd_targets(pid: int, limit: int = FD_MAX) -> Iterable[str]:
    """The link targets of a process's open fds (empty when gone or not readable)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names[:limit]:
        try:
            yield os.readlink(f"{base}/{name}")
        except OSError:
            continue


class Denied(Exception):
    """Some candidate's fds could not be read: the caller says so instead of "not found"."""


def find_socket_owner(inode: int, candidates: Iterable[int], deadline: float) -> int | None:
    """The first pid among ``candidates`` with an fd on ``socket:[inode]``.

    Raises Denied when nothing was found and at least one fd table was unreadable (EACCES),
    TimeoutError when the deadline passed first."""
    want = f"socket:[{inode}]"
    denied = False
    for pid in candidates:
        if time.monotonic() > deadline:
            raise TimeoutError
        base = f"/proc/{pid}/fd"
        try:
            names = os.listdir(base)
        except PermissionError:
            denied = True
            continue
        except OSError:
            continue
        for i, name in enumerate(names[:FD_MAX]):
            if not i & 255 and i and time.monotonic() > deadline:
                raise TimeoutError  # a process with a huge fd table must not hold the worker
            try:
                if os.readlink(f"{base}/{name}") == want:
                    return pid
            except OSError:
                continue
    if denied:
        raise Denied
    return None


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str | None:
    """The user's name (cached: ``getpwuid`` reads /etc/passwd on every call)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started: with the pid, the identity of a
    process (a pid reused by a new process has a different start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def describe(pid: int) -> dict[str, Any] | None:
    """``{pid, ppid, name, executable, command_line, uid, user}`` (fields that cannot be read
    are left out), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    lpar, rpar = stat.find(b"("), stat.rfind(b")")
    rest = stat[rpar + 2 :].split()
    out: dict[str, Any] = {"pid": pid}
    with contextlib.suppress(IndexError, ValueError):
        out["ppid"] = int(rest[1])
    out["name"] = stat[lpar + 1 : rpar].decode("utf-8", "replace")
    with contextlib.suppress(OSError):
        out["executable"] = os.readlink(f"/proc/{pid}/exe")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(CMDLINE_MAX * 4 + 1)
        cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        if len(cmd) > CMDLINE_MAX:
            cmd = cmd[: CMDLINE_MAX - 1] + "…"
        out["command_line"] = cmd
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    out["uid"] = uid
                    name = user_name(uid)
                    if name is not None:
                        out["user"] = name
                    break
    except (OSError, ValueError, IndexError):
        pass
    return out
