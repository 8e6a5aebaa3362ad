"""The daemon's life cycle on live traffic: crash (fail open / closed), reload, clean stop.

What an operator relies on: a SIGKILLed egressd leaves the node as its policy's ``fail``
says (open: traffic flows; closed: nothing new gets out) until ``egressd rules remove``; a
broken policy on SIGHUP is refused with file:line while enforcement goes on; a good one
takes effect at once; SIGTERM exits 0 and leaves no rule behind.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from daemon_fixtures import NEEDS_KERNEL, DaemonLab, events_to, one_event

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import policy_copy, set_key
from egressd_lab.netns import SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

Start = Callable[..., peers.Egressd]
TLS4 = SERVICES["tls"][0]
POOL = SERVICES["pool"][0]


def _https_ok(dlab: DaemonLab, max_time: float = 3.0) -> bool:
    p, _ = dlab.curl_tls("tls.example.net", TLS4, max_time=max_time)
    return p.returncode == 0 and p.stdout == "200"


def _remove_rules_and_check_none_remain(dlab: DaemonLab) -> None:
    p = dlab.egressd("rules", "remove")
    assert p.returncode == 0, p.stderr
    assert "EGRESSD" not in dlab.saves()


def test_sigkill_with_fail_open_lets_new_connections_through_until_rules_are_removed(
    dlab: DaemonLab, start_daemon: Start
) -> None:
    d = start_daemon()
    assert d.status()["fail"] == "open"
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert netfilter.installed(netns=dlab.lab.node)  # the rules outlive the daemon ...
    assert _https_ok(dlab)  # ... and --queue-bypass passes what nobody judges
    _remove_rules_and_check_none_remain(dlab)


def test_sigkill_with_fail_closed_blocks_new_connections_until_rules_are_removed(
    dlab: DaemonLab, start_daemon: Start, tmp_path: Path
) -> None:
    d = start_daemon(policy_copy(tmp_path, lambda t: set_key(t, "fail", "closed")))
    assert d.status()["fail"] == "closed"
    assert _https_ok(dlab)  # judged and allowed while the daemon runs
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not _https_ok(dlab, max_time=2.0)
    _remove_rules_and_check_none_remain(dlab)
    assert _https_ok(dlab)


def test_sighup_with_a_broken_policy_keeps_the_running_one_then_a_good_one_applies(
    dlab: DaemonLab, start_daemon: Start, tmp_path: Path
) -> None:
    pol = policy_copy(tmp_path)
    good = pol.read_text()
    d = start_daemon(pol)
    pool = dlab.peers.pool("v1", 3333)

    pol.write_text("mode: enforce\nrules:\n  - name: [unclosed\n")
    d.send_signal(signal.SIGHUP)
    assert d.wait_stderr("reload rejected"), d.stderr_text()
    assert re.search(rf"{re.escape(str(pol))}:\d+", d.stderr_text()), d.stderr_text()
    st = d.status()
    assert d.alive() and (st["reload_failures"], st["reloads"], st["mode"]) == (1, 0, "enforce")
    mark = pool.mark()
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    assert rc == 1 and not rep["handshake_complete"], rep
    assert pool.requests(mark) == []
    blocked = one_event(d, POOL, 3333)
    assert (blocked["rule"], blocked["action"], blocked["mode"]) == ("drop-mining", "blocked", "enforce")

    pol.write_text(set_key(good, "mode", "monitor"))
    d.send_signal(signal.SIGHUP)
    assert d.wait_stderr("policy reloaded"), d.stderr_text()
    assert d.status()["mode"] == "monitor"
    mark = pool.mark()
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    assert rc == 0 and rep["handshake_complete"], rep  # monitor: recorded, not dropped
    assert [r["method"] for r in pool.requests(mark)][:2] == ["mining.subscribe", "mining.authorize"]
    _, watched = events_to(d, POOL, 3333, count=2)
    assert (watched["rule"], watched["action"], watched["mode"]) == ("drop-mining", "allowed", "monitor")
    assert watched["would_drop"] is True


def test_sigterm_exits_0_and_leaves_no_egressd_rule(dlab: DaemonLab, start_daemon: Start) -> None:
    d = start_daemon()
    assert "EGRESSD" in dlab.saves()
    assert d.stop(signal.SIGTERM) == 0
    saves = dlab.saves()
    assert "EGRESSD" not in saves, saves
    assert not d.socket.exists()


def test_a_second_daemon_on_the_same_queue_fails_without_touching_the_first_ones_rules(
    dlab: DaemonLab, start_daemon: Start
) -> None:
    def rules() -> list[str]:  # iptables-save output without its timestamp comments
        return [line for line in dlab.saves().splitlines() if not line.startswith("#")]

    d = start_daemon()
    before = rules()
    assert any("EGRESSD" in line for line in before)
    try:
        start_daemon()
    except peers.PeerError as e:
        assert "cannot bind queue" in str(e)
    else:
        raise AssertionError("a second egressd bound the same queue")
    assert d.alive()
    assert rules() == before  # the first daemon's rules are untouched ...
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    assert rc == 1 and not rep["handshake_complete"], rep  # ... and it still enforces
