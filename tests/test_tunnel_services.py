"""Tunnel services named by the node: rules/lists/tunnel-services.yaml, the detection
``tunnel.service-domain`` (settings.tunnel_service_domains) and the shipped rule
drop-tunnel-service-names, from the list to the engine's verdict on crafted packets."""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import ssl
import textwrap
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP

from egressd.cli import main
from egressd.detect.kinds import KINDS, family_of
from egressd.engine import PIN_DENY, Engine
from egressd.paths import default_policy
from egressd.policy import FlowFacts, Policy, load_policy, validate

RULES = Path(__file__).resolve().parents[1] / "rules"
NODE, EDGE, RESOLVER, PROXY = "198.51.100.2", "203.0.113.70", "203.0.113.53", "203.0.113.50"
KIND = "tunnel.service-domain"
RULE = "drop-tunnel-service-names"

# What each tool's agent dials by default (the sources are cited in the list's header).
AGENT_NAMES = [
    "connect.ngrok-agent.com",  # ngrok agent v3, ngrok-go
    "tunnel.us.ngrok.com",  # ngrok legacy / SSH gateway ingress
    "_v2-origintunneld._tcp.argotunnel.com",  # cloudflared edge discovery (SRV)
    "region1.v2.argotunnel.com",  # its targets
    "protocol-v2.argotunnel.com",  # cloudflared protocol choice (TXT)
    "h2.cftunnel.com",  # cloudflared edge SNI, HTTP/2
    "quic.cftunnel.com",  # cloudflared edge SNI, QUIC
    "probe.cftunnel.com",  # cloudflared pre-flight probe SNI
    "update.argotunnel.com",  # cloudflared updater
    "api.trycloudflare.com",  # cloudflared quick tunnels
    "localtunnel.me",  # localtunnel client default host
    "abcdefgh.loca.lt",
    "bore.pub",
    "controlplane.tailscale.com",
    "derp1f.tailscale.com",
    "log.tailscale.io",
    "a.pinggy.io",
    "free.pinggy.io",
    "localhost.run",
    "serveo.net",
    "control.playit.gg",
]
# Names that must never match: lookalikes around a listed name, and websites left out on purpose.
NOT_AGENT_NAMES = [
    "evil-ngrok-agent.com.example",
    "ngrok-agent.com.evil.example",
    "notngrok-agent.com",
    "ngrok.com",
    "tunnel.ngrok.com.evil.example",
    "argotunnel.com.example",
    "tailscale.com",
    "pinggy.io",
    "bore.pub.example",
    "pypi.org",
]


@pytest.fixture(scope="module")
def default() -> Policy:
    return load_policy(default_policy())


@pytest.fixture(scope="module")
def allowlist() -> Policy:
    return load_policy(RULES / "allowlist.yaml")


def facts(dport: int, domains: tuple[str, ...], detections: tuple[str, ...], proto: int = 6) -> FlowFacts:
    d = ipaddress.ip_address(EDGE)
    return FlowFacts(
        proto, 4, ipaddress.ip_address(NODE).packed, d.packed, 40000, dport, domains, detections, "pending"
    )


# -- the kind and the list ----------------------------------------------------------------------
def test_the_kind_is_registered_in_the_tunnel_family() -> None:
    assert KIND in KINDS and "tunnel service" in KINDS[KIND]
    fam = family_of(KIND)
    assert fam.prefix == "tunnel" and fam.alert


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_the_shipped_list_names_each_agents_endpoint(default: Policy, name: str) -> None:
    assert default.tunnel_service_domains.match(name) is not None


@pytest.mark.parametrize("name", NOT_AGENT_NAMES)
def test_lookalikes_and_websites_are_not_in_the_list(default: Policy, name: str) -> None:
    assert default.tunnel_service_domains.match(name) is None


def test_the_list_is_not_the_pool_list(default: Policy) -> None:
    assert default.pool_domains.match("connect.ngrok-agent.com") is None
    assert default.tunnel_service_domains.match("xmr-eu1.nanopool.org") is None


# -- the shipped policies -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dport", "detections", "proto"),
    [
        (443, ("tls", KIND), 6),  # the TLS SNI
        (443, (), 6),  # the DNS answer that gave the address: known at the first packet
        (7844, (), 17),  # cloudflared's QUIC edge port, by the DNS answer
        (3128, ("proxy.http-connect", KIND), 6),  # the CONNECT host
    ],
)
@pytest.mark.parametrize("name", ["connect.ngrok-agent.com", "region1.v2.argotunnel.com"])
def test_default_drops_a_tunnel_service_by_name(
    default: Policy, name: str, dport: int, detections: tuple[str, ...], proto: int
) -> None:
    d = default.judge(facts(dport, (name,), detections, proto))
    assert (d.action, d.rule) == ("drop", RULE)


def test_default_drops_the_lookup_of_a_tunnel_service(default: Policy) -> None:
    d = default.judge(facts(53, ("api.trycloudflare.com",), ("dns", KIND), proto=17))
    assert (d.action, d.rule) == ("drop", RULE)


