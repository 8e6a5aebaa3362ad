"""SSH on any port, in either direction, with the SSH role of each TCP end.

Why roles matter: a reverse tunnel (``ssh -R`` run the other way round, or an SSH server
the node dials out to and then serves) shows up as a TCP connection whose *originator* is
the SSH **server**. The port and the banners cannot tell that apart from an ordinary
login; the key exchange can. Detection is emitted as soon as one identification line is
seen (so the flow can be cut before the handshake finishes) with ``refine=True``; the role
and the HASSH fingerprints are filled in as the KEXINIT packets arrive.

Identification (RFC 4253 §4.2, as OpenSSH reads it in ``kex_exchange_identification``):
a line is bytes up to LF, CRs before the LF are dropped, a NUL or a CR followed by
anything but CR/LF kills the connection. The first line longer than 4 bytes that starts
with exactly ``SSH-`` (case-sensitive, OpenSSH uses memcmp) is the banner and must parse
as ``SSH-%d.%d-%[^\\n]``; a malformed one ends the session, so it is NOT this. RFC 4253
lets only the server send other lines first, at most ``MAX_PRE_BANNER_LINES`` of them
(OpenSSH's server refuses them from a client, but Go's x/crypto/ssh and paramiko accept
them from either side), so a direction is given up only when its own bytes rule SSH out,
never because both sides began with text. The RFC caps the banner at 255 bytes but
OpenSSH accepts 8192, so a longer banner is still SSH (padding it is an evasion, not
another protocol); once ``RFC_BANNER_LEN`` bytes of a well-formed ``SSH-x.y-`` line are
seen it counts without waiting for the LF.

A banner found that way is not yet an SSH endpoint's: a line starting ``SSH-2.0-`` inside
a downloaded log, a mail or a chat looks the same. It *stands* (``_stands``) only when the
protocol around it is SSH's: at byte 0 of its direction and not followed by text; or after
lines (a server's preamble) when the peer answers with its own opening version line, or
when an SSH binary packet follows it and the peer is consistent with SSH (a version line,
or nothing at all yet); or, with nothing after it yet, when it is the responder's and the
originator is silent. Text after a banner makes it a quoted line (an SSH packet's first
byte is always 0x00), except the refusal a real sshd writes. docs/ssh-detection.md has the
table; anomalies of banners that stand become ``evasion.*`` findings (``_anomalies``).

Role, from protocol facts only (each is a vote for "this direction is the client/server"):

* the key-exchange message that follows KEXINIT. Numbers 30-49 are method-specific, so
  they are read under the negotiated method (RFC 4253 §7.1: the first of the client's
  kex algorithms that the server also lists, computed for each role hypothesis; with one
  KEXINIT, its list must be a single family). DH/ECDH/hybrid-PQ/GEX: 30, 32, 34 come from
  the client, 31, 33 from the server; RSA (RFC 4432) the other way round; GSS (RFC 4462)
  30/40 client, 32/33/41 server.
* KEXINIT pseudo-algorithms only one side may list: ``ext-info-c`` / ``ext-info-s``
  (RFC 8308), ``kex-strict-c-v00@openssh.com`` / ``kex-strict-s-v00@openssh.com``.
* lines before the banner (server only, RFC 4253 §4.2).
* SSH-1: the server's first packet is SMSG_PUBLIC_KEY (2), the client's CMSG_SESSION_KEY (3).
* a non-SSH side whose first line is an HTTP request is an HTTP client, so the SSH side
  answering it is the server (a browser pointed at port 22).

The key-exchange message and SSH-1 packet types are *strong* (a peer cannot fake them
without breaking the handshake) and decide; the others are *weak* (standard peers follow
them, custom ones can fake them for free) and only decide when no strong fact is known,
and ``refine`` stays on until a strong one is. Conflicting votes give ``role=unknown``
(``role_conflict`` lists the facts that disagree). HASSH (Salesforce) is md5 of
``kex;enc;mac;comp`` from the SSH *client's* KEXINIT (client-to-server lists) and
HASSH-server the same from the server's (server-to-client lists), assigned by SSH role
(TCP orientation while the role is unknown, as Zeek and Suricata do).

Bounds: a pure function over the head (8 KiB per direction), re-run from scratch on
every call, so it must be cheap on a growing buffer: the lines before the banner are
found, checked and counted with find/count/one regex search (C loops, no Python loop per
line), then at most ``_MAX_PACKETS`` packet headers and one KEXINIT are read per
direction. Never raises: every length is checked against the bytes present before use;
packet_length < 5 or > 256 KiB is malformed (OpenSSH's limits; Suricata rejects <= 1 as
an evasion attempt).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Final

from egressd.detect.base import (
    EVASION_SSH_CLIENT_PREAMBLE,
    EVASION_SSH_LONG_BANNER,
    EVASION_SSH_MALFORMED,
    NEED_MORE,
    NOT_THIS,
    SSH,
    SSH_REVERSE,
    Detection,
    Result,
    StreamContext,
    printable,
)

MAX_PRE_BANNER_LINES: Final = 1024  # OpenSSH SSH_MAX_PRE_BANNER_LINES
MAX_LINE: Final = 8192  # OpenSSH SSH_MAX_BANNER_LEN
RFC_BANNER_LEN: Final = 255  # RFC 4253 §4.2 (identification line incl. CR LF)
MAX_PACKET: Final = 256 * 1024  # OpenSSH PACKET_MAX_SIZE
_MIN_PACKET: Final = 5  # OpenSSH: packet_length < 1 + 4 is "Bad packet length"
_MAX_PACKETS: Final = 6  # packet headers walked per direction after the banner

_SSH: Final = b"SSH-"
# A CR run that does not end its line: OpenSSH's ``expect_nl`` rejects the connection.
_BAD_CR: Final = re.compile(rb"\r[^\r\n]")  # the last CR of any bad run is followed by this
_U32 = struct.Struct("!I")

_MSG_DISCONNECT: Final = 1
_MSG_IGNORE: Final = 2
_MSG_UNIMPLEMENTED: Final = 3
_MSG_DEBUG: Final = 4
_MSG_KEXINIT: Final = 20
_SKIPPABLE: Final = frozenset({_MSG_IGNORE, _MSG_UNIMPLEMENTED, _MSG_DEBUG})
_SSH1_SMSG_PUBLIC_KEY: Final = 2
_SSH1_CMSG_SESSION_KEY: Final = 3

CLIENT: Final = "client"
SERVER: Final = "server"
ROLE_NORMAL: Final = "normal"
ROLE_INVERTED: Final = "inverted"
ROLE_UNKNOWN: Final = "unknown"

# Key-exchange method families and who sends each method-specific message number.
_FAM_DH: Final = "dh"
_FAM_RSA: Final = "rsa"
_FAM_GSS: Final = "gss"
_MSG_ROLE: Final[dict[str, dict[int, str]]] = {
    _FAM_DH: {30: CLIENT, 31: SERVER, 32: CLIENT, 33: SERVER, 34: CLIENT},
    _FAM_RSA: {30: SERVER, 31: CLIENT, 32: SERVER},
    _FAM_GSS: {30: CLIENT, 32: SERVER, 33: SERVER, 40: CLIENT, 41: SERVER},
}
_DH_PREFIXES: Final = (
    b"diffie-hellman-",
    b"ecdh-sha2-",
    b"ecmqv-sha2",
    b"curve25519-",
    b"curve448-",
    b"sntrup",
    b"mlkem",
)
# Names in kex_algorithms that are flags, never negotiated (RFC 8308, OpenSSH strict kex,
# dropbear's kexguess2).
_PSEUDO_PREFIXES: Final = (b"ext-info-", b"kex-strict-", b"kexguess")
_CLIENT_MARKERS: Final = frozenset({b"ext-info-c", b"kex-strict-c-v00@openssh.com"})
_SERVER_MARKERS: Final = frozenset({b"ext-info-s", b"kex-strict-s-v00@openssh.com"})

_HTTP_METHODS: Final = (
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"OPTIONS ",
    b"DELETE ",
    b"CONNECT ",
    b"PATCH ",
    b"TRACE ",
)

# Per-direction identification states.
_PENDING: Final = 0  # compatible with SSH so far (empty, partial line, pre-banner lines)
_NOT: Final = 1  # this direction cannot be an SSH peer
_BANNER: Final = 2  # identification line found

# What follows the identification line in its own direction (RFC 4253 §4.2: the binary
# packet protocol starts right after it). A packet's length field is below 256 KiB, so its
# first byte is always 0x00: any other first byte rules a packet out at once.
_AFTER_NONE: Final = 0  # nothing yet (or not enough to tell)
_AFTER_PACKET: Final = 1  # a well-formed binary packet header (SSH-2 or SSH-1)
_AFTER_TEXT: Final = 2  # another line of text: the "banner" was a line quoted in a text protocol
_AFTER_SSHD_ERROR: Final = 3  # the text a real sshd sends a peer that is not an SSH client
_AFTER_BAD_PACKET: Final = 4  # binary, but not a valid packet: malformed (an evasion hint)

# What sshd writes after its banner to a peer whose identification it refuses (OpenSSH
# kex.c send_error; sshd.c "Protocol mismatch." before 7.x): a server's answer, not text.
_SSHD_ERRORS: Final = (
    b"Invalid SSH identification string.",
    b"Protocol major versions differ.",
    b"Protocol mismatch.",
)
_TEXT_BYTES: Final = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)))


@dataclass(frozen=True, slots=True)
class _Vote:
    """One fact about which SSH role a direction plays."""

    role: str  # CLIENT or SERVER, for the direction that carries the fact
    why: str
    strong: bool


@dataclass(slots=True)
class _Side:
    """What one direction's head says. Internal, rebuilt on every call."""

    head: bytes = b""  # first bytes of the direction, for evidence when it is not SSH
    state: int = _PENDING
    line: bytes = b""  # banner without CR/LF
    raw: bytes = b""  # banner as sent, for evidence
    pre_lines: int = 0
    text_lines: int = 0  # complete lines before the banner (or so far, while there is none)
    major: int = -1
    minor: int = -1
    after: int = 0  # offset of the first byte after the banner line
    http_client: bool = False
    kexinit: tuple[bytes, ...] | None = None
    kex_msg: int = -1  # first method-specific kex message after KEXINIT
    ssh1_type: int = -1
    malformed: bool = False
    after_kind: int = _AFTER_NONE
    standing: bool = False  # this side is an SSH endpoint, consistent with its peer
    done: bool = False  # nothing more to learn from this direction's packets
    votes: list[_Vote] = field(default_factory=list)


