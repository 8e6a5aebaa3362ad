"""Layered policies: a site file extends the shipped default, appends to its lists, overrides,
disables and re-prioritises its rules; ``validate --print-merged`` says where each piece came
from, and every mistake in a layer is reported at the layer's own line."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
from pathlib import Path

import pytest

from egressd.cli import main
from egressd.engine import Engine
from egressd.events import Event
from egressd.paths import default_policy
from egressd.policy import Diagnostic, FlowFacts, load_policy, validate
from egressd.policy.loader import load_with_sources

SHIPPED = default_policy().parent


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A copy of the shipped rules, so that layers can name the base by a relative path."""
    d = tmp_path / "rules"
    shutil.copytree(SHIPPED, d)
    return d


SITE = """\
# a site layer on the shipped default
extends: default.yaml
default: drop
settings:
  max_packets: 16
lists:
  ssh_allowed:
    append: [198.51.100.7/32]
  registries:
    type: domain
    items: [pypi.org, "*.pythonhosted.org"]
rules:
  - override: alert-vpn-tunnels
    action: drop
    priority: critical
  - override: alert-mining-ports
    enabled: false
  - name: accept-registries
    description: package registries
    match: {proto: tcp, dst_port: 443, dst_domain: $registries}
    action: accept
"""


def site(rules_dir: Path, text: str = SITE, name: str = "site.yaml") -> Path:
    p = rules_dir / name
    p.write_text(text)
    return p


