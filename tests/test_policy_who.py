"""Rules on who is behind a flow: validated like every key, judged after attribution only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egressd.events import Event
from egressd.paths import default_policy
from egressd.policy import PolicyError, load_policy, load_policy_text, validate
from egressd.policy.who import unevaluated

CID = "ab" * 32
POD = "5e393aad-0b0b-40f0-9ea6-41717ed6062d"

POLICY = f"""
default: accept
rules:
  - name: drop-mining
    match: {{detection: mining}}
    action: drop
    respond: freeze
  - name: gpu-tunnel
    match:
      detection: [mining, tunnel]
      gpu: true
    action: alert
    severity: 1
  - name: miners-by-name
    match:
      process: {{name: "xmrig*", uid: "1000-1999"}}
    action: alert
  - name: host-ssh
    match: {{container: none, dst_port: 22}}
    action: alert
  - name: that-pod
    match: {{pod: {POD}, cgroup: "/kubepods.slice/*"}}
    action: alert
  - name: that-container
    match: {{container: {CID[:12]}}}
    action: alert
"""


def _ev(kind: str | None = None, port: int = 3333) -> Event:
    ev = Event(0.0, 1, "198.51.100.2", 40000, "203.0.113.30", port, "TCP", "accept", "allowed", "default", "",
               "classified")  # fmt: skip
    if kind:
        ev.detections = [kind]
    return ev


def _who(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "python3", "executable": "/usr/bin/python3", "user": "u", "uid": 4242,
        "cgroup": "/system.slice/x.service", "container": None, "gpu": False, "known": True,
    }  # fmt: skip
    base.update(kw)
    return base


def test_who_rules_never_take_part_in_verdicts() -> None:
    p = load_policy_text(POLICY)
    assert [r.name for r in p.rules] == ["drop-mining"]
    assert [r.name for r in p.who_rules] == ["gpu-tunnel", "miners-by-name", "host-ssh", "that-pod", "that-container"]
    assert p.rule("drop-mining").respond == "freeze"  # type: ignore[union-attr]
    assert p.rule("gpu-tunnel").severity == 1  # type: ignore[union-attr]


def test_first_matching_who_rule_applies() -> None:
    p = load_policy_text(POLICY)
    assert p.judge_who(_ev("mining.stratum"), _who(gpu=True)).name == "gpu-tunnel"  # type: ignore[union-attr]
    assert p.judge_who(_ev("mining.stratum"), _who()) is None
    assert p.judge_who(_ev("tls"), _who(gpu=True)) is None
    assert p.judge_who(_ev("mining.stratum"), _who(gpu=None)) is None  # fds unreadable: unknown
    m = p.judge_who(_ev(), _who(name="xmrig-6.2", uid=1500))
    assert m is not None and m.name == "miners-by-name"
    assert p.judge_who(_ev(), _who(name="xmrig-6.2", uid=4242)) is None
    h = p.judge_who(_ev(port=22), _who())
    assert h is not None and h.name == "host-ssh"
    # An attribution that failed is not "no container": it proves nothing.
    assert p.judge_who(_ev(port=22), _who(known=False, cgroup=None)) is None
    pod = _who(container={"id": "cd" * 32, "runtime": "containerd", "pod_uid": POD}, cgroup="/kubepods.slice/a")
    assert p.judge_who(_ev(), pod).name == "that-pod"  # type: ignore[union-attr]
    ctr = _who(container={"id": CID, "runtime": "docker"})
    assert p.judge_who(_ev(), ctr).name == "that-container"  # type: ignore[union-attr]


def test_capture_replay_names_the_rules_it_cannot_evaluate() -> None:
    p = load_policy_text(POLICY)
    everyone = ["miners-by-name", "that-pod", "that-container"]  # no flow conditions: every flow
    assert unevaluated(p.who_rules, _ev("mining.xmr")) == ["gpu-tunnel", *everyone]
    assert unevaluated(p.who_rules, _ev("tls")) == everyone
    assert unevaluated(p.who_rules, _ev("tls", port=22)) == ["miners-by-name", "host-ssh", "that-pod", "that-container"]


@pytest.mark.parametrize(
    ("match", "action", "message"),
    [
        ("{gpu: maybe}", "alert", "'gpu' must be true or false"),
        ("{process: {nmae: x}}", "alert", "unknown key 'nmae' in 'process'; did you mean 'name'?"),
        ("{process: {uid: 9-3}}", "alert", "'process.uid' '9-3' is out of range"),
        ("{container: abc}", "alert", "'container' must be any, none, or container ids"),
        ("{pod: nope}", "alert", "'pod' must be a pod UID"),
        ("{cgroup: kubepods}", "alert", "'cgroup' patterns match cgroup-v2 paths"),
        ("{gpu: true}", "drop", "its action must be alert"),
    ],
)
def test_validate_reports_bad_who_keys_at_their_line(tmp_path: Path, match: str, action: str, message: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(f"default: accept\nrules:\n  - name: r\n    match: {match}\n    action: {action}\n")
    diags = validate(f)
    assert len(diags) == 1, diags
    assert diags[0].line in (4, 5) and message in diags[0].message, diags[0]
    with pytest.raises(PolicyError):
        load_policy(f)


def test_respond_and_severity_values_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("default: accept\nrules:\n  - name: r\n    match: {detection: mining}\n    action: drop\n"
                 "    respond: nuke\n    severity: 0\n")  # fmt: skip
    msgs = [(d.line, d.message) for d in validate(f)]
    assert msgs == [
        (6, "unknown respond 'nuke'; expected one of freeze, kill"),
        (7, "'severity' must be 1 (high), 2 or 3 (low), as in EVE alerts"),
    ]


def test_respond_on_an_accept_rule_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("default: accept\nrules:\n  - name: r\n    match: {dst_port: 22}\n    action: accept\n"
                 "    respond: kill\n")  # fmt: skip
    assert [(d.line, d.message) for d in validate(f)] == [
        (6, "rule 'r' accepts the flow; 'respond' only goes with drop or alert")
    ]


def test_a_who_rule_without_flow_conditions_does_not_hide_later_rules() -> None:
    p = load_policy_text("default: accept\nrules:\n  - {name: a, match: {gpu: true}, action: alert}\n"
                         "  - {name: b, match: {detection: mining}, action: drop}\n")  # fmt: skip
    assert [r.name for r in p.rules] == ["b"]


def test_shipped_policies_raise_gpu_mining_and_respond_nowhere() -> None:
    p = load_policy(default_policy())
    gpu_rules = [r for r in p.who_rules if r.who is not None and r.who.gpu]
    assert [r.name for r in gpu_rules] == ["gpu-mining-or-tunnel"]
    assert gpu_rules[0].severity == 1
    assert p.judge_who(_ev("mining.stratum"), _who(gpu=True)) is gpu_rules[0]
    assert p.judge_who(_ev("tunnel.wireguard"), _who(gpu=True)) is gpu_rules[0]
    for f in sorted(default_policy().parent.glob("*.yaml")):
        pol = load_policy(f)
        assert [r.name for r in (*pol.rules, *pol.who_rules) if r.respond] == [], f"{f}: containment is opt-in"


def test_egressd_test_says_which_rules_it_could_not_evaluate(capsys: pytest.CaptureFixture[str]) -> None:
    from egressd.cli import main

    pcap = Path(__file__).resolve().parents[1] / "pcaps" / "stratum-v1.pcap"
    assert main(["test", "--no-progress", str(pcap)]) == 0
    out = capsys.readouterr().out
    assert "not evaluated: rule 'gpu-mining-or-tunnel' matches on the process, container or GPU" in out
    assert main(["test", "--json", "--no-progress", str(pcap)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    mining = [r for r in rows if r["rule"] == "drop-mining"]
    assert mining and all(r["unevaluated_rules"] == ["gpu-mining-or-tunnel"] for r in mining)
    assert all("unevaluated_rules" not in r for r in rows if not r.get("detections"))
