"""What an SSH session is used for, from the sizes and order of its encrypted packets.

Why this is possible: after NEWKEYS everything is encrypted, but RFC 4253 §6 fixes how a
payload becomes a packet (1 byte of padding length, the payload, at least 4 bytes of
padding up to the cipher's block size, then the MAC or AEAD tag), and RFC 4254 fixes the
layout of the connection-protocol messages. OpenSSH (and paramiko, asyncssh) pad
minimally, so a packet's size gives its payload length to within one block, and the
messages that matter have telling lengths (payload bytes):

    CHANNEL_OPEN "session"                      24
    GLOBAL_REQUEST "no-more-sessions@openssh.com" 34 (want_reply 0: no answer)
    GLOBAL_REQUEST "keepalive@openssh.com"      27
    GLOBAL_REQUEST "tcpip-forward"              27 + len(bind address)   (ssh -R)
    CHANNEL_OPEN "tun@openssh.com"              40                       (ssh -w)
    CHANNEL_OPEN "direct-tcpip"                 45 + len(host) + len(originator)  (-L, -D, -W)
    CHANNEL_OPEN "forwarded-tcpip" (server)     48 + len(address) + len(originator)
    REQUEST_SUCCESS / REQUEST_FAILURE           1 (5 with the allocated port)
    CHANNEL_OPEN_CONFIRMATION                   17
    USERAUTH_SUCCESS                            1

How the wire shows a packet depends on the negotiated cipher and MAC (learned here from
the two plaintext KEXINITs, RFC 4253 §7.1: the first of the client's algorithms the server
also lists):

* AES-GCM (RFC 5647) and every ``-etm@openssh.com`` MAC leave the 4-byte length in clear:
  packets are walked exactly from the stream bytes, whatever the TCP segmentation.
* chacha20-poly1305 and the non-ETM MACs encrypt the length: only TCP segment sizes are
  seen. A segment may carry several packets (a sender's one write): a segment whose size
  cannot be more than one packet is a *single* unit, a few write patterns are recognised by
  their total, and anything else ambiguous is left undecided.

The state machine (bounded; one instance per SSH flow whose role is normal):

1. ``HANDSHAKE``: read each direction's plaintext head (banner, KEXINIT, kex messages) up
   to NEWKEYS; learn the framing per direction and the client's software (which write
   patterns apply). An unknown cipher or MAC, or no NEWKEYS within the head: give up (no
   usage kind, ever). Compression (dropbear's default) is followed, but then only the
   client's first requests are read, not the server's answers.
2. ``AUTH``: collect encrypted units; USERAUTH_SUCCESS is the first server unit after the
   client's first encrypted unit that is one minimal packet (payload <= 5 bytes); nothing
   else the server sends during authentication is that small (SERVICE_ACCEPT 17, FAILURE
   >= 15, PK_OK, EXT_INFO, banners are larger).
3. ``CONNECTION``: the first ``MAX_UNITS`` units of each direction after authentication are
   matched against the rules below. A decision ends the watch; so does the bound.

Rules, in short (docs/ssh-usage.md has each with its measurements; every detection's
evidence names the units, their sizes and the inferred messages):

* ``ssh.forward.remote``: the client's first request is a forward request by size, answered
  by a tiny REQUEST_SUCCESS (a channel open is answered by a confirmation, no-more-sessions
  not at all); or, where answers are unreadable, one whose size nothing else first sent has,
  or OpenSSH's and dropbear's write patterns around it; or the server opens a
  ``forwarded-tcpip`` channel the client confirms.
* ``ssh.forward.tun``: a ``tun@openssh.com`` open confirmed, or written with
  no-more-sessions (OpenSSH ``-w``); a program bootstrapped over the session (sshuttle: a long
  command, a large upload on its stdin that is not ended, a short answer, more talk).
* ``ssh.forward.local`` (``-L``, ``-D`` and ``-W`` look alike): a client channel open the
  size of a ``direct-tcpip`` that the server confirms, before any session channel (so it
  cannot be a channel request of a session).

Limits (docs/ssh-usage.md): a custom client can pad randomly or send decoys; a session whose
first requests come after the bound is not named; a lone ``tun@openssh.com`` open under
chacha20-poly1305 is the size of a ``tcpip-forward`` for "localhost" and is named remote.

Bounds: per direction at most ``MAX_UNITS`` units after authentication and
``_MAX_PRE_AUTH`` before it, each a few ints, and ``_MAX_SEGMENTS`` segments in all (a packet
dribbled in tiny segments ends the watch); the handshake walk reads at most ``_MAX_PLAIN``
packet headers, and a handshake not done when a head fills ends it too. Never raises (the
engine also guards every call).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from egressd.detect.base import Detection
from egressd.detect.kinds import SSH_FORWARD_LOCAL, SSH_FORWARD_REMOTE, SSH_FORWARD_TUN

MAX_UNITS: Final = 24  # units per direction watched after authentication (the "first few dozen")
_MAX_PRE_AUTH: Final = 24  # units per direction before USERAUTH_SUCCESS, or give up
_MAX_PLAIN: Final = 16  # plaintext packets walked per direction looking for NEWKEYS
_MAX_SEGMENTS: Final = 256  # segments per direction after the handshake, whatever they carry
# sshuttle's bootstrap (see UsageWatch._bootstrapped): its command is a long one-liner (sshuttle
# 1.1: 150-170 bytes of payload), its upload ~17 KB.
_P_LONG_EXEC: Final = 100
_P_EXEC_MAX: Final = 1500
_UPLOAD_MIN: Final = 8192  # plaintext packets walked per direction looking for NEWKEYS
_BURST: Final = 0.5  # s: client units this close to the first request are one burst (keepalives are >= 1 s apart)

_U32 = struct.Struct("!I")
_COMPRESSIONS: Final = frozenset({b"none", b"zlib@openssh.com", b"zlib"})
# zlib's per-packet flush marker and header can grow a small message (measured: dropbear's
# tcpip-forward for "localhost", 36 bytes, travels as 40..55 under aes256-ctr).
_ZLIB_SLACK: Final = 16
_MSG_KEXINIT: Final = 20
_MSG_NEWKEYS: Final = 21

# Payload lengths (RFC 4254 layouts with OpenSSH's request names).
P_SESSION: Final = 24
P_NO_MORE_SESSIONS: Final = 34
P_KEEPALIVE: Final = 27
P_TUN: Final = 40
P_CONFIRM: Final = 17
P_REPLY_MAX: Final = 5  # REQUEST_SUCCESS with the allocated port
# tcpip-forward: bind address "" .. "255.255.255.255" ("localhost", "127.0.0.1", "0.0.0.0", "*").
# A longer bind address (IPv6 text, a host name) is not modelled: docs/ssh-usage.md.
P_FWD_MIN, P_FWD_MAX = 27, 27 + 15
# Any forward request when its answer is seen: an IPv6 bind address (tcpip-forward, 27 + 45)
# or a socket path (streamlocal-forward@openssh.com, 39 + up to 108).
P_GR_MAX: Final = 39 + 108
P_DIRECT_MIN, P_DIRECT_MAX = 45 + 1 + 3, 45 + 255 + 46  # direct-tcpip: host, originator ("::1")
P_FORWARDED_MIN, P_FORWARDED_MAX = 48 + 1 + 3, 48 + 46 + 46  # forwarded-tcpip, server to client

_MACS: Final = {
    b"hmac-sha2-256": 32,
    b"hmac-sha2-512": 64,
    b"hmac-sha1": 20,
    b"hmac-sha1-96": 12,
    b"hmac-md5": 16,
    b"hmac-md5-96": 12,
    b"umac-64@openssh.com": 8,
    b"umac-128@openssh.com": 16,
    b"hmac-ripemd160": 20,
    b"hmac-ripemd160@openssh.com": 20,
}
_ETM: Final = b"-etm@openssh.com"


@dataclass(frozen=True, slots=True)
class Framing:
    """How one direction turns a payload into wire bytes (RFC 4253 §6, minimal padding)."""

    name: str
    block: int
    tag: int  # MAC or AEAD tag bytes after the packet
    visible: bool  # the 4-byte length is in clear (GCM, ETM)
    len_in_block: bool  # the length field counts towards block alignment (non-ETM MACs)

    def wire(self, payload: int) -> int:
        base = 1 + payload + (4 if self.len_in_block else 0)
        pad = self.block - base % self.block
        if pad < 4:
            pad += self.block
        return 4 + 1 + payload + pad + self.tag

    @property
    def min_wire(self) -> int:
        return self.wire(0)

    def payload_range(self, wire: int) -> tuple[int, int] | None:
        """Payload lengths a single packet of ``wire`` bytes can carry (minimal padding)."""
        return _payload_range(self.block, self.tag, self.len_in_block, wire)

    def fits(self, wire: int, lo: int, hi: int) -> bool:
        r = self.payload_range(wire)
        return r is not None and r[0] <= hi and lo <= r[1]


@functools.lru_cache(maxsize=4096)
def _payload_range(block: int, tag: int, len_in_block: bool, wire: int) -> tuple[int, int] | None:
    """Cached: the rules ask the same few sizes many times per flow (bounded cache)."""
    plen = wire - 4 - tag
    if plen < 5 or (plen + (4 if len_in_block else 0)) % block:
        return None
    return max(0, plen - 1 - (block + 3)), plen - 5


def framing(cipher: bytes, mac: bytes) -> Framing | None:
    """The framing a negotiated cipher/MAC pair gives, or None when sizes would mean nothing."""
    if cipher.startswith((b"aes128-gcm@", b"aes256-gcm@")):
        return Framing("aes-gcm", 16, 16, True, False)
    if cipher == b"chacha20-poly1305@openssh.com":
        return Framing("chacha20-poly1305", 8, 16, False, False)
    if cipher.startswith(b"aes") and cipher.endswith((b"-ctr", b"-cbc", b"-cbc@lysator.liu.se")):
        block = 16
    elif cipher.startswith((b"3des", b"blowfish", b"cast128")):
        block = 8
    else:
        return None
    etm = mac.endswith(_ETM)
    tag = _MACS.get(mac[: -len(_ETM)] + (b"@openssh.com" if mac.startswith(b"umac") else b"") if etm else mac)
    if tag is None:
        return None
    kind = f"{cipher.decode()}+{mac.decode()}"
    return Framing(kind, block, tag, etm, not etm)


# -- the plaintext handshake ------------------------------------------------------------------
def _after_banner(data: bytes) -> int:
    """Offset just after the identification line, or -1 while it is not complete."""
    pos = 0 if data.startswith(b"SSH-") else data.find(b"\nSSH-")
    if pos < 0:
        return -1
    if pos:
        pos += 1
    eol = data.find(b"\n", pos)
    return eol + 1 if eol >= 0 else -1


def _kexinit_lists(data: bytes, start: int, end: int) -> list[bytes] | None:
    lists: list[bytes] = []
    pos = start
    for _ in range(10):
        if pos + 4 > end:
            return None
        (n,) = _U32.unpack_from(data, pos)
        if pos + 4 + n > end:
            return None
        lists.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return lists


def plaintext_end(data: bytes) -> tuple[int, list[bytes] | None] | None:
    """(offset after NEWKEYS, KEXINIT name-lists) of one direction; None while incomplete.

    Returns (-1, lists) when this direction cannot be followed (malformed, NEWKEYS not
    within ``_MAX_PLAIN`` packets)."""
    pos = _after_banner(data)
    if pos < 0:
        return None
    lists: list[bytes] | None = None
    for _ in range(_MAX_PLAIN):
        if pos + 6 > len(data):
            return None
        (plen,) = _U32.unpack_from(data, pos)
        if plen < 5 or plen > 256 * 1024:
            return -1, lists
        end = pos + 4 + plen
        msg = data[pos + 5]
        if msg == _MSG_KEXINIT:
            if end > len(data):
                return None
            lists = _kexinit_lists(data, pos + 6 + 16, end - data[pos + 4])
            if lists is None:
                return -1, None
        elif msg == _MSG_NEWKEYS:
            return end, lists
        pos = end
    return -1, lists


def _negotiate(client: bytes, server: bytes) -> bytes | None:
    offered = set(server.split(b","))
    for alg in client.split(b","):
        if alg in offered:
            return alg
    return None


# -- encrypted units --------------------------------------------------------------------------
@dataclass(slots=True)
class Unit:
    """One encrypted packet (lengths visible) or one TCP segment's worth of packets."""

    size: int
    ts: float
    seq: int  # arrival order across both directions
    single: bool  # certainly one packet


