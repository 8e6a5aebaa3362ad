"""Containment, opt-in per rule: ``respond: freeze`` (the offender's cgroup) or ``kill`` (the offender).

Safety rules, each checked before acting and each a reason in the response event when it
refuses:

* never the daemon itself, its ancestors, or PID 1;
* ``freeze`` writes ``cgroup.freeze`` of the offending process's *own* cgroup (the ``0::`` path
  the process is in now), never a parent: freezing ``kubepods.slice`` because one pod mined
  would stop every job on the node. The root cgroup and any cgroup that holds the daemon (or
  is an ancestor of the daemon's) are refused;
* the target must still be the process that was attributed: its start time is compared, and
  ``kill`` goes through a pidfd opened before the comparison, so a pid reused in between is
  never signalled.

A response is never on the verdict path: it runs on the attribution worker after the event's
attribution, and its outcome is an event of its own (``event_type: response``).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Final

from egressd.attribution.cgroup import cgroup_of
from egressd.attribution.proc import start_time

RESPONSES: Final = ("freeze", "kill")


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _refuse_pid(pid: int) -> str | None:
    if pid <= 1:
        return "the target is PID 1"
    if pid in _ancestors(os.getpid()):
        return "the target is egressd itself or one of its ancestors"
    return None


def freeze(mount: str | None, pid: int, started: int | None) -> dict[str, Any]:
    """Freeze the cgroup ``pid`` is in. Returns the ``response`` object of the event."""
    out: dict[str, Any] = {"action": "freeze", "pid": pid}
    why = _refuse_pid(pid)
    if why is None and mount is None:
        why = "no cgroup-v2 hierarchy is mounted"
    path = cgroup_of(pid)
    if why is None and (path is None or (started is not None and start_time(pid) != started)):
        why = "the process exited (or its pid was reused) before the response"
    if why is None:
        assert path is not None and mount is not None
        out["cgroup"] = path
        mine = cgroup_of(os.getpid()) or "/"
        if path in ("/", ""):
            why = "the target is the root cgroup"
        elif mine == path or mine.startswith(path.rstrip("/") + "/"):
            why = f"the cgroup {path} holds egressd itself"
        else:
            ctl = os.path.join(mount, path.lstrip("/"), "cgroup.freeze")
            try:
                with open(ctl, "w") as f:
                    f.write("1")
            except OSError as e:
                why = f"writing {ctl} failed: {e.strerror or e}"
    out["result"] = "done" if why is None else "refused"
    if why is not None:
        out["reason"] = why
    return out


def kill(pid: int, started: int | None, sig: int = signal.SIGKILL) -> dict[str, Any]:
    """Signal the offending process (SIGKILL), through a pidfd so a reused pid is safe."""
    out: dict[str, Any] = {"action": "kill", "pid": pid, "signal": signal.Signals(sig).name}
    why = _refuse_pid(pid)
    if why is None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            why = "the process exited before the response"
        else:
            try:
                if started is not None and start_time(pid) != started:
                    why = "the pid was reused by another process before the response"
                else:
                    signal.pidfd_send_signal(fd, sig)
            except OSError as e:
                why = f"signalling failed: {e.strerror or e}"
            finally:
                os.close(fd)
    out["result"] = "done" if why is None else "refused"
    if why is not None:
        out["reason"] = why
    return out
