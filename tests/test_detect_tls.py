"""TLS ClientHello parsing and detection, specified with real and hand-built hellos.

The realistic hello comes from Python's own ``ssl`` module (OpenSSL) talking into a memory
BIO: real bytes with SNI and ALPN, no network. Hand-built hellos follow RFC 8446 §4.1.2
field by field, for the cases OpenSSL does not produce (GREASE, ECH, broken lengths).
"""

from __future__ import annotations

import os
import re
import ssl
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import NEED_MORE, NOT_THIS, TLS, Detection, StreamContext
from egressd.detect.tls import (
    MAX_HEAD,
    ClientHello,
    detect_tls,
    is_grease,
    normalise_hostname,
    parse_client_hello,
)

CTX = StreamContext(sport=40000, dport=443)


# --- building hellos ------------------------------------------------------------------------


def openssl_hello(
    server_hostname: str | None = "www.example.com",
    alpn: list[str] | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def u16(v: int) -> bytes:
    return struct.pack("!H", v)


def ext(etype: int, body: bytes) -> bytes:
    return u16(etype) + u16(len(body)) + body


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + u16(len(name)) + name
    return ext(0, u16(len(entry)) + entry)


def alpn_ext(protos: list[bytes]) -> bytes:
    body = b"".join(bytes([len(p)]) + p for p in protos)
    return ext(16, u16(len(body)) + body)


def versions_ext(versions: list[int]) -> bytes:
    body = b"".join(u16(v) for v in versions)
    return ext(43, bytes([len(body)]) + body)


def groups_ext(groups: list[int]) -> bytes:
    body = b"".join(u16(g) for g in groups)
    return ext(10, u16(len(body)) + body)


def point_formats_ext(formats: list[int]) -> bytes:
    return ext(11, bytes([len(formats)]) + bytes(formats))


def hello_message(
    extensions: list[bytes] | None,
    ciphers: list[int] = [0x1301, 0x1302, 0xC02F],  # noqa: B006 - never mutated
    legacy: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    compression: bytes = b"\x00",
) -> bytes:
    """A Handshake(ClientHello) message: type, 3-byte length, body."""
    body = u16(legacy) + b"\x42" * 32 + bytes([len(session_id)]) + session_id
    body += u16(2 * len(ciphers)) + b"".join(u16(c) for c in ciphers)
    body += bytes([len(compression)]) + compression
    if extensions is not None:
        block = b"".join(extensions)
        body += u16(len(block)) + block
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 16384, content_type: int = 22, version: int = 0x0301) -> bytes:
    """``message`` cut into TLS records of at most ``size`` bytes each."""
    out = b""
    for i in range(0, len(message), size):
        frag = message[i : i + size]
        out += bytes([content_type]) + u16(version) + u16(len(frag)) + frag
    return out


def parsed(data: bytes) -> ClientHello:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


# --- the realistic case: OpenSSL's own ClientHello --------------------------------------------


def test_openssl_hello_gives_sni_and_alpn() -> None:
    hello = parsed(openssl_hello("www.example.com", ["h2", "http/1.1"]))
    assert hello.sni == "www.example.com"
    assert hello.alpn == ("h2", "http/1.1")


def test_openssl_tls13_hello_reports_tls13_from_supported_versions() -> None:
    data = openssl_hello()
    legacy = struct.unpack_from("!H", data, 9)[0]
    hello = parsed(data)
    assert legacy == 0x0303
    assert hello.version == 0x0304
    assert hello.ja3.startswith("771,")


def test_tls12_only_client_reports_tls12() -> None:
    hello = parsed(openssl_hello(maximum=ssl.TLSVersion.TLSv1_2))
    assert hello.version == 0x0303


def test_hello_without_server_hostname_has_no_sni() -> None:
    hello = parsed(openssl_hello(server_hostname=None))
    assert hello.sni is None
    assert hello.sni_invalid == ""


def test_cipher_count_matches_the_offered_suites() -> None:
    data = openssl_hello()
    sid_len = data[5 + 4 + 34]
    cs_len = struct.unpack_from("!H", data, 5 + 4 + 35 + sid_len)[0]
    assert parsed(data).ciphers == cs_len // 2