class _Dir:
    """One direction's encrypted stream: where it starts and what has been seen of it."""

    __slots__ = ("edge", "fr", "lenbuf", "lost", "next", "segments", "start", "units")

    def __init__(self) -> None:
        self.start = -1  # stream offset of the first encrypted byte
        self.fr: Framing | None = None
        self.edge = -1  # stream offset up to which bytes have been consumed
        self.next = -1  # visible framing: offset of the next packet's length field
        self.lenbuf = b""
        self.lost = False  # a gap or a nonsensical length: stop following this direction
        self.segments = 0  # TCP segments consumed after the handshake (bounded: _MAX_SEGMENTS)
        self.units: list[Unit] = []

    def consume(self, off: int, data: bytes, ts: float, seq: int, length: int = -1) -> None:
        """Place stream bytes [off, off+length) (in order; a gap ends the watch of this
        direction). ``length`` > len(data) when only the segment's first bytes were captured
        (a GSO super-packet in NFQUEUE's copy range): its size still counts; a packet length
        field in the missing part cannot be read, and ends the watch (lengths in clear)."""
        if length < len(data):
            length = len(data)
        if self.lost or self.fr is None or not length:
            return
        end = off + length
        if end <= self.edge:
            return  # a retransmission of what was consumed
        if off > self.edge:
            self.lost = True  # bytes missing: sizes after this point cannot be trusted
            return
        data = data[self.edge - off :]
        length -= self.edge - off
        off = self.edge
        self.edge = end
        fr = self.fr
        if not fr.visible:
            self.units.append(Unit(length, ts, seq, _single(fr, length)))
            return
        while self.next < end:
            need = 4 - len(self.lenbuf)
            at = self.next + len(self.lenbuf) - off
            if at < 0:
                self.lost = True
                return
            self.lenbuf += data[at : at + need]
            if len(self.lenbuf) < 4:
                if at + need > len(data) and len(data) < length:
                    self.lost = True  # the length field lies in bytes that were not captured
                return
            (plen,) = _U32.unpack(self.lenbuf)
            self.lenbuf = b""
            if plen < 5 or plen > 256 * 1024 or plen % fr.block:
                self.lost = True
                return
            size = 4 + plen + fr.tag
            self.units.append(Unit(size, ts, seq, True))
            self.next += size


