"""detect_ssh: identification lines, KEXINIT/HASSH, role from the key exchange, hostile input.

Byte strings are built from RFC 4253 (binary packet, KEXINIT layout) in the helpers below.
``_REAL_CLIENT``/``_REAL_SERVER`` are real OpenSSH 9.2p1 heads captured for this test between
two network namespaces on 198.51.100.0/24 (``ssh`` to ``sshd``, key exchange completed,
auth refused): the banner, the KEXINIT packet and the 6-byte header of the next packet
(KEX_ECDH_INIT / KEX_ECDH_REPLY), zlib + base64. The same pair with the TCP roles swapped
is what ``sshd -i`` behind a socket that dials out looks like (captured too; same answer).
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import NEED_MORE, NOT_THIS, SSH, SSH_REVERSE, Detection, Result, StreamContext
from egressd.detect.ssh import detect_ssh

CTX = StreamContext(sport=40000, dport=22)
CLOSED = StreamContext(sport=40000, dport=22, fwd_closed=True, rev_closed=True)

CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"
SERVER_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"

KEX_CLIENT = b"sntrup761x25519-sha512@openssh.com,curve25519-sha256,ecdh-sha2-nistp256,ext-info-c"
KEX_SERVER = b"sntrup761x25519-sha512@openssh.com,curve25519-sha256,ecdh-sha2-nistp256,kex-strict-s-v00@openssh.com"
KEX_PLAIN = b"curve25519-sha256,ecdh-sha2-nistp256,diffie-hellman-group14-sha256"
KEX_GEX = b"diffie-hellman-group-exchange-sha256"
KEX_RSA = b"rsa2048-sha256"
ENC_C2S = b"chacha20-poly1305@openssh.com,aes128-ctr"
ENC_S2C = b"aes256-gcm@openssh.com,aes256-ctr"
MAC_C2S = b"umac-64-etm@openssh.com,hmac-sha2-256"
MAC_S2C = b"hmac-sha2-512-etm@openssh.com"
CMP_C2S = b"none,zlib@openssh.com"
CMP_S2C = b"none"

_REAL_CLIENT = (
    "eNrdVM1Kw0AYjCBSBA9CPSgi4tV8JbtN0vbmwUNvPQTxKOlmm4Tmj+ymVN/BZxDfwdcQT549+hpuoqlN3NjcBEMOy8x8PzNZYllj"
    "wD0NJgmNLGt8M+rhBJ1e0qlvR4DPHTpFOEPa3q6i7HQ73cf+2cHg+fr+8OrteLL//qAoW2MW8TRLBiZaYsNAI2CebSCsyuGLWAxi"
    "zOuROFRJli7oisWG+RO5CPxpLo9TV6XE8QoYIp/xJNfXoP5Qr0MGRqrjz2Y+BY8GQShsuWmcJUCXxLMjl5ajZSJklm6k7PBXVi87"
    "0yUHP5rFQNQ5XQLjqU84EFho2nocIssXcQTqfAZAaMqFBlUiE+6YXQ2hnVBE004oApML2Rw2ric0rTdMS5lIcIOiscfaQrJoZCnI"
    "DNe8tbDU6KSytKIogbhl4sUaJHFwi/qaUSm1KUN4CISnxXGEy2Nh+QsVApeE9bpcUYP/YN5rFtoETB0or1YUeN6qTng5sfqszWx+"
    "LZpYJB9n6tIVmsdXx323/8/GjqI4ouqd+LFWynNgIyt7tp86Jx9C0RKq"
)
_REAL_SERVER = (
    "eNrdU01KxDAUjjAg4x8Iuta9faXJtHUGFAZ0MTsXPYB00jdtsU1r0w6jV/AALjyJdxBceQEv4NKFG9NCR6e2bgVDFi/f97335eUR"
    "x5kA0w24SFE4zuRypLOUHp7jNHQFsCMPp5QV1NjeIKR30t/7eLvbuX4+u39/eMX13a1HQtZOpcizIj226YJZFh2BDFyLMq0dHifK"
    "SMpA50ms8SKb45Jllv0TGUfhtJQnma8h94IKBhHKPC31DWgwNJuQxajmhbNZiBBgFMWqLT9LihRwwQNX+Fhbt4moXXfTyg5/Zc26"
    "8hUuQOZZyHOQMDeM729ACNlUIaBXda2OkbqW2syANIlu6MCwVt7MRUnZEHieVeGI1aFyWqJK4PO4mVcqGvAf+L0UscvBNgHz1YwK"
    "L0s1iaAkqomWFbtZNYlOlrbb2WbrFbrtV+2+yv/nxvZFIlC7VT+xMcpOonX1nvoHn7K/cvc="
)
REAL_CLIENT = zlib.decompress(base64.b64decode(_REAL_CLIENT))
REAL_SERVER = zlib.decompress(base64.b64decode(_REAL_SERVER))


def name_list(value: bytes) -> bytes:
    return struct.pack("!I", len(value)) + value


def packet(payload: bytes) -> bytes:
    """RFC 4253 §6 binary packet, no MAC, block size 8, at least 4 bytes of padding."""
    pad = 8 - (5 + len(payload)) % 8
    if pad < 4:
        pad += 8
    return struct.pack("!IB", 1 + len(payload) + pad, pad) + payload + b"\x00" * pad


def kexinit(kex: bytes = KEX_PLAIN, side: str = "client") -> bytes:
    """A KEXINIT packet whose c2s lists differ from its s2c lists (so HASSH order is checked)."""
    enc, mac, cmp_ = (ENC_C2S, MAC_C2S, CMP_C2S) if side == "client" else (ENC_S2C, MAC_S2C, CMP_S2C)
    lists = [kex, b"ssh-ed25519,rsa-sha2-512", ENC_C2S, ENC_S2C, MAC_C2S, MAC_S2C, CMP_C2S, CMP_S2C, b"", b""]
    if side == "server":
        lists = [kex, b"ssh-ed25519", ENC_C2S, enc, MAC_C2S, mac, CMP_C2S, cmp_, b"", b""]
    body = b"".join(name_list(x) for x in lists)
    return packet(bytes([20]) + bytes(range(16)) + body + b"\x00" + b"\x00\x00\x00\x00")


def msg(code: int, body: bytes = b"\x00" * 36) -> bytes:
    return packet(bytes([code]) + body)


def hassh_of(kex: bytes, enc: bytes, mac: bytes, cmp_: bytes) -> str:
    return hashlib.md5(b";".join((kex, enc, mac, cmp_))).hexdigest()


def detection(result: Result) -> Detection:
    assert isinstance(result, Detection), result
    return result


# --- identification lines ------------------------------------------------------------


def test_client_banner_alone_is_ssh_and_asks_for_more() -> None:
    found = detection(detect_ssh(CLIENT_BANNER, b"", CTX))
    assert found.kind == SSH
    assert found.refine is True
    assert found.info["role"] == "unknown"
    assert found.info["client"] == "OpenSSH_9.6p1 Ubuntu-3ubuntu13"
    assert found.evidence == ">SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\\r\\n"


def test_server_banner_alone_is_ssh() -> None:
    found = detection(detect_ssh(b"", SERVER_BANNER, CTX))
    assert found.info["server"] == "OpenSSH_9.2p1 Debian-2+deb12u3"
    assert found.evidence.startswith("<SSH-2.0-")


def test_every_prefix_of_a_banner_is_need_more_until_the_lf() -> None:
    for cut in range(len(CLIENT_BANNER)):
        assert detect_ssh(CLIENT_BANNER[:cut], b"", CTX) is NEED_MORE, cut
    assert isinstance(detect_ssh(CLIENT_BANNER, b"", CTX), Detection)


def test_bare_lf_terminates_the_banner_as_in_openssh() -> None:
    found = detection(detect_ssh(b"SSH-2.0-dropbear_2022.83\n", b"", CTX))
    assert found.info["client"] == "dropbear_2022.83"


@pytest.mark.parametrize("version", [b"2.0", b"1.99", b"1.5"])
def test_protocol_versions_in_use_are_ssh(version: bytes) -> None:
    found = detection(detect_ssh(b"SSH-" + version + b"-Soft_1.0\r\n", b"", CTX))
    assert found.info["client_version"] == version.decode()


def test_lowercase_ssh_prefix_is_not_a_banner() -> None:
    # OpenSSH compares "SSH-" with memcmp; "ssh-2.0-..." is just a line of text.
    assert detect_ssh(b"ssh-2.0-OpenSSH_9.6\r\n", b"", CTX) is NEED_MORE
    assert detect_ssh(b"ssh-2.0-OpenSSH_9.6\r\n", b"sSH-2.0-x\r\n", CLOSED) is NOT_THIS


@pytest.mark.parametrize(
    "line",
    [b"SSH-2.0\r\n", b"SSH-x.y-soft\r\n", b"SSH-2.0-\r\n", b"SSH-2-soft\r\n", b"SSH-2.0-so\rft\r\n"],
)
def test_malformed_identification_is_not_ssh(line: bytes) -> None:
    assert detect_ssh(line, b"", CLOSED) is NOT_THIS


def test_ssh_line_of_four_bytes_is_an_ordinary_line_before_the_banner() -> None:
    found = detection(detect_ssh(b"", b"SSH-\r\n" + SERVER_BANNER, CTX))
    assert found.info["server_pre_banner_lines"] == "1"


def test_server_lines_before_the_banner_are_allowed_and_mark_the_server() -> None:
    rev = b"Welcome to host\r\n\r\n*** authorized use only ***\r\n" + SERVER_BANNER
    found = detection(detect_ssh(CLIENT_BANNER, rev, CTX))
    assert found.info["server_pre_banner_lines"] == "3"
    assert found.info["role"] == "normal"
    assert "pre-banner-lines" in found.info["role_basis"]


def test_pre_banner_lines_from_the_originator_mean_it_is_the_server() -> None:
    found = detection(detect_ssh(b"hello\r\n" + SERVER_BANNER, CLIENT_BANNER, CTX))
    assert found.kind == SSH_REVERSE
    assert found.info["role"] == "inverted"


def test_banner_after_1023_lines_is_ssh_but_after_1024_it_is_not() -> None:
    assert isinstance(detect_ssh(b"", b"\n" * 1023 + SERVER_BANNER, CTX), Detection)
    assert detect_ssh(b"", b"\n" * 1024 + SERVER_BANNER, CLOSED) is NOT_THIS


def test_nul_before_the_banner_is_not_ssh() -> None:
    assert detect_ssh(b"", b"motd\x00\r\n" + SERVER_BANNER, CLOSED) is NOT_THIS


def test_banner_longer_than_rfc_limit_counts_without_waiting_for_lf() -> None:
    long_banner = b"SSH-2.0-" + b"A" * 300
    found = detection(detect_ssh(long_banner, b"", CTX))
    assert found.info["client"].startswith("AAAA")


def test_unterminated_banner_counts_when_the_direction_closes() -> None:
    assert detect_ssh(b"SSH-2.0-OpenSSH_9", b"", CTX) is NEED_MORE
    closed = StreamContext(sport=1, dport=22, fwd_closed=True)
    assert isinstance(detect_ssh(b"SSH-2.0-OpenSSH_9", b"", closed), Detection)


def test_text_from_both_sides_is_given_up_only_when_they_end() -> None:
    http = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
    assert detect_ssh(http, b"HTTP/1.1 200 OK\r\n\r\n", CTX) is NEED_MORE
    assert detect_ssh(http, b"HTTP/1.1 200 OK\r\n\r\n", CLOSED) is NOT_THIS


def test_client_lines_before_its_banner_are_still_ssh() -> None:
    # RFC 4253 reserves this for servers, but Go's x/crypto/ssh and paramiko servers accept
    # it from clients too, so it is a cheap disguise that must not hide the session.
    fwd = b"GET / HTTP/1.1\r\n\r\n" + CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30)
    rev = b"HTTP/1.1 200 OK\r\n\r\n" + SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(31)
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.kind == SSH
    assert found.info["role"] == "normal"  # the key exchange decides, not the preambles
    assert found.info["role_conflict"] == "pre-banner-lines"


def test_text_from_one_side_alone_may_still_be_a_server_preamble() -> None:
    assert detect_ssh(b"220 mail.example ESMTP\r\n", b"", CTX) is NEED_MORE


# --- the edge case: an HTTP client talking to an SSH server ------------------------------


def test_http_client_to_ssh_server_is_ssh_with_no_client_banner() -> None:
    fwd = b"GET / HTTP/1.1\r\nHost: 198.51.100.7:22\r\nUser-Agent: Mozilla/5.0\r\n\r\n"
    found = detection(detect_ssh(fwd, b"SSH-2.0-OpenSSH_8.7\r\n", CTX))
    assert found.kind == SSH
    assert found.info["client_banner"] == "none"
    assert found.info["client_sent"].startswith("GET / HTTP/1.1")
    assert found.info["role"] == "normal"
    assert found.info["server"] == "OpenSSH_8.7"


def test_server_protocol_mismatch_text_is_reported_not_fatal() -> None:
    found = detection(detect_ssh(b"\r\n", b"SSH-2.0-OpenSSH_7.4\nProtocol mismatch.\n", CLOSED))
    assert found.info["malformed"] == "rev"
    assert found.info["rev_after_banner"] == "Protocol mismatch.\\n"
    assert found.refine is False


# --- KEXINIT, HASSH and the SSH role --------------------------------------------------------


def test_hassh_uses_client_to_server_lists_of_the_client_kexinit() -> None:
    found = detection(detect_ssh(CLIENT_BANNER + kexinit(KEX_CLIENT), b"", CTX))
    assert found.info["hassh"] == hassh_of(KEX_CLIENT, ENC_C2S, MAC_C2S, CMP_C2S)


def test_hassh_server_uses_server_to_client_lists_of_the_server_kexinit() -> None:
    found = detection(detect_ssh(b"", SERVER_BANNER + kexinit(KEX_SERVER, "server"), CTX))
    assert found.info["hassh_server"] == hassh_of(KEX_SERVER, ENC_S2C, MAC_S2C, CMP_S2C)


def test_kex_init_from_the_originator_is_the_normal_role() -> None:
    fwd = CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30)
    rev = SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(31)
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.kind == SSH
    assert found.info["role"] == "normal"
    assert found.info["role_basis"] == "kex-message"
    assert found.refine is False


def test_kex_init_from_the_responder_is_a_reverse_ssh_session() -> None:
    fwd = SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(31)
    rev = CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30)
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.kind == SSH_REVERSE
    assert found.info["role"] == "inverted"
    # HASSH follows the SSH roles, not the TCP ones.
    assert found.info["hassh"] == hassh_of(KEX_PLAIN, ENC_C2S, MAC_C2S, CMP_C2S)
    assert found.info["client"] == "OpenSSH_9.6p1 Ubuntu-3ubuntu13"


def test_group_exchange_request_from_the_responder_is_reverse() -> None:
    fwd = SERVER_BANNER + kexinit(KEX_GEX, "server")
    rev = CLIENT_BANNER + kexinit(KEX_GEX) + msg(34, b"\x00\x00\x08\x00" * 3)
    assert detection(detect_ssh(fwd, rev, CTX)).kind == SSH_REVERSE


def test_message_30_means_server_under_rsa_key_exchange() -> None:
    # RFC 4432: KEXRSA_PUBKEY (30) is sent by the server, unlike KEXDH_INIT (30).
    fwd = CLIENT_BANNER + kexinit(KEX_RSA)
    rev = SERVER_BANNER + kexinit(KEX_RSA, "server") + msg(30)
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.info["role"] == "normal"


def test_client_only_kexinit_flag_gives_the_role_without_a_kex_message() -> None:
    found = detection(detect_ssh(b"", CLIENT_BANNER + kexinit(KEX_CLIENT), CTX))
    assert found.info["role"] == "inverted"
    assert found.info["role_basis"] == "kexinit-client-flag"


def test_server_only_kexinit_flag_from_the_responder_is_normal() -> None:
    found = detection(detect_ssh(b"", SERVER_BANNER + kexinit(KEX_SERVER, "server"), CTX))
    assert found.info["role"] == "normal"


def test_kex_message_overrules_a_faked_kexinit_flag() -> None:
    fwd = CLIENT_BANNER + kexinit(KEX_CLIENT) + msg(31)  # lists ext-info-c, but sends a server reply
    found = detection(detect_ssh(fwd, b"", CTX))
    assert found.kind == SSH_REVERSE
    assert found.info["role_basis"] == "kex-message"
    assert found.info["role_conflict"] == "kexinit-client-flag"


def test_weak_facts_that_disagree_leave_the_role_unknown() -> None:
    fwd = CLIENT_BANNER + kexinit(KEX_CLIENT)
    rev = SERVER_BANNER + kexinit(KEX_CLIENT, "server")  # both claim ext-info-c
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.info["role"] == "unknown"
    assert found.kind == SSH
    assert found.refine is True


def test_kex_messages_that_contradict_each_other_leave_the_role_unknown() -> None:
    fwd = CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30)
    rev = SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(30)  # both send an INIT
    assert detection(detect_ssh(fwd, rev, CTX)).info["role"] == "unknown"


def test_role_from_weak_facts_only_keeps_refining() -> None:
    fwd = CLIENT_BANNER + kexinit(KEX_CLIENT)
    rev = SERVER_BANNER + kexinit(KEX_SERVER, "server")
    found = detection(detect_ssh(fwd, rev, CTX))
    assert found.info["role"] == "normal"
    assert found.refine is True  # until the kex message shows who really is the client


def test_half_duplex_client_side_is_detected_with_its_role() -> None:
    found = detection(detect_ssh(CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30), b"", CTX))
    assert found.info["role"] == "normal"
    assert "hassh" in found.info
    assert found.refine is True  # the server's KEXINIT could still arrive


def test_refine_stops_when_both_directions_are_closed() -> None:
    found = detection(detect_ssh(CLIENT_BANNER, SERVER_BANNER, CLOSED))
    assert found.refine is False
    assert found.info["role"] == "unknown"


def test_ignore_message_before_kexinit_is_skipped() -> None:
    fwd = CLIENT_BANNER + msg(2, b"\x00\x00\x00\x03abc") + kexinit(KEX_PLAIN) + msg(30)
    found = detection(detect_ssh(fwd, b"", CTX))
    assert found.info["role"] == "normal"
    assert "hassh" in found.info


def test_ssh1_session_key_packet_marks_the_client() -> None:
    # SSH-1: length(4) covers type+data+crc; 8 - length % 8 bytes of padding precede the type.
    length = 1 + 10 + 4
    pkt = struct.pack("!I", length) + b"\x00" * (8 - length % 8) + b"\x03" + b"\x00" * 14
    found = detection(detect_ssh(b"", b"SSH-1.5-OpenSSH_6.2\n" + pkt, CTX))
    assert found.info["role"] == "inverted"
    assert found.info["role_basis"] == "ssh1-session-key"


@pytest.mark.parametrize("length", [0, 1, 4, 0xFFFFFFFF, 0x7FFFFFFF])
def test_absurd_packet_length_is_malformed_but_the_banner_still_counts(length: int) -> None:
    fwd = CLIENT_BANNER + struct.pack("!IB", length, 4) + b"\x14" + b"\x00" * 40
    found = detection(detect_ssh(fwd, b"", CTX))
    assert found.info["malformed"] == "fwd"
    assert "hassh" not in found.info


def test_kexinit_with_lying_name_list_length_gives_no_hassh() -> None:
    bad = packet(bytes([20]) + bytes(16) + struct.pack("!I", 10_000) + b"curve25519-sha256")
    found = detection(detect_ssh(CLIENT_BANNER + bad, b"", CTX))
    assert "hassh" not in found.info
    assert found.info["malformed"] == "fwd"


# --- real OpenSSH bytes -------------------------------------------------------------------


def test_real_openssh_session_is_normal_with_both_hasshes() -> None:
    found = detection(detect_ssh(REAL_CLIENT, REAL_SERVER, CTX))
    assert found.kind == SSH
    assert found.info["role"] == "normal"
    assert found.info["client"] == "OpenSSH_9.2p1 Debian-2+deb12u10"
    assert len(found.info["hassh"]) == len(found.info["hassh_server"]) == 32
    assert found.refine is False


def test_real_openssh_session_with_tcp_roles_swapped_is_reverse() -> None:
    found = detection(detect_ssh(REAL_SERVER, REAL_CLIENT, CTX))
    assert found.kind == SSH_REVERSE
    assert found.info["role"] == "inverted"
    same = detection(detect_ssh(REAL_CLIENT, REAL_SERVER, CTX))
    assert found.info["hassh"] == same.info["hassh"]


def _replay(fwd: bytes, rev: bytes, rng: random.Random, max_chunk: int) -> list[Result]:
    """Feed both directions in random-sized pieces (server speaks first), all results."""
    results: list[Result] = []
    i = j = 0
    while i < len(fwd) or j < len(rev):
        if j < len(rev) and (i >= len(fwd) or rng.random() < 0.5):
            j = min(len(rev), j + rng.randint(1, max_chunk))
        else:
            i = min(len(fwd), i + rng.randint(1, max_chunk))
        results.append(detect_ssh(fwd[:i], rev[:j], CTX))
    return results


@pytest.mark.parametrize(("max_chunk", "seed"), [(1, 0), (7, 1), (300, 2), (1500, 3)])
def test_real_handshake_in_any_segmentation_is_never_a_wrong_answer(max_chunk: int, seed: int) -> None:
    for fwd, rev, final_kind in ((REAL_CLIENT, REAL_SERVER, SSH), (REAL_SERVER, REAL_CLIENT, SSH_REVERSE)):
        results = _replay(fwd, rev, random.Random(seed), max_chunk)
        assert NOT_THIS not in results
        first = next(n for n, r in enumerate(results) if isinstance(r, Detection))
        assert all(r is NEED_MORE for r in results[:first])
        assert all(isinstance(r, Detection) for r in results[first:])
        last = detection(results[-1])
        assert last.kind == final_kind
        assert last.refine is False
        # Before the role is known the kind is the neutral one, never the opposite role.
        assert all(detection(r).kind in (SSH, final_kind) for r in results[first:])


# --- not SSH -----------------------------------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("160301002f0100002b0303") + bytes(32) + bytes.fromhex("000002c02f01000000")
BITCOIN_VERSION = bytes.fromhex("f9beb4d976657273696f6e0000000000550000000000000000")
LSP = b'Content-Length: 52\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize"}'


@pytest.mark.parametrize(
    ("fwd", "rev"),
    [
        (TLS_CLIENT_HELLO, bytes.fromhex("160303007a020000760303") + bytes(64)),
        (BITCOIN_VERSION, BITCOIN_VERSION),
        (LSP, LSP),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 301 Moved\r\n\r\n"),
        (b'{"id":1,"method":"mining.subscribe","params":[]}\n', b'{"id":1,"result":[]}\n'),
    ],
)
def test_other_protocols_are_not_ssh(fwd: bytes, rev: bytes) -> None:
    assert detect_ssh(fwd, rev, CLOSED) is NOT_THIS


@pytest.mark.parametrize("data", [TLS_CLIENT_HELLO, BITCOIN_VERSION, b"line\rfeed\n"])
def test_binary_or_bare_cr_rules_ssh_out_without_waiting(data: bytes) -> None:
    assert detect_ssh(data, data, CTX) is NOT_THIS


def test_binary_client_data_alone_is_not_ssh_once_closed() -> None:
    assert detect_ssh(TLS_CLIENT_HELLO, b"", CLOSED) is NOT_THIS


@pytest.mark.parametrize("tail", [b"\x00" * 64, b"\xff" * 64, bytes(range(256)), struct.pack("!I", 0x100000)])
def test_hostile_bytes_after_the_banner_never_raise(tail: bytes) -> None:
    assert isinstance(detect_ssh(CLIENT_BANNER + tail, SERVER_BANNER + tail, CTX), Detection)


_CTXS = st.builds(
    StreamContext,
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    fwd_closed=st.booleans(),
    rev_closed=st.booleans(),
    fwd_full=st.booleans(),
    rev_full=st.booleans(),
)
_SSHISH = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda b, t: b + t, st.sampled_from([CLIENT_BANNER, SERVER_BANNER, b"SSH-1.5-x\n"]), st.binary()),
    st.builds(lambda t: CLIENT_BANNER + kexinit(KEX_CLIENT)[: len(t)] + t, st.binary(max_size=2000)),
)


@settings(max_examples=300, deadline=None)
@given(fwd=_SSHISH, rev=_SSHISH, ctx=_CTXS)
def test_arbitrary_input_never_raises(fwd: bytes, rev: bytes, ctx: StreamContext) -> None:
    result = detect_ssh(fwd, rev, ctx)
    assert result is NEED_MORE or result is NOT_THIS or isinstance(result, Detection)


# -- the no-banner shortcut (detect_ssh's answer for heads holding no "SSH-") ------------------

_NO_BANNER_PIECES = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"\x00",
        b"\x16\x03\x01",
        b'{"id":1}',
        b"SS",
        b"SH",
        b"a" * 300,
        b"x",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_NO_BANNER_PIECES, max_size=12), st.booleans(), st.integers(0, 9000))
def test_no_banner_shortcut_decides_as_the_full_scan(pieces: list[bytes], final: bool, pad: int) -> None:
    from egressd.detect.ssh import _NOT, _refused_without_banner, _scan_ident, _Side

    data = b"".join(pieces) + (b"y" * pad if pad > 8000 else b"")
    if b"SSH-" in data:
        return
    side = _Side()
    _scan_ident(data, final, side)
    assert _refused_without_banner(data, final) == (side.state == _NOT)


def test_many_short_lines_without_a_banner_are_refused_by_the_shortcut() -> None:
    from egressd.detect.ssh import MAX_PRE_BANNER_LINES

    head = b"x\n" * MAX_PRE_BANNER_LINES
    assert detect_ssh(head, b"", CTX) is NEED_MORE  # the other side may still show a banner
    assert detect_ssh(head, b"\x00", CTX) is NOT_THIS
