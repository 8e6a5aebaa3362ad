"""Golden tests for the tunnels that are not SSH: every capture in pcaps/tunnels/ replays to
what its expectation file says under the shipped default policy.

The captures are real programs (localtunnel, websockify + OpenSSH, iodine, dns2tcp,
ptunnel-ng, OpenVPN, wireguard-go, ike-scan, tinc, Nebula, Tor, httptunnel, shadowsocks-libev
+ simple-obfs) and
benign look-alikes (a WebSocket chat, long legitimate DNS names, ping, a large upload,
HTTPS to a bare IP), recorded by pcaps/make_tunnels.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egressd.cli import main

DIR = Path(__file__).resolve().parents[1] / "pcaps" / "tunnels"
PCAPS = sorted(DIR.glob("*.pcap"))
BENIGN = [p for p in PCAPS if p.stem.startswith("benign-")]


def test_every_tunnel_family_of_the_issue_has_a_capture() -> None:
    stems = {p.stem for p in PCAPS}
    for prefix in ("reverse-http", "websocket-ssh", "websocket-stratum", "websocket-socks5", "dns-", "icmp-",
                   "openvpn-udp", "wireguard", "ike", "tinc", "nebula", "tor", "httptunnel", "shadowsocks",
                   "benign-websocket", "benign-dns", "benign-ping", "benign-http-upload",
                   "benign-https-bare-ip", "vtun", "yggdrasil"):  # fmt: skip
        assert any(s.startswith(prefix) for s in stems), prefix


@pytest.mark.parametrize("pcap", PCAPS, ids=[p.stem for p in PCAPS])
def test_tunnel_capture_replays_as_expected(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect = pcap.with_suffix(".expect.yaml")
    assert expect.is_file(), f"{pcap.name} has no expectation file"
    rc = main(["test", str(pcap), "--expect", str(expect), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


@pytest.mark.parametrize("pcap", BENIGN, ids=[p.stem for p in BENIGN])
def test_benign_look_alikes_raise_no_tunnel_finding_at_all(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(pcap), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events
    for e in events:
        assert e["verdict"] == "accept", e
        assert not [k for k in e.get("detections") or [] if k.startswith("tunnel")], e


def test_every_tunnel_finding_carries_evidence(capsys: pytest.CaptureFixture[str]) -> None:
    seen = set()
    for pcap in PCAPS:
        assert main(["test", str(pcap), "--json"]) in (0, 1)
        for line in capsys.readouterr().out.splitlines():
            det = json.loads(line).get("detection") or {}
            if det.get("kind", "").startswith("tunnel."):
                assert len(det["evidence"]) > 20, det
                seen.add(det["kind"])
    assert {"tunnel.reverse-http", "tunnel.websocket", "tunnel.dns", "tunnel.icmp", "tunnel.openvpn",
            "tunnel.wireguard", "tunnel.ike", "tunnel.tinc", "tunnel.nebula", "tunnel.tor", "tunnel.http",
            "tunnel.unknown-encrypted"} <= seen, seen  # fmt: skip