def _single(fr: Framing, size: int) -> bool:
    """A segment of this size cannot hold two packets (or holds a whole number of none)."""
    if fr.payload_range(size) is None:
        return False
    if size < 2 * fr.min_wire:
        return True
    # chacha20-poly1305: every packet is 4 mod 8 bytes, so an odd count shows in the size.
    return fr.block == 8 and not fr.len_in_block and fr.tag == 16 and size < 3 * fr.min_wire


# -- the watcher ------------------------------------------------------------------------------
_HANDSHAKE: Final = 0
_AUTH: Final = 1
_CONNECTION: Final = 2
_DONE: Final = 3


class UsageWatch:
    """Fed every TCP payload of an SSH flow (client = originator); says what it is used for."""

    __slots__ = (
        "_anchor", "_c", "_floor", "_s", "_seq", "client", "compressed", "framings", "result", "state", "why_done",
    )  # fmt: skip

    def __init__(self) -> None:
        self._c = _Dir()
        self._s = _Dir()
        self._seq = 0
        self._anchor = -1  # seq of USERAUTH_SUCCESS
        self._floor = -1.0  # the quickest answer during authentication, once known (_answer_floor)
        self.state = _HANDSHAKE
        self.result: Detection | None = None
        self.framings = ""
        self.compressed = False
        self.client = ""  # the client's software, from its banner (which write patterns apply)
        self.why_done = ""

    @property
    def watching(self) -> bool:
        return self.state != _DONE

    def _stop(self, why: str) -> None:
        self.state = _DONE
        self.why_done = why

    def feed(
        self,
        from_client: bool,
        off: int,
        payload: bytes,
        ts: float,
        chead: bytes,
        shead: bytes,
        final: bool,
        length: int = -1,
    ) -> Detection | None:
        """One TCP payload at stream offset ``off``; ``chead``/``shead`` are the reassembled
        heads (read only while the handshake is not yet understood); ``final``: a head has
        ended (full or closed), so a handshake not found by now never will be; ``length``:
        the segment's real payload length when only its first bytes were captured."""
        if self.state == _DONE:
            return None
        if self.state == _HANDSHAKE:
            if not self._handshake(chead, shead):
                if final and self.state == _HANDSHAKE:
                    self._stop("NEWKEYS not within the head")
                return None
            # Everything up to the heads' ends is known bytes: consume from there, so segments
            # seen before NEWKEYS was found are not lost (their boundaries within the head are).
            for d, head in ((self._c, chead), (self._s, shead)):
                d.edge = d.start
                d.next = d.start
                if len(head) > d.start:
                    self._seq += 1
                    d.consume(d.start, head[d.start :], ts, self._seq)
            self.state = _AUTH
        else:
            d = self._c if from_client else self._s
            if off + max(length, len(payload)) <= d.edge:
                return None  # a retransmission: nothing new to judge
            d.segments += 1
            if d.segments > _MAX_SEGMENTS:
                # A packet dribbled in tiny segments (lengths in clear: no new unit per segment)
                # must not keep the flow in Python: the watch ends, the flow is pinned.
                self._stop("segment bound reached")
                return None
            units, lost = len(d.units), d.lost
            self._seq += 1
            d.consume(off, payload, ts, self._seq, length)
            if len(d.units) == units and d.lost == lost:
                return None  # inside a packet already counted (lengths in clear)
        return self._decide()

    def _handshake(self, chead: bytes, shead: bytes) -> bool:
        c = plaintext_end(chead)
        s = plaintext_end(shead)
        if c is None or s is None:
            return False
        if c[0] < 0 or s[0] < 0 or c[1] is None or s[1] is None:
            self._stop("handshake not followed")
            return False
        cl, sl = c[1], s[1]
        enc_cs, enc_sc = _negotiate(cl[2], sl[2]), _negotiate(cl[3], sl[3])
        mac_cs, mac_sc = _negotiate(cl[4], sl[4]) or b"", _negotiate(cl[5], sl[5]) or b""
        comp = (_negotiate(cl[6], sl[6]), _negotiate(cl[7], sl[7]))
        if enc_cs is None or enc_sc is None or not set(comp) <= _COMPRESSIONS:
            self._stop("no common cipher or compression")
            return False
        fc, fs = framing(enc_cs, mac_cs), framing(enc_sc, mac_sc)
        if fc is None or fs is None:
            self._stop(f"cipher {enc_cs.decode(errors='replace')} not modelled")
            return False
        self._c.fr, self._s.fr = fc, fs
        banner = chead[: max(0, _after_banner(chead))]
        at = banner.find(b"SSH-")
        dash = banner.find(b"-", at + 4) if at >= 0 else -1
        self.client = banner[dash + 1 : dash + 65].strip().decode("ascii", "replace") if dash >= 0 else ""
        self._c.start, self._s.start = c[0], s[0]
        self.framings = fc.name if fc == fs else f"{fc.name}/{fs.name}"
        if comp != (b"none", b"none"):
            self.compressed = True
            # dropbear's client prefers zlib@openssh.com, which starts after authentication. A
            # fresh deflate stream barely changes the first small requests (measured: dropbear's
            # session open keeps its size class, its tcpip-forward grows by up to _ZLIB_SLACK),
            # but later replies shrink once the dictionary knows them, so replies are not read.
            self.framings += f" + {(comp[0] or b'').decode(errors='replace')}"
        return True

    # -- inference ------------------------------------------------------------------------
    def _decide(self) -> Detection | None:
        c, s = self._c, self._s
        if self.state == _AUTH:
            self._find_anchor()
            if self.state == _AUTH:
                if c.lost or s.lost or len(c.units) > _MAX_PRE_AUTH or len(s.units) > _MAX_PRE_AUTH:
                    self._stop("authentication not seen")
                return None
        if self.state != _CONNECTION:
            return None
        det = self._connection()
        if det is not None:
            self.result = det
            self._stop("decided")
            return det
        after = sum(1 for u in c.units if u.seq > self._anchor), sum(1 for u in s.units if u.seq > self._anchor)
        if max(after) >= MAX_UNITS or c.lost or s.lost:
            self._stop("bound reached")
        return None

    def _find_anchor(self) -> None:
        c, s = self._c, self._s
        assert s.fr is not None
        if not c.units:
            return
        first_c = c.units[0].seq
        for u in s.units:
            if u.seq > first_c and u.single and u.size == s.fr.min_wire:
                self._anchor = u.seq
                self.state = _CONNECTION
                return

    def _connection(self) -> Detection | None:
        c, s = self._c, self._s
        fc, fs = c.fr, s.fr
        assert fc is not None and fs is not None
        after = self._anchor
        # Client packets too small to be any request or channel open (asyncssh answers with
        # some after authentication) say nothing about what the session is for.
        cu = [u for u in c.units if u.seq > after and not _too_small(fc, u)][:MAX_UNITS]
        su = [u for u in s.units if u.seq > after][:MAX_UNITS]
        if not cu:
            return None
        base = f"framing {self.framings}; USERAUTH_SUCCESS < {fs.min_wire}"
        c1 = cu[0]
        det = self._first_request(c1, cu, su, base)
        if det is not None:
            return det
        det = self._bootstrapped([u for u in c.units if u.seq > after][:MAX_UNITS], su, base)  # EOFs count here
        if det is not None:
            return det
        # -- channels the server opens: a remote forward in use ------------------------------
        for i, u in enumerate(su):
            if not (u.single and fs.fits(u.size, P_FORWARDED_MIN, P_FORWARDED_MAX)):
                continue
            nxt = next((x for x in cu if x.seq > u.seq), None)
            if nxt is None or not nxt.single or not fc.fits(nxt.size, P_CONFIRM, P_CONFIRM):
                continue
            if fc.fits(nxt.size, 9, 10) or fc.fits(nxt.size, P_SESSION, P_SESSION) or self._session_seen(cu, su, u.seq):
                # A window adjust, a keystroke or a session open of the same size: only an
                # unmistakable confirmation, before any session, counts.
                continue
            return _det(
                SSH_FORWARD_REMOTE,
                f"{base}; < {u.size} (CHANNEL_OPEN forwarded-tcpip, server #{i + 1}) confirmed by > {nxt.size}",
                self.framings,
            )
        # -- channels the client opens to a destination: -L / -D / -W ------------------------
        for i, u in enumerate(cu):
            if not fc.fits(u.size, P_DIRECT_MIN, P_DIRECT_MAX):
                continue
            if not u.single and not (i == 1 and _odd_after_nms(fc, c1, u)):
                continue
            if fc.fits(u.size, 0, P_FWD_MAX) and i == 0:
                continue  # could be the forward request above
            if self._session_seen(cu, su, u.seq) and not (i == 1 and self._maybe_nms(c1)):
                # From here on, channel requests of the session look alike. Unless the only
                # "session" is a first packet that may as well be a no-more-sessions (non-ETM
                # MACs): a channel request would be answered by CHANNEL_SUCCESS (tiny), only an
                # open by a confirmation.
                break
            rep = next((x for x in su if x.seq > u.seq), None)
            if rep is None or not rep.single:
                continue
            if fs.fits(rep.size, P_CONFIRM, P_CONFIRM) and not fs.fits(rep.size, 0, P_REPLY_MAX):
                return _det(
                    SSH_FORWARD_LOCAL,
                    f"{base}; > {u.size} (payload {_rng(fc, u.size)}: CHANNEL_OPEN direct-tcpip, client #{i + 1}) "
                    f"confirmed < {rep.size}",
                    self.framings,
                )
        return None

    def _first_request(self, c1: Unit, cu: list[Unit], su: list[Unit], base: str) -> Detection | None:
        """The client's first write after authentication: what it asks for first.

        Nothing is open yet, so every message in it is at least a session open's size: a
        unit smaller than two of those is one packet whatever the framing."""
        fc, fs = self._c.fr, self._s.fr
        assert fc is not None and fs is not None
        single = c1.single or (fc.payload_range(c1.size) is not None and c1.size < 2 * fc.wire(P_SESSION))
        if not single:
            return self._first_pair(c1, base)
        fwd = fc.fits(c1.size, P_FWD_MIN, P_FWD_MAX)
        session = fc.fits(c1.size, P_SESSION, P_SESSION)
        nms = fc.fits(c1.size, P_NO_MORE_SESSIONS, P_NO_MORE_SESSIONS)
        tun = fc.fits(c1.size, P_TUN, P_TUN)
        direct = fc.fits(c1.size, P_DIRECT_MIN, P_DIRECT_MAX)
        # Compression (zlib@openssh.com starts after authentication) shrinks the server's
        # replies below their size class once its dictionary knows them: replies are not read.
        reply = None if self.compressed else self._first_reply(su, c1, cu)
        what = f"> {c1.size} (payload {_rng(fc, c1.size)}"
        if fc.fits(c1.size, P_FWD_MIN, P_GR_MAX) and reply is not None and reply[1] == "reply":
            # A channel open is answered by a confirmation or a failure (payload >= 17), and
            # no-more-sessions is not answered: a tiny answer means a global request, and the
            # only ones a client sends first are forwards (any bind address, or a socket path).
            ev = f"{base}; {what}: GLOBAL_REQUEST tcpip-forward or streamlocal-forward)"
            return _det(SSH_FORWARD_REMOTE, f"{ev}, answered < {reply[0].size} (REQUEST_SUCCESS)", self.framings)
        if fwd and not session:
            ev = f"{base}; {what}: GLOBAL_REQUEST tcpip-forward)"
            if reply is None and not fs.visible and not nms and not (tun and fc.visible):
                # Opaque lengths: the server's reply rides in a segment with its post-auth
                # notices, so the request's size alone decides, when nothing else fits it.
                return _det(SSH_FORWARD_REMOTE, f"{ev}, alone in its segment", self.framings)
            if reply is not None and reply[1] == "confirm" and tun:
                return _det(
                    SSH_FORWARD_TUN, f"{base}; {what}: CHANNEL_OPEN tun@openssh.com), confirmed < {reply[0].size}",
                    self.framings,
                )  # fmt: skip
        if direct and not fwd and not session and not tun and not nms:
            # Nothing but a channel open to a destination is this large as a first request.
            tail = f", confirmed < {reply[0].size}" if reply is not None and reply[1] == "confirm" else ""
            # This size is also a forward request with a long bind address (IPv6), answered by
            # a tiny REQUEST_SUCCESS: with lengths in clear the answer decides (wait for it);
            # where answers cannot be read (compression, or coalesced into segments that already
            # came after the request) the far more common channel open is named.
            unreadable = self.compressed or (not fs.visible and any(x.seq > c1.seq and not x.single for x in su))
            if tail or (reply is None and unreadable):
                return _det(
                    SSH_FORWARD_LOCAL, f"{base}; {what}: CHANNEL_OPEN direct-tcpip, first request){tail}",
                    self.framings,
                )  # fmt: skip
        if fwd and session and fc.len_in_block and len(cu) > 1:
            # Opaque and coarse (non-ETM MACs): a lone packet of this size is a session open,
            # a no-more-sessions or a tcpip-forward. OpenSSH writes a session open together
            # with no-more-sessions, and -R's request alone followed at once by the rest.
            c2 = cu[1]
            floor = self._answer_floor()
            answered = any(c1.seq < x.seq < c2.seq and (x.single or x.ts - c1.ts >= floor / 4) for x in su)
            nms_next = c2.single and fc.fits(c2.size, P_NO_MORE_SESSIONS, P_NO_MORE_SESSIONS)
            pair_next = c2.size == fc.wire(P_SESSION) + fc.wire(P_NO_MORE_SESSIONS)
            # Either could also be a channel request (an exec of the right length) after a
            # session open was answered, so they count only when nothing could have answered.
            if c2.ts - c1.ts <= _BURST and (nms_next or pair_next) and not answered:
                return _det(
                    SSH_FORWARD_REMOTE,
                    f"{base}; {what}: GLOBAL_REQUEST tcpip-forward) alone, then > {c2.size} "
                    f"({'no-more-sessions' if nms_next else 'session open + no-more-sessions'}) before any answer",
                    self.framings,
                )
        return None

    def _bootstrapped(self, cu: list[Unit], su: list[Unit], base: str) -> Detection | None:
        """A program shipped over the session and run as a tunnel (sshuttle): a long command,
        then at once a large upload on its stdin that is not ended (no EOF), answered by a
        short message from the program, after which the client keeps talking.

        sshuttle 1.1 runs ``P=python3; ... exec "$P" -c '<loader>'`` and writes its server
        (~17 KB) to the command's stdin, which stays open: the server's sync string comes
        back, then its own multiplexed protocol. ``ssh host cmd < file`` ends its stdin (an
        EOF packet follows the upload); rsync, scp and git exchange small messages, or the
        server speaks, before any large transfer."""
        fc, fs = self._c.fr, self._s.fr
        assert fc is not None and fs is not None
        seq = sorted([(u.seq, 0, u) for u in cu] + [(u.seq, 1, u) for u in su], key=lambda x: (x[0], x[1]))
        n = len(seq)
        reply_max, sync_max, eof_max = 2 * fs.wire(9), 2 * fs.wire(9 + 64), fc.wire(11)
        for i, (_, side, x) in enumerate(seq):
            if side or not fc.wire(_P_LONG_EXEC) <= x.size <= fc.wire(_P_EXEC_MAX):
                continue
            j = i + 1
            while j < n and seq[j][1] and seq[j][2].size <= reply_max:
                j += 1  # CHANNEL_SUCCESS, window adjusts
            k, upload, ended = j, 0, False
            while k < n and not seq[k][1]:
                upload += seq[k][2].size
                ended |= seq[k][2].size <= eof_max  # an EOF (or close) in the burst: stdin ended
                k += 1
            if upload < _UPLOAD_MIN or ended or k >= n:
                continue
            sync = seq[k][2]
            nxt = next((e[2] for e in seq[k + 1 :] if not e[1]), None)
            if sync.size > sync_max or nxt is None or nxt.size <= eof_max:
                continue
            return _det(
                SSH_FORWARD_TUN,
                f"{base}; > {x.size} (a command of {_rng(fc, x.size)} bytes of payload), then > {upload} bytes "
                f"on its stdin with no EOF, answered < {sync.size}, and > {nxt.size} goes on: a program "
                "bootstrapped over the session (sshuttle)",
                self.framings,
            )
        return None

    def _first_pair(self, c1: Unit, base: str) -> Detection | None:
        """A first write of two packets: tun open + no-more-sessions (OpenSSH ``-w``), or a
        session open + tcpip-forward (dropbear ``-R`` with a command).

        The two can have the same total (non-ETM MACs, compression); the client's software
        (its plaintext banner) says which write pattern applies: dbclient has no ``-w``, and
        OpenSSH always sends its tcpip-forward requests on their own."""
        fc = self._c.fr
        assert fc is not None
        dropbear = self.client.startswith("dropbear")
        combo = _split_tun_first(fc, c1.size)
        if combo and not dropbear:
            return _det(
                SSH_FORWARD_TUN, f"{base}; > {c1.size} = {combo} (CHANNEL_OPEN tun@openssh.com + no-more-sessions)",
                self.framings,
            )  # fmt: skip
        if self.client.startswith("OpenSSH"):
            return None
        rest = c1.size - fc.wire(P_SESSION)
        slack = _ZLIB_SLACK if self.compressed else 0
        if (
            fc.payload_range(rest) is not None
            and rest < 2 * fc.wire(P_SESSION)
            and fc.fits(rest, P_FWD_MIN, P_FWD_MAX + slack)
            and not fc.fits(rest, P_SESSION, P_NO_MORE_SESSIONS)
        ):
            return _det(
                SSH_FORWARD_REMOTE,
                f"{base}; > {c1.size} = {fc.wire(P_SESSION)}+{rest} (CHANNEL_OPEN session + GLOBAL_REQUEST "
                f"tcpip-forward, payload {_rng(fc, rest)}; client {self.client})",
                self.framings,
            )
        return None

    def _first_reply(self, su: list[Unit], req: Unit, cu: list[Unit]) -> tuple[Unit, str] | None:
        """The server's first single packet after ``req`` that is a reply: a global-request
        reply (tiny) or a channel confirmation, and what it answers.

        The server answers in order, so the first reply answers ``req`` when ``req`` wants
        one; client units sent in between (the same burst: a keepalive's REQUEST_FAILURE,
        >= 1 s later, must not count) only matter for a confirmation, which may answer a
        session or direct-tcpip open sent after ``req`` unless everything in between was the
        size of no-more-sessions (which is never answered)."""
        fs, fc = self._s.fr, self._c.fr
        assert fs is not None and fc is not None
        skipped = False
        floor = self._answer_floor()
        for u in su:
            if u.seq <= req.seq:
                continue
            between = [x for x in cu if req.seq < x.seq < u.seq]
            if any(x.ts - req.ts > _BURST for x in between):
                return None
            if not u.single and u.ts - req.ts < floor / 4:
                continue  # sent before the request can have arrived: the server's own notices
            if not u.single:
                # Opaque and coalesced (the server's post-auth notices): what is inside is
                # unknown, so only a tiny packet after it, with nothing sent meanwhile, counts.
                skipped = True
                continue
            if u.size == fs.min_wire or (fs.fits(u.size, 0, P_REPLY_MAX) and not fs.fits(u.size, P_CONFIRM, P_CONFIRM)):
                if skipped and any(req.seq < x.seq < u.seq for x in self._c.units):
                    # The client said something (even a tiny EOF or close) after a server segment
                    # we could not read: this may answer that, after a confirmation we did not see.
                    return None
                return u, "reply"
            if skipped:
                return None
            if fs.fits(u.size, P_CONFIRM, P_CONFIRM):
                only_nms = all(x.single and fc.fits(x.size, P_NO_MORE_SESSIONS, P_NO_MORE_SESSIONS) for x in between)
                return (u, "confirm") if only_nms else None
        return None

    def _answer_floor(self) -> float:
        if self._floor < 0:
            self._floor = self._compute_floor()
        return self._floor

    def _compute_floor(self) -> float:
        """The quickest the server answered the client during authentication (request to
        next server packet). A coalesced server segment arriving sooner than a quarter of
        that after a request is taken as sent before the request arrived (the server's
        post-authentication notices), so it answers nothing of it. A quarter: channel opens
        are answered faster than authentication steps, which go through sshd's monitor
        (measured: asyncssh's session confirmed in under half the quickest auth answer).
        0 (nothing is excused) when no exchange was seen."""
        c, s = self._c.units, self._s.units
        best = -1.0
        for su in s:
            if su.seq >= self._anchor:
                break
            prev_c = [x for x in c if x.seq < su.seq]
            prev_s = [x for x in s if x.seq < su.seq]
            if prev_c and (not prev_s or prev_c[-1].seq > prev_s[-1].seq):
                d = su.ts - prev_c[-1].ts
                if d >= 0 and (best < 0 or d < best):
                    best = d
        return max(best, 0.0)

    def _maybe_nms(self, c1: Unit) -> bool:
        """The first request is one packet that may be a no-more-sessions (``ssh -N``)."""
        fc = self._c.fr
        assert fc is not None
        single = c1.single or (fc.payload_range(c1.size) is not None and c1.size < 2 * fc.wire(P_SESSION))
        return single and fc.fits(c1.size, P_NO_MORE_SESSIONS, P_NO_MORE_SESSIONS)

    def _session_seen(self, cu: list[Unit], su: list[Unit], before: int) -> bool:
        """Has the client opened a session (a unit the size of CHANNEL_OPEN session, or more
        than one client unit other than the first request) before ``before``?"""
        fc = self._c.fr
        assert fc is not None
        for u in cu:
            if u.seq >= before:
                return False
            if fc.fits(u.size, P_SESSION, P_SESSION) or not u.single:
                return True
        return False


