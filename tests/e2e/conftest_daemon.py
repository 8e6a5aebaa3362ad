"""Fixtures of the daemon end-to-end tests: one lab with real peers per module, a fresh daemon per test.

Why one lab per module and one daemon per test: starting the peers (sshd, dnsmasq, three
TLS servers, two HTTP servers, a proxy, five pools) costs about a second and a half, a
daemon about half a second. Each test gets its own ``egressd run`` with its own event log,
so "the event that explains this" is never an event of an earlier test; the peers are
shared and every assertion on a peer's log only looks at what was logged after a mark.

A plugin, not conftest.py (that one belongs to the kernel-mechanism tests): each daemon test
module says ``pytest_plugins = ["conftest_daemon"]``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from daemon_fixtures import DaemonLab

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.netns import Lab

_counter = 0


@pytest.fixture(scope="module")
def dlab() -> Iterator[DaemonLab]:
    """A lab with every standard peer, for the whole module; removed with everything in it."""
    global _counter
    _counter += 1
    tmp = Path(tempfile.mkdtemp(prefix="egressd-e2e-"))
    lb = Lab(f"dd{os.getpid() % 10000}m{_counter}")
    try:
        lb.create()
        yield DaemonLab(lb, peers.start_lab_peers(lb, tmp), tmp)
    finally:
        lb.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def start_daemon(dlab: DaemonLab, tmp_path: Path) -> Iterator[Callable[..., peers.Egressd]]:
    """Factory: ``start_daemon(policy=None, extra=())`` starts ``egressd run`` in the node namespace.

    Whatever the test did to them (SIGKILL included), every daemon it started is stopped by
    pid afterwards and egressd's kernel rules are removed, so the next test starts clean.
    """
    started: list[peers.Egressd] = []

    def start(policy: Path | None = None, extra: Sequence[str] = ()) -> peers.Egressd:
        d = peers.start_egressd(dlab.lab, tmp_path, policy, extra, name=f"egressd{len(started)}")
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGTERM)
    netfilter.remove(netns=dlab.lab.node)


@pytest.fixture
def daemon(start_daemon: Callable[..., peers.Egressd]) -> peers.Egressd:
    """``egressd run`` on the shipped default policy, ready (its status socket answers)."""
    return start_daemon()
