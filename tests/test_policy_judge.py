"""Policy.judge: first matching rule wins, else the default; each condition's edges."""

from __future__ import annotations

import ipaddress

import pytest

from egressd.policy import CidrSet, Decision, DomainSet, FlowFacts, Policy, PortSet, load_policy_text

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


def flow(
    dst: str = "198.51.100.20",
    dport: int = 443,
    *,
    proto: int = TCP,
    src: str | None = None,
    sport: int = 40000,
    domains: tuple[str, ...] = (),
    detections: tuple[str, ...] = (),
) -> FlowFacts:
    d = ipaddress.ip_address(dst)
    s = ipaddress.ip_address(src or ("198.51.100.2" if d.version == 4 else "2001:db8::2"))
    return FlowFacts(proto, d.version, s.packed, d.packed, sport, dport, domains, detections)


def policy(rules: str, head: str = "default: accept\n", lists: str = "") -> Policy:
    text = head + (f"lists:\n{lists}" if lists else "") + "rules:\n" + rules
    return load_policy_text(text, "test.yaml")


def rule_for(p: Policy, facts: FlowFacts) -> str:
    return p.judge(facts).rule


# ----------------------------------------------------------------------------- order and default


def test_first_matching_rule_wins() -> None:
    p = policy(
        "  - {name: first, match: {dst_port: 22}, action: drop}\n"
        "  - {name: second, match: {dst_port: 22}, action: accept}\n"
    )
    assert p.judge(flow(dport=22)) == Decision("drop", "first", "")


def test_default_decides_when_no_rule_matches() -> None:
    p = policy("  - {name: r, match: {dst_port: 22}, action: drop}\n", head="default: alert\n")
    assert p.judge(flow(dport=80)) == Decision("alert", "default", "")


def test_decision_carries_rule_description() -> None:
    p = policy(
        "  - name: r\n    description: Because reasons.\n    match: {dst_port: 22}\n    action: drop\n"
    )
    assert p.judge(flow(dport=22)).description == "Because reasons."


def test_catch_all_rule_matches_everything() -> None:
    p = policy("  - {name: all, action: alert}\n")
    assert rule_for(p, flow(proto=ICMP, dport=0)) == "all"
    assert rule_for(p, flow("2001:db8::9", 1)) == "all"


def test_monitor_mode_is_exposed_and_judge_still_reports_drop() -> None:
    p = policy(
        "  - {name: r, match: {dst_port: 22}, action: drop}\n", head="default: accept\nmode: monitor\n"
    )
    assert p.mode == "monitor"
    assert p.judge(flow(dport=22)).action == "drop"


def test_all_conditions_of_a_match_must_hold() -> None:
    p = policy("  - {name: r, match: {proto: tcp, dst_port: 22, dst: 203.0.113.0/24}, action: drop}\n")
    assert rule_for(p, flow("203.0.113.5", 22)) == "r"
    assert rule_for(p, flow("203.0.113.5", 22, proto=UDP)) == "default"
    assert rule_for(p, flow("203.0.113.5", 23)) == "default"
    assert rule_for(p, flow("198.51.100.5", 22)) == "default"


# ----------------------------------------------------------------------------- addresses


def test_ipv4_cidr_edges() -> None:
    p = policy("  - {name: r, match: {dst: 203.0.113.0/25}, action: drop}\n")
    assert rule_for(p, flow("203.0.113.0")) == "r"
    assert rule_for(p, flow("203.0.113.127")) == "r"
    assert rule_for(p, flow("203.0.113.128")) == "default"
    assert rule_for(p, flow("203.0.112.255")) == "default"


def test_ipv6_cidr_edges() -> None:
    p = policy('  - {name: r, match: {dst: "2001:db8:1::/48"}, action: drop}\n')
    assert rule_for(p, flow("2001:db8:1::")) == "r"
    assert rule_for(p, flow("2001:db8:1:ffff:ffff:ffff:ffff:ffff")) == "r"
    assert rule_for(p, flow("2001:db8:2::")) == "default"
    assert rule_for(p, flow("2001:db8:0:ffff:ffff:ffff:ffff:ffff")) == "default"


