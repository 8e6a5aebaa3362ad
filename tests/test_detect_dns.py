"""DNS message parsing and detection, specified with messages built per RFC 1035 §4.1.

A second, independent encoder (scapy's DNS layer) builds the realistic response, so the
parser is not only checked against this file's own idea of the format.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect import dns as dns_module
from egressd.detect.base import DNS, NEED_MORE, NOT_THIS, Detection, StreamContext
from egressd.detect.dns import (
    MAX_TCP_MESSAGES,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_TXT,
    DnsMessage,
    answers_by_ip,
    detect_dns_datagram,
    detect_dns_stream,
    iter_tcp_messages,
    parse_message,
    read_name,
)

CTX = StreamContext(sport=40000, dport=53)
QUERY = 0x0100  # RD
RESPONSE = 0x8180  # QR RD RA
NXDOMAIN = 0x8183

IP1 = ipaddress.ip_address("203.0.113.5").packed
IP2 = ipaddress.ip_address("198.51.100.7").packed
IP6 = ipaddress.ip_address("2001:db8::1").packed


# --- building messages ------------------------------------------------------------------------


def name(text: str) -> bytes:
    """Uncompressed wire name."""
    out = b""
    for label in text.split(".") if text else []:
        out += bytes([len(label)]) + label.encode("latin-1")
    return out + b"\x00"


def header(flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, ident: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def question(wire_name: bytes, qtype: int = TYPE_A) -> bytes:
    return wire_name + struct.pack("!HH", qtype, 1)


def rr(wire_name: bytes, rtype: int, rdata: bytes, ttl: int = 300, rclass: int = 1) -> bytes:
    return wire_name + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def pointer(offset: int) -> bytes:
    return struct.pack("!H", 0xC000 | offset)


def query(qname: str, qtype: int = TYPE_A) -> bytes:
    return header(QUERY) + question(name(qname), qtype)


def parsed(msg: bytes) -> DnsMessage:
    m = parse_message(msg)
    assert m is not None
    return m


def cname_response() -> bytes:
    """www.example.com -> CNAME edge.cdn.example -> CNAME e1.cdn.example -> A 203.0.113.5,
    every owner name and the second target compressed against earlier names."""
    q = question(name("www.example.com"))
    # offsets: header 12, question name at 12
    a1 = rr(pointer(12), TYPE_CNAME, name("edge.cdn.example"))
    edge_at = 12 + len(q) + 12  # rdata of a1: after its 2-byte name and 10 fixed bytes
    a2 = rr(pointer(edge_at), TYPE_CNAME, b"\x02e1" + pointer(edge_at + 5))
    e1_at = 12 + len(q) + len(a1) + 12
    a3 = rr(pointer(e1_at), TYPE_A, IP1, ttl=60)
    return header(RESPONSE, an=3) + q + a1 + a2 + a3


# --- questions and names ------------------------------------------------------------------


def test_query_gives_name_type_and_class() -> None:
    m = parsed(query("pool.example.net", TYPE_AAAA))
    assert [(q.name, q.qtype, q.qclass) for q in m.questions] == [("pool.example.net", TYPE_AAAA, 1)]
    assert not m.is_response


def test_names_are_lowercased() -> None:
    assert parsed(query("WWW.Example.COM")).questions[0].name == "www.example.com"


def test_root_name_is_empty_string() -> None:
    assert parsed(header(QUERY) + question(b"\x00", 2)).questions[0].name == ""


def test_query_only_message_has_no_records() -> None:
    m = parsed(query("example.com"))
    assert (m.answers, m.authority, m.additional) == ((), (), ())


def test_header_fields_are_decoded() -> None:
    m = parsed(header(NXDOMAIN | 0x0200, ident=0xBEEF) + question(name("nope.example")))
    assert (m.id, m.is_response, m.rcode, m.truncated, m.opcode) == (0xBEEF, True, 3, True, 0)


def test_dot_inside_a_label_is_escaped_not_a_separator() -> None:
    wire = b"\x03a.b\x07example\x00"
    assert parsed(header(QUERY) + question(wire)).questions[0].name == "a\\046b.example"


def test_binary_label_bytes_are_escaped() -> None:
    wire = b"\x03\x00\xff\x20\x07example\x00"
    assert parsed(header(QUERY) + question(wire)).questions[0].name == "\\000\\255\\032.example"


def test_bytes_after_the_last_record_are_tolerated() -> None:
    assert parsed(query("example.com") + b"\x00\x00\x00").questions[0].name == "example.com"


# --- answers -------------------------------------------------------------------------------


def test_a_and_aaaa_answers_map_to_the_question() -> None:
    qn = name("example.com")
    msg = (
        header(RESPONSE, an=2) + question(qn) + rr(pointer(12), TYPE_A, IP1) + rr(pointer(12), TYPE_AAAA, IP6)
    )
    assert answers_by_ip(parsed(msg)) == [(IP1, "example.com", 300), (IP6, "example.com", 300)]


def test_cname_chain_leads_back_to_the_question_name() -> None:
    assert answers_by_ip(parsed(cname_response())) == [(IP1, "www.example.com", 60)]


def test_cname_chain_is_followed_whatever_the_answer_order() -> None:
    msg = (
        header(RESPONSE, an=3)
        + question(name("www.example.com"))
        + rr(name("e1.cdn.example"), TYPE_A, IP1)
        + rr(name("edge.cdn.example"), TYPE_CNAME, name("e1.cdn.example"))
        + rr(name("www.example.com"), TYPE_CNAME, name("edge.cdn.example"))
    )
    assert answers_by_ip(parsed(msg)) == [(IP1, "www.example.com", 300)]


def test_cname_targets_are_decompressed() -> None:
    targets = [r.target for r in parsed(cname_response()).answers if r.rtype == TYPE_CNAME]
    assert targets == ["edge.cdn.example", "e1.cdn.example"]


def test_address_for_a_name_outside_the_chain_is_not_attributed() -> None:
    msg = (
        header(RESPONSE, an=2)
        + question(name("example.com"))
        + rr(pointer(12), TYPE_A, IP1)
        + rr(name("victim.example"), TYPE_A, IP2)
    )
    assert answers_by_ip(parsed(msg)) == [(IP1, "example.com", 300)]


def test_additional_section_addresses_are_not_attributed() -> None:
    msg = header(RESPONSE, an=1, ar=1) + question(name("example.com"))
    msg += rr(pointer(12), TYPE_A, IP1) + rr(pointer(12), TYPE_A, IP2)
    assert [ip for ip, _, _ in answers_by_ip(parsed(msg))] == [IP1]


def test_cname_loop_ends_the_walk() -> None:
    msg = (
        header(RESPONSE, an=3)
        + question(name("a.example"))
        + rr(name("a.example"), TYPE_CNAME, name("b.example"))
        + rr(name("b.example"), TYPE_CNAME, name("a.example"))
        + rr(name("b.example"), TYPE_A, IP1)
    )
    assert answers_by_ip(parsed(msg)) == [(IP1, "a.example", 300)]


def test_query_has_no_addresses_to_attribute() -> None:
    msg = header(QUERY, an=1) + question(name("example.com")) + rr(pointer(12), TYPE_A, IP1)
    assert answers_by_ip(parsed(msg)) == []


def test_nxdomain_has_no_addresses() -> None:
    assert answers_by_ip(parsed(header(NXDOMAIN) + question(name("nope.example")))) == []


def test_ttl_with_top_bit_set_is_treated_as_zero() -> None:
    msg = (
        header(RESPONSE, an=1) + question(name("example.com")) + rr(pointer(12), TYPE_A, IP1, ttl=0x80000001)
    )
    assert answers_by_ip(parsed(msg))[0][2] == 0


def test_a_record_with_wrong_length_is_malformed() -> None:
    msg = header(RESPONSE, an=1) + question(name("example.com")) + rr(pointer(12), TYPE_A, IP1 + b"\x00")
    assert parse_message(msg) is None


def test_cname_rdata_name_must_end_at_rdlength() -> None:
    msg = (
        header(RESPONSE, an=1)
        + question(name("example.com"))
        + rr(pointer(12), TYPE_CNAME, name("x.example") + b"!")
    )
    assert parse_message(msg) is None


def test_response_built_by_scapy_maps_addresses_to_the_question() -> None:
    dns = pytest.importorskip("scapy.layers.dns")
    resp = dns.DNS(
        id=7,
        qr=1,
        rd=1,
        ra=1,
        qd=dns.DNSQR(qname="Api.Example.ORG.", qtype="A"),
        an=[
            dns.DNSRR(rrname="api.example.org.", type="CNAME", ttl=30, rdata="lb.example.net."),
            dns.DNSRR(rrname="lb.example.net.", type="A", ttl=20, rdata="203.0.113.5"),
            dns.DNSRR(rrname="lb.example.net.", type="A", ttl=20, rdata="198.51.100.7"),
        ],
    )
    m = parsed(bytes(resp))
    assert answers_by_ip(m) == [(IP1, "api.example.org", 20), (IP2, "api.example.org", 20)]


# --- compression and hostile names ------------------------------------------------------------


def test_compression_pointer_into_the_question_is_followed() -> None:
    msg = (
        header(RESPONSE, an=1)
        + question(name("www.example.com"))
        + rr(b"\x04mail" + pointer(16), TYPE_A, IP1)
    )
    assert parsed(msg).answers[0].name == "mail.example.com"


def test_pointer_to_itself_is_malformed() -> None:
    assert parse_message(header(QUERY) + pointer(12) + b"\x00\x01\x00\x01") is None


def test_two_pointers_pointing_at_each_other_are_malformed() -> None:
    # name at 12 is a label then a pointer to 17; at 17 a pointer back to 12.
    body = b"\x03abc" + pointer(17) + pointer(12) + b"\x00\x01\x00\x01"
    assert parse_message(header(QUERY) + body) is None


def test_pointer_back_into_the_run_it_came_from_is_malformed() -> None:
    # A run at 12 ("a", then "b") whose pointer returns to the run's own start.
    body = b"\x01a\x01b" + pointer(12) + b"\x00\x01\x00\x01"
    assert parse_message(header(QUERY) + body) is None


def test_forward_pointer_is_malformed() -> None:
    body = pointer(40) + b"\x00\x01\x00\x01" + b"\x00" * 40
    assert parse_message(header(QUERY) + body) is None


def test_chain_of_backward_pointers_is_followed() -> None:
    msg = header(RESPONSE, an=2) + question(name("example.com"))  # "example" at 12, "com" at 20
    first = rr(b"\x03cdn" + pointer(12), TYPE_A, IP1)  # cdn.example.com at 29
    second = rr(b"\x04edge" + pointer(29), TYPE_A, IP2)
    assert [r.name for r in parsed(msg + first + second).answers] == [
        "cdn.example.com",
        "edge.cdn.example.com",
    ]


def test_label_length_64_is_malformed() -> None:
    assert parse_message(header(QUERY) + question(b"\x40" + b"a" * 64 + b"\x00")) is None


def test_label_of_63_bytes_is_fine() -> None:
    assert parsed(query("a" * 63 + ".example")).questions[0].name == "a" * 63 + ".example"


def test_name_of_255_wire_bytes_is_fine() -> None:
    text = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name(text)) == 255
    assert parsed(query(text)).questions[0].name == text


def test_name_over_255_wire_bytes_is_malformed() -> None:
    text = ".".join(["a" * 63] * 3 + ["b" * 62])
    assert len(name(text)) == 256
    assert parse_message(query(text)) is None


def test_name_over_255_built_from_pointers_is_malformed() -> None:
    long = ".".join(["a" * 63] * 3 + ["b" * 50])  # 244 wire bytes, at offset 12
    msg = header(RESPONSE, an=1) + question(name(long))
    msg += rr(b"\x0ccccccccccccc" + pointer(12), TYPE_A, IP1)
    assert parse_message(msg) is None


def test_many_pointers_to_one_long_name_decode_its_labels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    real = dns_module._label_text

    def counting(label: bytes) -> str:
        decoded.append(label)
        return real(label)

    monkeypatch.setattr(dns_module, "_label_text", counting)
    long = ".".join(["a"] * 127)  # 127 labels, 255 wire bytes
    count = 2000
    msg = header(RESPONSE, an=count) + question(name(long), TYPE_TXT)
    msg += rr(pointer(12), TYPE_TXT, b"") * count
    m = parsed(msg)
    assert {r.name for r in m.answers} == {long}
    assert len(decoded) == 127


def test_name_of_255_wire_bytes_through_an_already_read_suffix_is_fine() -> None:
    msg = header(RESPONSE, an=2) + question(name("x" * 63 + "." + "y" * 63 + ".example"), TYPE_TXT)
    y_at = 12 + 64  # the "yyy...example" suffix, 73 wire bytes
    msg += rr(b"\x03abc" + pointer(y_at), TYPE_TXT, b"")
    prefix = name("p" * 63 + "." + "q" * 63 + "." + "r" * 53)[:-1]  # 182 wire bytes, no root
    msg += rr(prefix + pointer(y_at), TYPE_TXT, b"")
    answers = parsed(msg).answers
    assert answers[1].name == "p" * 63 + "." + "q" * 63 + "." + "r" * 53 + "." + "y" * 63 + ".example"


def test_extended_label_type_is_malformed() -> None:
    assert parse_message(header(QUERY) + b"\x41\x00" + b"\x00\x01\x00\x01") is None


# --- truncation and counts --------------------------------------------------------------------


def test_every_truncation_of_a_response_is_malformed() -> None:
    msg = cname_response()
    assert parsed(msg).answers
    assert all(parse_message(msg[:k]) is None for k in range(len(msg)))


def test_counts_beyond_the_bytes_present_are_malformed() -> None:
    assert parse_message(header(RESPONSE, qd=1, an=0xFFFF) + question(name("example.com"))) is None


def test_rdlength_beyond_the_message_is_malformed() -> None:
    msg = header(RESPONSE, an=1) + question(name("example.com")) + pointer(12)
    msg += struct.pack("!HHIH", TYPE_TXT, 1, 60, 500) + b"\x04text"
    assert parse_message(msg) is None


# --- DNS over TCP framing ---------------------------------------------------------------------


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def test_tcp_stream_yields_complete_messages() -> None:
    a, b = query("a.example"), query("b.example", TYPE_AAAA)
    assert iter_tcp_messages(framed(a) + framed(b)) == [a, b]


def test_tcp_stream_split_anywhere_yields_only_complete_messages() -> None:
    a, b = query("a.example"), query("b.example")
    stream = framed(a) + framed(b)
    for cut in range(len(stream) + 1):
        expected = [m for m, end in ((a, len(a) + 2), (b, len(stream))) if end <= cut]
        assert iter_tcp_messages(stream[:cut]) == expected, cut


def test_tcp_zero_length_frame_stops_the_walk() -> None:
    a = query("a.example")
    assert iter_tcp_messages(framed(a) + b"\x00\x00" + framed(a)) == [a]


def test_tcp_message_count_is_bounded() -> None:
    a = query("a.example")
    assert len(iter_tcp_messages(framed(a) * (MAX_TCP_MESSAGES + 10))) == MAX_TCP_MESSAGES


# --- detection --------------------------------------------------------------------------------


def test_query_datagram_is_detected_with_name_and_type() -> None:
    result = detect_dns_datagram(query("Example.com"), from_originator=True)
    assert isinstance(result, Detection)
    assert result.kind == DNS
    assert result.evidence == "query example.com A"
    assert result.info == {"qname": "example.com", "qtype": "A", "rcode": "NOERROR"}


def test_answer_datagram_evidence_names_the_address() -> None:
    result = detect_dns_datagram(cname_response(), from_originator=False)
    assert isinstance(result, Detection)
    assert result.evidence == "answer www.example.com -> 203.0.113.5"


def test_nxdomain_answer_reports_the_rcode() -> None:
    result = detect_dns_datagram(header(NXDOMAIN) + question(name("nope.example")), from_originator=False)
    assert isinstance(result, Detection)
    assert result.info["rcode"] == "NXDOMAIN"
    assert "NXDOMAIN" in result.evidence


def test_answer_without_a_question_names_its_first_record() -> None:
    msg = header(0x8400, qd=0, an=1) + rr(name("printer.local"), TYPE_A, IP1)
    result = detect_dns_datagram(msg, from_originator=False)
    assert isinstance(result, Detection)
    assert result.evidence == "answer printer.local A NOERROR"
    assert result.info["qname"] == ""


def test_unknown_qtype_is_named_per_rfc_3597() -> None:
    result = detect_dns_datagram(query("example.com", 65280), from_originator=True)
    assert isinstance(result, Detection)
    assert result.info["qtype"] == "TYPE65280"


def test_query_sent_by_the_responder_is_flagged() -> None:
    result = detect_dns_datagram(query("example.com"), from_originator=False)
    assert isinstance(result, Detection)
    assert result.info.get("odd_direction") == "1"


def test_ordinary_query_is_not_flagged_for_direction() -> None:
    result = detect_dns_datagram(query("example.com"), from_originator=True)
    assert isinstance(result, Detection)
    assert "odd_direction" not in result.info


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x00" * 12,  # a "query" without a question
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x12\x34\x18\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",  # opcode 3
        b"",
    ],
)
def test_non_dns_datagrams_are_not_this(payload: bytes) -> None:
    assert detect_dns_datagram(payload, from_originator=True) is NOT_THIS


def test_tcp_query_is_detected() -> None:
    result = detect_dns_stream(framed(query("example.com", TYPE_TXT)), b"", CTX)
    assert isinstance(result, Detection)
    assert result.evidence == "query example.com TXT"


def test_tcp_query_split_needs_more_until_complete() -> None:
    stream = framed(query("example.com"))
    assert all(detect_dns_stream(stream[:k], b"", CTX) is NEED_MORE for k in range(len(stream)))
    assert isinstance(detect_dns_stream(stream, b"", CTX), Detection)


def test_tcp_partial_query_is_not_this_once_the_originator_closed() -> None:
    closed = StreamContext(sport=40000, dport=53, fwd_closed=True)
    assert detect_dns_stream(framed(query("example.com"))[:20], b"", closed) is NOT_THIS


def test_tcp_frame_shorter_than_a_header_is_not_this() -> None:
    assert detect_dns_stream(b"\x00\x05hello", b"", CTX) is NOT_THIS


def test_tcp_text_protocol_is_not_this_from_its_first_bytes() -> None:
    assert detect_dns_stream(b"GET / HTTP/1.1\r\n", b"", CTX) is NOT_THIS


def test_tcp_server_speaking_first_is_not_this() -> None:
    assert detect_dns_stream(b"", b"220 mail.example ESMTP\r\n", CTX) is NOT_THIS


# --- hostile input ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    m = parse_message(data)
    if m is not None:
        answers_by_ip(m)
    iter_tcp_messages(data)
    detect_dns_datagram(data, from_originator=True)
    detect_dns_datagram(data, from_originator=False)
    detect_dns_stream(data, b"", CTX)
    detect_dns_stream(b"", data, CTX)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 0xFFFF))
def test_arbitrary_records_behind_a_valid_header_never_raise(body: bytes, ancount: int) -> None:
    msg = header(RESPONSE, an=ancount & 0x1F) + question(name("example.com")) + body
    m = parse_message(msg)
    if m is not None:
        answers_by_ip(m)
        detect_dns_datagram(msg, from_originator=False)


_REAL = cname_response()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_REAL) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_real_response_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_REAL)
    for at, value in edits:
        data[at] = value
    m = parse_message(bytes(data))
    if m is not None:
        answers_by_ip(m)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=6).map(lambda b: bytes([len(b)]) + b),  # a label
            st.integers(0, 60).map(pointer),
            st.just(b"\x00"),
            st.binary(max_size=3),
        ),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_the_name_cache_never_changes_a_name(parts: list[bytes], rnd: random.Random) -> None:
    msg = header(QUERY, qd=0) + b"".join(parts)
    positions = list(range(len(msg)))
    rnd.shuffle(positions)
    cache: dict[int, tuple[str, int]] = {}
    for pos in positions:
        assert read_name(msg, pos, cache) == read_name(msg, pos), pos


# --- the corpus: every DNS datagram parses ------------------------------------------------------


def _corpus() -> Path | None:
    env = os.environ.get("EGRESSD_CORPUS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/corpus"
    return path if path.is_dir() else None


@pytest.mark.parametrize(
    "capture",
    [
        "ndpi/dns.pcap",
        "ndpi/dns-tunnel-iodine.pcap",
        "ndpi/dns_exfiltration.pcap",
        "ndpi/anyconnect-vpn.pcap",
    ],
)
def test_corpus_dns_datagrams_all_parse(capture: str) -> None:
    corpus = _corpus()
    if corpus is None:
        pytest.skip("corpus not found beside the checkout (../shared/corpus) nor in EGRESSD_CORPUS")
    scapy_all = pytest.importorskip("scapy.all")
    payloads = []
    for pkt in scapy_all.rdpcap(str(corpus / capture)):
        if scapy_all.UDP in pkt and 53 in (pkt[scapy_all.UDP].sport, pkt[scapy_all.UDP].dport):
            udp = pkt[scapy_all.UDP]
            payload = bytes(udp.payload)
            if scapy_all.Padding in udp:
                payload = payload[: len(payload) - len(bytes(udp[scapy_all.Padding]))]
            payloads.append(payload)
    assert payloads
    assert [p for p in payloads if parse_message(p) is None] == []
