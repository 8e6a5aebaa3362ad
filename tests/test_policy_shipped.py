"""The policies shipped in rules/ validate clean and do what their comments say."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egressd.policy import FlowFacts, Policy, load_policy, validate

RULES = Path(__file__).resolve().parents[1] / "rules"
TCP, UDP = 6, 17


def flow(
    dst: str,
    dport: int,
    *,
    proto: int = TCP,
    domains: tuple[str, ...] = (),
    detections: tuple[str, ...] = (),
    content: str = "pending",
) -> FlowFacts:
    d = ipaddress.ip_address(dst)
    s = ipaddress.ip_address("198.51.100.2" if d.version == 4 else "2001:db8::2")
    return FlowFacts(proto, d.version, s.packed, d.packed, 40000, dport, domains, detections, content)


@pytest.fixture(scope="module")
def default() -> Policy:
    return load_policy(RULES / "default.yaml")


@pytest.fixture(scope="module")
def allowlist() -> Policy:
    return load_policy(RULES / "allowlist.yaml")


@pytest.mark.parametrize("path", sorted(RULES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RULES)))
def test_every_shipped_file_validates_clean(path: Path) -> None:
    assert validate(path) == []


def test_every_shipped_rule_has_a_description(default: Policy, allowlist: Policy) -> None:
    for rule in default.rules + allowlist.rules:
        assert len(rule.description) > 20, rule.name


# ----------------------------------------------------------------------------- default.yaml


def test_default_policy_settings(default: Policy) -> None:
    assert (default.mode, default.default, default.fail) == ("enforce", "accept", "open")
    assert [Path(f).relative_to(RULES).as_posix() for f in default.files] == [
        "default.yaml",
        "lists/mining-pools.yaml",
        "lists/tunnel-services.yaml",
    ]
    assert default.pool_domains.match("xmr-eu1.nanopool.org") == "*.nanopool.org"
    assert default.tunnel_service_domains.match("connect.ngrok-agent.com") == "*.ngrok-agent.com"


def test_default_accepts_ordinary_https(default: Policy) -> None:
    assert default.judge(flow("198.51.100.80", 443, domains=("pypi.org",), detections=("tls",))).action == "accept"


@pytest.mark.parametrize("dst", ["203.0.113.10", "2001:db8:10::5"])
def test_default_accepts_ssh_to_allowed_cidr(default: Policy, dst: str) -> None:
    assert default.judge(flow(dst, 22)).action == "accept"
    assert default.judge(flow(dst, 22, detections=("ssh",))).action == "accept"


def test_default_accepts_ssh_to_allowed_name(default: Policy) -> None:
    facts = flow("198.51.100.30", 22, domains=("git.example.org",), detections=("ssh",))
    assert default.judge(facts).action == "accept"


@pytest.mark.parametrize("dst", ["203.0.113.11", "198.51.100.30", "2001:db8:11::1"])
def test_default_judges_ssh_by_protocol_not_port(default: Policy, dst: str) -> None:
    # Port 22 alone is not SSH: the flow is dropped when its banner is seen, so the event
    # carries the SSH evidence (and SSH on any other port is caught the same way).
    assert default.judge(flow(dst, 22)).action == "accept"
    decision = default.judge(flow(dst, 22, detections=("ssh",)))
    assert (decision.action, decision.rule) == ("drop", "drop-ssh-unlisted")


def test_default_drops_ssh_on_another_port_once_detected(default: Policy) -> None:
    assert default.judge(flow("198.51.100.30", 443)).action == "accept"
    decision = default.judge(flow("198.51.100.30", 443, detections=("ssh",)))
    assert (decision.action, decision.rule) == ("drop", "drop-ssh-unlisted")


def test_default_drops_reverse_ssh_even_to_allowed_host(default: Policy) -> None:
    decision = default.judge(flow("203.0.113.10", 22, detections=("ssh", "ssh.reverse")))
    assert (decision.action, decision.rule) == ("drop", "drop-reverse-ssh")


@pytest.mark.parametrize("dst", ["203.0.113.10", "2001:db8:10::5", "198.51.100.30"])
def test_default_drops_a_remote_forward_to_every_destination_allowed_bastions_included(
    default: Policy, dst: str
) -> None:
    decision = default.judge(flow(dst, 22, detections=("ssh", "ssh.forward.remote")))
    assert (decision.action, decision.rule) == ("drop", "drop-ssh-remote-forward")


@pytest.mark.parametrize("kind", ["ssh.forward.local", "ssh.forward.dynamic", "ssh.forward.tun"])
def test_default_alerts_on_other_forwards_to_an_allowed_bastion(default: Policy, kind: str) -> None:
    decision = default.judge(flow("203.0.113.10", 22, detections=("ssh", kind)))
    assert (decision.action, decision.rule) == ("alert", "alert-ssh-forwards")
    # ...and to an unlisted host the session is dropped as SSH anyway.
    assert default.judge(flow("198.51.100.30", 22, detections=("ssh", kind))).action == "drop"


@pytest.mark.parametrize("kind", ["mining.stratum", "mining.xmr", "mining.eth-stratum", "mining.getwork"])
def test_default_drops_mining_detected_on_port_443(default: Policy, kind: str) -> None:
    decision = default.judge(flow("198.51.100.40", 443, detections=(kind,)))
    assert (decision.action, decision.rule) == ("drop", "drop-mining")


@pytest.mark.parametrize("name", ["xmr-eu1.nanopool.org", "nanopool.org", "pool.supportxmr.com", "donate.v2.xmrig.com"])
def test_default_drops_pool_domain_at_first_packet(default: Policy, name: str) -> None:
    decision = default.judge(flow("198.51.100.40", 443, domains=(name,)))
    assert (decision.action, decision.rule) == ("drop", "drop-mining-pool-names")


def test_default_does_not_drop_lookalike_of_pool_domain(default: Policy) -> None:
    assert default.judge(flow("198.51.100.40", 443, domains=("notnanopool.org",))).action == "accept"


def test_default_drops_dns_lookup_of_a_pool(default: Policy) -> None:
    # The engine puts the queried name in the flow's names and reports mining.pool-domain.
    facts = flow(
        "198.51.100.53",
        53,
        proto=UDP,
        domains=("xmr.nanopool.org",),
        detections=("dns", "mining.pool-domain"),
    )
    decision = default.judge(facts)
    assert (decision.action, decision.rule) == ("drop", "drop-mining-pool-lookups")


def test_default_names_tls_sni_of_a_pool_as_pool_name(default: Policy) -> None:
    facts = flow("198.51.100.41", 443, domains=("xmr-eu1.nanopool.org",), detections=("tls", "mining.pool-domain"))
    decision = default.judge(facts)
    assert (decision.action, decision.rule) == ("drop", "drop-mining-pool-names")


def test_default_drops_pool_domain_detection_without_a_name(default: Policy) -> None:
    decision = default.judge(flow("198.51.100.41", 8443, detections=("mining.pool-domain",)))
    assert (decision.action, decision.rule) == ("drop", "drop-mining")


def test_default_alerts_on_unrecognised_payload_to_a_pool_port(default: Policy) -> None:
    decision = default.judge(flow("198.51.100.40", 3333, content="unclassified"))
    assert (decision.action, decision.rule) == ("alert", "alert-mining-ports")


def test_default_claims_nothing_on_a_pool_port_before_the_content_is_known(default: Policy) -> None:
    decision = default.judge(flow("198.51.100.40", 3333))
    assert (decision.action, decision.rule) == ("accept", "default")


def test_default_records_a_dataless_flow_to_a_pool_port_without_an_alert(default: Policy) -> None:
    decision = default.judge(flow("198.51.100.40", 3333, content="none"))
    assert (decision.action, decision.rule) == ("accept", "note-mining-ports-without-payload")


@pytest.mark.parametrize("kinds", [("rpc.jsonrpc",), ("tls",), ("dns",)])
def test_default_does_not_alert_on_a_pool_port_whose_content_is_something_else(
    default: Policy, kinds: tuple[str, ...]
) -> None:
    decision = default.judge(flow("198.51.100.40", 4444, detections=kinds, content="classified"))
    assert (decision.action, decision.rule) == ("accept", "default")


@pytest.mark.parametrize("port", [8333, 9332])
def test_cryptocurrency_node_ports_are_not_pool_ports(default: Policy, port: int) -> None:
    decision = default.judge(flow("198.51.100.40", port, content="unclassified"))
    assert (decision.action, decision.rule) == ("accept", "default")


# ----------------------------------------------------------------------------- allowlist.yaml


def test_allowlist_is_default_drop_and_fail_closed(allowlist: Policy) -> None:
    assert (allowlist.default, allowlist.fail) == ("drop", "closed")


@pytest.mark.parametrize(
    "name",
    [
        "pypi.org",
        "files.pythonhosted.org",
        "github.com",
        "objects.githubusercontent.com",
        "b.s3.amazonaws.com",
    ],
)
def test_allowlist_accepts_https_to_listed_names(allowlist: Policy, name: str) -> None:
    assert allowlist.judge(flow("192.0.2.80", 443, domains=(name,))).action == "accept"


def test_allowlist_drops_unlisted_https(allowlist: Policy) -> None:
    decision = allowlist.judge(flow("192.0.2.80", 443, domains=("paste.example.com",)))
    assert (decision.action, decision.rule) == ("drop", "default")


def test_allowlist_drops_mining_towards_an_allowed_name(allowlist: Policy) -> None:
    decision = allowlist.judge(flow("192.0.2.80", 443, domains=("pypi.org",), detections=("mining.xmr",)))
    assert (decision.action, decision.rule) == ("drop", "drop-mining")


def test_allowlist_drops_ssh_hidden_on_443_to_registry(allowlist: Policy) -> None:
    decision = allowlist.judge(flow("192.0.2.80", 443, domains=("pypi.org",), detections=("ssh",)))
    assert (decision.action, decision.rule) == ("drop", "drop-ssh-outside-git-hosting")


def test_allowlist_accepts_git_over_ssh(allowlist: Policy) -> None:
    assert allowlist.judge(flow("192.0.2.80", 22, domains=("github.com",), detections=("ssh",))).action == "accept"


def test_allowlist_dns_only_to_node_resolvers(allowlist: Policy) -> None:
    assert allowlist.judge(flow("198.51.100.53", 53, proto=UDP)).action == "accept"
    assert allowlist.judge(flow("192.0.2.53", 53, proto=UDP)).action == "drop"


def test_allowlist_accepts_ntp_pool_by_name(allowlist: Policy) -> None:
    assert allowlist.judge(flow("192.0.2.123", 123, proto=UDP, domains=("2.debian.pool.ntp.org",))).action == "accept"


def test_allowlist_accepts_internal_and_ipv6_neighbour_discovery(allowlist: Policy) -> None:
    assert allowlist.judge(flow("198.51.100.9", 5432)).action == "accept"
    assert allowlist.judge(flow("ff02::1:ff00:1", 0, proto=58)).action == "accept"
