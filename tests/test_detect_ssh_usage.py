"""What an SSH session is used for (egressd/detect/ssh_usage.py), on crafted sessions.

The real sessions are the pcaps/ssh-use-* captures (tests/test_pcaps_golden.py); these tests
pin down the size arithmetic against RFC 4253 §6 and the sizes those captures showed, and
the watcher's behaviour on segmentation, gaps, bounds and hostile bytes.
"""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect import ssh_usage as u
from egressd.detect.base import Detection
from egressd.detect.kinds import SSH_FORWARD_LOCAL, SSH_FORWARD_REMOTE, SSH_FORWARD_TUN

CHACHA = u.framing(b"chacha20-poly1305@openssh.com", b"")
GCM = u.framing(b"aes256-gcm@openssh.com", b"")
CTR_ETM = u.framing(b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com")
CTR_512 = u.framing(b"aes256-ctr", b"hmac-sha2-512")
CTR_256 = u.framing(b"aes256-ctr", b"hmac-sha2-256")


# -- the size arithmetic --------------------------------------------------------------------
def test_wire_sizes_match_what_openssh_9_2_put_on_the_wire() -> None:
    # Measured in the ssh-use-openssh-* captures (GCM/ETM lengths read in clear; chacha and
    # non-ETM from single-packet segments): USERAUTH_SUCCESS (1), session open (24),
    # tcpip-forward for "localhost" (36), no-more-sessions (34), tun open (40).
    assert CHACHA is not None and GCM is not None and CTR_ETM is not None and CTR_512 is not None
    assert [CHACHA.wire(p) for p in (1, 24, 36, 34, 40)] == [28, 52, 68, 60, 68]
    assert [GCM.wire(p) for p in (1, 24, 36, 34, 40)] == [36, 52, 68, 68, 68]
    assert [CTR_ETM.wire(p) for p in (1, 24, 36, 34, 40)] == [52, 68, 84, 84, 84]
    assert [CTR_512.wire(p) for p in (1, 24, 36, 34, 40)] == [80, 112, 112, 112, 128]


def test_framing_follows_the_negotiated_cipher_and_mac() -> None:
    assert GCM is not None and GCM.visible and GCM.tag == 16
    assert CHACHA is not None and not CHACHA.visible and CHACHA.block == 8
    assert CTR_ETM is not None and CTR_ETM.visible and CTR_ETM.tag == 32 and not CTR_ETM.len_in_block
    assert CTR_512 is not None and not CTR_512.visible and CTR_512.len_in_block and CTR_512.tag == 64
    umac = u.framing(b"aes128-ctr", b"umac-64-etm@openssh.com")
    assert umac is not None and umac.tag == 8 and umac.visible
    assert u.framing(b"twofish256-cbc", b"hmac-sha2-256") is None
    assert u.framing(b"aes128-ctr", b"hmac-whirlpool") is None


@settings(max_examples=300)
@given(st.sampled_from([CHACHA, GCM, CTR_ETM, CTR_512, CTR_256]), st.integers(0, 40000))
def test_payload_range_of_a_packet_contains_its_payload(fr: u.Framing | None, payload: int) -> None:
    assert fr is not None
    r = fr.payload_range(fr.wire(payload))
    assert r is not None and r[0] <= payload <= r[1]
    assert fr.payload_range(fr.wire(payload) + 1) is None  # off the block grid: not one packet


# -- crafted sessions -------------------------------------------------------------------------
def _plain(payload: bytes) -> bytes:
    pad = 8 - (5 + len(payload)) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack("!IB", 1 + len(payload) + pad, pad) + payload + b"\0" * pad


def _kexinit(enc: bytes, mac: bytes, comp: bytes = b"none") -> bytes:
    lists = [b"curve25519-sha256", b"ssh-ed25519", enc, enc, mac, mac, comp, comp, b"", b""]
    return bytes([20]) + b"\x11" * 16 + b"".join(struct.pack("!I", len(x)) + x for x in lists) + b"\0" * 5


def _head(client: bool, enc: bytes, mac: bytes, comp: bytes = b"none") -> bytes:
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n"
    kex = bytes([30 if client else 31]) + os.urandom(36)
    return banner + _plain(_kexinit(enc, mac, comp)) + _plain(kex) + _plain(bytes([21]))


def _enc(fr: u.Framing, payload: int) -> bytes:
    """One encrypted packet of a payload length: length in clear where the framing shows it."""
    size = fr.wire(payload)
    plen = size - 4 - fr.tag
    head = struct.pack("!I", plen) if fr.visible else os.urandom(4)
    return head + os.urandom(size - 4)


class Session:
    """Feeds a watcher the way the engine does: heads grow, each segment at its offset."""

    def __init__(self, enc: bytes = b"aes256-gcm@openssh.com", mac: bytes = b"hmac-sha2-256") -> None:
        self.w = u.UsageWatch()
        self.fr = u.framing(enc, mac)
        assert self.fr is not None
        self.c = _head(True, enc, mac)
        self.s = _head(False, enc, mac)
        self.ts = 0.0
        self.found: list[Detection] = []
        self.send(True, b"", initial=True)
        self.send(False, b"", initial=True)

    def send(self, client: bool, data: bytes, initial: bool = False) -> None:
        """``data`` arrives from one side (``initial``: the handshake heads, at offset 0)."""
        self.ts += 0.001
        if initial:
            off, data = 0, self.c if client else self.s
        elif client:
            off, self.c = len(self.c), self.c + data
        else:
            off, self.s = len(self.s), self.s + data
        d = self.w.feed(client, off, data, self.ts, self.c, self.s, False)
        if d is not None:
            self.found.append(d)

    def msgs(self, client: bool, *payloads: int) -> None:
        """One write (one segment) holding packets of these payload lengths."""
        assert self.fr is not None
        self.send(client, b"".join(_enc(self.fr, p) for p in payloads))

    def authenticate(self) -> None:
        self.msgs(True, 17)  # SERVICE_REQUEST
        self.msgs(False, 300)  # EXT_INFO
        self.msgs(False, 17)  # SERVICE_ACCEPT
        self.msgs(True, 330)  # USERAUTH_REQUEST publickey with signature
        self.msgs(False, 1)  # USERAUTH_SUCCESS


def test_gcm_remote_forward_answered_by_request_success() -> None:
    s = Session()
    s.authenticate()
    s.msgs(True, 36)  # tcpip-forward "localhost"
    s.msgs(True, 34)  # no-more-sessions
    s.msgs(False, 84, 120)  # hostkeys-00 + a debug message
    assert not s.found
    s.msgs(False, 1)  # REQUEST_SUCCESS
    assert [d.kind for d in s.found] == [SSH_FORWARD_REMOTE]
    assert "> 68" in s.found[0].evidence and "< 36 (REQUEST_SUCCESS)" in s.found[0].evidence
    assert not s.w.watching


def test_gcm_session_with_command_is_no_forward_and_the_watch_ends_at_its_bound() -> None:
    s = Session()
    s.authenticate()
    s.msgs(True, 24, 34)  # session open + no-more-sessions
    s.msgs(False, 84, 120)
    s.msgs(False, 17)  # OPEN_CONFIRMATION
    s.msgs(True, 40)  # exec
    s.msgs(False, 5)  # CHANNEL_SUCCESS
    for _ in range(u.MAX_UNITS):
        s.msgs(False, 200)  # output
        s.msgs(True, 9)  # window adjust
    assert not s.found
    assert not s.w.watching and s.w.why_done == "bound reached"


def test_gcm_tun_open_is_confirmed_not_answered() -> None:
    s = Session()
    s.authenticate()
    s.msgs(True, 40)  # tun@openssh.com
    s.msgs(True, 34)
    s.msgs(False, 84)
    s.msgs(False, 17)  # OPEN_CONFIRMATION
    assert [d.kind for d in s.found] == [SSH_FORWARD_TUN]


def test_gcm_direct_tcpip_after_no_more_sessions_is_a_local_forward() -> None:
    s = Session()
    s.authenticate()
    s.msgs(True, 34)  # ssh -N: no-more-sessions only
    s.msgs(False, 84, 120, 120)
    s.msgs(True, 66)  # direct-tcpip to 203.0.113.10 from 127.0.0.1
    s.msgs(False, 17)
    assert [d.kind for d in s.found] == [SSH_FORWARD_LOCAL]


def test_chacha_remote_forward_alone_in_its_segment() -> None:
    s = Session(b"chacha20-poly1305@openssh.com", b"hmac-sha2-256")
    s.authenticate()
    s.msgs(True, 36)
    assert [d.kind for d in s.found] == [SSH_FORWARD_REMOTE]
    assert "alone in its segment" in s.found[0].evidence


def test_chacha_session_open_with_no_more_sessions_is_no_forward() -> None:
    s = Session(b"chacha20-poly1305@openssh.com", b"hmac-sha2-256")
    s.authenticate()
    s.msgs(True, 24, 34)
    s.msgs(False, 84, 120)
    s.msgs(False, 120, 17)
    s.msgs(True, 40)
    s.msgs(False, 5)
    assert not s.found


def test_chacha_tun_open_with_no_more_sessions_in_one_write() -> None:
    s = Session(b"chacha20-poly1305@openssh.com", b"hmac-sha2-256")
    s.authenticate()
    s.msgs(True, 40, 34)
    assert [d.kind for d in s.found] == [SSH_FORWARD_TUN]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 97), min_size=1, max_size=12))
