"""sd_notify over a real AF_UNIX datagram socket, path and abstract names."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield s, {"NOTIFY_SOCKET": path}
    s.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    name = f"egressd-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(2)
    yield s, {"NOTIFY_SOCKET": "@" + name}
    s.close()


def _recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_ready_sends_ready_1(listener: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = listener
    assert sdnotify.ready(env=env)
    assert _recv(s) == "READY=1"


def test_ready_with_status_is_one_datagram(listener: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = listener
    assert sdnotify.ready("queue 0 bound", env=env)
    assert _recv(s) == "READY=1\nSTATUS=queue 0 bound"


def test_status_is_kept_on_one_line(listener: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = listener
    sdnotify.status("12 flows\n3 dropped", env=env)
    assert _recv(s) == "STATUS=12 flows 3 dropped"


def test_watchdog_and_stopping(listener: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = listener
    sdnotify.watchdog(env=env)
    sdnotify.stopping(env=env)
    assert [_recv(s), _recv(s)] == ["WATCHDOG=1", "STOPPING=1"]


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    listener: tuple[socket.socket, dict[str, str]],
) -> None:
    s, env = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sdnotify.reloading(env=env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _recv(s).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_socket_names_start_with_at(abstract_listener: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = abstract_listener
    assert sdnotify.ready(env=env)
    assert _recv(s) == "READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert not sdnotify.ready(env={})
    assert not sdnotify.watchdog(env={"NOTIFY_SOCKET": ""})


def test_unsupported_address_schemes_are_ignored() -> None:
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"})


def test_dead_socket_does_not_raise(tmp_path: Path) -> None:
    assert not sdnotify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_watchdog_interval_absent_or_bad_is_none() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_watchdog_for_another_pid_is_not_ours() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sdnotify.watchdog_interval(env) is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert sdnotify.watchdog_interval(env) == 0.5
