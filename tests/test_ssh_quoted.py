"""An SSH version line quoted inside another protocol is not SSH (RFC 4253 §4.2).

A line starting ``SSH-2.0-`` inside an HTTP body, a mail, a chat or an FTP transfer is text,
not an identification: only a server may send lines before its version string, the peer of
an SSH endpoint speaks SSH too (its own version line, or nothing yet), and what follows a
version line is an SSH binary packet, never another line of text. Each conversation below is
fed message by message, in both directions (the text sent by the node and received by it):
the detector must never claim SSH at any point, and the default policy must never alert on
or drop the flow.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, Result, StreamContext
from egressd.detect.ssh import detect_ssh
from egressd.engine import DIR_UNKNOWN, Engine
from egressd.paths import default_policy
from egressd.policy import load_policy
from tests.test_detect_ssh import KEX_PLAIN, kexinit, msg

# A text file of the kind that gets downloaded, mailed and pasted: sshd's log, a honeypot's
# list of banners. Its first line is a version line too (a file of banners).
SSHD_LOG = (
    b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\n"
    b"Dec  5 07:01:02 bastion sshd[1234]: Connection from 198.51.100.9 port 51234\n"
    b"SSH-2.0-libssh_0.10.6\n"
    b"SSH-2.0-Go\n"
    b"SSH-2.0-dropbear_2022.83\n"
    b"Dec  5 07:01:03 bastion sshd[1234]: Connection closed by 198.51.100.9 port 51234\n"
    b"SSH-2.0-PuTTY_Release_0.80\n"
)
# The same, ending on a version line: nothing follows it in its own direction.
BANNERS_LAST = b"banners seen today:\r\nSSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"

SSH_V = (
    b"$ ssh -v git@198.51.100.7\n"
    b"OpenSSH_9.6p1 Ubuntu-3ubuntu13, OpenSSL 3.0.13 30 Jan 2024\n"
    b"debug1: Reading configuration data /etc/ssh/ssh_config\n"
    b"debug1: Connecting to 198.51.100.7 [198.51.100.7] port 22.\n"
    b"debug1: Connection established.\n"
    b"debug1: Local version string SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\n"
    b"debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 Debian-2+deb12u3\n"
    b"$ nc 198.51.100.7 22\n"
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\n"
    b"^C\n"
)

Msg = tuple[str, bytes]  # ("c", bytes from the originator) or ("s", bytes from the responder)


def _http_get(body: bytes) -> list[Msg]:
    return [
        ("c", b"GET /sshd.log HTTP/1.1\r\nHost: files.example.net\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"),
        ("s", b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\nContent-type: text/plain\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body)),
        ("s", body),
    ]  # fmt: skip


def _http_put(body: bytes) -> list[Msg]:
    return [
        ("c", b"PUT /upload/sshd.log HTTP/1.1\r\nHost: files.example.net\r\nUser-Agent: curl/8.5.0\r\n"
              b"Accept: */*\r\nContent-Length: %d\r\n\r\n" % len(body)),
        ("c", body),
        ("s", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
    ]  # fmt: skip


def _smtp(body: bytes) -> list[Msg]:
    return [
        ("s", b"220 mail.example.org ESMTP Postfix (Debian/GNU)\r\n"),
        ("c", b"EHLO node.example.org\r\n"),
        ("s", b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"),
        ("c", b"MAIL FROM:<ops@example.org>\r\n"),
        ("s", b"250 2.1.0 Ok\r\n"),
        ("c", b"RCPT TO:<sec@example.org>\r\n"),
        ("s", b"250 2.1.5 Ok\r\n"),
        ("c", b"DATA\r\n"),
        ("s", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        ("c", b"From: ops@example.org\r\nSubject: sshd log\r\n\r\n" + body.replace(b"\n", b"\r\n")),
        ("c", b".\r\n"),
        ("s", b"250 2.0.0 Ok: queued as 4F2A81C0\r\n"),
        ("c", b"QUIT\r\n"),
        ("s", b"221 2.0.0 Bye\r\n"),
    ]


def _chat(text: bytes) -> list[Msg]:
    """Plain-text chat over a raw TCP connection (``nc``): lines as typed or pasted."""
    return [
        ("c", b"hi, have a look at what the honeypot logged\n"),
        ("s", b"sure, paste it\n"),
        ("c", text),
        ("s", b"thanks, those are all scanners\n"),
    ]


def _chat_pasted_first(text: bytes) -> list[Msg]:
    """The paste is the very first thing sent: its first line is at byte 0 of the stream."""
    return [("c", text), ("s", b"thanks, those are all scanners\n")]


def _irc(text: bytes) -> list[Msg]:
    msgs: list[Msg] = [
        ("c", b"NICK node7\r\nUSER node7 0 * :node seven\r\n"),
        ("s", b":irc.example.net 001 node7 :Welcome to the ExampleNet IRC Network node7\r\n"),
        ("c", b"JOIN #ops\r\n"),
    ]
    for line in text.splitlines():
        msgs.append(("c", b"PRIVMSG #ops :" + line + b"\r\n"))
        msgs.append(("s", b":peer!p@198.51.100.9 PRIVMSG #ops :" + line + b"\r\n"))
    return msgs


def _ftp_control() -> list[Msg]:
    return [
        ("s", b"220 (vsFTPd 3.0.3)\r\n"),
        ("c", b"USER anonymous\r\n"),
        ("s", b"331 Please specify the password.\r\n"),
        ("c", b"PASS anonymous@\r\n"),
        ("s", b"230 Login successful.\r\n"),
        ("c", b"PASV\r\n"),
        ("s", b"227 Entering Passive Mode (198,51,100,7,156,64).\r\n"),
        ("c", b"RETR SSH-2.0-OpenSSH_9.6p1.txt\r\n"),
        ("s", b"150 Opening BINARY mode data connection for SSH-2.0-OpenSSH_9.6p1.txt (40 bytes).\r\n"),
        ("s", b"226 Transfer complete.\r\n"),
    ]


def _ftp_data_retr(body: bytes) -> list[Msg]:
    """The passive-mode data connection of a download: the file, and nothing else."""
    return [("s", body)]


def _ftp_data_stor(body: bytes) -> list[Msg]:
    return [("c", body)]


CONVERSATIONS: dict[str, list[Msg]] = {
    "http-download": _http_get(SSHD_LOG),
    "http-download-ending-on-a-banner": _http_get(BANNERS_LAST),
    "http-upload": _http_put(SSHD_LOG),
    "http-upload-ending-on-a-banner": _http_put(BANNERS_LAST),
    "smtp": _smtp(SSHD_LOG),
    "smtp-ending-on-a-banner": _smtp(BANNERS_LAST),
    "chat": _chat(SSHD_LOG),
    "chat-ending-on-a-banner": _chat(BANNERS_LAST),
    "chat-paste-first": _chat_pasted_first(SSHD_LOG),
    "irc": _irc(SSHD_LOG),
    "ftp-control": _ftp_control(),
    "ftp-data-retr": _ftp_data_retr(SSHD_LOG),
    "ftp-data-stor": _ftp_data_stor(SSHD_LOG),
    "ssh-v-transcript-chat": _chat(SSH_V),
    "ssh-v-transcript-paste-first": _chat_pasted_first(SSH_V),
    "ssh-v-transcript-http-upload": _http_put(SSH_V),
    "ssh-v-transcript-http-download": _http_get(SSH_V),
    "ssh-v-transcript-smtp": _smtp(SSH_V),
}


def _swap(msgs: list[Msg]) -> list[Msg]:
    return [("s" if side == "c" else "c", data) for side, data in msgs]


# Not reversed: "http-upload-ending-on-a-banner" turned round is a responder that speaks
# first, to a silent originator, and ends its first flight on a version line. RFC 4253 lets
# an SSH server do exactly that (lines, then its banner, before the client says anything),
# so it is SSH until more bytes say otherwise (docs/ssh-detection.md, "What is left").
_NOT_REVERSED = {"http-upload-ending-on-a-banner"}

CASES = [
    pytest.param(msgs, id=f"{name}-{way}")
    for name, conv in CONVERSATIONS.items()
    for way, msgs in (("as-sent", conv), ("reversed", _swap(conv)))
    if way == "as-sent" or name not in _NOT_REVERSED
]


def _results(msgs: list[Msg], ctx: StreamContext) -> list[Result]:
    """detect_ssh after every message, as the engine calls it while the heads grow."""
    fwd = rev = b""
    out: list[Result] = []
    for side, data in msgs:
        if side == "c":
            fwd += data
        else:
            rev += data
        out.append(detect_ssh(fwd, rev, ctx))
    closed = StreamContext(ctx.sport, ctx.dport, fwd_closed=True, rev_closed=True)
    out.append(detect_ssh(fwd, rev, closed))
    return out


@pytest.mark.parametrize("msgs", CASES)
def test_quoted_version_line_is_never_ssh_at_any_point(msgs: list[Msg]) -> None:
    results = _results(msgs, StreamContext(sport=40000, dport=80))
    claims = [r for r in results if isinstance(r, Detection)]
    assert not claims, [(r.kind, r.evidence, r.info) for r in claims]
    assert results[-1] is NOT_THIS


@pytest.mark.parametrize("msgs", CASES)
def test_quoted_version_line_is_never_ssh_on_port_22_either(msgs: list[Msg]) -> None:
    """The port is no evidence: the same bytes to port 22 are still not SSH."""
    results = _results(msgs, StreamContext(sport=40000, dport=22))
    assert not [r for r in results if isinstance(r, Detection)]


def test_a_version_line_alone_at_the_end_of_a_direction_waits_for_what_follows() -> None:
    # An upload whose body ends on a version line, the server not answered yet: that could
    # be a server's preamble and banner, but a server's banner is followed by a binary
    # packet or answered by the client's own version line, so nothing is claimed yet ...
    fwd = b"PUT /x HTTP/1.1\r\nContent-Length: 40\r\n\r\n" + BANNERS_LAST
    assert detect_ssh(fwd, b"", StreamContext(40000, 80)) is NEED_MORE
    # ... and the answer is no SSH client's.
    assert detect_ssh(fwd, b"HTTP/1.1 201 Created\r\n", StreamContext(40000, 80)) is NEED_MORE
    closed = StreamContext(40000, 80, fwd_closed=True, rev_closed=True)
    assert detect_ssh(fwd, b"HTTP/1.1 201 Created\r\n", closed) is NOT_THIS


# --- through the engine and the shipped default policy -------------------------------------

NODE = "198.51.100.2"
SERVER = "203.0.113.40"


def _packets(msgs: list[Msg], dport: int) -> list[bytes]:
    """The conversation as TCP segments (handshake, data, both FINs), at most 1400 bytes each."""
    cseq, sseq = 1000, 5000
    out = [
        bytes(IP(src=NODE, dst=SERVER) / TCP(sport=40000, dport=dport, flags="S", seq=cseq - 1)),
        bytes(IP(src=SERVER, dst=NODE) / TCP(sport=dport, dport=40000, flags="SA", seq=sseq - 1, ack=cseq)),
    ]
    for side, data in msgs:
        for i in range(0, len(data), 1400):
            chunk = data[i : i + 1400]
            if side == "c":
                tcp = TCP(sport=40000, dport=dport, flags="PA", seq=cseq, ack=sseq)
                out.append(bytes(IP(src=NODE, dst=SERVER) / tcp / chunk))
                cseq += len(chunk)
            else:
                tcp = TCP(sport=dport, dport=40000, flags="PA", seq=sseq, ack=cseq)
                out.append(bytes(IP(src=SERVER, dst=NODE) / tcp / chunk))
                sseq += len(chunk)
    out.append(bytes(IP(src=NODE, dst=SERVER) / TCP(sport=40000, dport=dport, flags="FA", seq=cseq, ack=sseq)))
    out.append(bytes(IP(src=SERVER, dst=NODE) / TCP(sport=dport, dport=40000, flags="FA", seq=sseq, ack=cseq + 1)))
    return out


@pytest.mark.parametrize("dport", [80, 25, 21, 6667, 22])
@pytest.mark.parametrize("msgs", CASES)
def test_default_policy_neither_drops_nor_alerts_on_quoted_version_lines(msgs: list[Msg], dport: int) -> None:
    eng = Engine(load_policy(default_policy()))
    for i, p in enumerate(_packets(msgs, dport)):
        eng.feed(p, 1000.0 + i * 0.001, DIR_UNKNOWN)
    eng.finish(1100.0)
    events = list(eng.events)
    assert events, "the flow was not reported"
    # Turned round, an HTTP conversation is the far side sending HTTP requests down the
    # node's own connection: reverse HTTP (docs/tunnels.md), which the default policy drops.
    # That drop, and only that one, is right here; it is still never SSH.
    relay = msgs[0][0] == "s" and msgs[0][1].split(b" ", 1)[0] in (b"GET", b"PUT", b"POST")
    if relay:
        assert [e for e in events if e.rule == "drop-covert-tunnels" and e.detections == ["tunnel.reverse-http"]]
    bad = [
        e
        for e in events
        if (e.verdict != "accept" or e.event_type == "alert" or e.action != "allowed")
        and not (relay and e.rule == "drop-covert-tunnels" and e.detections == ["tunnel.reverse-http"])
    ]
    assert not bad, [(e.rule, e.verdict, e.detection) for e in bad]
    assert not [e for e in events if any(k.startswith("ssh") for k in e.detections)]


# --- real SSH is still SSH, whoever made the client ------------------------------------------

MAKES = [
    b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13",
    b"SSH-2.0-dropbear_2022.83",
    b"SSH-2.0-PuTTY_Release_0.80",
    b"SSH-2.0-paramiko_3.4.0",
    b"SSH-2.0-AsyncSSH_2.14.2",
    b"SSH-2.0-Go",
    b"SSH-2.0-libssh_0.10.6",
]


@pytest.mark.parametrize("preamble", [b"", b"Authorized use only.\r\nAll sessions are logged.\r\n"])
@pytest.mark.parametrize("client", MAKES)
@pytest.mark.parametrize("server_first", [True, False])
def test_real_clients_with_kexinit_in_the_banner_segment_are_ssh_from_their_first_bytes(
    client: bytes, preamble: bytes, server_first: bool
) -> None:
    """Clients send their version line at once, often with KEXINIT in the same segment;
    only servers send lines before their own. Either way it is SSH as soon as a banner that
    stands is seen, and the key exchange gives the role."""
    c_first = client + b"\r\n" + kexinit(KEX_PLAIN)
    s_first = preamble + b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n" + kexinit(KEX_PLAIN, "server")
    msgs: list[Msg] = [("s", s_first), ("c", c_first)] if server_first else [("c", c_first), ("s", s_first)]
    msgs += [("c", msg(30)), ("s", msg(31))]
    results = _results(msgs, StreamContext(sport=40000, dport=22))
    assert NOT_THIS not in results
    assert all(isinstance(r, Detection) for r in results), results
    last = results[-2]
    assert isinstance(last, Detection)
    assert (last.kind, last.info["role"], last.info["client"]) == ("ssh", "normal", client[8:].decode())


# --- any text conversation, any segmentation ----------------------------------------------------

_LINE = st.text(
    alphabet=st.characters(categories=["L", "N", "P", "Zs"], exclude_characters="\r\n"), min_size=0, max_size=40
).map(lambda t: t.encode("utf-8"))
_QUOTED = st.sampled_from(MAKES).map(lambda b: b + b"-quoted")


def _text_stream(first: bytes, lines: list[bytes], eol: bytes) -> bytes:
    return first + eol + b"".join(line + eol for line in lines)


@settings(max_examples=300, deadline=None)
@given(
    client=st.lists(st.one_of(_LINE, _QUOTED, _QUOTED.map(lambda b: b[:-7])), max_size=12),
    server=st.lists(st.one_of(_LINE, _QUOTED, _QUOTED.map(lambda b: b[:-7])), max_size=12),
    eol=st.sampled_from([b"\n", b"\r\n"]),
    cuts=st.lists(st.tuples(st.booleans(), st.integers(1, 64)), min_size=1, max_size=60),
)
def test_a_text_conversation_quoting_version_lines_is_never_ssh_however_it_is_cut(
    client: list[bytes], server: list[bytes], eol: bytes, cuts: list[tuple[bool, int]]
) -> None:
    """The originator speaks first (a request, a greeting reply, a chat line), then both
    sides send lines of text among which are version lines, cut into segments anywhere."""
    fwd = _text_stream(b"HELO node.example.org", client, eol)
    rev = _text_stream(b"250 mail.example.org", server, eol)
    i = j = 0
    ctx = StreamContext(40000, 25)
    first = True
    for to_server, n in cuts:
        if first or (to_server and i < len(fwd)) or j >= len(rev):
            i = min(len(fwd), i + n)
        else:
            j = min(len(rev), j + n)
        first = False
        r = detect_ssh(fwd[:i], rev[:j], ctx)
        assert not isinstance(r, Detection), (fwd[:i], rev[:j], r)
    r = detect_ssh(fwd, rev, StreamContext(40000, 25, fwd_closed=True, rev_closed=True))
    assert r is NOT_THIS
