"""``egressd learn``: a complete default-drop policy from recorded flows, as a person would write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from publicsuffixlist import PublicSuffixList

from egressd.cli import main
from egressd.learn import NEVER_LEARN, registrable
from egressd.paths import default_policy
from egressd.policy import load_policy, validate
from egressd.recorded import from_capture, from_events

ROOT = Path(__file__).parent.parent
PCAPS = sorted(str(p) for p in (ROOT / "pcaps").glob("*.pcap"))
PSL = PublicSuffixList()


def learn(tmp_path: Path, *inputs: str, extra: tuple[str, ...] = ()) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "proposed.yaml"
    assert main(["learn", *inputs, "-o", str(out), *extra]) == 0
    return out


def domain_items(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text())
    return [
        str(i)
        for n, ls in data["lists"].items()
        if n.startswith("learned_") and ls["type"] == "domain"
        for i in ls["items"]
    ]


def assert_no_wildcard_above_a_public_suffix(items: list[str]) -> None:
    for item in items:
        if item.startswith("*."):
            parent = item[2:]
            assert not PSL.is_public(parent), item
            assert registrable(parent) is not None, item


def is_forbidden(kinds: tuple[str, ...]) -> bool:
    return any(k == bad or k.startswith(bad + ".") for k in kinds for bad in NEVER_LEARN)


def test_learned_policy_from_the_captures_validates_and_accepts_every_benign_flow(tmp_path: Path) -> None:
    out = learn(tmp_path, *PCAPS)
    assert validate(out) == []
    proposed = load_policy(out)
    base = load_policy(default_policy())
    assert proposed.default == "drop" and proposed.mode == "enforce"
    # every detection rule of the shipped default, in order, before the first accept rule
    names = [r.name for r in proposed.rules]
    first_accept = next(i for i, r in enumerate(proposed.rules) if r.action == "accept")
    assert names[:first_accept] == [r.name for r in base.rules if r.action != "accept"]
    assert all(r.action == "drop" for r in proposed.rules[:first_accept])
    benign = mining = 0
    for cap in PCAPS:
        before = {(f.src_port, f.dest_ip, f.dest_port): f for f in from_capture(cap, base)}
        for f in from_capture(cap, proposed):
            was = before[(f.src_port, f.dest_ip, f.dest_port)]
            if was.verdict == "accept" and not is_forbidden(was.detections):
                benign += 1
                assert f.verdict == "accept", f"{cap}: {f.label()} now {f.verdict} by {f.rule}"
            else:
                mining += 1
                assert f.verdict == "drop", f"{cap}: {f.label()} ({was.detections}) now {f.verdict} by {f.rule}"
    assert benign >= 5 and mining >= 15


def test_flows_that_must_not_be_learned_are_listed_as_would_still_be_dropped(tmp_path: Path) -> None:
    out = learn(tmp_path, *PCAPS)
    text = out.read_text()
    section = text[text.index("# Would still be dropped") :]
    for needle in ("mining.stratum", "mining.xmr", "ssh.reverse", "drop-ssh-unlisted", "mining.pool-domain"):
        assert needle in section
    # the pool and the unlisted SSH server are nowhere in the learned lists
    data = yaml.safe_load(text)
    learned = [i for n, ls in data["lists"].items() if n.startswith("learned_") for i in ls["items"]]
    assert learned and not any(x.startswith(("203.0.113.30", "203.0.113.20", "203.0.113.41")) for x in learned)
    assert "xmr-eu1.nanopool.org" not in learned


def test_names_are_preferred_and_addresses_only_where_no_name_was_seen(tmp_path: Path) -> None:
    data = yaml.safe_load(learn(tmp_path, *PCAPS).read_text())
    lists = data["lists"]
    assert sorted(lists["learned_tcp_443_names"]["items"]) == ["bulk.example.net", "tls.example.net"]
    assert lists["learned_tcp_22_addresses"]["items"] == ["203.0.113.10/32"]  # SSH by address: no name seen
    assert lists["learned_udp_53_addresses"]["items"] == ["203.0.113.53/32"]  # DNS by resolver


def test_a_name_seen_only_after_the_first_packet_also_gets_its_address_with_the_reason(tmp_path: Path) -> None:
    """These captures have no DNS lookup: the SNI names the flow after its SYN, which a
    default-drop policy judges by address alone. The draft says so next to the address."""
    out = learn(tmp_path, *PCAPS)
    lists = yaml.safe_load(out.read_text())["lists"]
    assert sorted(lists["learned_tcp_443_addresses"]["items"]) == ["203.0.113.40/32", "203.0.113.60/32"]
    line = next(x for x in out.read_text().splitlines() if "- 203.0.113.40/32" in x)
    assert "named tls.example.net only after the first packet (no DNS answer seen)" in line


def test_output_is_deterministic(tmp_path: Path) -> None:
    a = learn(tmp_path / "a", *PCAPS).read_text()
    b = learn(tmp_path / "b", *PCAPS).read_text()
    assert a.replace(str(tmp_path / "a"), "") == b.replace(str(tmp_path / "b"), "")


def test_wildcard_needs_enough_distinct_names_and_says_why(tmp_path: Path) -> None:
    few = domain_items(learn(tmp_path / "three", *PCAPS))
    assert "*.example.net" not in few  # two names only: below the default of three
    out = learn(tmp_path / "two", *PCAPS, extra=("--wildcard-min", "2"))
    items = domain_items(out)
    assert "*.example.net" in items and "tls.example.net" not in items
    line = next(x for x in out.read_text().splitlines() if '"*.example.net"' in x)
    assert "wildcard: 2 distinct names below example.net: bulk.example.net, tls.example.net" in line
    assert_no_wildcard_above_a_public_suffix(items)
    assert validate(out) == []


# ---------------------------------------------------------------------------------- event logs


def event(i: int, dst: str, port: int, domain: str | None = None, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "timestamp": f"2026-12-0{1 + i % 5}T10:00:{i % 60:02d}.000000+0000",
        "event_type": "flow",
        "flow_id": i + 1,
        "src_ip": "198.51.100.2",
        "src_port": 40000 + i,
        "dest_ip": dst,
        "dest_port": port,
        "proto": "TCP",
        "verdict": "accept",
        "action": "allowed",
        "rule": "default",
        "rule_description": "",
        "reason": "classified",
        "mode": "monitor",
    }
    if domain:
        e["domain"] = domain
    e.update(kw)
    return e


def write_events(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_wildcards_never_go_above_a_public_suffix_even_with_many_names(tmp_path: Path) -> None:
    names = [
        *(f"b{i}.s3.amazonaws.com" for i in range(5)),  # s3.amazonaws.com is a (private) public suffix
        *(f"x{i}.github.io" for i in range(5)),  # so is github.io
        *(f"host{i}.com" for i in range(5)),  # never *.com
        *(f"n{i}.data.corp.co.uk" for i in range(4)),  # *.data.corp.co.uk is fine (below corp.co.uk)
    ]
    log = write_events(tmp_path / "e.jsonl", [event(i, f"203.0.113.{i + 1}", 443, n) for i, n in enumerate(names)])
    items = domain_items(learn(tmp_path, str(log)))
    assert_no_wildcard_above_a_public_suffix(items)
    wild = sorted(i for i in items if i.startswith("*."))
    assert wild == ["*.data.corp.co.uk"]
    assert {f"b{i}.s3.amazonaws.com" for i in range(5)} <= set(items)


def test_events_with_and_without_process_and_container_fields(tmp_path: Path) -> None:
    evs = [
        event(0, "203.0.113.40", 443, "api.example.org",
              process={"pid": 10, "ppid": 1, "name": "python3", "executable": "/usr/bin/python3",
                       "command_line": "python3 train.py", "uid": 1000, "user": "ml", "cgroup": "/kubepods/x"},
              container={"id": "0123456789abcdef0123", "runtime": "containerd", "pod_uid": "u", "name": "trainer"}),
        event(1, "203.0.113.40", 443, "api.example.org", process={"pid": 11, "executable": "/usr/bin/curl"}),
        event(2, "203.0.113.40", 443, "api.example.org"),
        event(3, "203.0.113.77", 8443),
    ]  # fmt: skip
    log = write_events(tmp_path / "e.jsonl", evs)
    out = learn(tmp_path, str(log))
    line = next(x for x in out.read_text().splitlines() if "- api.example.org" in x)
    assert "3 flows" in line and "processes: curl, python3" in line and "containers: trainer" in line
    assert "2026-12-01T10:00:00Z .. 2026-12-03T10:00:02Z" in line
    assert "203.0.113.40/32" not in out.read_text()  # named in every event: learned by name only
    addr = next(x for x in out.read_text().splitlines() if "- 203.0.113.77/32" in x)
    assert "1 flow;" in addr and "processes" not in addr
    pol = load_policy(out)
    for f in from_events(log):
        assert pol.judge(f.facts()).action == "accept", f.label()


def test_a_monitor_mode_would_drop_by_a_rule_is_not_learned(tmp_path: Path) -> None:
    evs = [
        event(0, "203.0.113.40", 443, "ok.example.org"),
        event(1, "203.0.113.99", 443, "files.example.org", verdict="drop", rule="drop-exfil-buckets", would_drop=True),
        event(2, "203.0.113.98", 51820, None, proto="UDP", verdict="alert", rule="alert-vpn-tunnels",
              detection={"kind": "tunnel.wireguard", "evidence": "WireGuard handshake", "info": {}},
              detections=["tunnel.wireguard"]),
        event(3, "203.0.113.97", 443, "new.example.org", verdict="drop", rule="default", would_drop=True),
    ]  # fmt: skip
    out = learn(tmp_path, str(write_events(tmp_path / "e.jsonl", evs)))
    data = yaml.safe_load(out.read_text())
    learned = [i for n, ls in data["lists"].items() if n.startswith("learned_") for i in ls["items"]]
    assert sorted(learned) == ["new.example.org", "ok.example.org"]  # a default would-drop is what learn is for
    text = out.read_text()
    assert "dropped by rule drop-exfil-buckets when recorded" in text
    assert "detection tunnel.wireguard" in text


def test_unusable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_type": "flow", "rule": "x"}\n{not json\n')
    assert main(["learn", str(bad), "-o", str(tmp_path / "o.yaml")]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


def test_a_name_that_is_not_a_domain_name_is_never_learned(tmp_path: Path) -> None:
    hostile = "<script>x</script>.example.org"
    evs = [event(i, "203.0.113.40", 443, f"h{i}.example.org") for i in range(2)]
    evs.append(event(5, "203.0.113.41", 443, hostile))
    out = learn(tmp_path, str(write_events(tmp_path / "e.jsonl", evs)))
    items = domain_items(out)
    assert sorted(items) == ["h0.example.org", "h1.example.org"]  # and no *.example.org from 3 "names"
    assert "203.0.113.41/32" in out.read_text()  # learned by address, like any flow without a usable name
    assert "<script>" not in out.read_text()


def test_a_flow_the_default_dropped_at_its_first_packet_was_never_inspected_and_is_not_learned(
    tmp_path: Path,
) -> None:
    evs = [
        event(0, "203.0.113.40", 443, "ok.example.org"),
        event(1, "203.0.113.30", 8080, None, verdict="drop", rule="default", reason="first-packet", would_drop=True),
    ]
    log = str(write_events(tmp_path / "e.jsonl", evs))
    text = learn(tmp_path / "strict", log).read_text()
    assert "203.0.113.30" not in text.split("# Would still be dropped")[0]
    assert "never inspected (dropped by the default at its first packet when recorded)" in text
    text = learn(tmp_path / "loose", log, extra=("--learn-uninspected",)).read_text()
    assert "- 203.0.113.30/32" in text.split("# Would still be dropped")[0]


def test_an_overload_event_is_never_learned(tmp_path: Path) -> None:
    evs = [
        event(0, "203.0.113.40", 443, "ok.example.org"),
        event(1, "203.0.113.31", 443, None, rule="on_overload", reason="overload", overload_count=40),
    ]
    text = learn(tmp_path, str(write_events(tmp_path / "e.jsonl", evs))).read_text()
    assert "203.0.113.31" not in text.split("# Would still be dropped")[0]
    assert "judged by on_overload" in text


def test_ipv6_destinations_are_learned_into_a_valid_policy(tmp_path: Path) -> None:
    evs = [
        event(0, "2001:db8:2::40", 443, "v6.example.org"),
        event(1, "2001:db8:2::41", 8443),
        event(2, "2001:db8:2::53", 53, "v6.example.org", proto="UDP"),
    ]
    log = write_events(tmp_path / "e.jsonl", evs)
    out = learn(tmp_path, str(log))
    assert validate(out) == []
    lists = yaml.safe_load(out.read_text())["lists"]
    assert lists["learned_tcp_8443_addresses"]["items"] == ["2001:db8:2::41/128"]
    assert lists["learned_udp_53_addresses"]["items"] == ["2001:db8:2::53/128"]
    pol = load_policy(out)
    assert all(pol.judge(f.facts()).action == "accept" for f in from_events(log))


def test_recorded_text_cannot_add_lines_to_the_proposed_policy(tmp_path: Path) -> None:
    evil = "x\ndefault: accept\nrules: []\n#"
    evs = [
        event(0, "203.0.113.40", 443, "ok.example.org", process={"name": evil}, container={"name": evil}),
        event(1, "203.0.113.30", 3333, "pool\nmode: monitor", verdict="drop", rule="drop-mining",
              detection={"kind": "mining.stratum", "evidence": "", "info": {}}, detections=["mining.stratum"]),
    ]  # fmt: skip
    out = learn(tmp_path, str(write_events(tmp_path / "e.jsonl", evs)))
    pol = load_policy(out)
    assert (pol.default, pol.mode) == ("drop", "enforce") and len(pol.rules) > 1
    text = out.read_text()
    assert "\\x0adefault: accept" in text and "\ndefault: accept" not in text
    assert "pool\\x0amode: monitor" in text