def _scan_int(line: bytes, pos: int) -> tuple[int, int] | None:
    """sscanf ``%d`` at ``pos``: optional whitespace and sign, then at least one digit."""
    n = len(line)
    while pos < n and line[pos] in b" \t\n\v\f\r":
        pos += 1
    negative = pos < n and line[pos] == 0x2D
    if pos < n and line[pos] in b"+-":
        pos += 1
    start = pos
    while pos < n and 0x30 <= line[pos] <= 0x39 and pos - start < 9:
        pos += 1
    if pos == start:
        return None
    value = int(line[start:pos])
    return (-value if negative else value), pos


def _parse_version(line: bytes) -> tuple[int, int] | None:
    """``SSH-%d.%d-`` followed by at least one byte, as OpenSSH's sscanf wants it."""
    first = _scan_int(line, 4)
    if first is None or first[1] >= len(line) or line[first[1]] != 0x2E:
        return None
    second = _scan_int(line, first[1] + 1)
    if second is None:
        return None
    end = second[1]
    if end + 1 >= len(line) or line[end] != 0x2D:
        return None
    return first[0], second[0]


def _line_ok(raw: bytes) -> bool:
    """OpenSSH's byte rules: no NUL, and CR only in the run right before the LF."""
    body = raw.rstrip(b"\r")
    return b"\x00" not in body and b"\r" not in body