def test_single_address_is_a_host_network() -> None:
    p = policy('  - {name: r, match: {dst: [203.0.113.10, "2001:db8::10"]}, action: drop}\n')
    assert rule_for(p, flow("203.0.113.10")) == "r"
    assert rule_for(p, flow("203.0.113.11")) == "default"
    assert rule_for(p, flow("2001:db8::10")) == "r"
    assert rule_for(p, flow("2001:db8::11")) == "default"


def test_ipv4_network_never_matches_ipv6_flow_with_the_same_low_bits() -> None:
    p = policy("  - {name: r, match: {dst: 0.0.0.0/0}, action: drop}\n")
    assert rule_for(p, flow("::cb00:710a")) == "default"
    assert rule_for(p, flow("203.0.113.10")) == "r"


def test_src_condition_uses_the_source_address() -> None:
    p = policy("  - {name: r, match: {src: 10.0.0.0/8}, action: drop}\n")
    assert rule_for(p, flow("203.0.113.1", src="10.1.2.3")) == "r"
    assert rule_for(p, flow("10.1.2.3", src="198.51.100.2")) == "default"


def test_cidr_list_reference_and_literal_are_merged() -> None:
    p = policy(
        "  - {name: r, match: {dst: [$nets, 192.0.2.0/24]}, action: drop}\n",
        lists="  nets: {type: cidr, items: [203.0.113.0/24]}\n",
    )
    assert rule_for(p, flow("203.0.113.77")) == "r"
    assert rule_for(p, flow("192.0.2.1")) == "r"
    assert rule_for(p, flow("198.51.100.1")) == "default"


def test_cidrset_merges_overlapping_and_adjacent_networks() -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24")]
    s = CidrSet(nets)
    assert s.contains_address(ipaddress.ip_address("10.0.1.255").packed)
    assert not s.contains_address(ipaddress.ip_address("10.0.2.0").packed)
    assert s.contains_address(ipaddress.ip_address("10.0.3.0").packed)


# ----------------------------------------------------------------------------- ports and protocols


def test_port_range_edges() -> None:
    p = policy("  - {name: r, match: {dst_port: 14444-14446}, action: drop}\n")
    assert [rule_for(p, flow(dport=port)) for port in (14443, 14444, 14446, 14447)] == [
        "default",
        "r",
        "r",
        "default",
    ]


def test_wide_port_range_is_matched_by_interval() -> None:
    s = PortSet([(1024, 65535), (22, 22)])
    assert s.contains(22) and s.contains(1024) and s.contains(65535)
    assert not s.contains(1023) and not s.contains(23)


def test_src_port_condition() -> None:
    p = policy("  - {name: r, match: {src_port: 53}, action: drop}\n")
    assert rule_for(p, flow(sport=53, proto=UDP)) == "r"
    assert rule_for(p, flow(sport=54, proto=UDP)) == "default"


def test_port_condition_never_matches_a_portless_protocol() -> None:
    p = policy("  - {name: r, match: {dst_port: 0}, action: drop}\n")
    assert rule_for(p, flow(dport=0, proto=ICMP)) == "default"
    assert rule_for(p, flow(dport=0, proto=UDP)) == "r"


def test_proto_list_and_names() -> None:
    p = policy("  - {name: r, match: {proto: [udp, icmpv6]}, action: drop}\n")
    assert rule_for(p, flow(proto=UDP)) == "r"
    assert rule_for(p, flow("2001:db8::1", 0, proto=ICMPV6)) == "r"
    assert rule_for(p, flow(proto=TCP)) == "default"


def test_proto_any_places_no_condition() -> None:
    p = policy("  - {name: r, match: {proto: [tcp, any], dst_port: 1}, action: drop}\n")
    assert rule_for(p, flow(dport=1, proto=UDP)) == "r"


def test_proto_by_number() -> None:
    p = policy("  - {name: r, match: {proto: 47}, action: drop}\n")
    assert rule_for(p, flow(proto=47, dport=0)) == "r"
    assert rule_for(p, flow(proto=TCP)) == "default"


# ----------------------------------------------------------------------------- domains


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.x.com", "*.x.com"),
        ("a.b.x.com", "*.x.com"),
        ("x.com", None),
        ("evilx.com", None),
        ("x.com.evil", None),
    ],
)
def test_wildcard_matches_names_below_the_suffix_only(name: str, expected: str | None) -> None:
    assert DomainSet(["*.x.com"]).match(name) == expected