def test_gcm_decision_does_not_depend_on_segmentation(cuts: list[int]) -> None:
    """The same bytes cut anywhere (lengths straddling segments included) decide the same."""
    s = Session()
    s.authenticate()
    assert s.fr is not None
    data = _enc(s.fr, 36) + _enc(s.fr, 34)
    pos = 0
    for n in cuts:
        if pos >= len(data):
            break
        s.send(True, data[pos : pos + n])
        pos += n
    if pos < len(data):
        s.send(True, data[pos:])
    s.msgs(False, 84, 120)
    s.msgs(False, 1)
    assert [d.kind for d in s.found] == [SSH_FORWARD_REMOTE]


def test_a_gap_in_the_stream_stops_the_watch_without_a_finding() -> None:
    s = Session()
    s.authenticate()
    assert s.fr is not None
    d = s.w.feed(True, len(s.c) + 100, _enc(s.fr, 36), 1.0, s.c, s.s, False)
    assert d is None
    s.msgs(False, 1)
    assert not s.found and not s.w.watching


def test_compressed_session_is_followed_and_named_from_its_first_request() -> None:
    w = u.UsageWatch()
    enc = b"chacha20-poly1305@openssh.com"
    c, s = _head(True, enc, b"", b"zlib@openssh.com"), _head(False, enc, b"", b"none,zlib@openssh.com")
    fr = u.framing(enc, b"")
    assert fr is not None
    w.feed(True, 0, c, 0.0, c, s, False)
    found = []
    for client, p in ((True, 17), (False, 300), (False, 17), (True, 330), (False, 1), (True, 36)):
        data = _enc(fr, p)
        off = len(c) if client else len(s)
        c, s = (c + data, s) if client else (c, s + data)
        found.append(w.feed(client, off, data, 0.1, c, s, False))
    assert "zlib@openssh.com" in w.framings
    assert [d.kind for d in found if d is not None] == [SSH_FORWARD_REMOTE]