def _next_candidate(data: bytes, frm: int) -> int:
    """Start of the next line beginning with ``SSH-`` at or after the LF at ``frm``, or -1."""
    i = data.find(b"\n" + _SSH, frm)
    return i + 1 if i >= 0 else -1


def _scan_ident(data: bytes, final: bool, side: _Side) -> None:
    """Find the identification line; fills ``side`` (state, banner, pre-banner count).

    C-speed operations only (find/count/one regex search), so a head of 8 KiB of short
    lines fed one byte at a time costs a few memchr passes per call, not a Python loop per
    line. Lines before the banner are only checked for the bytes OpenSSH refuses (NUL, a
    stray CR) and counted; their length limit (``MAX_LINE``) cannot bind inside the head.
    """
    n = len(data)
    nl = data.find(b"\n")
    first = data[: nl if nl >= 0 else n]
    side.http_client = nl >= 0 and first.startswith(_HTTP_METHODS) and b" HTTP/" in first
    pos = 0 if data.startswith(_SSH) else _next_candidate(data, 0)
    while pos >= 0:
        eol = data.find(b"\n", pos)
        if eol < 0 or len(data[pos:eol].rstrip(b"\r")) > 4:
            break
        pos = _next_candidate(data, eol)  # "SSH-" alone is an ordinary line to OpenSSH
    pre = data[:pos] if pos >= 0 else data
    if b"\x00" in pre or (b"\r" in pre and _BAD_CR.search(pre) is not None):
        _mark_not(side)
        return
    lines = pre.count(b"\n")
    if lines >= MAX_PRE_BANNER_LINES:
        _mark_not(side)
        return
    side.text_lines = lines
    if pos < 0:
        # No banner yet: complete lines and maybe a partial one (perhaps "SS" of "SSH-").
        if final or n - (pre.rfind(b"\n") + 1) > MAX_LINE:
            _mark_not(side)
        return
    eol = data.find(b"\n", pos)
    raw = data[pos : eol + 1] if eol >= 0 else data[pos:]
    body = raw.rstrip(b"\r\n")
    if not _line_ok(raw.rstrip(b"\n")) or len(body) > MAX_LINE:
        _mark_not(side)
        return
    if eol < 0 and not final and len(raw) < RFC_BANNER_LEN:
        return  # banner still arriving
    version = _parse_version(body)
    if version is None:
        _mark_not(side)
        return
    side.state = _BANNER
    side.line = body
    side.raw = raw
    side.pre_lines = lines
    side.major, side.minor = version
    side.after = eol + 1 if eol >= 0 else n
    side.done = eol < 0 and final


