"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET per state change.

Type=notify services tell systemd when they are ready, reloading, stopping, and alive
(the watchdog). The protocol is newline-separated KEY=VALUE pairs in a single AF_UNIX
datagram; a socket name starting with "@" is in the abstract namespace (the "@" becomes a
NUL byte). Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op that returns
False, so the daemon calls these unconditionally.

systemd 253+ wants RELOADING=1 accompanied by MONOTONIC_USEC (CLOCK_MONOTONIC in µs) so it
can tell this reload from an earlier one; READY=1 then ends the reload.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _address(env: Mapping[str, str]) -> str | bytes | None:
    name = env.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other schemes: not ours to speak


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification; True when a datagram went out. Never raises."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""), env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    return notify(f"STATUS={_one_line(text)}", env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", env)


def reloading(env: Mapping[str, str] | None = None) -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's timeout), or None without a watchdog.

    Honours WATCHDOG_PID: when set and not this process, the watchdog is someone else's.
    """
    e = os.environ if env is None else env
    try:
        usec = int(e.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = e.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return usec / 1e6 / 2


def _one_line(text: str) -> str:
    return text.replace("\n", " ")