def test_no_common_cipher_ends_the_watch() -> None:
    w = u.UsageWatch()
    c, s = _head(True, b"aes256-gcm@openssh.com", b"", b"zlib@openssh.com"), _head(False, b"x", b"", b"none")
    assert w.feed(True, 0, c, 0.0, c, s, False) is None
    assert not w.watching and "cipher" in w.why_done  # no common cipher: nothing to follow


def test_handshake_never_found_in_a_full_head_ends_the_watch() -> None:
    w = u.UsageWatch()
    c = b"SSH-2.0-x\r\n" + _plain(b"\x14" + b"\0" * 16)  # a KEXINIT too short to parse
    assert w.feed(True, 0, c, 0.0, c, b"", True) is None
    assert not w.watching


@settings(max_examples=200)
@given(st.binary(max_size=600), st.binary(max_size=600), st.lists(st.binary(max_size=80), max_size=20))
def test_hostile_bytes_never_raise(chead: bytes, shead: bytes, segs: list[bytes]) -> None:
    w = u.UsageWatch()
    c, s = b"SSH-2.0-a\r\n" + chead, b"SSH-2.0-b\r\n" + shead
    off = [len(c), len(s)]
    for i, seg in enumerate(segs):
        side = i % 2
        w.feed(side == 0, off[side], seg, float(i), c, s, i == len(segs) - 1)
        off[side] += len(seg)


