"""detect_proxy: HTTP CONNECT, SOCKS5 (RFC 1928/1929), SOCKS4/4a, and the inner-stream offsets.

Handshakes are written from the RFCs; addresses are documentation ones.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import (
    NEED_MORE,
    NOT_THIS,
    PROXY_CONNECT,
    PROXY_SOCKS,
    Detection,
    Result,
    StreamContext,
)
from egressd.detect.proxy import detect_proxy

CTX = StreamContext(sport=40000, dport=3128)
CLOSED = StreamContext(sport=40000, dport=3128, fwd_closed=True, rev_closed=True)

CONNECT = b"CONNECT pool.example.net:3333 HTTP/1.1\r\nHost: pool.example.net:3333\r\nUser-Agent: curl/8.5\r\n\r\n"
INNER = b'{"id":1,"method":"mining.subscribe","params":[]}\n'
OK_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"

SOCKS5_GREETING = b"\x05\x01\x00"
SOCKS5_SELECT_NONE = b"\x05\x00"
SOCKS5_REQUEST_DOMAIN = b"\x05\x01\x00\x03\x10pool.example.net\x0d\x05"  # port 3333
SOCKS5_REPLY_OK = b"\x05\x00\x00\x01\xc6\x33\x64\x01\x9c\x40"  # bound 198.51.100.1:40000


def detection(result: Result) -> Detection:
    assert isinstance(result, Detection), result
    return result


# --- HTTP CONNECT -----------------------------------------------------------------------------


def test_connect_request_gives_target_and_inner_fwd_while_reply_pending() -> None:
    found = detection(detect_proxy(CONNECT + INNER, b"", CTX))
    assert found.kind == PROXY_CONNECT
    assert found.info["target"] == "pool.example.net:3333"
    assert found.inner_fwd == len(CONNECT)
    assert found.inner_rev == -1
    assert found.refine is True
    assert found.evidence == "CONNECT pool.example.net:3333 HTTP/1.1"


def test_connect_200_reply_gives_inner_rev_and_stops_refining() -> None:
    found = detection(detect_proxy(CONNECT + INNER, OK_200 + b'{"id":1,"result":[]}\n', CTX))
    assert found.inner_rev == len(OK_200)
    assert found.info["status"] == "200"
    assert found.refine is False


def test_connect_refused_has_no_inner_rev_and_stops_refining() -> None:
    rev = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n"
    found = detection(detect_proxy(CONNECT, rev, CTX))
    assert found.inner_rev == -1
    assert found.refine is False
    assert found.info["status"] == "407"


def test_connect_interim_100_is_skipped_before_the_200() -> None:
    rev = b"HTTP/1.1 100 Continue\r\n\r\n" + OK_200
    assert detection(detect_proxy(CONNECT, rev, CTX)).inner_rev == len(rev)


def test_connect_absolute_uri_form_is_accepted() -> None:
    found = detection(detect_proxy(b"CONNECT http://203.0.113.5:8443/ HTTP/1.1\r\n\r\n", b"", CTX))
    assert found.info["target"] == "203.0.113.5:8443"


def test_connect_ipv6_literal_target() -> None:
    found = detection(detect_proxy(b"CONNECT [2001:db8::7]:22 HTTP/1.1\r\n\r\nSSH-2.0-x\r\n", b"", CTX))
    assert found.info["target"] == "[2001:db8::7]:22"
    assert found.inner_fwd == len(b"CONNECT [2001:db8::7]:22 HTTP/1.1\r\n\r\n")


def test_connect_with_stray_token_and_colonless_header_as_seen_in_the_wild() -> None:
    fwd = b"CONNECT mail.example.org:25 / HTTP/1.0\r\nMozilla 4.0 (compatible)\r\n\r\nHELO x\r\n"
    found = detection(detect_proxy(fwd, b"HTTP/1.0 200 Connection established\r\n\r\n220 ready\r\n", CTX))
    assert found.info["target"] == "mail.example.org:25"
    assert fwd[found.inner_fwd :] == b"HELO x\r\n"


def test_connect_proxy_authorization_scheme_is_noted_without_credentials() -> None:
    fwd = b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n"
    found = detection(detect_proxy(fwd, b"", CTX))
    assert found.info["proxy_auth"] == "basic"
    assert "dXNlcjpwYXNz" not in repr(found)


def test_connect_head_without_blank_line_keeps_inner_fwd_unknown() -> None:
    found = detection(detect_proxy(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a", b"", CTX))
    assert found.inner_fwd == -1
    assert found.refine is True


def test_every_prefix_of_the_request_line_is_need_more() -> None:
    request_line = b"CONNECT pool.example.net:3333 HTTP/1.1\r\n"
    for cut in range(len(request_line)):
        assert detect_proxy(request_line[:cut], b"", CTX) is NEED_MORE, cut
    assert isinstance(detect_proxy(request_line, b"", CTX), Detection)


@pytest.mark.parametrize(
    "fwd",
    [
        b"connect a.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECTX a:1 HTTP/1.1\r\n\r\n",
        b"CONNECT a:1\r\n\r\n",
        b"CONNECT a:99999 HTTP/1.1\r\n",
    ],
)
def test_malformed_connect_is_not_a_proxy(fwd: bytes) -> None:
    assert detect_proxy(fwd, b"", CTX) is NOT_THIS


def test_random_segmentation_reaches_both_offsets_without_a_wrong_answer() -> None:
    rng = random.Random(5)
    fwd, rev = CONNECT + INNER, OK_200 + b"{}\n"
    i = j = 0
    results: list[Result] = []
    while i < len(fwd) or j < len(rev):
        if i < len(fwd):
            i = min(len(fwd), i + rng.randint(1, 9))
        elif j < len(rev):
            j = min(len(rev), j + rng.randint(1, 9))
        results.append(detect_proxy(fwd[:i], rev[:j] if i == len(fwd) else b"", CTX))
    assert NOT_THIS not in results
    last = detection(results[-1])
    assert (last.inner_fwd, last.inner_rev, last.refine) == (len(CONNECT), len(OK_200), False)


# --- SOCKS5 ---------------------------------------------------------------------------------------


def test_socks5_full_handshake_gives_target_and_both_offsets() -> None:
    fwd = SOCKS5_GREETING + SOCKS5_REQUEST_DOMAIN + INNER
    rev = SOCKS5_SELECT_NONE + SOCKS5_REPLY_OK + b"{}\n"
    found = detection(detect_proxy(fwd, rev, CTX))
    assert found.kind == PROXY_SOCKS
    assert found.info["target"] == "pool.example.net:3333"
    assert found.info["auth"] == "none"
    assert fwd[found.inner_fwd :] == INNER
    assert rev[found.inner_rev :] == b"{}\n"
    assert found.refine is False


def test_socks5_greeting_alone_is_too_little_to_call() -> None:
    assert detect_proxy(SOCKS5_GREETING, b"", CTX) is NEED_MORE


def test_socks5_greeting_and_method_selection_is_a_proxy_waiting_for_the_request() -> None:
    found = detection(detect_proxy(SOCKS5_GREETING, SOCKS5_SELECT_NONE, CTX))
    assert found.refine is True
    assert found.inner_fwd == -1


def test_socks5_pipelined_request_before_any_reply_is_a_proxy() -> None:
    found = detection(detect_proxy(SOCKS5_GREETING + SOCKS5_REQUEST_DOMAIN, b"", CTX))
    assert found.inner_fwd == len(SOCKS5_GREETING + SOCKS5_REQUEST_DOMAIN)
    assert found.inner_rev == -1
    assert found.refine is True


@pytest.mark.parametrize(
    ("address", "target"),
    [
        (b"\x01\xcb\x00\x71\x05", "203.0.113.5"),
        (b"\x04" + bytes.fromhex("20010db8000000000000000000000009"), "[2001:db8::9]"),
    ],
)
def test_socks5_ip_targets(address: bytes, target: str) -> None:
    fwd = SOCKS5_GREETING + b"\x05\x01\x00" + address + b"\x01\xbb"
    found = detection(detect_proxy(fwd, SOCKS5_SELECT_NONE, CTX))
    assert found.info["target"] == f"{target}:443"


def test_socks5_username_password_names_the_user_never_the_password() -> None:
    fwd = b"\x05\x01\x02" + b"\x01\x05alice\x08hunter22" + SOCKS5_REQUEST_DOMAIN
    rev = b"\x05\x02" + b"\x01\x00" + SOCKS5_REPLY_OK
    found = detection(detect_proxy(fwd, rev, CTX))
    assert found.info["auth"] == "userpass"
    assert found.info["user"] == "alice"
    assert found.info["auth_status"] == "success"
    assert "hunter22" not in repr(found)
    assert found.inner_fwd == len(fwd)
    assert found.inner_rev == len(rev)


def test_socks5_no_acceptable_method_is_a_proxy_without_a_tunnel() -> None:
    found = detection(detect_proxy(b"\x05\x02\x00\x02", b"\x05\xff", CTX))
    assert found.info["auth"] == "none-acceptable"
    assert found.refine is False


def test_socks5_failed_connect_has_no_inner_rev() -> None:
    rev = SOCKS5_SELECT_NONE + b"\x05\x05\x00\x01" + bytes(6)  # connection refused
    found = detection(detect_proxy(SOCKS5_GREETING + SOCKS5_REQUEST_DOMAIN, rev, CTX))
    assert found.inner_rev == -1
    assert found.info["reply"] == "error 5"
    assert found.refine is False


@pytest.mark.parametrize(
    ("fwd", "rev"),
    [
        (b"\x05\x00", b""),  # no methods
        (b"\x05\x01\xff", b""),  # a client never offers "no acceptable methods"
        (b"\x05\x01\x00", b"\x05\x02"),  # server picks a method that was not offered
        (b"\x05\x01\x00", b"\x04\x00"),
        (b"\x05\x01\x00\x07\x01\x00\x01", b""),  # neither request nor auth after the greeting
    ],
)
def test_socks5_inconsistent_handshakes_are_not_a_proxy(fwd: bytes, rev: bytes) -> None:
    assert detect_proxy(fwd, rev, CTX) is NOT_THIS


def test_socks5_every_prefix_of_a_pipelined_handshake_is_need_more_until_the_request() -> None:
    fwd = SOCKS5_GREETING + SOCKS5_REQUEST_DOMAIN
    for cut in range(len(fwd)):
        assert detect_proxy(fwd[:cut], b"", CTX) is NEED_MORE, cut
    assert isinstance(detect_proxy(fwd, b"", CTX), Detection)


# --- SOCKS4 / 4a --------------------------------------------------------------------------------


def test_socks4_connect_with_granted_reply() -> None:
    fwd = b"\x04\x01" + struct.pack("!H", 443) + bytes([198, 51, 100, 20]) + b"bob\x00" + b"\x16\x03\x01"
    rev = b"\x00\x5a" + bytes(6) + b"\x16\x03\x03"
    found = detection(detect_proxy(fwd, rev, CTX))
    assert found.info["target"] == "198.51.100.20:443"
    assert found.info["version"] == "4"
    assert found.info["user"] == "bob"
    assert fwd[found.inner_fwd :] == b"\x16\x03\x01"
    assert rev[found.inner_rev :] == b"\x16\x03\x03"


def test_socks4a_domain_target() -> None:
    fwd = b"\x04\x01" + struct.pack("!H", 22) + b"\x00\x00\x00\x01" + b"\x00" + b"relay.example.org\x00"
    found = detection(detect_proxy(fwd, b"\x00\x5a" + bytes(6), CTX))
    assert found.info["version"] == "4a"
    assert found.info["target"] == "relay.example.org:22"
    assert found.inner_fwd == len(fwd)


def test_socks4_waits_for_the_reply_before_calling_it() -> None:
    fwd = b"\x04\x01\x01\xbb" + bytes([203, 0, 113, 9]) + b"\x00"
    assert detect_proxy(fwd, b"", CTX) is NEED_MORE
    assert isinstance(detect_proxy(fwd, b"", CLOSED), Detection)


def test_socks4_rejected_has_no_inner_rev() -> None:
    fwd = b"\x04\x01\x01\xbb" + bytes([203, 0, 113, 9]) + b"\x00"
    found = detection(detect_proxy(fwd, b"\x00\x5b" + bytes(6), CTX))
    assert found.inner_rev == -1
    assert found.refine is False


@pytest.mark.parametrize(
    "fwd",
    [
        b"\x04\x03\x00\x50\x01\x02\x03\x04\x00",  # unknown command
        b"\x04\x01\x00\x00\x01\x02\x03\x04\x00",  # port 0
        b"\x04\x01\x00\x50\x00\x00\x00\x00\x00",  # address 0.0.0.0
        b"\x04\x01\x00\x50\x01\x02\x03\x04\x01\x02\x00",  # binary user id
    ],
)
def test_socks4_malformed_requests_are_not_a_proxy(fwd: bytes) -> None:
    assert detect_proxy(fwd, b"", CTX) is NOT_THIS


# --- everything else ------------------------------------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("160301002f0100002b0303") + bytes(32) + bytes.fromhex("000002c02f01000000")


@pytest.mark.parametrize(
    "fwd",
    [
        TLS_CLIENT_HELLO,
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b'{"id":1,"method":"mining.subscribe"}\n',
        bytes.fromhex("f9beb4d976657273696f6e00"),
        b"\x00" * 32,
        b'Content-Length: 46\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize"}',
        b"CONNECTION: upgrade\r\n",
    ],
)
def test_other_protocols_are_not_this_at_once(fwd: bytes) -> None:
    assert detect_proxy(fwd, b"", CTX) is NOT_THIS


def test_server_speaking_first_is_not_a_proxy() -> None:
    assert detect_proxy(b"", b"220 smtp.example ESMTP\r\n", CTX) is NOT_THIS


def test_empty_flow_waits_until_closed() -> None:
    assert detect_proxy(b"", b"", CTX) is NEED_MORE
    assert detect_proxy(b"", b"", CLOSED) is NOT_THIS


_CTXS = st.builds(
    StreamContext,
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    fwd_closed=st.booleans(),
    rev_closed=st.booleans(),
    fwd_full=st.booleans(),
    rev_full=st.booleans(),
)
_PROXYISH = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda t: b"\x05" + t, st.binary(max_size=80)),
    st.builds(lambda t: b"\x04\x01" + t, st.binary(max_size=80)),
    st.builds(lambda t: b"CONNECT " + t, st.binary(max_size=200)),
    st.builds(lambda t: b"HTTP/1.1 " + t, st.binary(max_size=80)),
)


@settings(max_examples=400, deadline=None)
@given(fwd=_PROXYISH, rev=_PROXYISH, ctx=_CTXS)
def test_arbitrary_input_never_raises(fwd: bytes, rev: bytes, ctx: StreamContext) -> None:
    result = detect_proxy(fwd, rev, ctx)
    assert result is NEED_MORE or result is NOT_THIS or isinstance(result, Detection)
    if isinstance(result, Detection):
        assert -1 <= result.inner_fwd <= len(fwd)
        assert -1 <= result.inner_rev <= len(rev)
