"""TLS ClientHello: SNI, ALPN, version and JA3 from the originator's stream head.

Why the ClientHello: it is the last cleartext a TLS client sends, and it names the server
(SNI) and the application protocol (ALPN) before any key is agreed. The engine matches the
SNI against the policy's domain lists (mining pools, allowlists); this module only parses.

Goal and bounds: one pass over the head with ``struct.unpack_from`` at offsets, at most the
engine's head (the policy's ``head_bytes``, ``StreamContext.head``) considered. Every length
is checked against the bytes actually present before it is used, so hostile input yields
NOT_THIS, never an exception. The handshake message may be split over several TLS records
(RFC 8446 §5.1 allows any fragmentation) and the records over any TCP segments: while the
bytes seen so far are a valid prefix of a ClientHello the answer is NEED_MORE, and NOT_THIS
as soon as one byte rules it out (so the engine stops asking early). When the whole message
sits in one record (the usual case) it is parsed in place; only a fragmented message is
joined into one copy.

Outer framing (records, the handshake header, the fixed ClientHello fields, the extension
block) must be exact; a malformed *inside* of one extension only voids that extension, the
way a lenient middlebox would read it, because the framing alone already proves TLS.
The SSL 2.0-compatible ClientHello that old clients send to offer TLS is recognised too.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from egressd.detect.base import NEED_MORE, NOT_THIS, TLS, Detection, Outcome, Result, StreamContext, printable

MAX_HEAD: Final = 16384  # the bound for callers without a stream head (the engine passes head_bytes)
_MAX_RECORD: Final = 16384  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14

_CT_HANDSHAKE: Final = 22
_HS_CLIENT_HELLO: Final = 1
# legacy_version(2) random(32) session_id<0..32>(1) cipher_suites<2..>(2+2) compression<1..>(1+1)
_MIN_HELLO_BODY: Final = 2 + 32 + 1 + 4 + 2

_EXT_SERVER_NAME: Final = 0
_EXT_SUPPORTED_GROUPS: Final = 10
_EXT_EC_POINT_FORMATS: Final = 11
_EXT_ALPN: Final = 16
_EXT_SUPPORTED_VERSIONS: Final = 43
_EXT_ECH: Final = 0xFE0D  # draft-ietf-tls-esni encrypted_client_hello
_SNI_HOST_NAME: Final = 0

TLS1_3: Final = 0x0304
_VERSION_NAMES: Final = {
    0x0300: "SSL3.0",
    0x0301: "TLS1.0",
    0x0302: "TLS1.1",
    0x0303: "TLS1.2",
    0x0304: "TLS1.3",
}

_REC = struct.Struct("!BBBH")
_SSL2_LENGTHS = struct.Struct("!HHH")  # cipher_spec_length, session_id_length, challenge_length
_SSL2_HEAD: Final = 11  # length(2) msg_type(1) version(2) the three lengths(6)
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")

# Hostname bytes accepted in an SNI after lowercasing: LDH plus "_" (seen in real names,
# e.g. service records used as hosts). Anything else (NUL, space, UTF-8, "*") is invalid.
_HOST_CHARS: Final = b"abcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello says about where the client is going.

    ``sni`` is the host_name, lowercased, without a trailing dot, and only when it is a
    syntactically valid hostname; otherwise it is None and ``sni_invalid`` holds the raw
    value escaped for logs (an odd SNI is itself worth an event, but must never be matched
    against a domain list). ``ech`` says the encrypted_client_hello extension is present:
    real ECH (the SNI is then only the outer, public name) and Chrome's GREASE ECH look
    the same on the wire, by design, so it is a fact to log, not a verdict.
    ``version`` is the highest of legacy_version and supported_versions (TLS 1.3 drafts
    count as TLS 1.3); ``ciphers`` counts the offered suites without GREASE; ``ja3`` is the
    Salesforce JA3 string (GREASE removed), ``ja3_hash`` its MD5.
    """

    sni: str | None
    alpn: tuple[str, ...]
    version: int
    ciphers: int
    ja3: str
    ech: bool
    sni_invalid: str = ""

    @property
    def ja3_hash(self) -> str:
        if not self.ja3:
            return ""
        return hashlib.md5(self.ja3.encode("ascii"), usedforsecurity=False).hexdigest()


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE: 0x0a0a, 0x1a1a ... 0xfafa (both bytes equal, low nibble 0xa)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def version_name(version: int) -> str:
    return _VERSION_NAMES.get(version, f"0x{version:04x}")


