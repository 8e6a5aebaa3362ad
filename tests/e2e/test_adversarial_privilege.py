"""Least privilege: ``egressd run`` as an unprivileged user holding CAP_NET_ADMIN and nothing else.

The systemd unit runs it so (DynamicUser, AmbientCapabilities=CAP_NET_ADMIN, bounding set
CAP_NET_ADMIN); here ``setpriv`` builds the same process by hand inside the node namespace,
and the test reads back from /proc what the process really holds.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import (
    NODE_V4,
    POOL_V4,
    PREFIX,
    PY,
    adv_lab,
    live,
    need,
    proc_status,
    stratum,
    write_policy,
)
from egressd_lab.netns import Lab

pytestmark = live

NOBODY = 65534
CAP_NET_ADMIN = 1 << 12
SETPRIV = [
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=-all,+net_admin", "--ambient-caps=+net_admin", "--bounding-set=-all,+net_admin", "--",
]  # fmt: skip
METRICS_PORT = 9713
# The one live loopback address left in tests/e2e, kept on purpose: that --metrics serves on
# loopback only (and refuses any other address without --metrics-allow-remote) is the very
# behaviour under test, so the address cannot be a documentation one. It is the loopback of
# the lab's node namespace, which this module creates: the daemon runs there
# (peers.start_egressd), and so do ``ss`` and the fetch (``run_node``).
METRICS_LOOPBACK = "127.0.0.1"


@dataclass
class PrivLab:
    lab: Lab
    dir: Path
    d: peers.Egressd
    pool: peers.Pool


@pytest.fixture(scope="module")
def priv() -> Iterator[PrivLab]:
    need("setpriv")
    # Not under pytest's tmp_path: its parents are 0700 root, which the user could not traverse.
    base = Path(tempfile.mkdtemp(prefix="egadv-priv-", dir="/tmp"))
    try:
        os.chown(base, NOBODY, NOBODY)
        base.chmod(0o700)
        with adv_lab() as lb:
            pool = peers.start_pool(lb, base, "v1", POOL_V4, 3333)
            pol = write_policy(base / "etc")
            for p in (base / "etc", *(base / "etc").rglob("*")):
                p.chmod(0o755 if p.is_dir() else 0o644)
            extra = ["--metrics", f"{METRICS_LOOPBACK}:{METRICS_PORT}"]
            d = peers.start_egressd(lb, base, pol, wrapper=SETPRIV, extra=extra)
            yield PrivLab(lb, base, d, pool)
            if d.alive():
                d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _caps(st: dict[str, str], key: str) -> int:
    return int(st[key], 16)


def test_daemon_runs_as_an_unprivileged_user(priv: PrivLab) -> None:
    st = proc_status(priv.d.proc.pid)
    assert st["Uid"].split() == [str(NOBODY)] * 4
    assert st["Gid"].split() == [str(NOBODY)] * 4
    assert st["Groups"] == ""


def test_daemon_holds_exactly_cap_net_admin(priv: PrivLab) -> None:
    st = proc_status(priv.d.proc.pid)
    assert {k: _caps(st, k) for k in ("CapEff", "CapPrm", "CapBnd")} == dict.fromkeys(
        ("CapEff", "CapPrm", "CapBnd"), CAP_NET_ADMIN
    )


def test_unprivileged_daemon_blocks_a_stratum_handshake(priv: PrivLab) -> None:
    mark = priv.pool.mark()
    rep = stratum(priv.lab, POOL_V4, 3333)
    assert not rep["handshake_complete"], rep
    assert priv.pool.requests(mark) == []
    time.sleep(0.2)
    assert [e["rule"] for e in priv.d.events()][-1:] == ["drop-mining"]


def test_status_socket_is_0600_and_owned_by_the_daemon_user(priv: PrivLab) -> None:
    st = priv.d.socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_metrics_listen_on_loopback_only(priv: PrivLab) -> None:
    listeners = priv.lab.run_node(["ss", "-Hltn", f"sport = :{METRICS_PORT}"]).stdout.split("\n")
    local = sorted(line.split()[3] for line in listeners if line.strip())
    assert local == [f"{METRICS_LOOPBACK}:{METRICS_PORT}"]
    url = f"http://{METRICS_LOOPBACK}:{METRICS_PORT}/"  # from inside the node namespace
    fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=3).read().decode())"
    body = priv.lab.run_node([PY, "-c", fetch]).stdout
    assert "egressd_packets_total" in body
    assert "\negressd_link_guard_dropped_total 0\n" in body


def test_unprivileged_daemon_installs_the_link_guard(priv: PrivLab) -> None:
    guard = priv.d.status()["link_guard"]
    assert guard["error"] == "" and guard["ifaces"] == netfilter.uplinks(netns=priv.lab.node) != [], guard
    assert netfilter.guard_installed(netns=priv.lab.node) == guard["ifaces"]


def test_unprivileged_daemon_stops_cleanly_and_removes_its_rules(priv: PrivLab) -> None:
    assert netfilter.installed(netns=priv.lab.node)
    assert priv.d.stop() == 0, priv.d.stderr_text()
    assert not netfilter.installed(netns=priv.lab.node)
    assert netfilter.guard_installed(netns=priv.lab.node) == []


@pytest.mark.parametrize("addr", ["0.0.0.0", NODE_V4])
def test_metrics_refuse_a_non_loopback_address(addr: str, tmp_path: Path) -> None:
    with adv_lab(PREFIX + "m") as lb:  # the module's own lab may still be up
        pol = write_policy(tmp_path)
        try:
            d = peers.start_egressd(lb, tmp_path, pol, extra=["--metrics", f"{addr}:{METRICS_PORT}"], timeout=5)
        except RuntimeError:
            return  # refused to start: what the test asks for
        listeners = lb.run_node(["ss", "-Hltn", f"sport = :{METRICS_PORT}"]).stdout
        exposed = [ln.split()[3] for ln in listeners.splitlines() if ln.strip() and METRICS_LOOPBACK not in ln]
        d.stop()
        assert exposed == []