@pytest.mark.parametrize("name", ["evil-ngrok-agent.com.example", "ngrok-agent.com.evil.example", "pypi.org"])
def test_default_accepts_lookalikes_and_benign_names(default: Policy, name: str) -> None:
    assert default.judge(facts(443, (name,), ("tls",))).action == "accept"


def test_the_rule_sits_right_after_the_pool_names_rule(default: Policy) -> None:
    names = [r.name for r in default.rules]
    assert names.index(RULE) == names.index("drop-mining-pool-names") + 1


def test_allowlist_drops_a_tunnel_service_even_on_an_allowed_port(allowlist: Policy) -> None:
    assert allowlist.tunnel_service_domains.match("h2.cftunnel.com") == "*.cftunnel.com"
    d = allowlist.judge(facts(443, ("h2.cftunnel.com",), ("tls", KIND)))
    assert (d.action, d.rule) == ("drop", RULE)


# -- the engine on crafted packets ---------------------------------------------------------------
def client_hello(sni: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def tcp(dst: str, dport: int, sport: int, payload: bytes) -> list[bytes]:
    """SYN, SYN-ACK and one data segment from the node."""
    syn = IP(src=NODE, dst=dst) / TCP(sport=sport, dport=dport, flags="S", seq=999)
    synack = IP(src=dst, dst=NODE) / TCP(sport=dport, dport=sport, flags="SA", seq=4999, ack=1000)
    data = IP(src=NODE, dst=dst) / TCP(sport=sport, dport=dport, flags="PA", seq=1000) / payload
    return [bytes(syn), bytes(synack), bytes(data)]


def feed(eng: Engine, pkts: list[bytes]) -> list[int]:
    return [eng.feed(p, 100.0 + i * 0.001) for i, p in enumerate(pkts)]


@pytest.mark.parametrize("sni", ["connect.ngrok-agent.com", "h2.cftunnel.com", "api.trycloudflare.com"])
def test_a_tls_sni_naming_a_tunnel_service_is_dropped_with_the_detection(default: Policy, sni: str) -> None:
    eng = Engine(default)
    assert feed(eng, tcp(EDGE, 443, 41000, client_hello(sni)))[-1] == PIN_DENY
    ev = eng.events[-1]
    assert (ev.rule, ev.action, ev.domain) == (RULE, "blocked", sni)
    assert ev.detection is not None and ev.detection["kind"] == KIND
    assert sni in ev.detection["evidence"]


@pytest.mark.parametrize("sni", ["evil-ngrok-agent.com.example", "ngrok-agent.com.evil.example", "pypi.org"])
def test_a_lookalike_or_benign_sni_is_not_a_tunnel_service(default: Policy, sni: str) -> None:
    eng = Engine(default)
    assert PIN_DENY not in feed(eng, tcp(EDGE, 443, 41001, client_hello(sni)))
    assert all(KIND not in ev.detections for ev in eng.events)


def test_a_dns_query_for_a_tunnel_service_is_dropped_with_the_detection(default: Policy) -> None:
    eng = Engine(default)
    q = (
        IP(src=NODE, dst=RESOLVER)
        / UDP(sport=5353 + 1, dport=53)
        / DNS(rd=1, qd=DNSQR(qname="region1.v2.argotunnel.com"))
    )
    assert eng.feed(bytes(q), 10.0) == PIN_DENY
    ev = eng.events[-1]
    assert (ev.rule, ev.domain) == (RULE, "region1.v2.argotunnel.com")
    assert ev.detection is not None and ev.detection["kind"] == KIND


def test_a_dns_query_for_a_lookalike_is_not_dropped(default: Policy) -> None:
    eng = Engine(default)
    q = (
        IP(src=NODE, dst=RESOLVER)
        / UDP(sport=5400, dport=53)
        / DNS(rd=1, qd=DNSQR(qname="ngrok-agent.com.evil.example"))
    )
    assert eng.feed(bytes(q), 10.0) != PIN_DENY
    assert all(KIND not in ev.detections for ev in eng.events)


def test_an_address_a_dns_answer_gave_for_a_tunnel_service_is_dropped_at_its_syn(default: Policy) -> None:
    eng = Engine(default)
    # Only the answer is seen (the query went out before the capture or through a trusted
    # resolver rule): the address still carries the name.
    a = (
        IP(src=RESOLVER, dst=NODE)
        / UDP(sport=53, dport=5401)
        / DNS(
            qr=1,
            qd=DNSQR(qname="connect.ngrok-agent.com"),
            an=DNSRR(rrname="connect.ngrok-agent.com", rdata=EDGE, ttl=30),
        )
    )
    eng.feed(bytes(a), 10.0)
    syn = IP(src=NODE, dst=EDGE) / TCP(sport=41002, dport=443, flags="S", seq=999)
    assert eng.feed(bytes(syn), 11.0) == PIN_DENY
    ev = eng.events[-1]
    assert (ev.rule, ev.domain) == (RULE, "connect.ngrok-agent.com")


def test_a_connect_host_naming_a_tunnel_service_is_dropped(default: Policy) -> None:
    eng = Engine(default)
    req = b"CONNECT api.trycloudflare.com:443 HTTP/1.1\r\nHost: api.trycloudflare.com:443\r\n\r\n"
    assert feed(eng, tcp(PROXY, 3128, 41003, req))[-1] == PIN_DENY
    ev = eng.events[-1]
    assert (ev.rule, ev.domain) == (RULE, "api.trycloudflare.com")
    assert {"proxy.http-connect", KIND} <= set(ev.detections)


def test_the_setting_is_what_raises_the_detection(tmp_path: Path) -> None:
    """Without settings.tunnel_service_domains the names are only a list: no detection."""
    body = (
        'lists:\n  t: {type: domain, items: ["*.ngrok-agent.com"]}\n'
        "rules:\n  - {name: k, description: the kind, match: {detection: tunnel.service-domain}, action: drop}\n"
    )
    with_setting = tmp_path / "with.yaml"
    with_setting.write_text("default: accept\nsettings: {tunnel_service_domains: t}\n" + body)
    without = tmp_path / "without.yaml"
    without.write_text("default: accept\n" + body)
    last = {}
    for path in (with_setting, without):
        eng = Engine(load_policy(path))
        last[path.stem] = feed(eng, tcp(EDGE, 443, 41004, client_hello("connect.ngrok-agent.com")))[-1]
    assert last["with"] == PIN_DENY and last["without"] != PIN_DENY


def test_a_pool_name_and_a_tunnel_name_are_each_their_own_finding(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            default: accept
            settings: {pool_domains: p, tunnel_service_domains: t}
            lists:
              p: {type: domain, items: [pool.example]}
              t: {type: domain, items: [tunnel.example]}
            rules:
              - {name: pools, description: pool names, match: {detection: mining.pool-domain}, action: drop}
              - {name: tunnels, description: tunnel names, match: {detection: tunnel.service-domain}, action: drop}
            """
        )
    )
    eng = Engine(load_policy(path))
    for sport, name, rule, kind, other in (
        (5402, "pool.example", "pools", "mining.pool-domain", KIND),
        (5403, "tunnel.example", "tunnels", KIND, "mining.pool-domain"),
    ):
        q = IP(src=NODE, dst=RESOLVER) / UDP(sport=sport, dport=53) / DNS(rd=1, qd=DNSQR(qname=name))
        assert eng.feed(bytes(q), 10.0) == PIN_DENY
        ev = eng.events[-1]
        assert ev.rule == rule and kind in ev.detections and other not in ev.detections


# -- validation: the setting must name a domain list ---------------------------------------------
def test_the_setting_must_name_a_domain_list(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nsettings: {tunnel_service_domains: t}\nlists:\n  t: {type: port, items: [1]}\n")
    (d,) = validate(path)
    assert (d.file, d.line, d.col) == (str(path), 2, path.read_text().splitlines()[1].index("t}") + 1)
    assert "list 't' is a port list, but 'tunnel_service_domains' needs a domain list" in d.message


def test_the_setting_must_name_a_defined_list(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nsettings:\n  tunnel_service_domains: tunnel_servce_domains\nlists:\n"
                    "  tunnel_service_domains: {type: domain, items: [a.example]}\n")  # fmt: skip
    (d,) = validate(path)
    assert (d.file, d.line) == (str(path), 3)
    assert "list 'tunnel_servce_domains' is not defined" in d.message and "tunnel_service_domains" in d.message


def test_the_setting_must_be_a_name_not_a_list_of_names(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nsettings:\n  tunnel_service_domains: [a, b]\n")
    (d,) = validate(path)
    assert (d.file, d.line) == (str(path), 3)
    assert "tunnel_service_domains" in d.message


def test_egressd_validate_rejects_a_bad_setting_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nsettings: {tunnel_service_domains: nope}\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "list 'nope' is not defined" in err
    good = tmp_path / "good.yaml"
    good.write_text(
        "default: accept\nsettings: {tunnel_service_domains: t}\nlists:\n  t: {type: domain, items: [x.example]}\n"
    )
    assert main(["validate", str(good)]) == 0


def test_a_site_layer_keeps_the_setting_or_points_it_at_its_own_list(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    kept = rules / "site.yaml"
    kept.write_text("extends: default.yaml\nsettings: {max_packets: 16}\n")
    pol = load_policy(kept)
    assert pol.settings.tunnel_service_domains == "tunnel_service_domains"  # the base's, kept
    assert pol.tunnel_service_domains.match("h2.cftunnel.com") == "*.cftunnel.com"
    own = rules / "own.yaml"
    own.write_text(
        "extends: default.yaml\nsettings: {tunnel_service_domains: site_tunnels}\n"
        "lists:\n  site_tunnels: {type: domain, items: [tunnel.corp.example]}\n"
    )
    pol = load_policy(own)
    assert pol.tunnel_service_domains.match("tunnel.corp.example") == "tunnel.corp.example"
    assert pol.tunnel_service_domains.match("h2.cftunnel.com") is None
