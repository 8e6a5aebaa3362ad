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

All three must hold: a name of that shape (``www.`` + 4..32 base32 characters + ``.com`` or
``.net``; a random label need not contain a digit, about a fifth of Tor's do not), no ALPN
(every browser and curl send one), and a first client record of exactly a VERSIONS cell's
size *for the TLS version in use* (28 when the Finished came as application data, TLS 1.3;
the TLS 1.0-1.2 sizes otherwise). A benign HTTPS client without ALPN that happened to use
such a name would send an HTTP request, 16 bytes at the very least (``GET / HTTP/1.0``
and an empty line), never 11: 33+ bytes in TLS 1.3.

What cannot be told: Tor through a pluggable transport (obfs4, meek, Snowflake) shows none
of this; obfs4 is a fully encrypted stream (see ``unknown_encrypted``).
"""

from __future__ import annotations

from typing import Final

from egressd.detect.base import NEED_MORE, NOT_THIS, TUNNEL_TOR, Detection, Result, StreamContext
from egressd.detect.tls import detect_tls

_B32: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_CT_CCS: Final = 20
_CT_HANDSHAKE: Final = 22
_CT_APPDATA: Final = 23
_VERSIONS_TLS13: Final = frozenset({28})
_VERSIONS_TLS12: Final = frozenset({27, 32, 35, 48, 64, 80})  # ChaCha20, 1.0 CBC-SHA1, GCM, 1.1/1.2 CBC
_MAX_RECORDS: Final = 32


def tor_like_name(sni: str) -> bool:
    if not sni.startswith("www.") or not sni.endswith((".com", ".net")):
        return False
    label = sni[4:-4]
    return 4 <= len(label) <= 32 and set(label) <= _B32


def _first_app_record(fwd: bytes) -> tuple[int, bool]:
    """(length of the client's first application-data record after its Finished, TLS 1.3?);
    length -1 while not there yet, -2 when the records are not laid out as expected."""
    pos = 0
    after_ccs = False
    finished: bool | None = None  # None: not yet; True: sent as app data (TLS 1.3); False: as handshake (1.2)
    for _ in range(_MAX_RECORDS):
        if pos + 5 > len(fwd):
            return -1, False
        ct = fwd[pos]
        length = int.from_bytes(fwd[pos + 3 : pos + 5], "big")
        if ct == _CT_CCS:
            after_ccs = True
        elif after_ccs and ct == _CT_HANDSHAKE and finished is None:
            finished = False  # TLS 1.2: the Finished is an (encrypted) handshake record
        elif after_ccs and ct == _CT_APPDATA:
            if finished is not None:
                return length, finished
            finished = True  # TLS 1.3: the Finished travels as the first app-data record
        pos += 5 + length
    return -2, False


def detect_tor(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    hello = detect_tls(fwd, rev, ctx)
    if not isinstance(hello, Detection):
        return hello
    sni = hello.info.get("sni", "")
    if hello.info.get("alpn") not in ("", "-", None) or not tor_like_name(sni):
        return NOT_THIS
    size, tls13 = _first_app_record(fwd)
    if size == -1:
        return NOT_THIS if ctx.fwd_closed or ctx.fwd_full else NEED_MORE
    if size not in (_VERSIONS_TLS13 if tls13 else _VERSIONS_TLS12):
        return NOT_THIS
    return Detection(
        TUNNEL_TOR,
        f"Tor link handshake: TLS to a random-looking name {sni}, no ALPN, "
        f"first client record {size} bytes (a VERSIONS cell)",
        info={"sni": sni},
    )
