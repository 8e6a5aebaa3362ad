"""Moving a node to deny-by-default, end to end: record in monitor mode -> learn -> enforce.

The real daemon records a node's traffic in ``mode: monitor`` (real dig, curl, ssh and a
Stratum miner against the lab's peers); ``egressd learn`` drafts a default-drop policy from
that event log plus the captures in ``pcaps/``; the draft must validate, accept every benign
flow it was learned from, still drop every mining / unlisted-SSH flow, and contain no
wildcard above a public suffix. Then the daemon enforces the draft on live traffic: what was
learned passes, the miner and the unlisted SSH server do not, and a destination never seen
is dropped by the default.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, Event
from publicsuffixlist import PublicSuffixList

from egressd import netfilter
from egressd.cli import main
from egressd.learn import NEVER_LEARN
from egressd.policy import Policy, load_policy, validate
from egressd.recorded import Flow, from_capture, from_events
from egressd_lab import peers
from egressd_lab.harness import policy_copy
from egressd_lab.netns import SERVICES

pytestmark = [*NEEDS_KERNEL[:2], pytest.mark.timeout(180)]
pytest_plugins = ["conftest_daemon"]

ROOT = Path(__file__).parent.parent.parent
PCAPS = sorted(str(p) for p in (ROOT / "pcaps").glob("*.pcap"))
TLS4 = SERVICES["tls"][0]
POOL = SERVICES["pool"][0]
EVIL = SERVICES["ssh_evil"][0]
BASTION = SERVICES["ssh_allowed"][0]
BULK = SERVICES["bulk"][0]
WG_PORT = 51820
# A WireGuard handshake initiation (148 bytes, type 1): what `wg-quick up` sends first.
WG_SEND = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    f"s.sendto(b'\\x01\\x00\\x00\\x00' + bytes(144), ('{BULK}', {WG_PORT}))"
)


@dataclass
class Learned:
    events: Path
    recorded: list[Event]
    proposed: Path
    policy: Policy
    rules_dir: Path


def forbidden(f: Flow) -> bool:
    return any(k == b or k.startswith(b + ".") for k in f.detections for b in NEVER_LEARN)


def node_traffic(dlab: DaemonLab) -> dict[str, bool]:
    """What a job on the node does; returns which steps succeeded."""
    ok: dict[str, bool] = {}
    for name in ("tls.example.net", "bastion.example.org"):
        p, _ = dlab.dig(name)
        ok[f"dig {name}"] = p.returncode == 0 and "ANSWER SECTION" in p.stdout
    p, _ = dlab.curl_tls("tls.example.net", TLS4)
    ok["https"] = p.returncode == 0 and p.stdout == "200"
    p, _ = dlab.run(dlab.peers.ssh(BASTION, "echo", "bastion-ok"))
    ok["ssh bastion"] = p.returncode == 0 and "bastion-ok" in p.stdout
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1")
    ok["stratum"] = rc == 0 and bool(rep["handshake_complete"])
    p, _ = dlab.run(dlab.peers.ssh(EVIL, "echo", "evil-ok"), timeout=20)
    ok["ssh evil"] = p.returncode == 0 and "evil-ok" in p.stdout
    p, _ = dlab.run([sys.executable, "-c", WG_SEND])
    ok["wireguard sent"] = p.returncode == 0
    return ok


@pytest.fixture(scope="module")
def learned(dlab: DaemonLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Learned]:
    tmp = tmp_path_factory.mktemp("learn")
    base = policy_copy(tmp)
    record = base.parent / "record.yaml"
    # The recording policy: the shipped default in monitor mode, so that every flow is
    # inspected to the end (names, detections) and nothing is dropped.
    record.write_text("extends: default.yaml\nmode: monitor\n")
    d = peers.start_egressd(dlab.lab, tmp, record, name="recorder")
    try:
        ok = node_traffic(dlab)
        # monitor mode: everything got through, the miner and the unlisted SSH server included
        assert all(ok.values()), ok
        d.wait_events(lambda e: e["dest_ip"] == EVIL, timeout=5)
        d.wait_events(lambda e: e["dest_port"] == WG_PORT, timeout=5)
    finally:
        assert d.stop(signal.SIGTERM) == 0
        netfilter.remove(netns=dlab.lab.node)
    out = tmp / "proposed.yaml"
    assert main(["learn", str(d.events_path), *PCAPS, "-o", str(out), "--base", str(base)]) == 0
    yield Learned(d.events_path, d.events(), out, load_policy(out), base.parent)


def test_the_recording_has_the_flows_the_test_made(learned: Learned) -> None:
    by_rule = {(e["dest_ip"], e["rule"]) for e in learned.recorded}
    assert (POOL, "drop-mining") in by_rule and (EVIL, "drop-ssh-unlisted") in by_rule
    assert (BULK, "alert-vpn-tunnels") in by_rule
    would = [e for e in learned.recorded if e.get("would_drop")]
    assert would and all(e["action"] == "allowed" and e["mode"] == "monitor" for e in would)
    named = {e.get("domain") for e in learned.recorded if e["dest_ip"] == TLS4 and e["dest_port"] == 443}
    assert "tls.example.net" in named


def test_the_proposal_validates_and_keeps_the_detection_rules_first(learned: Learned) -> None:
    assert validate(learned.proposed) == []
    p = learned.policy
    assert (p.default, p.mode) == ("drop", "enforce")
    base = load_policy(learned.rules_dir / "default.yaml")
    accept_at = next(i for i, r in enumerate(p.rules) if r.action == "accept")
    assert [r.name for r in p.rules[:accept_at]] == [r.name for r in base.rules if r.action != "accept"]


def test_every_benign_recorded_flow_is_accepted_and_every_bad_one_dropped(learned: Learned) -> None:
    benign = bad = 0
    for f in from_events(learned.events):
        dec = learned.policy.judge(f.facts())
        if forbidden(f) or (f.verdict == "drop" and f.rule != "default"):
            bad += 1
            assert dec.action == "drop", f"{f.label()} {f.detections}: {dec}"
        else:
            benign += 1
            assert dec.action == "accept", f"{f.label()} {f.domains}: {dec}"
    assert benign >= 4 and bad >= 2
    base = load_policy(learned.rules_dir / "default.yaml")
    for cap in PCAPS:
        before = {(f.src_port, f.dest_port): f for f in from_capture(cap, base)}
        for f in from_capture(cap, learned.policy):
            was = before[(f.src_port, f.dest_port)]
            # An alert rule of the base is a drop in the proposal (learn.py), e.g. alert-ssh-forwards.
            expect = "drop" if forbidden(was) or was.verdict in ("drop", "alert") else "accept"
            assert f.verdict == expect, f"{cap}: {f.label()} {was.detections} -> {f.verdict} by {f.rule}"


def test_names_not_addresses_and_no_wildcard_above_a_public_suffix(learned: Learned) -> None:
    data = yaml.safe_load(learned.proposed.read_text())
    learned_lists = {n: ls for n, ls in data["lists"].items() if n.startswith("learned_")}
    names = [i for ls in learned_lists.values() if ls["type"] == "domain" for i in ls["items"]]
    assert "tls.example.net" in names and "bastion.example.org" in names
    psl = PublicSuffixList()
    for item in names:
        if item.startswith("*."):
            assert not psl.is_public(item[2:]) and psl.privatesuffix(item[2:]) is not None, item
    cidrs = [i for ls in learned_lists.values() if ls["type"] == "cidr" for i in ls["items"]]
    assert f"{POOL}/32" not in cidrs and f"{EVIL}/32" not in cidrs
    assert not any(n.startswith(f"learned_udp_{WG_PORT}") for n in learned_lists)  # the tunnel was not learned
    assert "detection tunnel.wireguard" in learned.proposed.read_text()


def test_the_node_enforcing_the_proposal(dlab: DaemonLab, learned: Learned, tmp_path: Path) -> None:
    d = peers.start_egressd(dlab.lab, tmp_path, learned.proposed, name="enforcer")
    try:
        assert d.status()["mode"] == "enforce"
        ok = node_traffic(dlab)
        assert ok == {
            "dig tls.example.net": True,
            "dig bastion.example.org": True,
            "https": True,
            "ssh bastion": True,
            "stratum": False,
            "ssh evil": False,
            "wireguard sent": True,  # sent: UDP has no answer to wait for; the event says what happened
        }
        wg = d.wait_events(lambda e: e["dest_port"] == WG_PORT, timeout=3)
        # Not learned, so the default drops it at its first datagram, before any detector runs.
        assert wg and (wg[0]["rule"], wg[0]["action"]) == ("default", "blocked"), wg
        # A destination the node never used is dropped by the default.
        p = subprocess.run(
            dlab.lab.node_cmd(["curl", "-sS", "--max-time", "3", "-o", "/dev/null", f"http://{BULK}/"]),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert p.returncode != 0
        ev = d.wait_events(lambda e: e["dest_ip"] == BULK, timeout=3)
        assert ev and (ev[0]["rule"], ev[0]["action"]) == ("default", "blocked"), ev
    finally:
        d.stop(signal.SIGTERM)
        netfilter.remove(netns=dlab.lab.node)