def test_every_prefix_of_a_real_hello_needs_more() -> None:
    data = openssl_hello("pool.example.net", ["http/1.1"])
    assert all(parse_client_hello(data[:k]) is NEED_MORE for k in range(len(data)))
    assert parsed(data).sni == "pool.example.net"


def test_real_hello_fed_one_byte_segment_at_a_time_is_found_at_the_last_byte() -> None:
    data = openssl_hello("pool.example.net")
    head = b""
    results = []
    for i in range(len(data)):
        head += data[i : i + 1]
        results.append(detect_tls(head, b"", CTX))
    assert all(r is NEED_MORE for r in results[:-1])
    assert isinstance(results[-1], Detection)


def test_hello_split_across_small_records_is_reassembled() -> None:
    data = openssl_hello("www.example.com", ["h2"])
    message = data[5:]
    whole = parsed(data)
    for size in (1, 2, 7, 100):
        split = parsed(records(message, size=size))
        assert split == whole


def test_every_prefix_of_a_multi_record_hello_needs_more() -> None:
    data = records(openssl_hello("www.example.com")[5:], size=50)
    assert all(parse_client_hello(data[:k]) is NEED_MORE for k in range(len(data)))
    assert parsed(data).sni == "www.example.com"


def test_non_handshake_record_inside_a_split_hello_is_not_tls() -> None:
    message = openssl_hello()[5:]
    data = records(message[:100]) + records(message[100:], content_type=23)
    assert parse_client_hello(data) is NOT_THIS


def test_bytes_after_the_hello_do_not_matter() -> None:
    data = openssl_hello("www.example.com")
    assert parsed(data + b"\x17\x03\x03\x00\x05hello") == parsed(data)


# --- hand-built hellos: extensions and GREASE ----------------------------------------------


def test_alpn_list_is_kept_in_order() -> None:
    hello = parsed(records(hello_message([alpn_ext([b"http/1.1", b"h2", b"stratum"])])))
    assert hello.alpn == ("http/1.1", "h2", "stratum")


def test_grease_values_are_left_out_of_ja3() -> None:
    grease = [0x0A0A, 0x1A1A, 0xFAFA]
    message = hello_message(
        [
            ext(grease[1], b""),
            sni_ext(b"a.example"),
            groups_ext([grease[0], 29, 23]),
            point_formats_ext([0]),
            ext(grease[2], b"\x00"),
            versions_ext([grease[0], 0x0304, 0x0303]),
        ],
        ciphers=[grease[0], 0x1301, 0xC02F],
    )
    assert parsed(records(message)).ja3 == "771,4865-49199,0-10-11-43,29-23,0"


def test_grease_in_supported_versions_does_not_count_as_highest() -> None:
    message = hello_message([versions_ext([0x7A7A, 0x0303])])
    assert parsed(records(message)).version == 0x0303


def test_grease_ciphers_are_not_counted() -> None:
    message = hello_message([], ciphers=[0x2A2A, 0x1301, 0x1302])
    assert parsed(records(message)).ciphers == 2


def test_tls13_draft_version_counts_as_tls13() -> None:
    message = hello_message([versions_ext([0x7F17, 0x0303])])
    assert parsed(records(message)).version == 0x0304


def test_ja3_fields_follow_wire_order_and_decimal_values() -> None:
    message = hello_message(
        [groups_ext([24, 29]), sni_ext(b"x.example"), point_formats_ext([0, 1, 2])],
        ciphers=[0x0035, 0x002F],
        legacy=0x0301,
    )
    assert parsed(records(message)).ja3 == "769,53-47,10-0-11,24-29,0-1-2"


def test_hello_without_extension_block_is_tls_without_sni() -> None:
    hello = parsed(records(hello_message(None, legacy=0x0301)))
    assert hello.sni is None
    assert hello.version == 0x0301
    assert hello.ja3 == "769,4865-4866-49199,,,"


def test_ech_extension_is_flagged() -> None:
    message = hello_message([sni_ext(b"public.example"), ext(0xFE0D, b"\x00" * 40)])
    hello = parsed(records(message))
    assert hello.ech
    assert hello.sni == "public.example"


def test_hello_without_ech_is_not_flagged() -> None:
    assert not parsed(openssl_hello()).ech


@pytest.mark.parametrize("grease", [0x0A0A + 0x1010 * i for i in range(16)])
def test_all_sixteen_grease_values_are_recognised(grease: int) -> None:
    assert is_grease(grease)


