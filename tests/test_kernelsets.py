"""The compiled policy (egressd.kernelsets) decides exactly as the engine does, where it decides.

The equivalence is held against the engine's own decisions on real captures (pcaps/ and the
shared corpus): for every flow the kernel would decide at its SYN, the engine's final
decision for that flow must have the same action. A policy built from the captures' own
addresses makes sure the compiled rules decide many flows (a check that never fires proves
nothing), miners among them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egressd import kernelsets as ks
from egressd.events import Event
from egressd.paths import default_policy
from egressd.policy import Policy, load_policy
from egressd.policy.matchers import CidrSet, Match, PortSet
from egressd.policy.model import Decision, Rule
from egressd.replay import replay

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
MASK, ALLOW, DENY = 0x30000000, 0x20000000, 0x30000000


def _captures() -> list[Path]:
    own = sorted((ROOT / "pcaps").glob("*.pcap")) + sorted((ROOT / "pcaps" / "tunnels").glob("*.pcap"))
    corpus = sorted(CORPUS.rglob("*.pcap*")) if CORPUS.is_dir() else []
    small = [p for p in corpus if p.stat().st_size < 2_000_000]
    return own + small[::3]  # every third corpus capture keeps the test under a few seconds


def _rule(name: str, action: str, match: Match) -> Rule:
    return Rule(name, name, action, match, "test", 1, Decision(action, name, name))


def _with_rules(base: Policy, rules: tuple[Rule, ...], *, mode: str = "enforce") -> Policy:
    return Policy(
        path=base.path,
        mode=mode,
        default=base.default,
        settings=base.settings,
        pool_domains=base.pool_domains,
        tunnel_service_domains=base.tunnel_service_domains,
        rules=rules,
    )


def _net(ip: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(ip)


def _flows(policy: Policy) -> list[Event]:
    out: list[Event] = []
    for cap in _captures():
        out += replay(cap, policy).final_events()
    return out


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy(default_policy())


def test_the_shipped_policy_compiles_only_the_pool_and_tunnel_service_names_into_dns_sets(shipped: Policy) -> None:
    plan = ks.compile_policy(shipped)
    assert [(e.rule, e.action, e.by_name) for e in plan.entries] == [
        ("drop-mining-pool-names", "drop", True),
        ("drop-tunnel-service-names", "drop", True),
    ]
    assert plan.default is None  # the detection rules shadow everything
    skipped = dict(plan.skipped)
    assert "drop-mining" in skipped and "alert-mining-ports" in skipped


def test_a_trusted_accept_after_a_detection_rule_is_not_compiled(shipped: Policy) -> None:
    # The example: an accept placed after drop-mining must not skip that detection.
    trust = _rule("trust", "accept", Match(dst=CidrSet([_net("203.0.113.0/24")])))
    plan = ks.compile_policy(_with_rules(shipped, (*shipped.rules, trust)))
    assert "trust" not in [e.rule for e in plan.entries]
    assert dict(plan.skipped)["trust"].startswith("an earlier rule")


def test_a_drop_after_a_detection_rule_is_compiled_but_not_after_an_alert(shipped: Policy) -> None:
    block = _rule("block", "drop", Match(dst=CidrSet([_net("203.0.113.9/32")])))
    drop_mining = next(r for r in shipped.rules if r.name == "drop-mining")
    plan = ks.compile_policy(_with_rules(shipped, (drop_mining, block)))  # drop-mining first
    assert [e.rule for e in plan.entries] == ["block"]
    alert = _rule("alert-all", "alert", Match(protos=frozenset({6})))
    plan = ks.compile_policy(_with_rules(shipped, (alert, block)))
    assert plan.entries == []  # the alert holds at the first judgement, and the kernel writes no event


def test_monitor_mode_compiles_no_drop(shipped: Policy) -> None:
    block = _rule("block", "drop", Match(dst=CidrSet([_net("203.0.113.9/32")])))
    trust = _rule("trust", "accept", Match(dst=CidrSet([_net("198.51.100.0/24")]), dst_ports=PortSet([(443, 443)])))
    plan = ks.compile_policy(_with_rules(shipped, (block, trust), mode="monitor"))
    assert [e.rule for e in plan.entries] == ["trust"]


def test_an_accept_leaves_dns_to_the_engine() -> None:
    pol = Policy(path="t", rules=(_rule("trust", "accept", Match(dst=CidrSet([_net("198.51.100.0/24")]))),))
    plan = ks.compile_policy(pol)
    a, b = ipaddress.ip_address("198.51.100.2").packed, ipaddress.ip_address("198.51.100.53").packed
    assert plan.decide(6, a, 40000, b, 443) == ("accept", "trust")
    assert plan.decide(17, a, 40000, b, 53) is None  # the engine reads the answer
    assert plan.decide(6, a, 40000, b, 53) is None
    rendered = ks.render(plan, 4, 1, state_mask=MASK, allow=ALLOW, deny=DENY, deny_chain="X")
    assert "-A EGRESSD-POLICY-0 -p udp -m multiport --dports 53,5353 -j RETURN" in rendered.rules


def test_disjoint_reads_protocols_ports_and_networks() -> None:
    tcp443 = Match(protos=frozenset({6}), dst_ports=PortSet([(443, 443)]))
    assert ks.disjoint(tcp443, Match(protos=frozenset({17})))
    assert ks.disjoint(tcp443, Match(dst_ports=PortSet([(53, 53)])))
    assert not ks.disjoint(tcp443, Match(dst_ports=PortSet([(400, 500)])))
    assert ks.disjoint(tcp443, Match(protos=frozenset({1})))  # ports need a port protocol
    a, b = CidrSet([_net("203.0.113.0/25")]), CidrSet([_net("203.0.113.128/25")])
    assert ks.disjoint(Match(dst=a), Match(dst=b)) and not ks.disjoint(Match(dst=a), Match(dst=a))
    assert not ks.disjoint(Match(dst=a), Match(kinds=("mining",)))


def test_compiled_rules_decide_as_the_engine_does_on_real_captures(shipped: Policy) -> None:
    seen = _flows(shipped)
    dsts = sorted({e.dest_ip for e in seen if e.proto in ("TCP", "UDP")})
    assert len(dsts) > 20, "too few flows to hold the compiled policy against"
    trusted = CidrSet([_net(d) for d in dsts[0::3]])
    blocked = CidrSet([_net(d) for d in dsts[1::3]])
    rules = (
        _rule("trust-some", "accept", Match(dst=trusted, protos=frozenset({6}))),
        _rule("block-some", "drop", Match(dst=blocked)),
        *shipped.rules,
        _rule("late-trust", "accept", Match(dst=CidrSet([_net(d) for d in dsts[2::3]]))),
    )
    pol = _with_rules(shipped, rules)
    plan = ks.compile_policy(pol)
    assert [e.rule for e in plan.entries] == [
        "trust-some",
        "block-some",
        "drop-mining-pool-names",
        "drop-tunnel-service-names",
    ]
    decided = 0
    wrong: list[str] = []
    for e in _flows(pol):
        proto = {"TCP": 6, "UDP": 17}.get(e.proto)
        if proto is None:
            continue
        src, dst = ipaddress.ip_address(e.src_ip).packed, ipaddress.ip_address(e.dest_ip).packed
        k = plan.decide(proto, src, e.src_port, dst, e.dest_port)
        if k is None:
            continue
        decided += 1
        engine = "drop" if e.verdict == "drop" else e.verdict
        if k[0] != engine:
            wrong.append(f"{e.proto} {e.src_ip}:{e.src_port} -> {e.dest_ip}:{e.dest_port}: kernel {k}, engine {engine}")
    assert decided > 20, decided
    assert not wrong, "\n".join(wrong[:20])


def test_without_sets_networks_become_plain_rules_and_name_rules_stay_in_python(shipped: Policy) -> None:
    trust = _rule(
        "trust",
        "accept",
        Match(dst=CidrSet([_net("203.0.113.0/25"), _net("198.51.100.7/32")]), dst_ports=PortSet([(443, 443)])),
    )
    plan = ks.compile_policy(_with_rules(shipped, (trust, *shipped.rules)))
    assert [e.rule for e in plan.entries] == ["trust", "drop-mining-pool-names", "drop-tunnel-service-names"]
    r = ks.render(plan, 4, 1, state_mask=MASK, allow=ALLOW, deny=DENY, deny_chain="X", log_group=0, use_sets=False)
    assert r.ipset == [] and r.sets == [] and not any("-m set" in x for x in r.rules)
    tails = [
        x.split("-m multiport --dports 443 ", 1)[1] for x in r.rules if x.startswith("-A EGRESSD-POLICY -m connmark")
    ]
    assert {t.split(" -j ")[0] for t in tails} == {"-d 203.0.113.0/25", "-d 198.51.100.7/32"}
    assert len(tails) == 2 * 5  # two networks, five port protocols
    with_sets = ks.render(plan, 4, 1, state_mask=MASK, allow=ALLOW, deny=DENY, deny_chain="X", log_group=0)
    assert "egd1-2n4" in with_sets.sets and any("NFLOG" in x for x in with_sets.rules)  # rule index 2