def _refused_without_banner(data: bytes, final: bool) -> bool:
    """What :func:`_scan_ident` decides of a head holding no ``SSH-`` at all: True when it can
    no longer become an SSH peer's (a NUL or a stray CR, too many lines, a partial line past
    ``MAX_LINE``, or the direction is over), False while a banner may still follow.

    The common case by far (TLS, HTTP, Stratum, ... at the head): :func:`detect_ssh` answers
    it with these few C-speed scans instead of building and filling two ``_Side`` records
    (a fifth of the detectors' time in bench/replay.py). Same checks, same order as
    ``_scan_ident`` with no candidate line (``pos < 0``, ``pre`` = the whole head);
    tests/test_detect_ssh.py compares the two on generated heads.
    """
    if b"\x00" in data or (b"\r" in data and _BAD_CR.search(data) is not None):
        return True
    if data.count(b"\n") >= MAX_PRE_BANNER_LINES:
        return True
    return final or len(data) - (data.rfind(b"\n") + 1) > MAX_LINE


def _mark_not(side: _Side) -> None:
    side.state = _NOT


def _malformed(side: _Side) -> None:
    """Binary bytes after the banner that are no valid packet (the first ones decide the kind)."""
    side.malformed = True
    side.done = True
    if side.after_kind == _AFTER_NONE:
        side.after_kind = _AFTER_BAD_PACKET


def _classify_after(data: bytes, side: _Side) -> None:
    """Text, sshd's refusal, or (first byte 0x00) perhaps a packet: see ``_AFTER_*``.

    Text after an identification line is what a quoted line looks like (the next line of a
    log, a mail, a chat) and never what an SSH peer sends. UTF-8 text counts as text: a log
    line may start with a non-ASCII letter.
    """
    pos = side.after
    if pos >= len(data) or data[pos] == 0:
        return  # nothing yet, or a packet's length field: _scan_packets decides
    rest = data[pos : pos + 40]
    for refusal in _SSHD_ERRORS:
        if rest.startswith(refusal) or refusal.startswith(rest):
            side.after_kind = _AFTER_SSHD_ERROR
            side.malformed = True
            side.done = True
            return
    b = data[pos]
    if 0xC2 <= b <= 0xF4:
        if pos + 1 >= len(data):
            return  # the rest of the character decides
        text = 0x80 <= data[pos + 1] <= 0xBF
    else:
        text = b in _TEXT_BYTES
    if text:
        side.after_kind = _AFTER_TEXT
        side.done = True
    else:
        _malformed(side)