@pytest.mark.parametrize("value", [0x0000, 0x1301, 0x0A1A, 0xFE0D, 0x0A0B])
def test_ordinary_values_are_not_grease(value: int) -> None:
    assert not is_grease(value)


# --- SNI normalisation and validation -----------------------------------------------------


def test_sni_is_lowercased_and_trailing_dot_stripped() -> None:
    hello = parsed(records(hello_message([sni_ext(b"Pool.Example.COM.")])))
    assert hello.sni == "pool.example.com"


@pytest.mark.parametrize(
    "raw",
    [
        b"pool.example.com\x00.attacker.test",
        b"two words.example",
        b"a..b.example",
        b"x" * 64 + b".example",
        b"caf\xc3\xa9.example",
        (b"a" * 63 + b".") * 4,
        b"*.example",
    ],
)
def test_invalid_sni_is_recorded_not_raised(raw: bytes) -> None:
    hello = parsed(records(hello_message([sni_ext(raw)])))
    assert hello.sni is None
    assert hello.sni_invalid


def test_invalid_sni_is_escaped_for_logs() -> None:
    hello = parsed(records(hello_message([sni_ext(b"evil\x00\x1b[31m.example")])))
    assert "\x00" not in hello.sni_invalid
    assert "\x1b" not in hello.sni_invalid


def test_hostname_of_253_characters_is_valid() -> None:
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
    assert len(name) == 253
    assert normalise_hostname(name) == name.decode()


def test_hostname_of_254_characters_is_invalid() -> None:
    assert normalise_hostname(b".".join([b"a" * 63] * 3 + [b"b" * 62])) is None


def test_underscore_in_hostname_is_accepted() -> None:
    assert normalise_hostname(b"_acme.example") == "_acme.example"


def test_first_of_two_server_name_extensions_wins() -> None:
    hello = parsed(records(hello_message([sni_ext(b"first.example"), sni_ext(b"second.example")])))
    assert hello.sni == "first.example"


def test_malformed_server_name_extension_voids_only_the_sni() -> None:
    message = hello_message([ext(0, b"\x00\x10\x00\x00"), alpn_ext([b"h2"])])
    hello = parsed(records(message))
    assert hello.sni is None
    assert hello.sni_invalid
    assert hello.alpn == ("h2",)


# --- lengths that lie -------------------------------------------------------------------------


def test_record_longer_than_2_14_is_not_tls() -> None:
    assert parse_client_hello(b"\x16\x03\x01" + u16(16385) + b"\x01") is NOT_THIS


def test_zero_length_handshake_record_is_not_tls() -> None:
    assert parse_client_hello(b"\x16\x03\x01\x00\x00") is NOT_THIS


def test_handshake_length_beyond_the_bound_is_not_tls() -> None:
    assert parse_client_hello(b"\x16\x03\x01\x00\x10\x01\xff\xff\xff\x03\x03") is NOT_THIS


def test_handshake_length_too_short_for_a_hello_is_not_tls() -> None:
    message = b"\x01\x00\x00\x04\x03\x03\x00\x00"
    assert parse_client_hello(records(message)) is NOT_THIS


def test_extension_overrunning_the_message_is_not_tls() -> None:
    message = bytearray(hello_message([sni_ext(b"a.example")]))
    message[-len(sni_ext(b"a.example")) + 2 : -len(sni_ext(b"a.example")) + 4] = u16(0x7FFF)
    assert parse_client_hello(records(bytes(message))) is NOT_THIS


def test_extension_block_length_overrunning_the_message_is_not_tls() -> None:
    good = hello_message([sni_ext(b"a.example")])
    block_at = len(good) - len(sni_ext(b"a.example")) - 2
    bad = good[:block_at] + u16(0x0FFF) + good[block_at + 2 :]
    assert parse_client_hello(records(bad)) is NOT_THIS


def test_bytes_after_the_extension_block_inside_the_message_are_not_tls() -> None:
    good = hello_message([sni_ext(b"a.example")])
    bad = b"\x01" + (len(good) - 4 + 3).to_bytes(3, "big") + good[4:] + b"abc"
    assert parse_client_hello(records(bad)) is NOT_THIS


