"""/proc lookups on real processes: the socket's owner, its description, GPU fds, responses' safety."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.attribution import gpu, proc, respond


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "30"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def test_socket_owner_found_among_candidates_and_not_elsewhere() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ino = os.fstat(s.fileno()).st_ino
        deadline = time.monotonic() + 5
        assert proc.find_socket_owner(ino, [1_000_000_000, os.getpid()], deadline) == os.getpid()
        assert proc.find_socket_owner(ino, [os.getppid()], deadline) is None
        with pytest.raises(TimeoutError):
            proc.find_socket_owner(ino, [os.getpid()], time.monotonic() - 1)


def test_describe_names_pid_ppid_name_executable_bounded_command_line_and_user() -> None:
    long_arg = "x" * 5000
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", long_arg], stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        d = proc.describe(p.pid)
        assert d is not None
        assert (d["pid"], d["ppid"]) == (p.pid, os.getpid())
        assert d["name"].startswith("python")
        assert d["executable"] == os.path.realpath(sys.executable)
        assert len(d["command_line"]) == proc.CMDLINE_MAX and d["command_line"].endswith("…")
        assert d["uid"] == os.getuid()
        assert d.get("user") == proc.user_name(os.getuid())
        assert proc.start_time(p.pid) is not None
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
    assert proc.describe(p.pid) is None  # gone (reaped)


def test_gpu_device_paths_only_numbered_nodes_count() -> None:
    assert gpu._DEVICE.match("/dev/nvidia0") and gpu._DEVICE.match("/dev/nvidia15")
    for other in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-caps/nvidia-cap1", "/tmp/dev/nvidia0"):
        assert not gpu._DEVICE.match(other)


def test_no_gpu_fds_means_no_gpu_object() -> None:
    assert gpu.gpu_from_proc(os.getpid(), [os.getpid()], time.monotonic() + 5) is None


def test_nvml_absent_is_handled_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    nv = gpu.Nvml()
    assert nv.devices_for({os.getpid()}) is None
    assert nv.unavailable is not None and "nvidia-ml-py" in nv.unavailable


def test_nvml_driver_missing_is_handled_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    nv = gpu.Nvml()
    assert nv.devices_for({1}) is None
    assert nv.unavailable == "NVML did not initialise: NVML Shared Library Not Found"


def test_nvml_compute_processes_map_to_device_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NVML path's own logic, on a stand-in module (these machines have no GPU)."""
    running = {0: [types.SimpleNamespace(pid=10)], 1: [types.SimpleNamespace(pid=42)]}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: running[h],
        nvmlDeviceGetMinorNumber=lambda h: h + 4,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nv = gpu.Nvml()
    assert nv.devices_for({42, 7}) == ["/dev/nvidia5"]
    assert nv.devices_for({99}) == []
    assert nv.unavailable is None


def test_responses_refuse_pid_1_egressd_itself_and_its_ancestors() -> None:
    # The check both responses run first (called directly: a regression must not signal pytest).
    assert respond._refuse_pid(1) == "the target is PID 1"
    for pid in (os.getpid(), os.getppid()):
        assert respond._refuse_pid(pid) == "the target is egressd itself or one of its ancestors"
    assert respond.kill(1, None)["result"] == "refused"


def test_kill_refuses_a_reused_pid(sleeper: subprocess.Popen[bytes]) -> None:
    started = proc.start_time(sleeper.pid)
    assert started is not None
    r = respond.kill(sleeper.pid, started + 1)  # "the attributed process" started at another time
    assert r["result"] == "refused" and "reused" in r["reason"]
    assert sleeper.poll() is None
    r = respond.kill(sleeper.pid, started)
    assert r == {"action": "kill", "pid": sleeper.pid, "signal": "SIGKILL", "result": "done"}
    assert sleeper.wait(5) == -signal.SIGKILL


def test_freeze_refuses_egressd_own_cgroup_and_pid_1(tmp_path: Path) -> None:
    assert respond.freeze(str(tmp_path), 1, None)["result"] == "refused"
    r = respond.freeze(str(tmp_path), os.getpid(), None)
    assert r["result"] == "refused" and "egressd" in r["reason"]
    assert respond.freeze(None, 999_999_999, None)["result"] == "refused"


def test_freeze_refuses_a_cgroup_that_holds_egressd(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """A child of ours in our own cgroup: freezing its cgroup would freeze the daemon."""
    r = respond.freeze(str(tmp_path), sleeper.pid, proc.start_time(sleeper.pid))
    assert r["result"] == "refused", r
    assert "egressd" in r["reason"] or "root cgroup" in r["reason"]
    assert not list(tmp_path.iterdir())  # nothing was written