def _stands(side: _Side, peer: _Side, responder: bool) -> bool:
    """Is this banner an SSH endpoint's, consistent with what its peer sends? (RFC 4253 §4.2)

    A version line at the very start of a direction is how an SSH peer opens: it stands
    whatever the other side sent (a browser pointed at port 22 is still talking to sshd).
    Lines before the version line may only come from a server, so such a banner stands
    only when the client answers with its own opening version line, or when an SSH binary
    packet follows the banner *and* the peer is consistent with SSH (a version line of its
    own, or nothing but the start of one yet). Quoted text never meets these: the next line
    of the file follows the quote, and the peer speaks the text protocol.
    """
    if side.state != _BANNER:
        return False
    if side.pre_lines == 0:
        return True
    if peer.state == _BANNER and peer.pre_lines == 0:
        return True
    if side.after_kind == _AFTER_PACKET:
        return peer.state == _BANNER or not peer.head
    # Nothing after the banner yet. A responder's preamble and banner stand while the
    # originator (the SSH client) is silent; an originator's wait for the responder's own
    # version line, which an SSH client sends without waiting (OpenSSH, PuTTY, paramiko, Go,
    # libssh, dropbear): an upload whose body ends on a quoted line must not count. A peer
    # that has sent part of a line is not silent: its line decides, once complete.
    return responder and side.after_kind == _AFTER_NONE and not peer.head


def _name_list(buf: bytes, pos: int, end: int) -> tuple[bytes, int] | None:
    if pos + 4 > end:
        return None
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    if length > end - pos:
        return None
    return buf[pos : pos + length], pos + length


def _parse_kexinit(buf: bytes, start: int, end: int) -> tuple[bytes, ...] | None:
    """The ten name-lists of a KEXINIT payload (``start`` is just after msg byte + cookie)."""
    lists: list[bytes] = []
    pos = start
    for _ in range(10):
        got = _name_list(buf, pos, end)
        if got is None:
            return None
        lists.append(got[0])
        pos = got[1]
    return tuple(lists)


def _is_ssh1(side: _Side, other: _Side) -> bool:
    """SSH-1 packet format is spoken when either side only speaks 1.x (1.99 means both)."""

    def only_v1(s: _Side) -> bool:
        return s.state == _BANNER and s.major == 1 and s.minor != 99

    return only_v1(side) or (only_v1(other) and side.major == 1)


def _scan_packets(data: bytes, final: bool, side: _Side, ssh1: bool) -> None:
    """Walk the first binary packets after the banner: KEXINIT, then the first kex message."""
    if side.done:
        return
    if ssh1:
        _scan_ssh1(data, final, side)
        return
    pos = side.after
    n = len(data)
    for _ in range(_MAX_PACKETS):
        if n - pos < 6:
            side.done = final
            return
        (plen,) = _U32.unpack_from(data, pos)
        pad = data[pos + 4]
        if plen < _MIN_PACKET or plen > MAX_PACKET or pad >= plen - 1:
            _malformed(side)
            return
        msg = data[pos + 5]
        end = pos + 4 + plen
        if side.kexinit is None:
            if msg not in _SKIPPABLE and msg != _MSG_KEXINIT and msg != _MSG_DISCONNECT:
                _malformed(side)
                return
            side.after_kind = _AFTER_PACKET
            if msg in _SKIPPABLE:
                if end > n:
                    side.done = final
                    return
                pos = end
                continue
            if msg != _MSG_KEXINIT:
                side.done = True  # a DISCONNECT: the session ends here
                return
            if end > n:
                side.done = final
                return
            lists = _parse_kexinit(data, pos + 6 + 16, end - pad)
            if lists is None:
                _malformed(side)
                return
            side.kexinit = lists
            names = set(lists[0].split(b","))
            if names & _CLIENT_MARKERS:
                side.votes.append(_Vote(CLIENT, "kexinit-client-flag", strong=False))
            if names & _SERVER_MARKERS:
                side.votes.append(_Vote(SERVER, "kexinit-server-flag", strong=False))
            pos = end
            continue
        if msg in _SKIPPABLE:
            if end > n:
                side.done = final
                return
            pos = end
            continue
        if 30 <= msg <= 49:
            side.kex_msg = msg
        side.done = True
        return
    side.done = True