def test_odd_cipher_suites_length_is_not_tls() -> None:
    good = hello_message([], ciphers=[0x1301, 0x1302])
    at = 4 + 2 + 32 + 1 + 32
    bad = good[:at] + u16(3) + good[at + 2 :]
    assert parse_client_hello(records(bad)) is NOT_THIS


def test_session_id_longer_than_32_is_not_tls() -> None:
    assert parse_client_hello(records(hello_message([], session_id=b"\x00" * 33))) is NOT_THIS


def test_empty_compression_methods_is_not_tls() -> None:
    assert parse_client_hello(records(hello_message([], compression=b""))) is NOT_THIS


def test_hello_larger_than_the_bound_is_not_parsed() -> None:
    padding = ext(21, b"\x00" * MAX_HEAD)
    data = records(hello_message([sni_ext(b"a.example"), padding]))
    assert parse_client_hello(data[:10]) is NOT_THIS
    assert parse_client_hello(data) is NOT_THIS


def test_nine_kilobyte_hello_over_two_records_is_parsed() -> None:
    padding = ext(21, b"\x00" * 9000)
    message = hello_message([sni_ext(b"big.example"), padding])
    assert parsed(records(message, size=4096)).sni == "big.example"


# --- not TLS at all ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b'{"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.10"]}\n',
        b"\x05\x01\x00",
        b"\x15\x03\x03\x00\x02\x02\x28",  # an Alert record
        b"\x17\x03\x03\x00\x05hello",  # application data first
        b"\x16\x03\x03\x00\x30\x02\x00\x00\x2c\x03\x03",  # a ServerHello
        b"\x16\x02\x00",  # record version 2.0
        b"\x16\x03\x05",  # record version beyond TLS 1.3
    ],
)
def test_non_tls_bytes_are_not_this(data: bytes) -> None:
    assert parse_client_hello(data) is NOT_THIS


def test_first_byte_alone_rejects_a_text_protocol() -> None:
    assert parse_client_hello(b"S") is NOT_THIS


def test_empty_head_needs_more() -> None:
    assert parse_client_hello(b"") is NEED_MORE


def test_sslv2_compatible_hello_is_tls_without_sni() -> None:
    specs = b"\x00\x00\x39\x00\x00\x2f\x01\x00\x80"
    challenge = b"\x5a" * 16
    body = b"\x01\x03\x01" + u16(len(specs)) + u16(0) + u16(len(challenge)) + specs + challenge
    data = u16(0x8000 | len(body)) + body
    hello = parsed(data)
    assert hello.sni is None
    assert hello.version == 0x0301
    assert hello.ciphers == 3
    assert all(parse_client_hello(data[:k]) is NEED_MORE for k in range(1, len(data)))


def test_sslv2_hello_with_inconsistent_lengths_is_not_tls() -> None:
    body = b"\x01\x03\x01" + u16(3) + u16(0) + u16(16) + b"\x00\x00\x2f" + b"\x5a" * 16
    assert parse_client_hello(u16(0x8000 | (len(body) + 5)) + body) is NOT_THIS


# --- detect_tls -------------------------------------------------------------------------------


def test_detect_tls_reports_sni_alpn_and_version() -> None:
    result = detect_tls(openssl_hello("www.example.com", ["h2", "http/1.1"]), b"", CTX)
    assert isinstance(result, Detection)
    assert result.kind == TLS
    assert not result.refine
    assert result.info["sni"] == "www.example.com"
    assert result.info["alpn"] == "h2,http/1.1"
    assert result.info["version"] == "TLS1.3"
    assert "sni=www.example.com" in result.evidence
    assert "alpn=h2,http/1.1" in result.evidence


def test_detect_tls_info_carries_ja3_and_its_md5() -> None:
    hello = parsed(openssl_hello())
    result = detect_tls(openssl_hello(), b"", CTX)
    assert isinstance(result, Detection)
    assert result.info["ja3"] == hello.ja3
    assert re.fullmatch(r"[0-9a-f]{32}", result.info["ja3_hash"])


def test_detect_tls_without_sni_reports_empty_sni() -> None:
    result = detect_tls(openssl_hello(server_hostname=None), b"", CTX)
    assert isinstance(result, Detection)
    assert result.info["sni"] == ""
    assert "sni=-" in result.evidence