# -- through the engine, on the shipped policy -----------------------------------------------
def test_engine_drops_a_remote_forward_to_the_allowed_bastion_on_the_answer() -> None:
    from egressd.engine import PIN_ALLOW, PIN_DENY, Engine
    from egressd.paths import default_policy
    from egressd.policy import load_policy
    from tests.test_engine import ALLOWED, Conn

    enc, mac = b"aes256-gcm@openssh.com", b""
    fr = u.framing(enc, mac)
    assert fr is not None
    eng = Engine(load_policy(default_policy()))
    c = Conn(ALLOWED, 22)
    ch, sh = _head(True, enc, mac), _head(False, enc, mac)
    pkts = [c.syn(), c.synack(), c.s(sh), c.c(ch)]
    co, so = len(ch), len(sh)
    for client, p in ((True, 17), (False, 300), (False, 17), (True, 330), (False, 1), (True, 36), (False, 84)):
        data = _enc(fr, p)
        pkts.append(c.c(data, co) if client else c.s(data, so))
        co, so = (co + len(data), so) if client else (co, so + len(data))
    verdicts = [eng.feed(x, 1000.0 + i * 0.001) for i, x in enumerate(pkts)]
    assert PIN_DENY not in verdicts and PIN_ALLOW not in verdicts, "an allowed SSH flow is watched, not pinned"
    assert eng.feed(c.s(_enc(fr, 1), so), 1001.0) == PIN_DENY  # REQUEST_SUCCESS: the forward is confirmed
    ev = eng.events[-1]
    assert (ev.rule, ev.verdict) == ("drop-ssh-remote-forward", "drop")
    assert ev.detection is not None and ev.detection["kind"] == SSH_FORWARD_REMOTE


def test_engine_pins_an_ordinary_session_once_the_watch_is_over() -> None:
    from egressd.engine import PIN_ALLOW, PIN_DENY, Engine
    from egressd.paths import default_policy
    from egressd.policy import load_policy
    from tests.test_engine import ALLOWED, Conn

    enc, mac = b"chacha20-poly1305@openssh.com", b""
    fr = u.framing(enc, mac)
    assert fr is not None
    eng = Engine(load_policy(default_policy()))
    c = Conn(ALLOWED, 22)
    ch, sh = _head(True, enc, mac), _head(False, enc, mac)
    pkts = [c.syn(), c.synack(), c.s(sh), c.c(ch)]
    co, so = len(ch), len(sh)
    script = [(True, 17), (False, 300), (False, 17), (True, 330), (False, 1), (True, 24), (False, 17)]
    script += [(False, 1000), (True, 9)] * u.MAX_UNITS
    for client, p in script:
        data = _enc(fr, p)
        pkts.append(c.c(data, co) if client else c.s(data, so))
        co, so = (co + len(data), so) if client else (co, so + len(data))
    verdicts = [eng.feed(x, 1000.0 + i * 0.001) for i, x in enumerate(pkts)]
    assert PIN_DENY not in verdicts
    assert PIN_ALLOW in verdicts
    pinned_at = verdicts.index(PIN_ALLOW)
    assert pinned_at < len(pkts) - 1, "pinned before the end of the session: the watch is bounded"
    (ev,) = [e for e in eng.events if e.flow_id == 1]
    assert (ev.rule, ev.verdict, ev.detections) == ("default", "accept", ["ssh"])