def _scan_ssh1(data: bytes, final: bool, side: _Side) -> None:
    """SSH-1 packet: length(4) = type+data+crc, 8 - length % 8 bytes padding, then type."""
    pos = side.after
    if len(data) - pos < 4:
        side.done = final
        return
    (plen,) = _U32.unpack_from(data, pos)
    if plen < _MIN_PACKET or plen > MAX_PACKET:
        _malformed(side)
        return
    side.after_kind = _AFTER_PACKET
    type_at = pos + 4 + 8 - (plen % 8)
    if type_at >= len(data):
        side.done = final
        return
    side.ssh1_type = data[type_at]
    if side.ssh1_type == _SSH1_SMSG_PUBLIC_KEY:
        side.votes.append(_Vote(SERVER, "ssh1-public-key", strong=True))
    elif side.ssh1_type == _SSH1_CMSG_SESSION_KEY:
        side.votes.append(_Vote(CLIENT, "ssh1-session-key", strong=True))
    side.done = True


def _family(name: bytes) -> str | None:
    if name.startswith(b"gss-"):
        return _FAM_GSS
    if name.startswith(b"rsa") and b"-sha" in name:
        return _FAM_RSA
    if name.startswith(_DH_PREFIXES):
        return _FAM_DH
    return None


def _real_algs(kex_list: bytes) -> list[bytes]:
    return [a for a in kex_list.split(b",") if a and not a.startswith(_PSEUDO_PREFIXES)]


def _negotiated_family(client: _Side, server: _Side) -> str | None:
    """Family of the kex method the two KEXINITs agree on, or that a lone KEXINIT forces."""
    c = _real_algs(client.kexinit[0]) if client.kexinit is not None else None
    s = _real_algs(server.kexinit[0]) if server.kexinit is not None else None
    if c is not None and s is not None:
        offered = set(s)
        for alg in c:
            if alg in offered:
                return _family(alg)
        return None
    only = c if c is not None else s
    if not only:
        return None
    families = {_family(a) for a in only}
    return families.pop() if len(families) == 1 else None


def _kex_vote(fwd: _Side, rev: _Side) -> str | None:
    """The orientation the kex messages support and the other contradicts, if any."""
    verdicts: dict[str, bool | None] = {}
    for orientation, (client, server) in ((ROLE_NORMAL, (fwd, rev)), (ROLE_INVERTED, (rev, fwd))):
        fam = _negotiated_family(client, server)
        if fam is None:
            verdicts[orientation] = None
            continue
        table = _MSG_ROLE[fam]
        ok: bool | None = None
        for side, expected in ((client, CLIENT), (server, SERVER)):
            said = table.get(side.kex_msg)
            if said is None:
                continue
            if said != expected:
                ok = False
                break
            ok = True
        verdicts[orientation] = ok
    if verdicts[ROLE_NORMAL] is True and verdicts[ROLE_INVERTED] is not True:
        return ROLE_NORMAL
    if verdicts[ROLE_INVERTED] is True and verdicts[ROLE_NORMAL] is not True:
        return ROLE_INVERTED
    return None


@dataclass(frozen=True, slots=True)
class _Role:
    role: str
    strong: bool  # decided by a fact a peer cannot fake without breaking the key exchange
    basis: tuple[str, ...]
    conflict: tuple[str, ...]


