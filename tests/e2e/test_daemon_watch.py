"""``egressd run --watch`` on live traffic: a policy delivered by a ConfigMap or by config
management is picked up without a signal, with SIGHUP's all-or-nothing rejection.

The ConfigMap volume is written by :class:`tests.configmap.ConfigMapVolume`, which repeats
the kubelet's exact sequence (timestamped directory, ``..data_tmp`` symlink renamed over
``..data``, old directory removed). No test here sends the daemon a signal.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab

from egressd import netfilter
from egressd.paths import default_policy
from egressd_lab import peers
from egressd_lab.harness import policy_copy, set_key
from egressd_lab.netns import SERVICES
from tests.configmap import ConfigMapVolume

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

POOL = SERVICES["pool"][0]
BROKEN = "mode: monitor\ndefault: accept\nrules:\n  - {name: r, match: {dst_port: 1}, action: allow}\n"  # line 4


@pytest.fixture
def start_watching(dlab: DaemonLab, tmp_path: Path) -> Iterator[Callable[..., peers.Egressd]]:
    """Factory: ``egressd run --watch`` (or without, ``watch=False``) on a policy path."""
    started: list[peers.Egressd] = []

    def start(policy: Path, watch: bool = True) -> peers.Egressd:
        extra = ["--watch"] if watch else []
        d = peers.start_egressd(dlab.lab, tmp_path, policy, extra, name=f"watch{len(started)}")
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGTERM)
    netfilter.remove(netns=dlab.lab.node)


def shipped_files() -> dict[str, str]:
    rules = default_policy().parent
    return {
        "default.yaml": (rules / "default.yaml").read_text(),
        "lists/mining-pools.yaml": (rules / "lists" / "mining-pools.yaml").read_text(),
        "lists/tunnel-services.yaml": (rules / "lists" / "tunnel-services.yaml").read_text(),
    }


def stratum_blocked(dlab: DaemonLab) -> bool:
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    return rc == 1 and not rep["handshake_complete"]


def test_configmap_swap_is_picked_up_and_a_broken_one_rejected_without_a_signal(
    dlab: DaemonLab, start_watching: Callable[..., peers.Egressd], tmp_path: Path
) -> None:
    vol = ConfigMapVolume(tmp_path / "configmap")
    files = shipped_files()
    vol.write(files)
    visible = vol.root / "default.yaml"
    d = start_watching(visible)
    assert d.status()["mode"] == "enforce"
    assert stratum_blocked(dlab)

    vol.write({**files, "default.yaml": BROKEN})
    assert d.wait_stderr("reload rejected"), d.stderr_text()
    assert re.search(rf"{re.escape(str(visible))}:4:\d+: unknown action 'allow'", d.stderr_text()), d.stderr_text()
    st = d.status()
    assert d.alive() and (st["reload_failures"], st["reloads"], st["mode"]) == (1, 0, "enforce")
    assert stratum_blocked(dlab)  # the running policy stayed in force
    time.sleep(1.5)
    assert d.status()["reload_failures"] == 1  # the same broken file is not retried over and over

    vol.write({**files, "default.yaml": set_key(files["default.yaml"], "mode", "monitor")})
    assert d.wait_stderr("policy reloaded"), d.stderr_text()
    st = d.status()
    assert (st["reloads"], st["mode"]) == (1, "monitor")
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    assert rc == 0 and rep["handshake_complete"], rep  # monitor: recorded, not dropped
    assert "the policy files changed on disk (--watch)" in d.stderr_text()


def test_file_replaced_by_config_management_is_picked_up(
    dlab: DaemonLab, start_watching: Callable[..., peers.Egressd], tmp_path: Path
) -> None:
    pol = policy_copy(tmp_path)
    good = pol.read_text()
    d = start_watching(pol)
    # Ansible's copy: write a temporary file beside the target, rename it over the target.
    tmp = pol.with_name(".default.yaml.ansible-tmp")
    tmp.write_text(set_key(good, "mode", "monitor"))
    os.replace(tmp, pol)
    assert d.wait_stderr("policy reloaded"), d.stderr_text()
    assert d.status()["mode"] == "monitor"
    # An in-place rewrite with a broken policy: rejected, the monitor policy stays.
    pol.write_text(BROKEN)
    assert d.wait_stderr("reload rejected"), d.stderr_text()
    st = d.status()
    assert (st["reloads"], st["reload_failures"], st["mode"]) == (1, 1, "monitor")
    pol.write_text(good)
    assert wait_reloads(d, 2) == 2, d.stderr_text()
    assert d.status()["mode"] == "enforce"
    # A change to an included file counts too.
    lists = pol.parent / "lists" / "mining-pools.yaml"
    lists.write_text(lists.read_text() + "\n# touched\n")
    assert wait_reloads(d, 3) == 3, d.stderr_text()


def wait_reloads(d: peers.Egressd, n: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = int(d.status()["reloads"])
        if got >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_without_watch_a_replaced_file_waits_for_sighup(
    dlab: DaemonLab, start_watching: Callable[..., peers.Egressd], tmp_path: Path
) -> None:
    pol = policy_copy(tmp_path)
    d = start_watching(pol, watch=False)
    pol.write_text(set_key(pol.read_text(), "mode", "monitor"))
    time.sleep(2.0)  # four --watch polls' worth
    assert (d.status()["reloads"], d.status()["mode"]) == (0, "enforce")
