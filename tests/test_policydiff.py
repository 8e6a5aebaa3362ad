"""``egressd diff``: the flows a policy change opens or closes, with exit codes for CI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from egressd.cli import main
from egressd.paths import default_policy
from egressd.policy import load_policy
from egressd.recorded import from_capture

PCAPS = sorted(str(p) for p in (Path(__file__).parent.parent / "pcaps").glob("*.pcap"))
EVIL = "203.0.113.20"  # the lab's SSH server that is not in ssh_allowed


@pytest.fixture
def with_evil_allowed(tmp_path: Path) -> Path:
    """The default policy plus one ssh_allowed address, as a layer on a copy of the shipped rules."""
    rules = tmp_path / "rules"
    shutil.copytree(default_policy().parent, rules)
    layer = rules / "site.yaml"
    layer.write_text(f"extends: default.yaml\nlists:\n  ssh_allowed: {{append: [{EVIL}/32]}}\n")
    return layer


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    rc = main(["diff", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_extra_ssh_allowed_address_lists_exactly_the_ssh_flows_to_it(
    with_evil_allowed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = default_policy()
    # What must change, found independently: flows dropped by the SSH allowlist rule, to that
    # address; they open unless what the session is used for drops them anyway (ssh -R).
    pol, new = load_policy(default), load_policy(with_evil_allowed)
    before = {
        (cap, f.src_port, f.dest_port)
        for cap in PCAPS
        for f in from_capture(cap, pol)
        if f.dest_ip == EVIL and "ssh" in f.detections and f.rule == "drop-ssh-unlisted"
    }
    after = {(cap, f.src_port, f.dest_port): f for cap in PCAPS for f in from_capture(cap, new)}
    expected = {k for k in before if after[k].rule == "default"}
    remote = {k for k in before if after[k].rule == "drop-ssh-remote-forward"}
    assert len(expected) >= 1 and len(remote) >= 1  # ssh-on-443; the reverse tunnel
    rc, doc = run_json(capsys, str(default), str(with_evil_allowed), *PCAPS)
    assert rc == 1
    changed = doc["changed"]
    assert isinstance(changed, list)
    opened = [c for c in changed if c["change"] == "opens"]
    assert {(c["capture"], c["src_port"], c["dest_port"]) for c in opened} == expected
    for c in opened:
        assert c["dest_ip"] == EVIL and c["detections"] == ["ssh"] and c["evidence"].startswith(">SSH-")
        assert c["before"] == {"verdict": "drop", "action": "blocked", "rule": "drop-ssh-unlisted"}
        assert c["after"]["verdict"] == "accept"
    # The reverse tunnel to EVIL stays dropped, now by drop-ssh-remote-forward (allowed or
    # not, a remote forward is dropped): only its rule changes.
    for c in changed:
        if (c["capture"], c["src_port"], c["dest_port"]) in remote:
            assert c["after"] == {"verdict": "drop", "action": "blocked", "rule": "drop-ssh-remote-forward"}
    assert len(changed) == len(expected) + len(remote)
    # The role-inversion capture also goes to EVIL but stays dropped by drop-reverse-ssh: not listed.
    assert not any("role-inversion" in c["capture"] for c in changed)


def test_identical_policies_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["diff", str(default_policy()), str(default_policy()), *PCAPS])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("0 of ") and "change" in out


def test_text_output_names_before_and_after(with_evil_allowed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["diff", str(default_policy()), str(with_evil_allowed), *PCAPS])
    out = capsys.readouterr().out
    assert rc == 1
    assert "opens: drop by drop-ssh-unlisted -> accept by default" in out


def test_a_policy_that_does_not_load_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: maybe\n")
    assert main(["diff", str(default_policy()), str(bad), PCAPS[0]]) == 2
    assert f"{bad}:1:10" in capsys.readouterr().err


def test_an_unreadable_capture_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a capture at all")
    assert main(["diff", str(default_policy()), str(default_policy()), str(junk)]) == 2
    assert "junk.pcap" in capsys.readouterr().err


def test_a_closed_flow_is_reported_as_closes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(default_policy().parent, rules)
    strict = rules / "strict.yaml"
    strict.write_text("extends: default.yaml\ndefault: drop\n")
    rc, doc = run_json(capsys, str(default_policy()), str(strict), str(Path(PCAPS[0]).parent / "tls-sni.pcap"))
    assert rc == 1
    [c] = doc["changed"]  # type: ignore[misc]
    assert (c["change"], c["before"]["rule"], c["after"]["rule"]) == ("closes", "default", "default")
    assert c["domains"] == ["tls.example.net"]


def test_an_event_log_is_compared_flow_by_flow(
    with_evil_allowed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.jsonl"
    for cap in PCAPS:
        assert main(["test", cap, "--json"]) == 0
    log.write_text(capsys.readouterr().out)
    rc, doc = run_json(capsys, str(default_policy()), str(with_evil_allowed), str(log))
    assert rc == 1
    changed = doc["changed"]
    assert isinstance(changed, list) and changed
    assert all(c["dest_ip"] == EVIL and c["change"] == "opens" for c in changed)
    assert {c["before"]["rule"] for c in changed} == {"drop-ssh-unlisted"}
    rc, doc = run_json(capsys, str(default_policy()), str(default_policy()), str(log))
    assert rc == 0 and doc["changed"] == []
