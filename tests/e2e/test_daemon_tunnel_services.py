"""Tunnel services by name, live: the real daemon, a real resolver (dnsmasq) and real TLS
(``openssl s_server`` / ``s_client``) in the lab's namespaces.

The lab's resolver answers the names tunnel agents dial (connect.ngrok-agent.com,
region1.v2.argotunnel.com) with a documentation address where a TLS server listens, and a
benign name with another. "Refused" means the TLS handshake never completed and the daemon's
event names drop-tunnel-service-names; every refusal has a benign control on the same path,
so a refusal never means "the lab was broken".
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd_lab import peers
from egressd_lab.harness import DNS_V4, PREFIX, adv_lab, live, need, write_policy
from egressd_lab.netns import SERVICES, Lab

pytestmark = live

TLS_V4 = SERVICES["tls"][0]  # the benign server: tls.example.net
EDGE_V4 = SERVICES["tls_pool"][0]  # stands in for the tunnel services' edge
AGENT_NAMES = ("connect.ngrok-agent.com", "region1.v2.argotunnel.com")
RULE, KIND = "drop-tunnel-service-names", "tunnel.service-domain"
RESOLVER = {
    "name": "accept-lab-resolver",
    "description": "the site's resolver, trusted by address (DNS answers still teach the daemon names)",
    "match": {"dst": f"{DNS_V4}/32"},
    "action": "accept",
}


@pytest.fixture(scope="module")
def lab_and_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, peers.Peer]]:
    need("dig", "dnsmasq", "openssl")
    tmp = tmp_path_factory.mktemp("svc")
    with adv_lab(PREFIX + "sv") as lb:
        names = {**peers.lab_dns_names(), **{n: [EDGE_V4] for n in AGENT_NAMES}}
        dns = peers.start_dnsmasq(lb, tmp, names, [DNS_V4])
        peers.start_tls_server(lb, tmp, peers.make_cert(tmp, ["tls.example.net"], "benign"), TLS_V4)
        peers.start_tls_server(lb, tmp, peers.make_cert(tmp, list(AGENT_NAMES), "edge"), EDGE_V4)
        yield lb, dns


@pytest.fixture
def slab(lab_and_dns: tuple[Lab, peers.Peer]) -> Lab:
    return lab_and_dns[0]


@pytest.fixture
def daemon(slab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[peers.Egressd]:
    rules: list[dict[str, Any]] = getattr(request, "param", [])
    d = peers.start_egressd(slab, tmp_path, write_policy(tmp_path, prepend_rules=rules))
    try:
        yield d
    finally:
        d.stop()


def dig(lb: Lab, name: str) -> subprocess.CompletedProcess[str]:
    return lb.run_node(["dig", "+short", "+time=2", "+tries=1", f"@{DNS_V4}", name], timeout=20)


def s_client(lb: Lab, addr: str, *sni: str) -> tuple[bool, float]:
    """One real TLS handshake from the node; (completed, seconds). ``sni`` empty: no SNI."""
    opts = ["-servername", sni[0]] if sni else ["-noservername"]
    t = time.monotonic()
    r = lb.run_node(["openssl", "s_client", "-connect", f"{addr}:443", *opts, "-brief"], timeout=20)
    return "CONNECTION ESTABLISHED" in r.stdout + r.stderr, time.monotonic() - t


def events_to(d: peers.Egressd, addr: str, port: int) -> list[dict[str, Any]]:
    time.sleep(0.3)  # the event is written after the verdict
    return [e for e in d.events() if e["dest_ip"] == addr and e["dest_port"] == port]


@pytest.mark.parametrize("daemon", [[RESOLVER]], indirect=True, ids=["resolver-trusted"])
@pytest.mark.parametrize("name", AGENT_NAMES)
def test_a_tunnel_service_resolved_by_the_node_is_refused_and_a_benign_name_passes(
    slab: Lab, daemon: peers.Egressd, name: str
) -> None:
    # Control first: the benign name resolves and its TLS handshake completes.
    assert dig(slab, "tls.example.net").stdout.split() == [TLS_V4]
    assert s_client(slab, TLS_V4, "tls.example.net")[0], "the lab's benign TLS path is broken"
    # The tunnel service's name resolves (the resolver is trusted) to its documentation address...
    assert dig(slab, name).stdout.split() == [EDGE_V4]
    # ...and the connection to that address is refused at its first packet, before any TLS:
    # no SNI is sent, so only the DNS answer can have named it.
    done, took = s_client(slab, EDGE_V4)
    assert not done and took < 5.0
    evs = events_to(daemon, EDGE_V4, 443)
    assert evs and {(e["rule"], e["action"], e["domain"]) for e in evs} == {(RULE, "blocked", name)}, evs
    assert {e["reason"] for e in evs} == {"first-packet"}, evs
    # Decided by the kernel: the DNS answer put the address in drop-tunnel-service-names's set.
    assert {e.get("kernel") for e in evs} == {True}, evs


def test_a_lookup_of_a_tunnel_service_gets_no_answer_and_never_reaches_the_resolver(
    slab: Lab, lab_and_dns: tuple[Lab, peers.Peer], daemon: peers.Egressd
) -> None:
    dns = lab_and_dns[1]
    assert dig(slab, "tls.example.net").stdout.split() == [TLS_V4]  # the control is answered
    before = dns.log_text().count("region1.v2.argotunnel.com")
    r = dig(slab, "region1.v2.argotunnel.com")
    assert EDGE_V4 not in r.stdout, r.stdout
    evs = [e for e in events_to(daemon, DNS_V4, 53) if e["domain"] == "region1.v2.argotunnel.com"]
    assert evs and evs[0]["rule"] == RULE and evs[0]["action"] == "blocked", evs
    assert evs[0]["detection"]["kind"] == KIND, evs
    assert dns.log_text().count("region1.v2.argotunnel.com") == before, "the query left the node"


@pytest.mark.parametrize("sni", ["connect.ngrok-agent.com", "h2.cftunnel.com"])
def test_tls_whose_sni_names_a_tunnel_service_is_refused_with_the_detection(
    slab: Lab, daemon: peers.Egressd, sni: str
) -> None:
    done, took = s_client(slab, EDGE_V4, sni)
    assert not done and took < 5.0
    evs = events_to(daemon, EDGE_V4, 443)
    assert [(e["rule"], e["action"], e["domain"], e["detection"]["kind"]) for e in evs] == [
        (RULE, "blocked", sni, KIND)
    ], evs


@pytest.mark.parametrize("sni", ["evil-ngrok-agent.com.example", "ngrok-agent.com.evil.example"])
def test_tls_to_a_lookalike_name_passes(slab: Lab, daemon: peers.Egressd, sni: str) -> None:
    # To the benign server: s_server serves one connection at a time, and the edge server may
    # still hold a connection whose ClientHello a test above dropped (its side never learns).
    done, _ = s_client(slab, TLS_V4, sni)
    assert done, f"a lookalike SNI {sni} was refused"
    evs = events_to(daemon, TLS_V4, 443)
    assert evs and all(e["rule"] != RULE and KIND not in e.get("detections", []) for e in evs), evs
