"""One registry for detection kinds (egressd.detect.kinds), one for protocols (egressd.protocols)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd import expect, protocols
from egressd.detect import base, kinds
from egressd.engine import _priority
from egressd.events import Event, category_of, severity_of
from egressd.policy.values import KNOWN_KINDS, parse_kind, parse_proto


def test_every_registered_kind_belongs_to_a_family() -> None:
    assert kinds.KINDS
    for name in kinds.KINDS:
        assert kinds.family_of(name) is not kinds.UNKNOWN_FAMILY, name


def test_policies_accept_exactly_the_registered_kinds_and_their_prefixes() -> None:
    assert set(KNOWN_KINDS) == set(kinds.KINDS)
    for name in kinds.KINDS:
        assert parse_kind(name) == name
        assert parse_kind(name.split(".", 1)[0]) is not None
    assert parse_kind("tunnel.nonexistent") is None


def test_detector_constants_are_the_registry_entries() -> None:
    exported = {getattr(base, n) for n in base.__all__ if n.isupper() and isinstance(getattr(base, n), str)}
    assert exported == set(kinds.KINDS)


def test_registering_a_kind_twice_or_outside_every_family_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        kinds.kind("ssh", "again")
    with pytest.raises(ValueError, match="no family"):
        kinds.kind("gpu.nvlink", "a family nobody declared")


def test_longest_family_prefix_wins() -> None:
    assert kinds.family_of("ssh.reverse").prefix == "ssh.reverse"
    assert kinds.family_of("ssh.forward.local").prefix == "ssh.forward"
    assert kinds.family_of("ssh.other").prefix == "ssh"
    assert kinds.family_of("sshx") is kinds.UNKNOWN_FAMILY


@pytest.mark.parametrize(
    ("name", "severity", "rank_before"),
    [("mining.xmr", 1, "ssh.reverse"), ("ssh.reverse", 1, "evasion.fragment-overlap"), ("ssh", 2, "tunnel.ike")],
)
def test_event_severity_and_engine_rank_come_from_the_family(name: str, severity: int, rank_before: str) -> None:
    assert severity_of(name) == severity
    assert category_of(name) == kinds.family_of(name).category
    assert _priority(name) < _priority(rank_before)


@pytest.mark.parametrize(("name", "alert"), [("tls", False), ("dns", False), ("rpc.jsonrpc", False), ("ssh", True)])
def test_whether_a_finding_alone_makes_an_alert_comes_from_the_family(name: str, alert: bool) -> None:
    ev = Event(0.0, 1, "198.51.100.2", 1, "203.0.113.1", 2, "TCP", "accept", "allowed", "default", "", "end")
    ev.detection = {"kind": name, "evidence": "", "info": {}}
    assert ev.event_type == ("alert" if alert else "flow")


def test_protocol_table_names_every_constant_and_policy_name() -> None:
    for const in ("PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "PROTO_GRE", "PROTO_ESP", "PROTO_AH", "PROTO_ICMPV6"):
        number = getattr(protocols, const)
        assert protocols.EVE_NAMES[number]
    for p in protocols.PROTOCOLS:
        for name in p.names:
            assert parse_proto(name) == p.number
    assert protocols.eve_name(6) == "TCP" and protocols.eve_name(250) == "250"
    assert {6, 17, 33, 132, 136} == protocols.PORT_PROTOS


@pytest.mark.parametrize(
    ("written", "eve"), [("tcp", "TCP"), ("icmpv6", "IPv6-ICMP"), ("ipv6-icmp", "IPv6-ICMP"), ("47", "GRE")]
)
def test_expectation_files_name_protocols_as_policies_do(tmp_path: Path, written: str, eve: str) -> None:
    f = tmp_path / "x.expect.yaml"
    f.write_text(f"flows:\n  - match: {{proto: '{written}'}}\n    verdict: accept\n")
    ev = Event(0.0, 1, "198.51.100.2", 1, "203.0.113.1", 2, eve, "accept", "allowed", "default", "", "end")
    assert expect.check(expect.load(f), [ev]) == []