def line_of(path: Path, fragment: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def facts(
    dst: str, dport: int, proto: int = 6, domains: tuple[str, ...] = (), kinds: tuple[str, ...] = ()
) -> FlowFacts:
    ip = ipaddress.ip_address(dst)
    src = ipaddress.ip_address("198.51.100.2" if ip.version == 4 else "2001:db8::2")
    return FlowFacts(proto, ip.version, src.packed, ip.packed, 40000, dport, domains, kinds)


def one(diags: list[Diagnostic]) -> Diagnostic:
    assert len(diags) == 1, "\n".join(map(str, diags))
    return diags[0]


# ---------------------------------------------------------------------------------- semantics


def test_layer_keeps_the_base_rules_first_and_its_own_after(rules_dir: Path) -> None:
    pol = load_policy(site(rules_dir))
    base = load_policy(rules_dir / "default.yaml")
    names = [r.name for r in pol.rules]
    kept = [r.name for r in base.rules if r.name != "alert-mining-ports"]
    assert names == [*kept, "accept-registries"]
    assert pol.default == "drop" and pol.mode == base.mode and pol.fail == base.fail


def test_append_adds_to_the_base_list_used_by_the_base_rule(rules_dir: Path) -> None:
    base = load_policy(rules_dir / "default.yaml")
    pol = load_policy(site(rules_dir))
    ssh = facts("198.51.100.7", 22, kinds=("ssh",))
    assert base.judge(ssh).rule == "drop-ssh-unlisted"
    assert pol.judge(ssh).rule == "default"  # no longer dropped by the SSH rule; the layer's default decides
    assert pol.judge(facts("203.0.113.10", 22, kinds=("ssh",))).rule == "default"  # base items still there


def test_override_changes_the_action_and_the_severity_of_the_events(rules_dir: Path) -> None:
    pol = load_policy(site(rules_dir))
    dec = pol.judge(facts("203.0.113.9", 51820, proto=17, kinds=("tunnel.wireguard",)))
    assert (dec.action, dec.rule, dec.severity) == ("drop", "alert-vpn-tunnels", 1)
    ev = Event(0.0, 1, "198.51.100.2", 1, "203.0.113.9", 2, "UDP", "drop", "blocked", dec.rule, "", "detection",
               detection={"kind": "tunnel.wireguard", "evidence": "", "info": {}}, severity=dec.severity)  # fmt: skip
    assert ev.to_dict()["alert"]["severity"] == 1
    ev.severity = 0
    assert ev.to_dict()["alert"]["severity"] == 2  # the per-kind severity when no priority is set


def test_engine_events_carry_the_rule_priority(rules_dir: Path) -> None:
    # default: accept, so that the first datagram is not already dropped by the default
    pol = load_policy(site(rules_dir, SITE.replace("default: drop", "default: accept")))
    eng = Engine(pol)
    # A WireGuard handshake initiation (type 1, 148 bytes) in one UDP datagram.
    from scapy.layers.inet import IP, UDP  # tests only

    payload = b"\x01\x00\x00\x00" + bytes(144)
    eng.feed(bytes(IP(src="198.51.100.2", dst="203.0.113.9") / UDP(sport=40000, dport=51820) / payload), 1.0)
    ev = eng.events[-1].to_dict()
    assert (ev["rule"], ev["verdict"], ev["alert"]["severity"]) == ("alert-vpn-tunnels", "drop", 1)


def test_disabled_rule_is_left_out(rules_dir: Path) -> None:
    pol = load_policy(site(rules_dir))
    assert pol.rule("alert-mining-ports") is None
    assert pol.judge(facts("203.0.113.9", 3333)).rule == "default"
    off = "  - {name: off, match: {dst_port: 1}, action: drop, enabled: false}\n"
    own = site(rules_dir, "default: accept\nrules:\n" + off, "own.yaml")
    assert load_policy(own).rules == ()


def test_settings_are_overridden_key_by_key(rules_dir: Path) -> None:
    pol = load_policy(site(rules_dir))
    assert pol.settings.max_packets == 16
    assert pol.settings.pool_domains == "mining_pool_domains"  # the base's, kept
    assert len(pol.pool_domains) > 10


def test_extends_egressd_default_names_the_shipped_policy(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("extends: egressd:default\ndefault: drop\n")
    pol = load_policy(p)
    assert [r.name for r in pol.rules] == [r.name for r in load_policy(default_policy()).rules]
    assert pol.default == "drop"


# ---------------------------------------------------------------------------------- --print-merged


def merged(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    assert main(["validate", "--print-merged", str(path)]) == 0
    return capsys.readouterr().out


def test_print_merged_shows_append_override_and_disable_with_file_line(
    rules_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = site(rules_dir)
    out = merged(capsys, s)
    base = rules_dir / "default.yaml"
    append = re.search(r"^      - 198\.51\.100\.7/32 +# (\S+) \(appended\)$", out, re.M)
    assert append and append.group(1) == f"{s}:{line_of(s, '198.51.100.7')}"
    shipped_item = re.search(r"^      - 203\.0\.113\.10/32 +# (\S+)$", out, re.M)
    assert shipped_item and shipped_item.group(1) == f"{base}:{line_of(base, '- 203.0.113.10/32')}"
    block = out[out.index("  - name: alert-vpn-tunnels") :].split("  - name:")[1]
    assert re.search(rf"action: drop +# overridden at {re.escape(str(s))}:{line_of(s, 'action: drop')}$", block, re.M)
    assert re.search(rf"priority: critical +# {re.escape(str(s))}:{line_of(s, 'priority: critical')}$", block, re.M)
    assert f"alert-mining-ports: defined at {base}:{line_of(base, 'name: alert-mining-ports')}, enabled: false at " \
        f"{s}:{line_of(s, 'enabled: false')}" in out  # fmt: skip
    assert "  - name: alert-mining-ports" not in out
    assert re.search(rf"^default: drop +# {re.escape(str(s))}:3$", out, re.M)


def test_print_merged_is_a_policy_that_judges_like_the_layers(
    rules_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = site(rules_dir)
    flat = tmp_path / "flat.yaml"
    flat.write_text(merged(capsys, s))
    a, b = load_policy(s), load_policy(flat)
    assert [(r.name, r.action, r.decision.severity) for r in a.rules] == [
        (r.name, r.action, r.decision.severity) for r in b.rules
    ]
    cases = [
        facts("198.51.100.7", 22, kinds=("ssh",)),
        facts("203.0.113.20", 22, kinds=("ssh",)),
        facts("203.0.113.9", 443, domains=("files.pythonhosted.org",)),
        facts("203.0.113.9", 443, domains=("pool.supportxmr.com",)),
        facts("203.0.113.9", 3333, kinds=("mining.stratum",)),
        facts("203.0.113.9", 80),
    ]
    assert [a.judge(f) for f in cases] == [b.judge(f) for f in cases]


# ---------------------------------------------------------------------------------- errors at the layer's line


@pytest.mark.parametrize(
    ("layer", "fragment", "message"),
    [
        ("lists:\n  ssh_alowed: {append: [198.51.100.7/32]}\n", "ssh_alowed", "did you mean 'ssh_allowed'"),
        ("lists:\n  ssh_allowed: {append: [198.51.100.7/24]}\n", "198.51.100.7/24", "host bits set"),
        ("lists:\n  ssh_allowed: {append: [1.2.3.4], items: [5.6.7.8]}\n", "items", "unknown key 'items'"),
        ("rules:\n  - override: drop-minin\n    action: accept\n", "drop-minin", "did you mean 'drop-mining'"),
        ("rules:\n  - override: drop-mining\n    action: allow\n", "allow", "unknown action 'allow'"),
        ("rules:\n  - override: drop-mining\n    priority: urgent\n", "urgent", "unknown priority 'urgent'"),
        ("rules:\n  - override: drop-mining\n    enabled: maybe\n", "maybe", "'enabled' must be true or false"),
        ("rules:\n  - override: drop-mining\n", "override", "changes nothing"),
        ("rules:\n  - override: drop-mining\n    match: {dst_port: 1}\n", "match", "unknown key 'match'"),
        ("rules:\n  - {name: drop-mining, action: drop}\n", "drop-mining", "duplicate rule name 'drop-mining'"),
        ("settings:\n  max_packets: 0\n", "0", "'max_packets' must be between 1 and 10000"),
        ("default: sometimes\n", "sometimes", "unknown default action 'sometimes'"),
    ],
)
def test_errors_in_a_layer_point_at_the_layers_line(rules_dir: Path, layer: str, fragment: str, message: str) -> None:
    s = site(rules_dir, "extends: default.yaml\n" + layer)
    d = one(validate(s))
    line = line_of(s, fragment)
    col = s.read_text().splitlines()[line - 1].index(fragment) + 1
    assert (d.file, d.line) == (str(s), line), str(d)
    assert d.col <= col, str(d)
    assert message in d.message, d.message


def test_override_cannot_reach_a_rule_defined_later(rules_dir: Path) -> None:
    s = site(
        rules_dir, "default: accept\nrules:\n  - {override: late, action: drop}\n  - {name: late, action: accept}\n"
    )
    d = one(validate(s))
    assert (d.line, "no file read before this one defines" in d.message) == (3, True), str(d)


def test_extends_cycle_and_missing_base_are_reported(rules_dir: Path) -> None:
    a = site(rules_dir, "extends: b.yaml\n", "a.yaml")
    site(rules_dir, "extends: a.yaml\ndefault: drop\n", "b.yaml")
    assert "extends cycle" in one(validate(a)).message
    m = site(rules_dir, "extends: nowhere.yaml\ndefault: drop\n", "m.yaml")
    d = one(validate(m))
    assert (d.file, d.line) == (str(m), 1) and "does not exist" in d.message, str(d)


def test_extends_in_an_included_file_is_refused(rules_dir: Path) -> None:
    inc = site(rules_dir, "extends: default.yaml\nlists: {}\n", "inc.yaml")
    s = site(rules_dir, "default: accept\ninclude: [inc.yaml]\n", "s.yaml")
    d = one(validate(s))
    assert (d.file, d.line) == (str(inc), 1) and "'extends' can only be set in the main policy file" in d.message


def test_validate_exit_code_and_json_free_output_for_a_broken_layer(
    rules_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = site(rules_dir, "extends: default.yaml\nrules:\n  - {override: nope, action: drop}\n")
    assert main(["validate", "--print-merged", str(s)]) == 1
    err = capsys.readouterr().err
    assert f"{s}:3:" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)  # diagnostics are lines for people, not JSON


def test_load_with_sources_lists_every_file(rules_dir: Path) -> None:
    s = site(rules_dir)
    _, src = load_with_sources(s)
    assert src.files == [
        str(s),
        str(rules_dir / "default.yaml"),
        str(rules_dir / "lists" / "mining-pools.yaml"),
        str(rules_dir / "lists" / "tunnel-services.yaml"),
    ]
    assert src.extends == [f"{s} -> {rules_dir / 'default.yaml'}"]


@pytest.mark.parametrize("name", ["default.yaml", "allowlist.yaml"])
def test_print_merged_of_each_shipped_policy_judges_every_recorded_flow_alike(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from egressd.recorded import from_capture

    src = SHIPPED / name
    flat = tmp_path / "flat.yaml"
    flat.write_text(merged(capsys, src))
    a, b = load_policy(src), load_policy(flat)
    assert [(r.name, r.action) for r in a.rules] == [(r.name, r.action) for r in b.rules]
    assert len(b.files) == 1  # self-contained: no includes left
    pcaps = sorted((SHIPPED.parent / "pcaps").glob("*.pcap"))
    facts = [f.facts() for cap in pcaps for f in from_capture(cap, a)]
    assert len(facts) > 20
    assert [a.judge(f) for f in facts] == [b.judge(f) for f in facts]
