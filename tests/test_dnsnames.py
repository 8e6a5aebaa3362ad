"""egressd.dnsnames: the one place the engine learns names from DNS."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from egressd.dnsnames import DNS_PORTS, DnsNames, is_dns_port

ADDR = ipaddress.ip_address("203.0.113.30").packed


def query(name: str) -> bytes:
    return bytes(DNS(id=7, rd=1, qd=DNSQR(qname=name)))


def answer(name: str, ip: str = "203.0.113.30", ttl: int = 300) -> bytes:
    return bytes(DNS(id=7, qr=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, type="A", rdata=ip, ttl=ttl)))


def framed(*msgs: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in msgs)


@pytest.mark.parametrize(
    ("sport", "dport", "dns"), [(40000, 53, True), (53, 40000, True), (5353, 5353, True), (1, 2, False)]
)
def test_one_port_test_for_udp_and_tcp(sport: int, dport: int, dns: bool) -> None:
    assert is_dns_port(sport, dport) is dns
    assert {53, 5353} == DNS_PORTS


def test_udp_query_gives_the_flow_its_names_and_the_dns_finding() -> None:
    seen = DnsNames(16).observe(query("pool.example"), True, 1.0, tcp=False)
    assert seen.queries == ("pool.example",)
    assert seen.detection is not None and seen.detection.kind == "dns"
    assert seen.detection.info == {"qname": "pool.example"}


def test_a_query_from_the_responder_names_nothing() -> None:
    assert DnsNames(16).observe(query("pool.example"), False, 1.0, tcp=False).queries == ()


def test_udp_answers_are_learned_from_either_side_and_expire_after_ttl_and_grace() -> None:
    names = DnsNames(16)
    names.observe(answer("pool.example", ttl=30), True, 100.0, tcp=False)
    assert names.names_for(ADDR, 150.0) == ("pool.example",)
    assert names.names_for(ADDR, 100.0 + 30 + 60 + 1) == ()


def test_tcp_answers_are_learned_only_from_the_responder() -> None:
    names = DnsNames(16)
    names.observe(framed(answer("fake.example")), True, 1.0, tcp=True)
    assert names.names_for(ADDR, 2.0) == ()
    names.observe(framed(answer("pool.example")), False, 1.0, tcp=True)
    assert names.names_for(ADDR, 2.0) == ("pool.example",)


def test_pipelined_tcp_queries_are_all_seen() -> None:
    seen = DnsNames(16).observe(framed(query("a.example"), query("pool.example")), True, 1.0, tcp=True)
    assert seen.queries == ("a.example", "pool.example")


def test_several_names_per_address_newest_first_and_the_cache_is_bounded() -> None:
    names = DnsNames(2)
    for n in ("a.example", "b.example", "c.example", "d.example", "e.example"):
        names.observe(answer(n), False, 1.0, tcp=False)
    assert names.names_for(ADDR, 2.0) == ("e.example", "d.example", "c.example", "b.example")
    for i in range(5):
        names.observe(answer("x.example", f"203.0.113.{100 + i}"), False, 1.0, tcp=False)
    assert len(names) == 2


def test_garbage_teaches_nothing() -> None:
    names = DnsNames(16)
    assert names.observe(b"\x00\x01garbage", True, 1.0, tcp=False).queries == ()
    assert names.observe(b"\x00\x00\x00", False, 1.0, tcp=True).queries == ()
    assert len(names) == 0
