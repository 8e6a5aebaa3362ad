"""Tor's link handshake, seen from the client: a TLS connection that is a Tor relay link.

What Tor's bytes show (tor-spec.txt §2 "Connections", §4 "Negotiating and initializing
connections"; tortls_openssl.c / tortls_nss.c): a Tor client opens TLS to a relay's ORPort
with a made-up server name, ``www.`` + random base32 (``[a-z2-7]``) + ``.com``
(``crypto_random_hostname``), and offers no ALPN; as soon as the handshake is done its first
cell is VERSIONS — circuit id 0 (2 bytes), command 7, a 2-byte length and two bytes per
supported link version (3, 4, 5 today): 11 bytes. Encrypted, that first application-data
record is 11 bytes + the record overhead of the suite: 28 in TLS 1.3 (content type byte +
16-byte tag); 27 or 35 in TLS 1.2 AEAD (ChaCha20-Poly1305, or AES-GCM with its 8-byte
explicit nonce); 32 with TLS 1.0 CBC and HMAC-SHA1 (11 + 20 + padding to the 16-byte
block, as older Tor clients negotiated); 48/64/80 with TLS 1.1/1.2 CBC (a 16-byte explicit
IV, HMAC-SHA1/-SHA256/-SHA384, padding).

All three must hold: the random-looking name (which must contain one of base32's digits,
as a random string of that length nearly always does and real host names of that shape
seldom do), no ALPN (every browser and curl send one), and a first client record of a
VERSIONS cell's size. A benign HTTPS client that happened to use such a name would still
send an HTTP request (tens to hundreds of bytes) as its first record, not 11 bytes.

What cannot be told: Tor through a pluggable transport (obfs4, meek, Snowflake) shows none
of this; obfs4 is a fully encrypted stream (see ``unknown_encrypted``).
"""

from __future__ import annotations

from typing import Final

from egressd.detect.base import NEED_MORE, NOT_THIS, TUNNEL_TOR, Detection, Result, StreamContext
from egressd.detect.tls import detect_tls

_B32: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_B32_DIGITS: Final = frozenset("234567")
_CT_CCS: Final = 20
_CT_HANDSHAKE: Final = 22
_CT_APPDATA: Final = 23
_VERSIONS_SIZES: Final = frozenset({27, 28, 32, 35, 48, 64, 80})
_MAX_RECORDS: Final = 32


def tor_like_name(sni: str) -> bool:
    if not sni.startswith("www.") or not sni.endswith((".com", ".net")):
        return False
    label = sni[4:-4]
    return 4 <= len(label) <= 32 and set(label) <= _B32 and not _B32_DIGITS.isdisjoint(label)


def _first_app_record(fwd: bytes) -> int:
    """Length of the client's first application-data record after its Finished; -1 if not yet."""
    pos = 0
    after_ccs = False
    finished_seen = False
    for _ in range(_MAX_RECORDS):
        if pos + 5 > len(fwd):
            return -1
        ct = fwd[pos]
        length = int.from_bytes(fwd[pos + 3 : pos + 5], "big")
        if ct == _CT_CCS:
            after_ccs = True
        elif after_ccs and ct == _CT_HANDSHAKE:
            finished_seen = True  # TLS 1.2: the Finished is an (encrypted) handshake record
        elif after_ccs and ct == _CT_APPDATA:
            if finished_seen:
                return length
            finished_seen = True  # TLS 1.3: the Finished travels as the first app-data record
        pos += 5 + length
    return -2


def detect_tor(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    hello = detect_tls(fwd, rev, ctx)
    if not isinstance(hello, Detection):
        return hello
    sni = hello.info.get("sni", "")
    if hello.info.get("alpn") not in ("", "-", None) or not tor_like_name(sni):
        return NOT_THIS
    size = _first_app_record(fwd)
    if size == -1:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    if size not in _VERSIONS_SIZES:
        return NOT_THIS
    return Detection(
        TUNNEL_TOR,
        f"Tor link handshake: TLS to a random-looking name {sni}, no ALPN, "
        f"first client record {size} bytes (a VERSIONS cell)",
        info={"sni": sni},
    )
