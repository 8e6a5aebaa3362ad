"""The kernel's head bound when the rules are installed apart from the daemon.

``egressd run --no-rules`` leaves the kernel rules to someone else, typically
``egressd rules install`` from a unit or a provisioning script. Both must bound the head the
same way (``netfilter.kernel_head`` of the policy), or a miner that cuts its first request
into 1-byte segments outlasts the shorter bound and the rest of its line passes unseen.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event, wait_pool_close

from egressd import netfilter
from egressd.paths import default_policy
from egressd.policy import load_policy
from egressd_lab import peers
from egressd_lab.netns import SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

POOL = SERVICES["pool"][0]
ONE_BYTE = ("--split", "1", "--split-delay", "0.005")  # the subscribe line, one byte per segment


def _no_rules_daemon(dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd]) -> peers.Egressd:
    d = start_daemon(extra=["--no-rules"])
    assert not netfilter.installed(netns=dlab.lab.node), "--no-rules installed rules"
    return d


def test_rules_install_beside_a_no_rules_daemon_cuts_a_one_byte_segment_miner(
    dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd]
) -> None:
    d = _no_rules_daemon(dlab, start_daemon)
    p = dlab.egressd("rules", "install")  # the shipped policy, as the daemon runs it
    assert p.returncode == 0, p.stderr
    head = netfilter.kernel_head(load_policy(default_policy()).settings)
    lines = p.stdout.splitlines()
    assert lines[0] == f"egressd rules installed (queue 0, head bound {head} packets per direction)", p.stdout
    assert lines[1].startswith("egressd link guard on "), p.stdout  # installed with the rules
    shown = dlab.egressd("rules", "show").stdout
    assert shown.count(f"--connbytes 0:{head} ") == 4, shown  # original and reply, IPv4 and IPv6
    pool = dlab.peers.pool("v1", 3333)
    mark = pool.mark()
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1", *ONE_BYTE)
    assert rc == 1 and rep["connected"] and not rep["handshake_complete"], rep
    (close,) = wait_pool_close(pool, mark)
    assert close["requests"] == 0 and close["bytes_in"] > 0, close  # segments arrived, never the line
    ev = one_event(d, POOL, 3333)
    assert (ev["rule"], ev["detection"]["kind"]) == ("drop-mining", "mining.stratum")


def test_the_old_fixed_bound_of_32_packets_is_outlasted_by_one_byte_segments(
    dlab: DaemonLab, start_daemon: Callable[..., peers.Egressd]
) -> None:
    # The control: what `egressd rules install` did before (--max-packets 32 whatever the
    # policy). Without it the test above could pass for a reason that is not the bound.
    _no_rules_daemon(dlab, start_daemon)
    netfilter.install(0, fail_open=True, max_packets=32, netns=dlab.lab.node)
    pool = dlab.peers.pool("v1", 3333)
    mark = pool.mark()
    dlab.stratum(f"{POOL}:3333", "v1", *ONE_BYTE)
    (close,) = wait_pool_close(pool, mark)
    assert close["requests"] >= 1, close  # the whole subscribe line reached the pool