def _split_tun_first(fr: Framing, size: int) -> str:
    """``size`` = tun open + no-more-sessions (OpenSSH ``-w`` writes them together), and not
    the session open + no-more-sessions every OpenSSH session starts with."""
    t, n = fr.wire(P_TUN), fr.wire(P_NO_MORE_SESSIONS)
    if size != t + n or size == fr.wire(P_SESSION) + n:
        return ""
    return f"{t}+{n}"


def _too_small(fr: Framing, u: Unit) -> bool:
    r = fr.payload_range(u.size)
    return u.single and r is not None and r[1] < P_SESSION


def _odd_after_nms(fr: Framing, c1: Unit, u: Unit) -> bool:
    """chacha20-poly1305: after a lone no-more-sessions (``ssh -N``) nothing is open, so a
    segment that holds an odd number of packets (its size is 4 mod 8) is one channel open:
    three packets would need three things to say, and there is nothing yet to say them about."""
    return (
        fr.block == 8
        and not fr.len_in_block
        and c1.single
        and fr.fits(c1.size, P_NO_MORE_SESSIONS, P_NO_MORE_SESSIONS)
        and not fr.fits(c1.size, P_SESSION, P_SESSION)
        and fr.payload_range(u.size) is not None
    )


def _rng(fr: Framing, size: int) -> str:
    r = fr.payload_range(size)
    return f"{r[0]}..{r[1]}" if r else "?"


def _det(kind: str, evidence: str, framings: str) -> Detection:
    return Detection(kind, evidence, info={"ssh_framing": framings, "inferred_from": "encrypted packet sizes"})