def test_exact_domain_matches_only_itself() -> None:
    s = DomainSet(["x.com"])
    assert s.match("x.com") == "x.com"
    assert s.match("a.x.com") is None


def test_longest_wildcard_is_reported() -> None:
    assert DomainSet(["*.com", "*.x.com"]).match("a.x.com") == "*.x.com"


def test_dst_domain_matches_when_any_flow_name_matches() -> None:
    p = policy('  - {name: r, match: {dst_domain: ["*.pool.example", git.example.org]}, action: drop}\n')
    assert rule_for(p, flow(domains=("cdn.example.net", "eu1.pool.example"))) == "r"
    assert rule_for(p, flow(domains=("git.example.org",))) == "r"
    assert rule_for(p, flow(domains=("pool.example",))) == "default"
    assert rule_for(p, flow(domains=())) == "default"


def test_domain_list_reference() -> None:
    p = policy(
        "  - {name: r, match: {dst_domain: $names}, action: drop}\n",
        lists='  names: {type: domain, items: ["*.nanopool.org", nanopool.org]}\n',
    )
    assert rule_for(p, flow(domains=("xmr-eu1.nanopool.org",))) == "r"
    assert rule_for(p, flow(domains=("nanopool.org",))) == "r"
    assert rule_for(p, flow(domains=("notnanopool.org",))) == "default"


# ----------------------------------------------------------------------------- detections and not


def test_detection_prefix_matches_dotted_kinds() -> None:
    p = policy("  - {name: r, match: {detection: mining}, action: drop}\n")
    assert rule_for(p, flow(detections=("mining.xmr",))) == "r"
    assert rule_for(p, flow(detections=("mining",))) == "r"
    assert rule_for(p, flow(detections=("miningfoo",))) == "default"
    assert rule_for(p, flow(detections=("tls",))) == "default"
    assert rule_for(p, flow()) == "default"


def test_specific_detection_does_not_match_its_parent() -> None:
    p = policy("  - {name: r, match: {detection: ssh.reverse}, action: drop}\n")
    assert rule_for(p, flow(detections=("ssh",))) == "default"
    assert rule_for(p, flow(detections=("ssh", "ssh.reverse"))) == "r"


def test_not_block_excludes_flows() -> None:
    p = policy("  - {name: r, match: {detection: ssh, not: {dst: 203.0.113.10}}, action: drop}\n")
    assert rule_for(p, flow("203.0.113.10", 22, detections=("ssh",))) == "default"
    assert rule_for(p, flow("203.0.113.11", 22, detections=("ssh",))) == "r"


def test_not_list_means_none_of_them_may_hold() -> None:
    p = policy(
        "  - name: r\n"
        "    match:\n"
        "      detection: ssh\n"
        "      not:\n"
        "        - dst: 203.0.113.10\n"
        "        - dst_domain: git.example.org\n"
        "    action: drop\n"
    )
    assert rule_for(p, flow("203.0.113.10", detections=("ssh",))) == "default"
    assert rule_for(p, flow("198.51.100.9", detections=("ssh",), domains=("git.example.org",))) == "default"
    assert rule_for(p, flow("198.51.100.9", detections=("ssh",), domains=("other.example.org",))) == "r"


def test_not_alone_is_not_a_catch_all() -> None:
    p = policy("  - {name: r, match: {not: {dst_port: 443}}, action: drop}\n  - {name: s, action: accept}\n")
    assert rule_for(p, flow(dport=80)) == "r"
    assert rule_for(p, flow(dport=443)) == "s"


def test_pool_domains_list_is_loaded() -> None:
    p = load_policy_text(
        "default: accept\n"
        "settings: {pool_domains: pools}\n"
        "lists:\n"
        "  pools: {type: domain, items: [a.example]}\n"
    )
    assert p.pool_domains.match("a.example") == "a.example"


def test_rule_lookup_by_name() -> None:
    p = policy("  - {name: r, match: {dst_port: 1}, action: drop}\n")
    found = p.rule("r")
    assert found is not None and found.action == "drop"
    assert p.rule("nope") is None


def test_judge_returns_shared_decision_objects() -> None:
    p = policy("  - {name: r, match: {dst_port: 1}, action: drop}\n")
    assert p.judge(flow(dport=1)) is p.judge(flow(dport=1))
