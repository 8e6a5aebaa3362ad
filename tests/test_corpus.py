"""egressd on real captures from other projects (../shared/corpus), scored against their labels.

Skipped with a message when the corpus is absent (it is not part of the repository). The
per-group table next to ndpiReader 4.2's figures is printed at the end of the test run.
"""

from __future__ import annotations

import pytest

from egressd_lab.corpus import corpus_dir
from tests.corpus_eval import Score, evaluate

ROOT = corpus_dir()
pytestmark = pytest.mark.skipif(ROOT is None, reason="../shared/corpus not found (set EGRESSD_CORPUS)")


@pytest.fixture(scope="module")
def score() -> Score:
    assert ROOT is not None
    s = evaluate(ROOT)
    pytest.corpus_table = s.table()  # type: ignore[attr-defined]
    return s


def test_every_mining_flow_is_detected_as_mining(score: Score) -> None:
    misses = [o for o in score.misses() if o.want == "mining"]
    assert not misses, "\n".join(f"{o.capture}: {o.flow} [{o.label}] got {o.got}" for o in misses)


def test_every_ssh_flow_is_detected_as_ssh(score: Score) -> None:
    misses = [o for o in score.misses() if o.want == "ssh"]
    assert not misses, "\n".join(f"{o.capture}: {o.flow} [{o.label}] got {o.got}" for o in misses)


def test_no_benign_p2p_rpc_or_scan_flow_is_flagged_as_mining_or_ssh(score: Score) -> None:
    fps = score.false_positives()
    assert not fps, "\n".join(f"{o.capture}: {o.flow} [{o.label}] got {o.got}" for o in fps)


def test_no_benign_p2p_rpc_or_scan_flow_gets_any_alert_or_drop(score: Score) -> None:
    """False positives as a user sees them: any alert or drop, policy alerts included."""
    fps = score.user_false_positives()
    assert not fps, "\n".join(f"{o.capture}: {o.flow} [{o.label}] {o.alerts} {o.got}" for o in fps)
    assert any(o.want == "clean" for o in score.outcomes), "the corpus scored no clean flow"


def test_every_scored_flow_was_seen(score: Score) -> None:
    assert not score.unmatched, "\n".join(score.unmatched)
    assert score.outcomes, "the corpus produced no scored flows"


def test_no_clean_flow_is_flagged_as_a_vpn_tunnel(score: Score) -> None:
    fps = score.tunnel_false_positives()
    assert not fps, "\n".join(f"{o.capture}: {o.flow} [{o.label}] got {o.got}" for o in fps)


def test_no_corpus_ssh_session_is_named_a_forward(score: Score) -> None:
    """None of the corpus's SSH sessions (various clients, servers and ciphers, some with
    compression) is a port forward or a tun device; none may be named one."""
    ssh = [o for o in score.outcomes if o.want == "ssh"]
    assert len(ssh) >= 50, f"only {len(ssh)} SSH flows scored"
    named = [o for o in score.outcomes if any(k.startswith("ssh.forward") for k in o.got)]
    assert not named, "\n".join(f"{o.capture}: {o.flow} [{o.label}] got {o.got}" for o in named)
