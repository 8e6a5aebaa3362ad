"""Fully encrypted proxies (Shadowsocks AEAD, obfs4, VMess): a stream with no plaintext at all.

What can be told, and what cannot. These protocols are designed so that *no byte* is
predictable: Shadowsocks AEAD opens with a random salt (16 or 32 bytes) followed by
AEAD-sealed length and payload chunks (SIP004/SIP022); obfs4 with an Elligator2-encoded
public key, random padding and a MAC; VMess with an encrypted auth header. No signature
exists, by construction, so the protocol cannot be named and a single flow cannot be
proven to be one of them. What can be told is the *absence* of everything ordinary traffic
shows in its first bytes: a magic number, a length field, a version, printable text.

The test follows the exemptions that censors were measured to apply to flag such traffic
(Wu et al., "How the Great Firewall of China Detects and Blocks Fully Encrypted Traffic",
USENIX Security 2023), each of which lets an ordinary protocol through; a flow is called
``tunnel.unknown-encrypted`` only when *none* applies, in *both* directions:

* the first 6 bytes are printable ASCII, or more than half of them are, or 20 in a row
  are (text protocols: HTTP, SMTP, Redis, JSON-RPC ...);
* the bits set per byte average below 3.4 or above 4.6 (random bytes give 4.0 +- ~0.15 over
  a few hundred bytes; headers full of zeros or 0xff push it out);
* the first bytes are a TLS record, an SSH banner, an HTTP request or response (their own
  detectors judge them);
* added here for binary protocols, which GFW did not need: the first 2 or 4 bytes are a
  length of what follows (big or little endian; RLPx EIP-8, Kafka, DNS over TCP, most RPC
  framings), or the first byte is 0x04 (an uncompressed EC point: pre-EIP-8 RLPx);
* an 8-byte string occurs twice in the first 512 bytes of a direction (a session id, a
  header field repeated per message: structure that ciphertext never has);
* the server spoke first (fully encrypted proxies are client-first), or either side's first
  segment is shorter than ``MIN_CLIENT`` / ``MIN_SERVER`` bytes (a short hello before a
  TLS upgrade: PostgreSQL, RDP).

It also fires on other protocols that are fully encrypted by design (BitTorrent's MSE/PE
obfuscation, for one): that is what the kind says, and why the policy only alerts on it.

And only to a destination with no name: a flow whose address came from a DNS answer or
that named its server (SNI, CONNECT) is not called this (the engine checks, see
``info["unnamed_only"]``). The policy alerts on it; it does not drop, because a capture
that ends in noise-like bytes both ways proves only that the bytes look like noise.
"""

from __future__ import annotations

from typing import Final

from egressd.detect.base import NEED_MORE, NOT_THIS, TUNNEL_UNKNOWN_ENCRYPTED, Detection, Result, StreamContext

MIN_CLIENT: Final = 48  # a Shadowsocks salt (16/32) + sealed length chunk (18) at least
MIN_SERVER: Final = 32
WINDOW: Final = 512  # bytes of each direction looked at
_REPEAT: Final = 8  # random bytes repeat an 8-byte string with probability ~n^2/2^65: never
_POP_LO: Final = 3.4
_POP_HI: Final = 4.6
_POPCOUNT: Final = bytes(bin(i).count("1") for i in range(256))
_PRINTABLE: Final = frozenset(range(0x20, 0x7F))
_KNOWN_STARTS: Final = (
    b"\x16\x03", b"\x17\x03", b"\x15\x03", b"SSH-", b"GET ", b"POST", b"PUT ", b"HEAD", b"HTTP/", b"PRI *",
    b"CONNECT", b"OPTIONS", b"DELETE", b"PATCH",
)  # fmt: skip


def looks_random(data: bytes) -> str | None:
    """Why ``data`` has no plaintext structure (for evidence), or None if an exemption applies."""
    head = data[:WINDOW]
    n = len(head)
    if head.startswith(_KNOWN_STARTS) or head[0] == 0x04:
        return None
    if all(b in _PRINTABLE for b in head[:6]):
        return None
    printable = 0
    run = longest = 0
    for b in head:
        if b in _PRINTABLE:
            printable += 1
            run += 1
            longest = max(longest, run)
        else:
            run = 0
    if printable * 2 > n or longest > 20:
        return None
    pop = sum(_POPCOUNT[b] for b in head) / n
    if not _POP_LO <= pop <= _POP_HI:
        return None
    seen: set[bytes] = set()
    for i in range(0, n - _REPEAT + 1):
        chunk = head[i : i + _REPEAT]
        if chunk in seen:
            return None  # a repeated 8-byte string: an identifier or header, not ciphertext
        seen.add(chunk)
    rest = len(data)
    for width in (2, 4):
        for order in ("big", "little"):
            v = int.from_bytes(data[:width], order)
            if v in (rest - width, rest):
                return None
    return f"{rest} bytes, {pop:.2f} bits set per byte, {100 * printable // n}% printable"


def detect_unknown_encrypted(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """Called each time a direction grows, so the first call that sees client bytes sees the
    client's first segment: it must already be ``MIN_CLIENT`` bytes (these proxies send their
    salt or key and the first sealed chunk in one write), and likewise the server's first
    segment ``MIN_SERVER`` bytes. A short first message (PostgreSQL's 8-byte SSLRequest and
    its 1-byte answer, RDP's X.224 request, any protocol's hello before a TLS upgrade) rules
    the flow out before the TLS bytes that follow could look random."""
    if not fwd:
        return NOT_THIS if rev or ctx.fwd_closed else NEED_MORE  # server-first: not these
    if len(fwd) < MIN_CLIENT:
        return NOT_THIS
    up = looks_random(fwd)
    if up is None:
        return NOT_THIS
    if not rev:
        return NOT_THIS if ctx.rev_closed or ctx.rev_full else NEED_MORE
    if len(rev) < MIN_SERVER:
        return NOT_THIS
    down = looks_random(rev)
    if down is None:
        return NOT_THIS
    return Detection(
        TUNNEL_UNKNOWN_ENCRYPTED,
        f"no plaintext structure either way: client {up}; server {down} "
        "(consistent with Shadowsocks AEAD, obfs4, VMess; which one cannot be told)",
        confidence=0.6,
        info={"unnamed_only": "1"},
    )