def _bootstrap(s: Session, eof: bool) -> None:
    s.authenticate()
    s.msgs(True, 24, 34)  # session open + no-more-sessions
    s.msgs(False, 84, 120)
    s.msgs(False, 17)  # confirmation
    s.msgs(True, 165)  # exec of a long one-liner (sshuttle 1.1: 156..171)
    s.msgs(False, 5)  # CHANNEL_SUCCESS
    s.msgs(True, 17000)  # the program, on its stdin
    if eof:
        s.msgs(True, 5)  # CHANNEL_EOF: stdin ended
    s.msgs(False, 23)  # a short answer ("\0\0SSHUTTLE0001")
    s.msgs(True, 30)  # and the client goes on


def test_a_program_bootstrapped_over_stdin_that_stays_open_is_a_tun() -> None:
    for enc in (b"aes256-gcm@openssh.com", b"chacha20-poly1305@openssh.com"):
        s = Session(enc, b"hmac-sha2-256")
        _bootstrap(s, eof=False)
        assert [d.kind for d in s.found] == [SSH_FORWARD_TUN], enc
        assert "no EOF" in s.found[0].evidence


def test_the_same_upload_ended_by_eof_is_an_ordinary_command() -> None:
    for enc in (b"aes256-gcm@openssh.com", b"chacha20-poly1305@openssh.com"):
        s = Session(enc, b"hmac-sha2-256")
        _bootstrap(s, eof=True)
        assert not s.found, enc


def test_a_forward_with_a_long_bind_address_is_named_from_its_tiny_answer() -> None:
    s = Session()  # lengths in clear: every packet is seen whole
    s.authenticate()
    s.msgs(True, 27 + len("2001:db8:ffff:ffff:ffff:ffff:ffff:1"))  # tcpip-forward on an IPv6 address
    s.msgs(True, 34)
    s.msgs(False, 84, 120)
    s.msgs(False, 1)
    assert [d.kind for d in s.found] == [SSH_FORWARD_REMOTE]


def test_a_direct_tcpip_first_request_answered_by_a_confirmation_is_local_not_remote() -> None:
    s = Session()
    s.authenticate()
    s.msgs(True, 45 + len("203.0.113.10") + len("127.0.0.1"))  # ssh -W / ProxyJump
    s.msgs(False, 84, 120)
    s.msgs(False, 17)
    assert [d.kind for d in s.found] == [SSH_FORWARD_LOCAL]


def test_a_segment_captured_only_in_part_still_counts_its_whole_size() -> None:
    """NFQUEUE copies at most 4016 bytes of a GSO super-packet: the watcher is told the real
    length, and sizes (lengths encrypted) count it whole."""
    s = Session(b"chacha20-poly1305@openssh.com", b"hmac-sha2-256")
    s.authenticate()
    before = len(s.w._c.units)
    big = os.urandom(17000)
    d = s.w.feed(True, len(s.c), big[:4000], 9.0, s.c, s.s, False, length=len(big))
    assert d is None
    assert s.w._c.units[before].size == 17000 and s.w._c.edge == len(s.c) + 17000


def test_a_length_field_in_bytes_not_captured_ends_the_watch() -> None:
    s = Session()  # lengths in clear: the next packet's length is where the copy stopped
    s.authenticate()
    assert s.fr is not None
    data = _enc(s.fr, 6000) + _enc(s.fr, 36)
    s.w.feed(True, len(s.c), data[:4000], 9.0, s.c, s.s, False, length=len(data))
    assert s.w._c.lost


def test_a_packet_dribbled_in_one_byte_segments_ends_the_watch() -> None:
    s = Session()  # lengths in clear: a 2000-byte packet in 1-byte segments adds no unit
    s.authenticate()
    assert s.fr is not None
    data = _enc(s.fr, 2000)
    for i in range(len(data)):
        s.send(True, data[i : i + 1])
        if not s.w.watching:
            break
    assert not s.w.watching and s.w.why_done == "segment bound reached"
    assert i <= u._MAX_SEGMENTS + 1