def _role(fwd: _Side, rev: _Side) -> _Role:
    """Strong facts (kex message, SSH-1 packet types) decide; weak ones only when none exist.

    Weak facts (KEXINIT flags, pre-banner lines, an HTTP client on the other side) are what
    standard peers do, but a custom peer can fake them at no cost: OpenSSH ignores an
    ``ext-info-c`` in a server's list, and Go's x/crypto/ssh and paramiko accept lines
    before the banner from either side. So they never overrule the key exchange.
    """
    votes: list[tuple[str, _Vote]] = []
    for side, is_fwd in ((fwd, True), (rev, False)):
        for vote in side.votes:
            votes.append((ROLE_NORMAL if (vote.role == CLIENT) == is_fwd else ROLE_INVERTED, vote))
    kex = _kex_vote(fwd, rev)
    if kex is not None:
        votes.append((kex, _Vote(CLIENT, "kex-message", strong=True)))
    for strong in (True, False):
        said = {orientation for orientation, vote in votes if vote.strong == strong}
        if not said:
            continue
        if len(said) > 1:
            break
        role = said.pop()
        basis = tuple(dict.fromkeys(v.why for o, v in votes if o == role))
        conflict = tuple(dict.fromkeys(v.why for o, v in votes if o != role))
        return _Role(role, strong, basis, conflict)
    return _Role(ROLE_UNKNOWN, False, (), tuple(dict.fromkeys(v.why for _, v in votes)))


def _direct_votes(fwd: _Side, rev: _Side) -> None:
    """Facts that need both sides' identification state: pre-banner lines, HTTP clients."""
    for side, other in ((fwd, rev), (rev, fwd)):
        if side.state == _BANNER and side.pre_lines:
            side.votes.append(_Vote(SERVER, "pre-banner-lines", strong=False))
        if side.state != _BANNER and side.http_client and other.state == _BANNER:
            other.votes.append(_Vote(SERVER, "http-client-peer", strong=False))


def _hassh(lists: tuple[bytes, ...], server: bool) -> str:
    enc, mac, comp = (lists[3], lists[5], lists[7]) if server else (lists[2], lists[4], lists[6])
    return hashlib.md5(b";".join((lists[0], enc, mac, comp)), usedforsecurity=False).hexdigest()


def _software(side: _Side) -> str:
    dash = side.line.find(b"-", 4)
    return printable(side.line[dash + 1 :], 128)


def _version(side: _Side) -> str:
    dash = side.line.find(b"-", 4)
    return printable(side.line[4:dash], 16)


