"""Does the process behind a flow — or any process in its cgroup — hold an NVIDIA GPU?

Two sources, neither required:

* ``proc-fd``: a CUDA process keeps ``/dev/nvidia<N>`` open for as long as it uses device N,
  so its fd links name the devices it holds. Needs ptrace-read access to the process, nothing
  from NVIDIA. The cgroup's other processes are looked at too: a miner that forks a helper to
  talk to the pool while the parent computes is still "the job that holds the GPUs".
* ``nvml``: with the optional extra ``nvidia-ml-py`` installed and a driver present, the
  GPUs' compute-process lists (what ``nvidia-smi`` shows) — this also sees a process whose
  fds cannot be read. Its absence (no package, no driver, no GPU) is a normal case: the reason
  is kept for ``egressd status`` and attribution goes on with ``proc-fd``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from typing import Any, Final

from egressd.attribution.proc import fd_targets

_DEVICE: Final = re.compile(r"^/dev/nvidia([0-9]+)$")
MAX_CGROUP_PIDS: Final = 256  # other processes of the cgroup looked at per lookup


def devices_of(pid: int) -> list[str]:
    """The NVIDIA device nodes among ``pid``'s open fds, sorted by device number."""
    found = {t for t in fd_targets(pid) if _DEVICE.match(t)}
    return sorted(found, key=lambda t: int(t[len("/dev/nvidia") :]))


def gpu_from_proc(pid: int | None, cgroup_pids: Iterable[int], deadline: float) -> dict[str, Any] | None:
    """``{devices, source: "proc-fd", held_by}`` or None when no process holds a device."""
    devs: set[str] = set()
    holders: list[int] = []
    if pid is not None:
        mine = devices_of(pid)
        if mine:
            devs.update(mine)
            holders.append(pid)
    n = 0
    for other in cgroup_pids:
        if other == pid:
            continue
        n += 1
        if n > MAX_CGROUP_PIDS or time.monotonic() > deadline:
            break
        theirs = devices_of(other)
        if theirs:
            devs.update(theirs)
            holders.append(other)
    if not devs:
        return None
    return {
        "devices": sorted(devs, key=lambda t: int(t[len("/dev/nvidia") :])),
        "source": "proc-fd",
        "held_by": "process" if pid is not None and holders and holders[0] == pid else "cgroup",
        "pids": holders[:16],
    }


class Nvml:
    """NVML if it can be used, else the reason it cannot (``unavailable``). Initialised once,
    on first use, from the attribution worker (NVML calls may take milliseconds)."""

    def __init__(self) -> None:
        self.unavailable: str | None = None
        self._mod: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def _init(self) -> None:
        self._tried = True
        try:
            import pynvml  # the optional extra nvidia-ml-py
        except ImportError:
            self.unavailable = "nvidia-ml-py is not installed (pip install 'egressd[nvidia]')"
            return
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.unavailable = f"NVML did not initialise: {e}"[:200]
            return
        self._mod = pynvml

    def devices_for(self, pids: set[int]) -> list[str] | None:
        """The ``/dev/nvidiaN`` of GPUs whose compute processes include one of ``pids``;
        None when NVML is unavailable."""
        with self._lock:
            if not self._tried:
                self._init()
            nv = self._mod
            if nv is None:
                return None
            out: list[str] = []
            try:
                for i in range(nv.nvmlDeviceGetCount()):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    running = nv.nvmlDeviceGetComputeRunningProcesses(h)
                    if any(p.pid in pids for p in running):
                        out.append(f"/dev/nvidia{nv.nvmlDeviceGetMinorNumber(h)}")
            except Exception as e:  # a GPU fell off the bus, the driver was unloaded, ...
                self.unavailable = f"NVML query failed: {e}"[:200]
                return None
            return out