def _normalise_version(v: int) -> int:
    """TLS 1.3 drafts (0x7fNN) and Facebook's fizz drafts (0xfbNN) mean TLS 1.3; values
    outside SSL3..TLS1.3 are unknown and ignored (0), so they cannot win "highest"."""
    if 0x0300 <= v <= 0x0304:
        return v
    if (v >> 8) in (0x7F, 0xFB):
        return TLS1_3
    return 0


def normalise_hostname(raw: bytes) -> str | None:
    """Lowercase, strip one trailing dot, and accept only a valid hostname (labels of
    1..63 LDH/underscore bytes, at most 253 in all); None otherwise."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    if name.translate(None, _HOST_CHARS + b"."):
        return None
    for label in name.split(b"."):
        if not label or len(label) > 63:
            return None
    return name.decode("ascii")


def parse_client_hello(data: bytes, limit: int = MAX_HEAD) -> ClientHello | Outcome:
    """Parse the first ClientHello at the start of ``data`` (the originator's stream head).

    NEED_MORE while ``data`` is a valid, incomplete prefix of one; NOT_THIS when it cannot
    be one (wrong record type or version, a handshake other than ClientHello, a length
    that does not fit, or a message that would not fit in ``limit`` bytes).
    """
    end = min(len(data), limit)
    if end and data[0] & 0x80:
        return _parse_sslv2_hello(data, end, limit)
    pos = 0
    # (start, stop) of each record fragment of the handshake message, in stream order.
    frags: list[tuple[int, int]] = []
    have = 0
    msg_total = -1  # handshake header (4) + body, once the header is known
    while True:
        if end - pos < 5:
            if len(data) >= limit:
                return NOT_THIS
            return _check_partial_record_header(data, pos, end)
        ctype, major, minor, rlen = _REC.unpack_from(data, pos)
        if ctype != _CT_HANDSHAKE or major != 3 or minor > 4 or rlen == 0 or rlen > _MAX_RECORD:
            return NOT_THIS
        start = pos + 5
        stop = min(start + rlen, end)
        frags.append((start, stop))
        have += stop - start
        if msg_total < 0:
            early = _check_handshake_head(data, frags, limit)
            if early is not None:
                if isinstance(early, Outcome):
                    return early
                msg_total = early
        if msg_total >= 0 and have >= msg_total:
            break
        if stop < start + rlen:  # this record is still arriving
            return NOT_THIS if len(data) >= limit else NEED_MORE
        pos = stop
    first_start, first_stop = frags[0]
    if first_stop - first_start >= msg_total:
        return _parse_body(data, first_start + 4, first_start + msg_total)
    joined = b"".join([data[a:b] for a, b in frags])
    return _parse_body(joined, 4, msg_total)


def _parse_sslv2_hello(data: bytes, end: int, limit: int) -> ClientHello | Outcome:
    """The SSL 2.0-compatible ClientHello old clients still send to offer TLS (RFC 5246
    Appendix E.2): a 2-byte length with the top bit set, msg_type 1, the TLS version,
    then three lengths and 3-byte cipher specs. It has no extensions (no SNI, no ALPN) and
    JA3 does not define it, so ``ja3`` is empty. Plain SSL 2.0 (version 0x0002) is not TLS.
    """
    if end >= 3 and data[2] != _HS_CLIENT_HELLO:
        return NOT_THIS
    if end >= 4 and data[3] != 3:
        return NOT_THIS
    if end >= 5 and data[4] > 3:
        return NOT_THIS
    if end < _SSL2_HEAD:
        return NEED_MORE
    msg_len = ((data[0] & 0x7F) << 8) | data[1]
    cs_len, sid_len, ch_len = _SSL2_LENGTHS.unpack_from(data, 5)
    if (
        cs_len == 0
        or cs_len % 3
        or sid_len not in (0, 16)
        or not 16 <= ch_len <= 32
        or msg_len != 9 + cs_len + sid_len + ch_len
    ):
        return NOT_THIS
    if end < 2 + msg_len:
        return NOT_THIS if len(data) >= limit else NEED_MORE
    version = _U16.unpack_from(data, 3)[0]
    return ClientHello(sni=None, alpn=(), version=version, ciphers=cs_len // 3, ja3="", ech=False)


def _check_partial_record_header(data: bytes, pos: int, end: int) -> Outcome:
    """Fewer than 5 bytes of a record header: reject on the bytes that are there."""
    n = end - pos
    if n >= 1 and data[pos] != _CT_HANDSHAKE:
        return NOT_THIS
    if n >= 2 and data[pos + 1] != 3:
        return NOT_THIS
    if n >= 3 and data[pos + 2] > 4:
        return NOT_THIS
    if n >= 4 and data[pos + 3] > (_MAX_RECORD >> 8):
        return NOT_THIS
    return NEED_MORE


def _check_handshake_head(data: bytes, frags: list[tuple[int, int]], limit: int) -> int | Outcome | None:
    """Look at the first 6 handshake bytes (type, length, legacy_version major/minor)
    across fragments. Returns the total message length once known and plausible,
    NOT_THIS when the bytes rule a ClientHello out, None when there are too few yet."""
    head = bytearray()
    for a, b in frags:
        head += data[a : min(b, a + 6 - len(head))]
        if len(head) >= 6:
            break
    if not head:
        return None
    if head[0] != _HS_CLIENT_HELLO:
        return NOT_THIS
    if len(head) >= 5 and head[4] != 3:
        return NOT_THIS
    if len(head) >= 6 and head[5] > 4:
        return NOT_THIS
    if len(head) < 4:
        return None
    body_len = (head[1] << 16) | (head[2] << 8) | head[3]
    if body_len < _MIN_HELLO_BODY or body_len + 4 + 5 > limit:
        return NOT_THIS
    return body_len + 4


def _parse_body(buf: bytes, p: int, end: int) -> ClientHello | Outcome:
    """ClientHello body in ``buf[p:end]`` (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2)."""
    legacy = _U16.unpack_from(buf, p)[0]
    if not 0x0300 <= legacy <= 0x0304:
        return NOT_THIS
    p += 34  # legacy_version + random
    sid_len = buf[p]
    p += 1
    if sid_len > 32 or p + sid_len + 2 > end:
        return NOT_THIS
    p += sid_len
    cs_len = _U16.unpack_from(buf, p)[0]
    p += 2
    if cs_len < 2 or cs_len & 1 or p + cs_len + 1 > end:
        return NOT_THIS
    ciphers = [str(c) for (c,) in struct.iter_unpack("!H", buf[p : p + cs_len]) if not is_grease(c)]
    p += cs_len
    comp_len = buf[p]
    p += 1
    if comp_len < 1 or p + comp_len > end:
        return NOT_THIS
    p += comp_len

    sni: str | None = None
    sni_invalid = ""
    alpn: tuple[str, ...] = ()
    version = legacy
    ech = False
    ext_types: list[str] = []
    groups: list[str] = []
    point_formats: list[str] = []
    if p < end:  # the extension block is optional before TLS 1.3
        if p + 2 > end:
            return NOT_THIS
        ext_end = p + 2 + _U16.unpack_from(buf, p)[0]
        p += 2
        if ext_end != end:  # the extension block ends the message (RFC 8446 §4.1.2)
            return NOT_THIS
        seen_sni = False
        while p < ext_end:
            if p + 4 > ext_end:
                return NOT_THIS
            etype, elen = _U16X2.unpack_from(buf, p)
            p += 4
            if p + elen > ext_end:
                return NOT_THIS
            if not is_grease(etype):
                ext_types.append(str(etype))
            if etype == _EXT_SERVER_NAME and not seen_sni:
                seen_sni = True
                raw = _server_name(buf, p, p + elen)
                if raw is not None:
                    sni = normalise_hostname(raw)
                    if sni is None:
                        sni_invalid = printable(raw, 255)
                elif elen:
                    sni_invalid = "(malformed server_name extension)"
            elif etype == _EXT_ALPN and not alpn:
                alpn = _alpn(buf, p, p + elen)
            elif etype == _EXT_SUPPORTED_VERSIONS:
                version = max(version, _highest_supported_version(buf, p, p + elen))
            elif etype == _EXT_SUPPORTED_GROUPS:
                groups = _u16_list(buf, p, p + elen, 2)
            elif etype == _EXT_EC_POINT_FORMATS:
                if elen >= 1 and buf[p] + 1 <= elen:
                    point_formats = [str(b) for b in buf[p + 1 : p + 1 + buf[p]]]
            elif etype == _EXT_ECH:
                ech = True
            p += elen
    ja3 = f"{legacy},{'-'.join(ciphers)},{'-'.join(ext_types)},{'-'.join(groups)},{'-'.join(point_formats)}"
    return ClientHello(
        sni=sni,
        alpn=alpn,
        version=version,
        ciphers=len(ciphers),
        ja3=ja3,
        ech=ech,
        sni_invalid=sni_invalid,
    )


def _server_name(buf: bytes, p: int, end: int) -> bytes | None:
    """RFC 6066 §3: ServerNameList<1..2^16-1> of (name_type, HostName<1..2^16-1>).
    The first host_name entry; None when the extension is empty or malformed."""
    if p + 2 > end:
        return None
    list_end = p + 2 + _U16.unpack_from(buf, p)[0]
    p += 2
    if list_end > end:
        return None
    while p + 3 <= list_end:
        name_type = buf[p]
        nlen = _U16.unpack_from(buf, p + 1)[0]
        p += 3
        if p + nlen > list_end:
            return None
        if name_type == _SNI_HOST_NAME:
            return buf[p : p + nlen] if nlen else None
        p += nlen
    return None


def _alpn(buf: bytes, p: int, end: int) -> tuple[str, ...]:
    """RFC 7301 §3.1: ProtocolNameList<2..2^16-1> of ProtocolName<1..2^8-1>; names are
    opaque bytes, shown escaped. Empty on any malformation."""
    if p + 2 > end:
        return ()
    list_end = p + 2 + _U16.unpack_from(buf, p)[0]
    p += 2
    if list_end > end:
        return ()
    out: list[str] = []
    while p < list_end and len(out) < 32:
        n = buf[p]
        p += 1
        if n == 0 or p + n > list_end:
            return ()
        out.append(printable(buf[p : p + n], 64))
        p += n
    return tuple(out)


def _highest_supported_version(buf: bytes, p: int, end: int) -> int:
    """RFC 8446 §4.2.1: ClientHello form, ProtocolVersion versions<2..254>."""
    if p + 1 > end or p + 1 + buf[p] > end:
        return 0
    best = 0
    for v in _u16_values(buf, p + 1, p + 1 + buf[p]):
        if not is_grease(v):
            best = max(best, _normalise_version(v))
    return best


def _u16_values(buf: bytes, p: int, end: int) -> list[int]:
    return [v for (v,) in struct.iter_unpack("!H", buf[p : end - ((end - p) & 1)])] if end > p else []


def _u16_list(buf: bytes, p: int, end: int, prefix: int) -> list[str]:
    """A u16-length-prefixed list of u16 values as JA3 decimal strings, GREASE removed."""
    if p + prefix > end:
        return []
    list_end = p + prefix + _U16.unpack_from(buf, p)[0]
    if list_end > end:
        return []
    return [str(v) for v in _u16_values(buf, p + prefix, list_end) if not is_grease(v)]


# The last heads looked at and the answer. The engine runs detect_tls and then detect_tor,
# which starts by asking detect_tls, on the very same head objects: the second call reuses
# the first's parse instead of parsing the ClientHello again (a tenth of the detectors' time
# in bench/replay.py). Identity, not equality: the references held here keep those objects
# alive, so the same ids mean the same bytes. The answer is a fresh Detection nobody mutates.
_last_args: list[object] = [None, None, None]
_last_result: list[Result] = [NOT_THIS]


def detect_tls(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    """A ClientHello at the head of the originator's stream.

    NOT_THIS when the server spoke first (a TLS server never does) or when the head can
    no longer grow into a ClientHello (direction closed or head buffer full).
    """
    last = _last_args
    if last[0] is fwd and last[1] is rev and last[2] is ctx:
        return _last_result[0]
    result = _detect_tls(fwd, rev, ctx)
    last[0], last[1], last[2] = fwd, rev, ctx
    _last_result[0] = result
    return result


def _detect_tls(fwd: bytes, rev: bytes, ctx: StreamContext) -> Result:
    if not fwd:
        return NOT_THIS if rev or ctx.fwd_closed else NEED_MORE
    hello = parse_client_hello(fwd, ctx.head)
    if isinstance(hello, Outcome):
        if hello is NEED_MORE and (ctx.fwd_closed or ctx.fwd_full):
            return NOT_THIS
        return hello
    return tls_detection(hello)


def tls_detection(hello: ClientHello) -> Detection:
    """The Detection for a parsed ClientHello (shared with QUIC, whose CRYPTO frames
    carry the same message)."""
    alpn = ",".join(hello.alpn)
    sni = hello.sni or ""
    evidence = f"ClientHello sni={sni or '-'} alpn={alpn or '-'} {version_name(hello.version)}"
    if hello.sni_invalid:
        evidence += f" invalid-sni={hello.sni_invalid}"
    if hello.ech:
        evidence += " ech"
    info = {
        "sni": sni,
        "alpn": alpn,
        "version": version_name(hello.version),
        "ja3": hello.ja3,
    }
    if hello.ja3:
        info["ja3_hash"] = hello.ja3_hash
    if hello.sni_invalid:
        info["sni_invalid"] = hello.sni_invalid
    if hello.ech:
        info["ech"] = "1"
    return Detection(kind=TLS, evidence=evidence, info=info, refine=False)
