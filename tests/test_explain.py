"""``egressd explain``: every rule in order, and the condition and list item that decided."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from egressd.cli import main
from egressd.explain import explain
from egressd.paths import default_policy
from egressd.policy.loader import load_with_sources
from egressd.recorded import from_capture

ROOT = Path(__file__).parent.parent
PCAPS = ROOT / "pcaps"
DEFAULT = default_policy()


def line_of(path: Path, fragment: str, after: str = "") -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines[start:], start + 1) if fragment in line)


def explain_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    assert main(["explain", *argv, "--json"]) == 0
    doc: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return doc


def test_every_rule_is_listed_in_order_and_the_deciding_item_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    [doc] = explain_json(capsys, str(PCAPS / "ssh-reverse-tunnel.pcap"), "--match", "dst_port=22")
    policy, _ = load_with_sources(DEFAULT)
    assert [r["rule"] for r in doc["rules"]] == [r.name for r in policy.rules]
    assert doc["decision"] == {"action": "drop", "rule": "drop-ssh-unlisted"}
    first = next(r for r in doc["rules"] if r["matched"])
    assert first["rule"] == "drop-ssh-unlisted"
    det = next(c for c in first["conditions"] if c["condition"] == "detection")
    assert det["item"] == {
        "value": "ssh",
        "where": f"{DEFAULT}:{line_of(DEFAULT, 'detection: ssh', after='name: drop-ssh-unlisted')}",
        "list": None,
    }
    assert all(r["engine_agrees"] for r in doc["rules"])
    # The rules before it say which condition ruled them out.
    before = doc["rules"][: [r["rule"] for r in doc["rules"]].index("drop-ssh-unlisted")]
    assert before and not any(r["matched"] for r in before)


def test_a_list_item_in_a_not_block_is_named_with_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    [doc] = explain_json(capsys, str(PCAPS / "ssh-allowed.pcap"))
    rule = next(r for r in doc["rules"] if r["rule"] == "drop-ssh-unlisted")
    assert not rule["matched"]
    nots = next(c for c in rule["conditions"] if c["condition"] == "not")
    assert not nots["holds"]
    assert nots["item"] == {
        "value": "203.0.113.10/32",
        "where": f"{DEFAULT}:{line_of(DEFAULT, '- 203.0.113.10/32')}",
        "list": "ssh_allowed",
    }
    assert doc["decision"] == {"action": "accept", "rule": "default"}


def test_an_event_line_is_explained_with_the_wildcard_item_from_the_included_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    assert main(["test", str(PCAPS / "tls-pool-domain.pcap"), "--json"]) == 0
    events.write_text(capsys.readouterr().out)
    [doc] = explain_json(capsys, str(events), "--line", "1")
    pools = DEFAULT.parent / "lists" / "mining-pools.yaml"
    assert doc["decision"]["rule"] == "drop-mining-pool-names"
    rule = next(r for r in doc["rules"] if r["matched"])
    [cond] = rule["conditions"]
    line = line_of(pools, '"*.nanopool.org"')
    assert cond["item"] == {
        "value": "*.nanopool.org",
        "where": f"{pools}:{line}",
        "list": "mining_pool_domains",
    }


def test_an_item_appended_by_a_layer_points_at_the_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT.parent, rules)
    site = rules / "site.yaml"
    site.write_text("extends: default.yaml\nlists:\n  ssh_allowed:\n    append:\n      - 203.0.113.20/32\n")
    [doc] = explain_json(capsys, str(PCAPS / "ssh-on-443.pcap"), "--policy", str(site))
    rule = next(r for r in doc["rules"] if r["rule"] == "drop-ssh-unlisted")
    nots = next(c for c in rule["conditions"] if c["condition"] == "not")
    assert nots["item"] == {"value": "203.0.113.20/32", "where": f"{site}:5", "list": "ssh_allowed"}
    assert doc["recorded"] == {"verdict": "accept", "rule": "default"}


@pytest.mark.parametrize("policy_name", ["default.yaml", "allowlist.yaml"])
def test_explanations_agree_with_the_engine_on_every_recorded_flow(policy_name: str) -> None:
    policy, sources = load_with_sources(DEFAULT.parent / policy_name)
    flows = [f for cap in sorted(PCAPS.glob("*.pcap")) for f in from_capture(cap, policy)]
    assert len(flows) > 20
    for fl in flows:
        facts = fl.facts()
        results, action, rule = explain(policy, sources, facts)
        dec = policy.judge(facts)
        assert (action, rule) == (dec.action, dec.rule), fl.label()
        assert all(r.engine_agrees for r in results), fl.label()
        assert [r.name for r in results] == [r.name for r in policy.rules]


def test_text_output_marks_the_first_match(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(PCAPS / "stratum-v1.pcap")]) == 0
    out = capsys.readouterr().out
    assert "drop-mining (" in out and "MATCHED -> drop" in out
    assert "decision: drop by drop-mining" in out


def test_nothing_selected_or_a_bad_match_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(PCAPS / "stratum-v1.pcap"), "--match", "dst_port=1"]) == 2
    assert "no flow" in capsys.readouterr().err
    assert main(["explain", str(PCAPS / "stratum-v1.pcap"), "--match", "port=1"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_text_output_lists_a_rule_a_layer_disabled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT.parent, rules)
    site = rules / "site.yaml"
    site.write_text("extends: default.yaml\nrules:\n  - override: alert-mining-ports\n    enabled: false\n")
    assert main(["explain", str(PCAPS / "stratum-v1.pcap"), "--policy", str(site)]) == 0
    out = capsys.readouterr().out
    assert f"alert-mining-ports ({rules / 'default.yaml'}:" in out
    assert f"disabled (enabled: false at {site}:4)" in out


def test_control_characters_from_an_event_are_escaped_on_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = {
        "timestamp": "2026-12-05T06:00:00.000000+0000", "event_type": "flow", "flow_id": 1,
        "src_ip": "198.51.100.2", "src_port": 40000, "dest_ip": "203.0.113.40", "dest_port": 443,
        "proto": "TCP", "verdict": "accept", "action": "allowed", "rule": "default",
        "rule_description": "", "reason": "classified", "mode": "enforce", "domain": "a\x1b[2Jb.example.org",
        "process": {"pid": 7, "name": "curl"}, "container": {"id": "abc", "name": "trainer"},
    }  # fmt: skip
    log = tmp_path / "e.jsonl"
    log.write_text(json.dumps(ev) + "\n")
    assert main(["explain", str(log), "--line", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "who: process curl (pid 7), container trainer" in out
    assert "a\\x1b[2jb.example.org" in out  # names are compared in lower case


def test_the_content_condition_is_explained_and_agrees_with_the_matcher() -> None:
    import ipaddress

    from egressd.policy import FlowFacts

    policy, sources = load_with_sources(DEFAULT)
    src, dst = ipaddress.ip_address("198.51.100.2").packed, ipaddress.ip_address("203.0.113.30").packed
    seen = {}
    for content in ("pending", "none", "unclassified", "classified"):
        facts = FlowFacts(6, 4, src, dst, 40000, 3333, (), (), content)
        results, action, rule = explain(policy, sources, facts)
        assert all(r.engine_agrees for r in results), content
        assert (action, rule) == (policy.judge(facts).action, policy.judge(facts).rule)
        seen[content] = rule
    assert seen == {
        "pending": "default",
        "none": "note-mining-ports-without-payload",
        "unclassified": "alert-mining-ports",
        "classified": "default",
    }
    results, _, _ = explain(policy, sources, FlowFacts(6, 4, src, dst, 40000, 3333, (), (), "none"))
    rule = next(r for r in results if r.matched)
    cond = next(c for c in rule.conditions if c.key == "content")
    assert cond.item is not None and cond.item.value == "none"
    assert cond.item.where == f"{DEFAULT}:{line_of(DEFAULT, 'content: none')}"
