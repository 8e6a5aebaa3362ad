"""The policy loader reports every problem with file:line:col and a plain sentence.

Positions are 1-based and asserted exactly: a security engineer jumps to them from CI output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.policy import Diagnostic, Policy, PolicyError, load_policy, load_policy_text, validate

HEAD = "default: accept\n"


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def one(diags: list[Diagnostic]) -> Diagnostic:
    assert len(diags) == 1, "\n".join(map(str, diags))
    return diags[0]


def at(diag: Diagnostic, path: Path, line: int, col: int | str, fragment: str) -> None:
    """``col`` is a column, or the text the diagnostic must point at (its first occurrence on the line)."""
    if isinstance(col, str):
        col = path.read_text(encoding="utf-8").splitlines()[line - 1].index(col) + 1
    assert (diag.file, diag.line, diag.col) == (str(path), line, col), str(diag)
    assert fragment in diag.message, diag.message


# ----------------------------------------------------------------------------- well-formed input


def test_minimal_policy_loads(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, HEAD))
    assert isinstance(policy, Policy)
    assert (policy.mode, policy.default, policy.fail, policy.on_overload, policy.on_error) == (
        "enforce",
        "accept",
        "open",
        "drop",
        "accept",
    )
    assert policy.rules == ()


def test_validate_returns_empty_list_for_a_good_policy(tmp_path: Path) -> None:
    assert validate(write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst_port: 22}, action: drop}\n")) == []


def test_load_policy_accepts_pathlike_and_records_path(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD)
    policy = load_policy(path)
    assert policy.path == str(path)
    assert policy.files == (str(path),)


# ----------------------------------------------------------------------------- YAML level


def test_yaml_syntax_error_is_reported_at_the_yaml_mark(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules: [a, b\nmode: enforce\n")
    diag = one(validate(path))
    # The flow sequence opened on line 2 is still open when "mode:" arrives on line 3.
    assert diag.file == str(path) and diag.line == 3
    assert diag.message.startswith("YAML syntax error:")


def test_tab_indentation_is_a_syntax_error_with_position(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n\t- name: x\n")
    diag = one(validate(path))
    assert (diag.line, diag.col) == (3, 1)
    assert "YAML syntax error" in diag.message


def test_unquoted_wildcard_domain_explains_quoting(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  d: {type: domain, items: [*.example.com]}\n")
    diag = one(validate(path))
    assert diag.line == 3
    assert "must be quoted" in diag.message


def test_alias_is_rejected_outright(tmp_path: Path) -> None:
    text = HEAD + "lists:\n  a: &ports {type: port, items: [22]}\n  b: *ports\n"
    diags = validate(write(tmp_path, text))
    path = tmp_path / "policy.yaml"
    assert len(diags) == 2, diags
    at(diags[0], path, 3, 6, "YAML anchors (&ports) are not allowed")
    at(diags[1], path, 4, 6, "YAML aliases (*ports) are not allowed")


def test_billion_laughs_is_refused_without_expanding(tmp_path: Path) -> None:
    lines = [HEAD.strip(), "lists:", '  l0: &l0 {type: domain, items: ["a.example"]}']
    for i in range(1, 10):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"  l{i}: &l{i} [{refs}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    diags = validate(path)  # composed without expanding: the aliases are refused one by one
    assert any("YAML aliases" in d.message for d in diags)
    assert all(d.file == str(path) for d in diags)


def test_python_tag_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - !!python/object/apply:os.system [echo hi]\n")
    diags = validate(path)
    at(diags[0], path, 3, 5, "YAML tag !!python/object/apply:os.system is not allowed")


def test_custom_local_tag_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "mode: !mode enforce\n")
    at(one(validate(path)), path, 2, 7, "YAML tag !mode is not allowed")


def test_standard_str_tag_is_allowed(tmp_path: Path) -> None:
    assert validate(write(tmp_path, "default: !!str accept\n")) == []


def test_second_yaml_document_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "---\nmode: monitor\n")
    diag = one(validate(path))
    assert (diag.line, diag.col) == (2, 1)
    assert "one YAML document" in diag.message


def test_deep_nesting_is_reported_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules: " + "[" * 500 + "]" * 500 + "\n")
    diag = one(validate(path))
    assert diag.line == 2
    assert "nested more than 64 levels" in diag.message


def test_non_mapping_top_level(tmp_path: Path) -> None:
    path = write(tmp_path, "- default: accept\n")
    at(one(validate(path)), path, 1, 1, "top level of a policy file must be a mapping")


def test_scalar_top_level(tmp_path: Path) -> None:
    path = write(tmp_path, "just some words\n")
    at(one(validate(path)), path, 1, 1, "must be a mapping")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    at(one(validate(path)), path, 1, 1, "the policy file is empty")


def test_comment_only_file_is_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n\n")
    at(one(validate(path)), path, 1, 1, "is empty")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"default: accept\nmode: \xff\n")
    at(one(validate(path)), path, 1, 1, "not UTF-8 text (byte 0xff on line 2)")


def test_control_character_is_reported_at_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "default: accept\nmode: en\x07force\n")
    at(one(validate(path)), path, 2, 9, "control character")


def test_missing_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    at(one(validate(path)), path, 1, 1, "does not exist")


def test_duplicate_mapping_key(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "mode: enforce\nmode: monitor\n")
    at(one(validate(path)), path, 3, 1, "duplicate key 'mode' in the policy file (first defined at line 2)")


# ----------------------------------------------------------------------------- schema


def test_missing_default_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: enforce\n")
    at(one(validate(path)), path, 1, 1, "add 'default: accept' or 'default: drop'")


def test_unknown_top_level_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "ruels: []\n")
    at(one(validate(path)), path, 2, 1, "unknown key 'ruels' in the policy file; did you mean 'rules'?")


def test_unknown_rule_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - name: r\n    acton: drop\n")
    diags = validate(path)
    assert len(diags) == 2, diags
    at(diags[0], path, 3, 5, "rule 'r' needs an 'action:'")
    at(diags[1], path, 4, 5, "unknown key 'acton' in rule 'r'; did you mean 'action'?")


def test_unknown_match_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst_prot: 22}, action: drop}\n")
    at(one(validate(path)), path, 3, "dst_prot", "did you mean 'dst_port'?")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, zzz: 1, action: drop}\n")
    at(one(validate(path)), path, 3, "zzz", "valid keys are name, description, match, action")


def test_rules_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules: {name: r}\n")
    at(one(validate(path)), path, 2, 8, "'rules' must be a list of rules")


def test_rule_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - drop everything\n")
    at(one(validate(path)), path, 3, 5, "a rule must be a mapping")


def test_rule_name_must_be_text(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: yes, action: drop}\n")
    at(one(validate(path)), path, 3, "yes", "a rule's name must be text, not the boolean yes")


def test_setting_of_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings:\n  head_bytes: lots\n")
    at(one(validate(path)), path, 3, 15, "'head_bytes' must be a number, not the text 'lots'")


def test_setting_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings:\n  head_bytes: 81920000\n")
    at(one(validate(path)), path, 3, 15, "'head_bytes' must be between 64 and 1048576, not 81920000")


def test_integer_setting_rejects_fraction(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings:\n  max_flows: 1.5\n")
    at(one(validate(path)), path, 3, 14, "'max_flows' must be a whole decimal number")


def test_settings_are_read_and_defaults_kept(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, HEAD + "settings: {head_bytes: 4096, tcp_idle: 90, queue_num: 3}\n"))
    assert policy.settings.head_bytes == 4096
    assert policy.settings.tcp_idle == 90.0 and isinstance(policy.settings.tcp_idle, float)
    assert policy.settings.queue_num == 3
    assert policy.settings.max_packets == 32 and policy.settings.queue_len == 4096


def test_unknown_setting_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings:\n  tcp_idel: 30\n")
    at(one(validate(path)), path, 3, 3, "did you mean 'tcp_idle'?")


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("mode", "enforcing", "unknown mode"),
        ("fail", "shut", "unknown fail mode"),
        ("default", "block", "unknown default action"),
    ],
)
def test_unknown_policy_choice(tmp_path: Path, key: str, value: str, what: str) -> None:
    text = f"{key}: {value}\n" if key == "default" else HEAD + f"{key}: {value}\n"
    line = 1 if key == "default" else 2
    path = write(tmp_path, text)
    at(one(validate(path)), path, line, len(key) + 3, f"{what} '{value}'")


def test_unknown_action_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, action: dorp}\n")
    at(
        one(validate(path)),
        path,
        3,
        "dorp",
        "unknown action 'dorp'; expected one of accept, drop, alert; did you mean 'drop'?",
    )


def test_bad_cidr(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  n: {type: cidr, items: [203.0.113.300/32]}\n")
    at(
        one(validate(path)),
        path,
        3,
        "203.",
        "'203.0.113.300/32' is not a valid IPv4/IPv6 address or CIDR network",
    )


def test_cidr_with_host_bits_suggests_network(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst: 10.1.2.3/8}, action: drop}\n")
    at(
        one(validate(path)),
        path,
        3,
        "10.1",
        "did you mean 10.0.0.0/8 (the network) or 10.1.2.3 (one address)?",
    )


def test_bad_ipv6_address(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + 'rules:\n  - {name: r, match: {dst: "2001:db8::g"}, action: drop}\n')
    at(one(validate(path)), path, 3, '"2001', "'2001:db8::g' is not a valid IPv4/IPv6 address")


def test_name_where_address_expected_points_to_dst_domain(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst: git.example.org}, action: drop}\n")
    at(one(validate(path)), path, 3, "git.", "to match a name use dst_domain")


def test_bad_port(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  p: {type: port, items: [22, 70000, ssh]}\n")
    diags = validate(path)
    assert len(diags) == 2, diags
    at(diags[0], path, 3, "70000", "port 70000 is out of range (0-65535)")
    at(diags[1], path, 3, "ssh", "'ssh' is not a valid port")


def test_backwards_port_range(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst_port: 14446-14444}, action: drop}\n")
    at(one(validate(path)), path, 3, "14446", "the port range '14446-14444' is backwards")


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("a.*.example.com", "the only wildcard allowed is a leading '*.'"),
        ("*example.com", "the only wildcard allowed is a leading '*.'"),
        ("exa mple.com", "character ' ' is not allowed"),
        ("a..example.com", "empty label"),
        ("203.0.113.5", "is an address, not a name"),
    ],
)
def test_bad_domain_pattern(tmp_path: Path, pattern: str, fragment: str) -> None:
    path = write(tmp_path, HEAD + f'lists:\n  d: {{type: domain, items: ["{pattern}"]}}\n')
    at(one(validate(path)), path, 3, '"', fragment)


def test_domain_patterns_are_normalised(tmp_path: Path) -> None:
    text = (
        HEAD + "settings: {pool_domains: d}\n"
        "lists:\n"
        '  d: {type: domain, items: ["Git.Example.ORG.", "bücher.example"]}\n'
    )
    policy = load_policy(write(tmp_path, text))
    assert policy.pool_domains.entries == ("git.example.org", "xn--bcher-kva.example")


def test_undefined_list_suggests_closest(tmp_path: Path) -> None:
    text = (
        HEAD + "lists:\n"
        "  ssh_allowed: {type: cidr, items: []}\n"
        "rules:\n"
        "  - {name: r, match: {dst: $ssh_alowed}, action: drop}\n"
    )
    path = write(tmp_path, text)
    at(
        one(validate(path)),
        path,
        5,
        "$ssh_alowed",
        "list '$ssh_alowed' is not defined; did you mean 'ssh_allowed'?",
    )


def test_list_of_wrong_type(tmp_path: Path) -> None:
    text = (
        HEAD + "lists:\n"
        "  pool_ports: {type: port, items: [3333]}\n"
        "rules:\n"
        "  - {name: r, match: {dst: $pool_ports}, action: drop}\n"
    )
    path = write(tmp_path, text)
    at(
        one(validate(path)),
        path,
        5,
        "$pool_ports",
        "list '$pool_ports' is a port list, but 'dst' needs a cidr list",
    )


def test_list_without_type_or_items(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  a: {items: [22]}\n  b: {type: port}\n")
    diags = validate(path)
    assert len(diags) == 2, diags
    at(diags[0], path, 3, "{", "list 'a' has no 'type:'")
    at(diags[1], path, 4, "{", "list 'b' has no 'items:'")


def test_unknown_list_type_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  a: {type: domains, items: []}\n")
    at(one(validate(path)), path, 3, "domains", "unknown type of list 'a' 'domains'")


def test_list_cannot_contain_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  a: {type: port, items: [22]}\n  b: {type: port, items: [$a]}\n")
    at(one(validate(path)), path, 4, "$a", "a list cannot contain another list ('$a')")


def test_duplicate_rule_name_names_the_first(tmp_path: Path) -> None:
    text = (
        HEAD + "rules:\n"
        "  - {name: r, match: {dst_port: 1}, action: drop}\n"
        "  - {name: r, match: {dst_port: 2}, action: drop}\n"
    )
    path = write(tmp_path, text)
    at(one(validate(path)), path, 4, "r,", f"duplicate rule name 'r' (first defined at {path}:3)")


def test_rule_name_default_is_reserved(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: default, match: {dst_port: 1}, action: drop}\n")
    at(one(validate(path)), path, 3, "default", "the rule name 'default' is reserved")


def test_duplicate_list_name_in_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "lists:\n  a: {type: port, items: [1]}\n  a: {type: port, items: [2]}\n")
    at(one(validate(path)), path, 4, 3, "duplicate list name 'a' in 'lists' (first defined at line 3)")


def test_duplicate_list_name_across_includes(tmp_path: Path) -> None:
    inc = write(tmp_path, "lists:\n  ports: {type: port, items: [1]}\n", "lists/extra.yaml")
    path = write(tmp_path, HEAD + "include: [lists/extra.yaml]\nlists:\n  ports: {type: port, items: [2]}\n")
    at(one(validate(path)), path, 4, 3, f"duplicate list name 'ports' (first defined at {inc}:2)")


def test_unknown_detection_kind_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {detection: minig}, action: drop}\n")
    diag = one(validate(path))
    at(diag, path, 3, "minig", "unknown detection kind 'minig'")
    assert "did you mean 'mining'?" in diag.message
    assert "mining.stratum" in diag.message  # the known kinds, read from egressd.detect.base


def test_detection_prefix_of_known_kind_is_accepted(tmp_path: Path) -> None:
    assert (
        validate(
            write(
                tmp_path,
                HEAD + "rules:\n  - {name: r, match: {detection: [mining, ssh.reverse, proxy]}, action: drop}\n",
            )
        )
        == []
    )


def test_detection_partial_label_is_not_a_kind(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {detection: min}, action: drop}\n")
    at(one(validate(path)), path, 3, "min}", "unknown detection kind 'min'")


def test_unknown_protocol(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {proto: tpc}, action: drop}\n")
    at(one(validate(path)), path, 3, "tpc", "unknown protocol 'tpc'")


def test_port_condition_with_portless_protocol(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {proto: icmp, dst_port: 0}, action: drop}\n")
    at(one(validate(path)), path, 3, "dst_port", "'dst_port' can never match")


def test_empty_value_list_in_condition(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst: []}, action: drop}\n")
    at(one(validate(path)), path, 3, "[]", "empty list, which never matches")


def test_empty_not_block(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {dst_port: 22, not: {}}, action: drop}\n")
    at(one(validate(path)), path, 3, "{}", "'not' needs at least one condition")


def test_errors_inside_not_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - {name: r, match: {not: [{dst: $nope}]}, action: drop}\n")
    at(one(validate(path)), path, 3, "$nope", "list '$nope' is not defined")


def test_unreachable_rule_after_catch_all_names_both(tmp_path: Path) -> None:
    text = (
        HEAD + "rules:\n"
        "  - {name: everything, action: drop}\n"
        "  - {name: later, match: {dst_port: 22}, action: accept}\n"
    )
    path = write(tmp_path, text)
    diag = one(validate(path))
    at(diag, path, 4, "{", "rule 'later' can never match: rule 'everything'")
    assert f"({path}:3)" in diag.message


def test_empty_match_is_a_catch_all_too(tmp_path: Path) -> None:
    text = HEAD + "rules:\n  - {name: all, match: {}, action: alert}\n  - {name: later, action: drop}\n"
    path = write(tmp_path, text)
    at(one(validate(path)), path, 4, "{", "rule 'later' can never match: rule 'all'")


def test_missing_include_file(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "include: [lists/missing.yaml]\n")
    diag = one(validate(path))
    at(diag, path, 2, "lists/", "included file 'lists/missing.yaml' does not exist")


def test_include_cycle(tmp_path: Path) -> None:
    b = write(tmp_path, "include: policy.yaml\nlists: {}\n", "b.yaml")
    path = write(tmp_path, HEAD + "include: b.yaml\n")
    diag = one(validate(path))
    assert (diag.file, diag.line, diag.col) == (str(b), 1, 10)
    assert f"include cycle: {path} -> {b} -> {path}" in diag.message


def test_main_only_key_in_included_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "mode: monitor\nlists: {}\n", "extra.yaml")
    path = write(tmp_path, HEAD + "include: extra.yaml\n")
    at(one(validate(path)), inc, 1, 1, "'mode' can only be set in the main policy file")


def test_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "lists:\n  p: {type: port, items: [99999]}\n", "lists/p.yaml")
    path = write(tmp_path, HEAD + "include: lists/p.yaml\n")
    at(one(validate(path)), inc, 2, "99999", "port 99999 is out of range")


def test_diamond_include_is_read_once(tmp_path: Path) -> None:
    write(tmp_path, "lists:\n  common: {type: port, items: [1]}\n", "common.yaml")
    write(tmp_path, "include: common.yaml\nlists:\n  a: {type: port, items: [2]}\n", "a.yaml")
    write(tmp_path, "include: common.yaml\nlists:\n  b: {type: port, items: [3]}\n", "b.yaml")
    path = write(tmp_path, HEAD + "include: [a.yaml, b.yaml]\n")
    policy = load_policy(path)
    assert [os.path.basename(f) for f in policy.files] == ["policy.yaml", "a.yaml", "common.yaml", "b.yaml"]


def test_included_rules_come_before_own_rules(tmp_path: Path) -> None:
    write(tmp_path, "rules:\n  - {name: inc, match: {dst_port: 2}, action: drop}\n", "inc.yaml")
    path = write(tmp_path, HEAD + "include: inc.yaml\nrules:\n  - {name: own, match: {dst_port: 1}, action: drop}\n")
    assert [r.name for r in load_policy(path).rules] == ["inc", "own"]


def test_rule_records_its_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "rules:\n  - name: r\n    action: drop\n")
    rule = load_policy(path).rules[0]
    assert (rule.file, rule.line) == (str(path), 3)


def test_pool_domains_must_name_a_domain_list(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings: {pool_domains: p}\nlists:\n  p: {type: port, items: [1]}\n")
    at(one(validate(path)), path, 2, "p}", "list 'p' is a port list, but 'pool_domains' needs a domain list")


def test_pool_domains_undefined(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "settings: {pool_domains: pools}\n")
    at(one(validate(path)), path, 2, "pools", "list 'pools' is not defined")


def test_list_file_validates_on_its_own_but_is_not_a_policy(tmp_path: Path) -> None:
    path = write(tmp_path, "lists:\n  p: {type: port, items: [1]}\n")
    assert validate(path) == []
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    at(one(err.value.diagnostics), path, 1, 1, "this file only defines lists")


# ----------------------------------------------------------------------------- reporting


def test_all_errors_of_a_file_are_reported_together(tmp_path: Path) -> None:
    text = (
        "default: acept\n"  # 1
        "lists:\n"  # 2
        "  p: {type: port, items: [70000]}\n"  # 3
        "rules:\n"  # 4
        "  - {name: a, match: {dst: 10.0.0.1/8}, action: drop}\n"  # 5
        "  - {name: b, match: {detection: sshh}, action: drop}\n"  # 6
        "  - {name: a, match: {dst_port: $p}, action: dorp}\n"  # 7
    )
    path = write(tmp_path, text)
    diags = validate(path)
    lines = text.splitlines()
    expected = [(1, "acept"), (3, "70000"), (5, "10.0"), (6, "sshh"), (7, "a,"), (7, "dorp")]
    assert [(d.line, d.col) for d in diags] == [(ln, lines[ln - 1].index(tok) + 1) for ln, tok in expected]
    assert "unknown default action 'acept'" in diags[0].message
    assert "out of range" in diags[1].message
    assert "host bits" in diags[2].message
    assert "unknown detection kind 'sshh'" in diags[3].message
    assert "duplicate rule name 'a'" in diags[4].message
    assert "unknown action 'dorp'" in diags[5].message


def test_policy_error_lists_every_diagnostic_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "default: maybe\nmode: sometimes\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    lines = str(err.value).splitlines()
    assert lines == [str(d) for d in err.value.diagnostics]
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:1:10: unknown default action 'maybe'")
    assert lines[1].startswith(f"{path}:2:7: unknown mode 'sometimes'")


def test_diagnostic_str_is_file_line_col_message() -> None:
    assert str(Diagnostic("rules/x.yaml", 3, 7, "bad")) == "rules/x.yaml:3:7: bad"


def test_load_policy_text_names_the_text_in_diagnostics() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text("default: accept\nmode: fast\n", "inline.yaml")
    assert str(err.value).startswith("inline.yaml:2:7: unknown mode 'fast'")


def test_hostile_value_is_escaped_and_shortened_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + 'mode: "x\\u202ey' + "z" * 200 + '"\n')
    message = one(validate(path)).message
    assert "\u202e" not in message and "\\u202e" in message
    assert len(message) < 200


# ----------------------------------------------------------------------------- never crash

_TOKENS = [
    "\n",
    " ",
    "  ",
    "- ",
    ": ",
    ":",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    '"',
    "#",
    "&a ",
    "*a",
    "!!python/object ",
    "!x ",
    "---\n",
    "...",
    "|",
    ">",
    "? ",
    "%YAML 1.1\n",
    "\t",
    "\\",
    "\x00",
    "\x85",
    "\ufeff",
    "default",
    "accept",
    "drop",
    "alert",
    "mode",
    "monitor",
    "fail",
    "closed",
    "include",
    "lists",
    "rules",
    "settings",
    "name",
    "action",
    "match",
    "not",
    "proto",
    "tcp",
    "icmp",
    "dst",
    "src",
    "dst_port",
    "dst_domain",
    "detection",
    "mining",
    "ssh.reverse",
    "type",
    "items",
    "cidr",
    "port",
    "domain",
    "$",
    "$a",
    "a",
    "10.0.0.0/8",
    "2001:db8::/32",
    "::1",
    "1:2:3:4:5:6:7:8",
    "*.x.com",
    "x.com",
    "22",
    "1-2",
    "65536",
    "-1",
    "0x1f",
    "1e999",
    ".nan",
    "~",
    "null",
    "yes",
    "on",
    "head_bytes",
    "pool_domains",
    "9" * 5000,
]


def _assert_loads_or_policy_error(text: str) -> None:
    try:
        policy = load_policy_text(text, "/nonexistent-egressd-dir/p.yaml")
    except PolicyError as err:
        assert err.diagnostics
        for d in err.diagnostics:
            assert d.line >= 1 and d.col >= 1
            assert not d.message.startswith("internal error"), d.message
    else:
        assert isinstance(policy, Policy)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS) | st.text(max_size=4), max_size=40).map("".join))
def test_arbitrary_yamlish_text_only_ever_raises_policy_error(text: str) -> None:
    _assert_loads_or_policy_error(text)


_KEYS = [
    "default",
    "mode",
    "rules",
    "lists",
    "settings",
    "include",
    "name",
    "action",
    "match",
    "not",
    "dst",
    "dst_port",
    "dst_domain",
    "detection",
    "proto",
    "type",
    "items",
    "src",
    "pool_domains",
    "head_bytes",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.sampled_from(["accept", "drop", "cidr", "port", "domain", "$a", "mining", "10.0.0.0/8", "*.x.com", "1-9"]),
    st.text(max_size=8),
)
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _DOCS, max_size=6))
def test_arbitrary_structured_policy_only_ever_raises_policy_error(doc: dict[str, object]) -> None:
    _assert_loads_or_policy_error(yaml.safe_dump(doc, allow_unicode=True))
