"""Shared test configuration: the corpus score table at the end of the run, and a network
namespace of its own for unit tests that open live sockets."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = getattr(pytest, "corpus_table", None)
    if table:
        terminalreporter.write_sep("-", "egressd vs ndpiReader 4.2 on ../shared/corpus (flows)")
        terminalreporter.write_line(table)


# -- a network namespace of the test's own, for unit tests with live sockets ------------------
# The brief allows test traffic only inside namespaces the test made, on documentation
# addresses. A network namespace belongs to a thread, not to the process: the test's thread
# enters a fresh one (unshare), and every socket, thread and subprocess it starts there is in
# it; the thread goes back to the namespace it came from afterwards (setns), and the fresh one
# goes away with its last socket. Python 3.11 has no os.unshare/os.setns, hence libc.
NETNS_V4 = "198.51.100.7"
NETNS_V6 = "2001:db8::7"
_CLONE_NEWNET = 0x40000000


@pytest.fixture
def own_netns() -> Iterator[tuple[str, str]]:
    """Run the test in a fresh network namespace with its two addresses (IPv4, IPv6) on its
    loopback; they are what the fixture gives."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace of its own needs root")
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    home_id = os.readlink("/proc/thread-self/ns/net")
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        try:
            for argv in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{NETNS_V4}/32", "dev", "lo"],
                ["ip", "-6", "addr", "add", f"{NETNS_V6}/128", "dev", "lo", "nodad"],
            ):
                subprocess.run(argv, check=True, capture_output=True)
            yield NETNS_V4, NETNS_V6
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace")
            assert os.readlink("/proc/thread-self/ns/net") == home_id, "not back in the test's namespace"
    finally:
        os.close(home)