def test_detect_tls_shows_an_invalid_sni_in_the_evidence() -> None:
    result = detect_tls(records(hello_message([sni_ext(b"bad name.example")])), b"", CTX)
    assert isinstance(result, Detection)
    assert result.info["sni"] == ""
    assert "bad name.example" in result.info["sni_invalid"]
    assert "invalid-sni=" in result.evidence


def test_detect_tls_needs_more_on_a_partial_hello() -> None:
    assert detect_tls(openssl_hello()[:100], b"", CTX) is NEED_MORE


def test_detect_tls_gives_up_on_a_partial_hello_when_the_originator_closed() -> None:
    closed = StreamContext(sport=40000, dport=443, fwd_closed=True)
    assert detect_tls(openssl_hello()[:100], b"", closed) is NOT_THIS


def test_detect_tls_gives_up_on_a_partial_hello_when_the_head_is_full() -> None:
    full = StreamContext(sport=40000, dport=443, fwd_full=True)
    assert detect_tls(openssl_hello()[:100], b"", full) is NOT_THIS


def test_detect_tls_is_not_this_when_the_server_speaks_first() -> None:
    assert detect_tls(b"", b"SSH-2.0-OpenSSH_9.2\r\n", CTX) is NOT_THIS


def test_detect_tls_waits_while_nobody_has_spoken() -> None:
    assert detect_tls(b"", b"", CTX) is NEED_MORE


# --- hostile input ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), ClientHello | type(NEED_MORE))
    detect_tls(data, b"", CTX)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_behind_a_handshake_record_header_never_raise(tail: bytes) -> None:
    data = b"\x16\x03\x01" + u16(len(tail)) + tail
    assert isinstance(parse_client_hello(data), ClientHello | type(NEED_MORE))


_REAL = openssl_hello("www.example.com", ["h2", "http/1.1"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_REAL) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_real_hello_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_REAL)
    for at, value in edits:
        data[at] = value
    assert isinstance(parse_client_hello(bytes(data)), ClientHello | type(NEED_MORE))


# --- the corpus: nDPI 4.2's SNI and JA3C for the same flows ---------------------------------


def _corpus() -> Path | None:
    env = os.environ.get("EGRESSD_CORPUS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/corpus"
    return path if path.is_dir() else None


_NDPI_FLOW = re.compile(
    r"\s*\d+\s+TCP (\S+):(\d+) <?-> (\S+):(\d+) .*\[Hostname/SNI: ([^\]]*)\].*\[JA3C: ([0-9a-f]+)\]"
)


@pytest.mark.parametrize(
    "capture",
    [
        "ndpi/443-curl.pcap",
        "ndpi/443-firefox.pcap",
        "ndpi/443-git.pcap",
        "ndpi/dns_doh.pcap",
        "ndpi/tor.pcap",
    ],
)
def test_corpus_hellos_match_ndpi_sni_and_ja3(capture: str) -> None:
    corpus = _corpus()
    if corpus is None:
        pytest.skip("corpus not found beside the checkout (../shared/corpus) nor in EGRESSD_CORPUS")
    scapy_all = pytest.importorskip("scapy.all")
    expected = {}
    for line in (corpus / f"{capture}.ndpiReader-4.2.txt").read_text(errors="replace").splitlines():
        m = _NDPI_FLOW.match(line)
        if m:
            expected[(m.group(1), int(m.group(2)))] = (m.group(5), m.group(6))
    assert expected
    segments: dict[tuple[str, int], dict[int, bytes]] = {}
    for pkt in scapy_all.rdpcap(str(corpus / capture)):
        if scapy_all.TCP not in pkt:
            continue
        tcp = pkt[scapy_all.TCP]
        payload = bytes(tcp.payload)
        if scapy_all.Padding in tcp:
            payload = payload[: len(payload) - len(bytes(tcp[scapy_all.Padding]))]
        key = (str(tcp.underlayer.src), int(tcp.sport))
        if key in expected and payload:
            segments.setdefault(key, {}).setdefault(int(tcp.seq), payload)
    for key, (sni, ja3c) in expected.items():
        head = b""
        for _, payload in sorted(segments[key].items())[:8]:
            head += payload
        hello = parsed(head)
        assert (hello.sni, hello.ja3_hash) == (sni, ja3c), key