def detect_ssh(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """SSH identification in either direction; role and HASSH once the KEXINITs show."""
    fwd_final = ctx.fwd_closed or ctx.fwd_full
    rev_final = ctx.rev_closed or ctx.rev_full
    if _SSH not in fwd and _SSH not in rev:
        # No banner on either side, nor the start of one after a line: the answer below for
        # two sides without a banner, without the records.
        if _refused_without_banner(fwd, fwd_final) and _refused_without_banner(rev, rev_final):
            return NOT_THIS
        return NEED_MORE
    f, r = _Side(head=fwd[:64]), _Side(head=rev[:64])
    _scan_ident(fwd, fwd_final, f)
    _scan_ident(rev, rev_final, r)
    if f.state != _BANNER and r.state != _BANNER:
        # Text from both sides is not enough to give up: Go's x/crypto/ssh and paramiko
        # accept lines before the banner from a client too, so each side is judged alone.
        return NOT_THIS if f.state == _NOT and r.state == _NOT else NEED_MORE
    for side, data in ((f, fwd), (r, rev)):
        if side.state == _BANNER:
            _classify_after(data, side)
            if side.after_kind == _AFTER_TEXT:
                side.state = _NOT  # a line of text that happens to start with "SSH-"
    if f.state == _BANNER and f.after_kind == _AFTER_NONE:
        _scan_packets(fwd, fwd_final, f, _is_ssh1(f, r))
    if r.state == _BANNER and r.after_kind == _AFTER_NONE:
        _scan_packets(rev, rev_final, r, _is_ssh1(r, f))
    f.standing = _stands(f, r, responder=False)
    r.standing = _stands(r, f, responder=True)
    if not (f.standing or r.standing):
        # Not SSH so far; given up once neither direction can still change that.
        done = (f.state == _NOT or fwd_final) and (r.state == _NOT or rev_final)
        return NOT_THIS if done else NEED_MORE
    _direct_votes(f, r)
    decided = _role(f, r)
    role = decided.role
    client, server = (r, f) if role == ROLE_INVERTED else (f, r)

    info: dict[str, str] = {"role": role}
    if decided.basis:
        info["role_basis"] = ",".join(decided.basis)
    if decided.conflict:
        info["role_conflict"] = ",".join(decided.conflict)
    for name, side in (("client", client), ("server", server)):
        if side.state == _BANNER:
            info[name] = _software(side)
            info[f"{name}_version"] = _version(side)
        elif side.state == _NOT or side.http_client:
            # Not an SSH peer (or, so far, an HTTP client): only the other side speaks SSH.
            info[f"{name}_banner"] = "none"
            info[f"{name}_sent"] = printable(side.head, 64)
        if side.pre_lines:
            info[f"{name}_pre_banner_lines"] = str(side.pre_lines)
    if client.kexinit is not None:
        info["hassh"] = _hassh(client.kexinit, server=False)
    if server.kexinit is not None:
        info["hassh_server"] = _hassh(server.kexinit, server=True)
    malformed = [name for name, side in (("fwd", f), ("rev", r)) if side.malformed]
    if malformed:
        info["malformed"] = ",".join(malformed)
        for name, side, data in (("fwd", f, fwd), ("rev", r, rev)):
            if side.malformed:
                info[f"{name}_after_banner"] = printable(data[side.after : side.after + 48], 48)

    evidence = " ".join(
        f"{arrow}{printable(side.raw, 96)}" for arrow, side in ((">", f), ("<", r)) if side.state == _BANNER
    )
    complete = decided.strong and _kex_known(f) and _kex_known(r)
    learnable = _can_learn(f, fwd_final) or _can_learn(r, rev_final)
    return Detection(
        kind=SSH_REVERSE if role == ROLE_INVERTED else SSH,
        evidence=evidence,
        info=info,
        refine=learnable and not complete,
        anomalies=_anomalies(f, r, fwd, rev, client if decided.strong else None),
    )


def _anomalies(f: _Side, r: _Side, fwd: bytes, rev: bytes, client: _Side | None) -> tuple[Detection, ...]:
    """What a standard peer never does, as ``evasion.*`` findings a policy can match.

    A banner padded past RFC 4253's 255 bytes (OpenSSH reads 8 KiB, a filter may not), binary
    bytes after a banner that are no SSH packet (Suricata's "invalid record"), and lines
    before the *client's* banner once the key exchange has shown which side is the client
    (RFC 4253 §4.2 reserves them for servers; Go and paramiko servers accept them, so they
    are a cheap disguise). Only sides that stand as SSH count: a quoted line is not a banner.
    """
    out: list[Detection] = []
    for arrow, side, data in ((">", f, fwd), ("<", r, rev)):
        if not side.standing:
            continue
        if len(side.raw.rstrip(b"\r\n")) + 2 > RFC_BANNER_LEN:
            out.append(
                Detection(
                    EVASION_SSH_LONG_BANNER,
                    f"{arrow}identification line of {len(side.raw)} bytes (RFC 4253 allows {RFC_BANNER_LEN})",
                    info={"length": str(len(side.raw))},
                )
            )
        if side.after_kind == _AFTER_BAD_PACKET or (side.malformed and side.after_kind == _AFTER_PACKET):
            out.append(
                Detection(
                    EVASION_SSH_MALFORMED,
                    f"{arrow}after the banner: {printable(data[side.after : side.after + 32], 32)}",
                    info={"direction": "fwd" if arrow == ">" else "rev"},
                )
            )
    if client is not None and client.standing and client.pre_lines:
        out.append(
            Detection(
                EVASION_SSH_CLIENT_PREAMBLE,
                f"the SSH client sent {client.pre_lines} line(s) before its banner",
                info={"lines": str(client.pre_lines)},
            )
        )
    return tuple(out)


def _kex_known(side: _Side) -> bool:
    """This side's KEXINIT is in hand, or it will never come (not SSH-2, malformed)."""
    return side.kexinit is not None or side.state == _NOT or (side.state == _BANNER and side.done)


def _can_learn(side: _Side, final: bool) -> bool:
    if final or side.state == _NOT:
        return False
    if side.state == _PENDING:
        return True
    return not side.done
