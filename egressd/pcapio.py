"""Capture files -> (timestamp, IP packet bytes). Our own reader: struct at offsets, no scapy.

Why not scapy: ``egressd test`` is benchmarked against ndpiReader, and building a scapy
packet per frame costs more than the whole engine. Here a record is one ``unpack_from`` on
an mmap, a link-layer walk over a few bytes, and one slice (the only copy: the consumer
needs ``bytes``).

Goals and bounds:
* Formats: classic pcap (both byte orders, microsecond and nanosecond magic, and the
  "modified" Kuznetzov records) and pcapng (several sections, either byte order, one
  link type and timestamp resolution per interface, EPB/SPB/OPB; every other block is
  skipped by its length, which is checked at both ends).
* Link layers (:data:`SUPPORTED_LINKTYPES`): Ethernet with any stack of 802.1Q / 802.1ad /
  QinQ tags, MPLS, PPPoE and LLC/SNAP; Linux cooked SLL/SLL2; raw IP; BSD loopback;
  PPP; Cisco HDLC; NFLOG. Frames that carry no IP (ARP, LLDP, STP ...) are counted by
  kind in :class:`CaptureStats` and skipped.
* Hostile input: every length is checked against the file before it is used, loops are
  bounded by the file size (each step advances by at least 12 bytes) and by
  ``_MAX_TAGS`` per frame. Anything the reader cannot make sense of is a
  :class:`CaptureError` naming the byte offset and how many packets came before it:
  a person must be able to find the broken record with a hex editor.
* Header snaplen is not trusted (libpcap clamps it too: writers put 0, 65535, 262144 or
  2**31-1 there); a *record* longer than ``MAX_CAPLEN`` is an error, because no IP link
  produces one and a corrupt length would otherwise make us slurp the rest of the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

MAX_CAPLEN: Final = 256 * 1024
_MAX_TAGS: Final = 8  # VLAN tags / MPLS labels walked per frame before giving up

# -- magic numbers --------------------------------------------------------------------------
_PCAP_US: Final = 0xA1B2C3D4
_PCAP_NS: Final = 0xA1B23C4D
_PCAP_MODIFIED: Final = 0xA1B2CD34  # Alexey Kuznetzov's patched libpcap: 24-byte records
_PCAPNG_SHB: Final = 0x0A0D0D0A
_PCAPNG_BOM: Final = 0x1A2B3C4D
_PCAPNG_BOM_SWAPPED: Final = 0x4D3C2B1A

_BT_IDB: Final = 0x00000001
_BT_OPB: Final = 0x00000002
_BT_SPB: Final = 0x00000003
_BT_EPB: Final = 0x00000006
_BT_PACKET: Final = frozenset({_BT_EPB, _BT_OPB})

_OPT_ENDOFOPT: Final = 0
_OPT_IF_TSRESOL: Final = 9
_OPT_IF_TSOFFSET: Final = 14

# -- link types (https://www.tcpdump.org/linktypes.html) -------------------------------------
LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_PPP: Final = 9
LINKTYPE_RAW_12: Final = 12
LINKTYPE_RAW_14: Final = 14
LINKTYPE_PPP_HDLC: Final = 50
LINKTYPE_PPP_ETHER: Final = 51
LINKTYPE_RAW: Final = 101
LINKTYPE_C_HDLC: Final = 104
LINKTYPE_LOOP: Final = 108
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_NFLOG: Final = 239
LINKTYPE_LINUX_SLL2: Final = 276

LINKTYPE_NAMES: Final[dict[int, str]] = {
    0: "NULL",
    1: "ETHERNET",
    6: "IEEE802_5",
    9: "PPP",
    10: "FDDI",
    12: "RAW",
    14: "RAW",
    50: "PPP_HDLC",
    51: "PPP_ETHER",
    101: "RAW",
    104: "C_HDLC",
    105: "IEEE802_11",
    108: "LOOP",
    113: "LINUX_SLL",
    117: "PFLOG",
    119: "IEEE802_11_PRISM",
    127: "IEEE802_11_RADIOTAP",
    143: "DOCSIS",
    187: "BLUETOOTH_HCI_H4",
    189: "USB_LINUX",
    192: "PPI",
    195: "IEEE802_15_4",
    201: "BLUETOOTH_HCI_H4_WITH_PHDR",
    220: "USB_LINUX_MMAPPED",
    228: "IPV4",
    229: "IPV6",
    239: "NFLOG",
    249: "USBPCAP",
    276: "LINUX_SLL2",
}


def linktype_name(lt: int) -> str:
    """A person's name for a link type number (``"ETHERNET (1)"``)."""
    return f"{LINKTYPE_NAMES.get(lt, 'unknown')} ({lt})"


# -- ethertypes --------------------------------------------------------------------------
_ET_IPV4: Final = 0x0800
_ET_IPV6: Final = 0x86DD
_ET_IP: Final = frozenset({_ET_IPV4, _ET_IPV6})
_ET_VLAN: Final = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})  # 802.1Q, 802.1ad, legacy QinQ
_ET_MPLS: Final = frozenset({0x8847, 0x8848})
_ET_PPPOE_SESSION: Final = 0x8864
_ET_NAMES: Final[dict[int, str]] = {
    0x0806: "ARP",
    0x8035: "RARP",
    0x88CC: "LLDP",
    0x8137: "IPX",
    0x888E: "EAPOL",
    0x8863: "PPPoE discovery",
    0x9000: "Ethernet loopback",
    0x88E5: "MACsec",
    0x88F7: "PTP",
    0x8906: "FCoE",
    0x8809: "slow protocols (LACP)",
    0x88E1: "HomePlug",
    0x893A: "IEEE 1905",
    0x22F0: "AVTP",
}

_PPP_IPV4: Final = 0x0021
_PPP_IPV6: Final = 0x0057
_PPP_IP: Final = frozenset({_PPP_IPV4, _PPP_IPV6})

# BSD loopback address families: AF_INET is 2 everywhere, AF_INET6 is not.
_AF_INET: Final = 2
_AF_INET6: Final = frozenset({10, 23, 24, 28, 30})  # Linux, Winsock, Net/OpenBSD, FreeBSD, Darwin

_NFULA_PAYLOAD: Final = 9

_RAW_LINKTYPES: Final = frozenset({LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14})
_IP_VERSIONS: Final = (4, 6)
# The classic-pcap loop stores its offset (for progress bars) once per this many + 1 records
# instead of once per record: an attribute store per packet is measurable at 500k packets/s.
_OFFSET_EVERY: Final = 0x3FF


class CaptureError(Exception):
    """The capture cannot be read (further). ``offset`` is the byte where reading failed,
    ``packets`` the number of packet records read before it."""

    def __init__(self, path: str, offset: int, packets: int, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.offset = offset
        self.packets = packets
        self.reason = message


@dataclass
class CaptureStats:
    """What was read, for the summary line at the end of ``egressd test``."""

    format: str = ""  # "pcap", "pcap-ns", "pcap-modified", "pcapng"
    records: int = 0  # packet records read, IP or not
    packets: int = 0  # IP packets yielded
    bytes: int = 0  # bytes of the IP packets yielded
    non_ip: int = 0  # frames skipped because they carry no IP packet
    non_ip_kinds: dict[str, int] = field(default_factory=dict)  # e.g. {"ARP": 3}
    link_types: dict[int, int] = field(default_factory=dict)  # link type -> records
    sections: int = 0  # pcapng sections (1 for classic pcap)
    blocks_skipped: int = 0  # pcapng blocks that are neither packets nor needed metadata


# A link handler maps a frame (buf[off:end]) to the offset where its IP packet starts, or -1.
_Buf = bytes | mmap.mmap
LinkHandler = Callable[[_Buf, int, int], int]


def _by_ethertype(buf: _Buf, p: int, end: int, et: int) -> int:
    """Walk tags after an ethertype; return the IP start or -1."""
    for _ in range(_MAX_TAGS):
        if et in _ET_IP:
            return p
        if et in _ET_VLAN:
            if p + 4 > end:
                return -1
            et = buf[p + 2] << 8 | buf[p + 3]
            p += 4
        elif et in _ET_MPLS:
            return _mpls(buf, p, end)
        elif et == _ET_PPPOE_SESSION:
            return _ppp(buf, p + 6, end)
        elif et <= 1500:
            # IEEE 802.3 length field: only LLC/SNAP (AA AA 03 + OUI) can carry an ethertype.
            if p + 8 > end or buf[p] != 0xAA or buf[p + 1] != 0xAA or buf[p + 2] != 0x03:
                return -1
            et = buf[p + 6] << 8 | buf[p + 7]
            p += 8
        else:
            return -1
    return -1


def _mpls(buf: _Buf, p: int, end: int) -> int:
    """MPLS label stack: after the bottom-of-stack label the first nibble says IPv4/IPv6
    (RFC 4385); a pseudowire control word (nibble 0) is not IP."""
    for _ in range(_MAX_TAGS):
        if p + 4 > end:
            return -1
        bos = buf[p + 2] & 1
        p += 4
        if bos:
            if p >= end:
                return -1
            v = buf[p] >> 4
            return p if v == 4 or v == 6 else -1
    return -1


def _ppp(buf: _Buf, p: int, end: int) -> int:
    """A PPP protocol field (RFC 1661, with protocol-field compression) at ``p``."""
    if p >= end:
        return -1
    if buf[p] & 1:  # compressed: one odd byte
        proto = buf[p]
        p += 1
    else:
        if p + 2 > end:
            return -1
        proto = buf[p] << 8 | buf[p + 1]
        p += 2
    return p if proto in _PPP_IP else -1


def _link_ethernet(buf: _Buf, off: int, end: int) -> int:
    if off + 14 > end:
        return -1
    return _by_ethertype(buf, off + 14, end, buf[off + 12] << 8 | buf[off + 13])


def _link_raw(buf: _Buf, off: int, end: int) -> int:
    if off >= end:
        return -1
    v = buf[off] >> 4
    return off if v == 4 or v == 6 else -1


def _link_ipv4(buf: _Buf, off: int, end: int) -> int:
    return off if off < end and buf[off] >> 4 == 4 else -1


def _link_ipv6(buf: _Buf, off: int, end: int) -> int:
    return off if off < end and buf[off] >> 4 == 6 else -1


_ARPHRD_NETLINK: Final = 824


def _link_sll(buf: _Buf, off: int, end: int) -> int:
    # packet type(2) ARPHRD(2) addr len(2) addr(8) protocol(2)
    if off + 16 > end:
        return -1
    if (buf[off + 2] << 8 | buf[off + 3]) == _ARPHRD_NETLINK:
        return -1
    return _by_ethertype(buf, off + 16, end, buf[off + 14] << 8 | buf[off + 15])


def _link_sll2(buf: _Buf, off: int, end: int) -> int:
    # protocol(2) reserved(2) ifindex(4) ARPHRD(2) packet type(1) addr len(1) addr(8)
    if off + 20 > end:
        return -1
    if (buf[off + 8] << 8 | buf[off + 9]) == _ARPHRD_NETLINK:
        return -1
    return _by_ethertype(buf, off + 20, end, buf[off] << 8 | buf[off + 1])


def _family(af: int) -> bool:
    return af == _AF_INET or af in _AF_INET6


def _link_null(buf: _Buf, off: int, end: int) -> int:
    # The family is in the *capturing host's* byte order, which need not be the file's:
    # take whichever reading is a small number (what libpcap and Wireshark do).
    if off + 4 > end:
        return -1
    af = buf[off] | buf[off + 1] << 8 | buf[off + 2] << 16 | buf[off + 3] << 24
    if af > 0xFFFF:
        af = buf[off + 3] | buf[off + 2] << 8 | buf[off + 1] << 16 | buf[off] << 24
    return off + 4 if _family(af) else -1


def _link_loop(buf: _Buf, off: int, end: int) -> int:
    if off + 4 > end:
        return -1
    af = buf[off] << 24 | buf[off + 1] << 16 | buf[off + 2] << 8 | buf[off + 3]
    return off + 4 if _family(af) else -1


def _link_ppp(buf: _Buf, off: int, end: int) -> int:
    # RFC 1662 HDLC-like framing starts FF 03; Cisco PPP-in-HDLC (RFC 1547) 0F/8F 00 + ethertype.
    if off + 2 <= end:
        b0 = buf[off]
        if b0 == 0xFF and buf[off + 1] == 0x03:
            return _ppp(buf, off + 2, end)
        if (b0 == 0x0F or b0 == 0x8F) and off + 4 <= end:
            return _by_ethertype(buf, off + 4, end, buf[off + 2] << 8 | buf[off + 3])
    return _ppp(buf, off, end)


def _link_pppoe(buf: _Buf, off: int, end: int) -> int:
    return _ppp(buf, off + 6, end)


def _link_c_hdlc(buf: _Buf, off: int, end: int) -> int:
    if off + 4 > end:
        return -1
    return _by_ethertype(buf, off + 4, end, buf[off + 2] << 8 | buf[off + 3])


def _nflog_handler(big_endian: bool) -> LinkHandler:
    """NFLOG TLVs are in the writing host's byte order, i.e. the file's (libpcap swaps them
    with the rest of the record when the reader's order differs)."""
    lo, hi = (1, 0) if big_endian else (0, 1)

    def link_nflog(buf: _Buf, off: int, end: int) -> int:
        # family(1) version(1) resource id(2), then TLVs: length(2) type(2) value, 4-aligned
        if off + 4 > end:
            return -1
        p = off + 4
        for _ in range(64):
            if p + 4 > end:
                return -1
            tlen = buf[p + lo] | buf[p + hi] << 8
            ttype = buf[p + 2 + lo] | buf[p + 2 + hi] << 8
            if tlen < 4 or p + tlen > end:
                return -1
            if ttype == _NFULA_PAYLOAD:
                q = p + 4
                if q >= end:
                    return -1
                v = buf[q] >> 4
                return q if v == 4 or v == 6 else -1
            p += (tlen + 3) & ~3
        return -1

    return link_nflog


_HANDLERS: Final[dict[int, LinkHandler]] = {
    LINKTYPE_NULL: _link_null,
    LINKTYPE_ETHERNET: _link_ethernet,
    LINKTYPE_PPP: _link_ppp,
    LINKTYPE_RAW_12: _link_raw,
    LINKTYPE_RAW_14: _link_raw,
    LINKTYPE_PPP_HDLC: _link_ppp,
    LINKTYPE_PPP_ETHER: _link_pppoe,
    LINKTYPE_RAW: _link_raw,
    LINKTYPE_C_HDLC: _link_c_hdlc,
    LINKTYPE_LOOP: _link_loop,
    LINKTYPE_LINUX_SLL: _link_sll,
    LINKTYPE_IPV4: _link_ipv4,
    LINKTYPE_IPV6: _link_ipv6,
    LINKTYPE_LINUX_SLL2: _link_sll2,
}
SUPPORTED_LINKTYPES: Final = frozenset({*_HANDLERS, LINKTYPE_NFLOG})


def _handler(lt: int, big_endian: bool) -> LinkHandler | None:
    if lt == LINKTYPE_NFLOG:
        return _nflog_handler(big_endian)
    return _HANDLERS.get(lt)


def _supported_list() -> str:
    return ", ".join(linktype_name(lt) for lt in sorted(SUPPORTED_LINKTYPES))


def _non_ip_kind(buf: _Buf, off: int, end: int, lt: int) -> str:
    """Name what a skipped frame was. Off the hot path: only non-IP frames get here."""
    et = -1
    p = -1
    if lt == LINKTYPE_ETHERNET and off + 14 <= end:
        et, p = buf[off + 12] << 8 | buf[off + 13], off + 14
    elif lt == LINKTYPE_LINUX_SLL and off + 16 <= end:
        et, p = buf[off + 14] << 8 | buf[off + 15], off + 16
    elif lt == LINKTYPE_LINUX_SLL2 and off + 20 <= end:
        et, p = buf[off] << 8 | buf[off + 1], off + 20
    if et < 0:
        return f"{LINKTYPE_NAMES.get(lt, str(lt))} frame ({end - off} bytes)"
    for _ in range(_MAX_TAGS):
        if et in _ET_VLAN and p + 4 <= end:
            et = buf[p + 2] << 8 | buf[p + 3]
            p += 4
        else:
            break
    if et in _ET_VLAN:
        return "truncated VLAN tag"
    if et in _ET_MPLS:
        return "MPLS (not IP)"
    if et == _ET_PPPOE_SESSION:
        return "PPPoE session (not IP)"
    if et in _ET_IP:
        return "IP frame with too many tags"
    if et <= 1500:
        return "802.3 LLC"
    return _ET_NAMES.get(et, f"ethertype 0x{et:04x}")


_GZIP: Final = b"\x1f\x8b"


def _describe_magic(head: bytes) -> str:
    shown = " ".join(f"{b:02x}" for b in head[:8])
    hint = ""
    if head.startswith(_GZIP):
        hint = " (gzip-compressed: decompress it first)"
    elif head.startswith(b"snoop\0"):
        hint = " (Solaris snoop)"
    elif head.startswith(b"\x28\xb5\x2f\xfd"):
        hint = " (zstd-compressed: decompress it first)"
    elif head[:8].isascii() and all(0x20 <= b < 0x7F or b in (9, 10, 13) for b in head[:8]):
        hint = f" (text: {head[:8].decode('ascii')!r})"
    return (
        f"not a capture file: the first bytes are {shown}{hint}; "
        "supported formats are pcap (microsecond or nanosecond, either byte order) and pcapng"
    )


class Reader:
    """One pass over a capture. Iterate for ``(timestamp, ip_packet_bytes)``; read ``stats``
    at the end and ``offset``/``size`` at any time for a progress bar.

    The constructor reads and checks the file header, so a wrong file fails before any
    output; errors further in surface from the iteration. Both are :class:`CaptureError`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.stats = CaptureStats()
        self.offset = 0
        self._buf: _Buf = b""
        self._mm: mmap.mmap | None = None
        self._used = False
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size > 0:
                    try:
                        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                        self._buf = self._mm
                    except (OSError, ValueError):
                        self._buf = f.read()
                else:
                    # Size 0: an empty file, or a pipe / device that has no size to map.
                    self._buf = f.read()
        except OSError as e:
            raise CaptureError(self.path, 0, 0, f"cannot read: {e.strerror or e}") from e
        self.size = len(self._buf)
        try:
            self._gen = self._open()
        except CaptureError:
            self.close()
            raise

    # -- public ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        if self._used:
            raise RuntimeError("a Reader is a single pass; open the file again")
        self._used = True
        return self._gen

    def close(self) -> None:
        """Unmap the file. Iteration closes it by itself at the end or on an error."""
        mm, self._mm = self._mm, None
        self._buf = b""
        if mm is not None:
            mm.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header ------------------------------------------------------------------------------
    def _error(self, offset: int, message: str) -> CaptureError:
        return CaptureError(self.path, offset, self.stats.records, message)

    def _open(self) -> Iterator[tuple[float, bytes]]:
        buf, size = self._buf, self.size
        if size == 0:
            raise self._error(0, "empty file (0 bytes): there is no capture header to read")
        if size < 4:
            raise self._error(0, f"file too short ({size} bytes) to be a capture; {_describe_magic(bytes(buf[:size]))}")
        if struct.unpack_from("<I", buf, 0)[0] == _PCAPNG_SHB:
            if size < 28:
                raise self._error(0, f"truncated pcapng Section Header Block: {size} of at least 28 bytes")
            bom = struct.unpack_from("<I", buf, 8)[0]
            if bom not in (_PCAPNG_BOM, _PCAPNG_BOM_SWAPPED):
                raise self._error(8, _bad_bom(buf, 0))
            self._shb(buf, 0, 28, "<" if bom == _PCAPNG_BOM else ">")  # the version, before any output
            return self._pcapng(buf)
        for endian in ("<", ">"):
            magic = struct.unpack_from(endian + "I", buf, 0)[0]
            if magic in (_PCAP_US, _PCAP_NS, _PCAP_MODIFIED):
                return self._pcap(buf, endian, magic)
        raise self._error(0, _describe_magic(bytes(buf[:8])))

    def _pcap(self, buf: _Buf, endian: str, magic: int) -> Iterator[tuple[float, bytes]]:
        size = self.size
        if size < 24:
            raise self._error(0, f"truncated pcap file header: {size} of 24 bytes")
        network = struct.unpack_from(endian + "I", buf, 20)[0]
        lt = network & 0xFFFF  # the upper bits carry FCS-length flags (pcap spec, LinkType field)
        handler = _handler(lt, endian == ">")
        if handler is None:
            raise self._error(20, f"unsupported link type {linktype_name(lt)}; supported: {_supported_list()}")
        s = self.stats
        s.format = "pcap-ns" if magic == _PCAP_NS else "pcap-modified" if magic == _PCAP_MODIFIED else "pcap"
        s.sections = 1
        self.offset = 24
        return self._pcap_records(buf, endian, magic, lt, handler)

    # -- the hot loops: locals only, one unpack per record ---------------------------------------
    def _pcap_records(
        self, buf: _Buf, endian: str, magic: int, lt: int, handler: LinkHandler
    ) -> Iterator[tuple[float, bytes]]:
        size = self.size
        stats = self.stats
        div = 1e9 if magic == _PCAP_NS else 1e6
        rec = struct.Struct(endian + "IIII")
        rec_len = 24 if magic == _PCAP_MODIFIED else 16
        eth = lt == LINKTYPE_ETHERNET
        # Raw IP (what bench/replay.py and NFLOG-to-pcap tools write): the link walk is one
        # version test, done here rather than in a call per record.
        raw = lt in _RAW_LINKTYPES
        # Locals, not globals: no dictionary look-up per record.
        max_caplen, offset_every, ip_versions = MAX_CAPLEN, _OFFSET_EVERY, _IP_VERSIONS
        off = 24
        records = nbytes = non_ip = 0
        try:
            while off < size:
                if off + rec_len > size:
                    raise self._error(
                        off,
                        f"truncated packet record header at byte {off} after {records} packets: "
                        f"{size - off} of {rec_len} bytes",
                    )
                sec, frac, caplen, _origlen = rec.unpack_from(buf, off)
                start = off + rec_len
                if caplen > max_caplen:
                    raise self._error(
                        off,
                        f"absurd packet record at byte {off} after {records} packets: captured length "
                        f"{caplen} bytes exceeds the {MAX_CAPLEN}-byte maximum (corrupt file?)",
                    )
                end = start + caplen
                if end > size:
                    raise self._error(
                        off,
                        f"truncated packet record at byte {off} after {records} packets: header says "
                        f"{caplen} bytes, {size - start} remain",
                    )
                off = end
                records += 1
                if not records & offset_every:
                    self.offset = off  # for a progress bar; exact at the end (finally)
                if eth and caplen >= 14 and (buf[start + 12] << 8 | buf[start + 13]) in _ET_IP:
                    p = start + 14
                elif raw:
                    p = start if caplen and buf[start] >> 4 in ip_versions else -1
                else:
                    p = handler(buf, start, end)
                if p < 0:
                    non_ip += 1
                    k = _non_ip_kind(buf, start, end, lt)
                    stats.non_ip_kinds[k] = stats.non_ip_kinds.get(k, 0) + 1
                    continue
                nbytes += end - p
                yield sec + frac / div, buf[p:end]
        except CaptureError as err:
            err.packets = records
            raise
        finally:
            self.offset = off
            # Every record is a packet yielded or a non-IP frame skipped.
            self._flush(records, records - non_ip, nbytes, non_ip, {lt: records} if records else {})

    def _pcapng(self, buf: _Buf) -> Iterator[tuple[float, bytes]]:
        size = self.size
        stats = self.stats
        stats.format = "pcapng"
        off = 0
        e = "<"
        u32x2 = struct.Struct("<II")
        u32 = struct.Struct("<I")
        epb = struct.Struct("<IIIII")
        opb = struct.Struct("<HHIIII")
        # The current section's interfaces: (link type, handler, snaplen, ts divisor, ts offset s).
        ifaces: list[tuple[int, LinkHandler | None, int, float, int]] = []
        records = packets = nbytes = non_ip = 0
        lt_counts: dict[int, int] = {}
        last_ts = 0.0
        try:
            while off < size:
                if size - off < 12:
                    raise self._error(
                        off,
                        f"truncated pcapng block at byte {off} after {records} packets: "
                        f"{size - off} bytes remain, a block needs at least 12",
                    )
                btype, blen = u32x2.unpack_from(buf, off)
                if btype == _PCAPNG_SHB:
                    bom = struct.unpack_from("<I", buf, off + 8)[0]
                    if bom == _PCAPNG_BOM:
                        e = "<"
                    elif bom == _PCAPNG_BOM_SWAPPED:
                        e = ">"
                    else:
                        raise self._error(off + 8, _bad_bom(buf, off))
                    u32x2 = struct.Struct(e + "II")
                    u32 = struct.Struct(e + "I")
                    epb = struct.Struct(e + "IIIII")
                    opb = struct.Struct(e + "HHIIII")
                    ifaces = []
                    blen = u32x2.unpack_from(buf, off)[1]
                elif off == 0:
                    raise self._error(0, "pcapng file does not start with a Section Header Block")
                if blen < 12 or blen % 4:
                    why = "below 12" if blen < 12 else "not a multiple of 4"
                    raise self._error(
                        off, f"corrupt pcapng {_block_name(btype)} at byte {off} after {records} packets: "
                        f"total length {blen} is {why}",
                    )  # fmt: skip
                if blen > size - off:
                    raise self._error(
                        off,
                        f"truncated pcapng {_block_name(btype)} at byte {off} after {records} packets: "
                        f"block says {blen} bytes, {size - off} remain",
                    )
                trailer = u32.unpack_from(buf, off + blen - 4)[0]
                if trailer != blen:
                    raise self._error(
                        off,
                        f"corrupt pcapng {_block_name(btype)} at byte {off} after {records} packets: "
                        f"total length {blen} at the start but {trailer} at the end",
                    )
                b = off
                off += blen
                self.offset = off
                if btype in _BT_PACKET:
                    if blen < 32:
                        raise self._error(b, f"corrupt pcapng {_block_name(btype)} at byte {b}: {blen} bytes")
                    if btype == _BT_EPB:
                        iid, tsh, tsl, caplen, _olen = epb.unpack_from(buf, b + 8)
                    else:
                        iid, _drops, tsh, tsl, caplen, _olen = opb.unpack_from(buf, b + 8)
                    if caplen > blen - 32:
                        raise self._error(
                            b,
                            f"corrupt pcapng {_block_name(btype)} at byte {b} after {records} packets: "
                            f"captured length {caplen} does not fit in a {blen}-byte block",
                        )
                    if iid >= len(ifaces):
                        raise self._error(
                            b,
                            f"pcapng {_block_name(btype)} at byte {b} names interface {iid}, but its "
                            f"section describes {len(ifaces)} interface(s) before it",
                        )
                    lt, handler, _snap, div, tsoff = ifaces[iid]
                    last_ts = ((tsh << 32) | tsl) / div + tsoff
                    start = b + 28
                elif btype == _BT_SPB:
                    if blen < 16:
                        raise self._error(b, f"corrupt pcapng Simple Packet Block at byte {b}: {blen} bytes")
                    if not ifaces:
                        raise self._error(
                            b,
                            f"pcapng Simple Packet Block at byte {b} comes before any Interface Description Block",
                        )
                    iid = 0
                    lt, handler, snap, _div, _tsoff = ifaces[0]
                    # No captured length of its own: the smallest of packet, block and snaplen.
                    caplen = min(u32.unpack_from(buf, b + 8)[0], blen - 16)
                    if snap:
                        caplen = min(caplen, snap)
                    start = b + 12
                    # No timestamp either: it keeps the previous packet's.
                elif btype == _BT_IDB:
                    ifaces.append(self._idb(buf, b, blen, e))
                    continue
                elif btype == _PCAPNG_SHB:
                    self._shb(buf, b, blen, e)
                    stats.sections += 1
                    continue
                else:
                    stats.blocks_skipped += 1
                    continue
                if caplen > MAX_CAPLEN:
                    raise self._error(
                        b,
                        f"absurd pcapng {_block_name(btype)} at byte {b} after {records} packets: captured "
                        f"length {caplen} bytes exceeds the {MAX_CAPLEN}-byte maximum",
                    )
                if handler is None:
                    raise self._error(
                        b,
                        f"unsupported link type {linktype_name(lt)} on interface {iid} (packet at byte {b}); "
                        f"supported: {_supported_list()}",
                    )
                records += 1
                lt_counts[lt] = lt_counts.get(lt, 0) + 1
                end = start + caplen
                if lt == LINKTYPE_ETHERNET and caplen >= 14 and (buf[start + 12] << 8 | buf[start + 13]) in _ET_IP:
                    p = start + 14
                else:
                    p = handler(buf, start, end)
                    if p < 0:
                        non_ip += 1
                        k = _non_ip_kind(buf, start, end, lt)
                        stats.non_ip_kinds[k] = stats.non_ip_kinds.get(k, 0) + 1
                        continue
                packets += 1
                nbytes += end - p
                yield last_ts, buf[p:end]
        except CaptureError as err:
            err.packets = records
            raise
        finally:
            self._flush(records, packets, nbytes, non_ip, lt_counts)

    def _flush(self, records: int, packets: int, nbytes: int, non_ip: int, lts: dict[int, int]) -> None:
        s = self.stats
        s.records += records
        s.packets += packets
        s.bytes += nbytes
        s.non_ip += non_ip
        for k, v in lts.items():
            s.link_types[k] = s.link_types.get(k, 0) + v
        self.close()

    def _shb(self, buf: _Buf, off: int, blen: int, e: str) -> None:
        if blen < 28:
            raise self._error(off, f"corrupt pcapng Section Header Block at byte {off}: {blen} bytes, need 28")
        major, minor = struct.unpack_from(e + "HH", buf, off + 12)
        if major != 1:
            raise self._error(off, f"unsupported pcapng version {major}.{minor} at byte {off} (only 1.x exists)")

    def _idb(self, buf: _Buf, off: int, blen: int, e: str) -> tuple[int, LinkHandler | None, int, float, int]:
        if blen < 20:
            raise self._error(off, f"corrupt pcapng Interface Description Block at byte {off}: {blen} bytes, need 20")
        lt, _reserved, snap = struct.unpack_from(e + "HHI", buf, off + 8)
        div = 1e6
        tsoff = 0
        p, stop = off + 16, off + blen - 4
        while p + 4 <= stop:
            code, olen = struct.unpack_from(e + "HH", buf, p)
            if code == _OPT_ENDOFOPT:
                break
            if p + 4 + olen > stop:
                raise self._error(
                    p,
                    f"corrupt option {code} in the Interface Description Block at byte {off}: it runs past the block",
                )
            if code == _OPT_IF_TSRESOL and olen >= 1:
                r = buf[p + 4]
                exp = r & 0x7F
                if (r & 0x80 and exp > 63) or (not r & 0x80 and exp > 18):
                    raise self._error(
                        p, f"absurd if_tsresol 0x{r:02x} in the Interface Description Block at byte {off}"
                    )
                div = float(2**exp) if r & 0x80 else float(10**exp)
            elif code == _OPT_IF_TSOFFSET and olen >= 8:
                tsoff = struct.unpack_from(e + "q", buf, p + 4)[0]
            p += 4 + ((olen + 3) & ~3)
        return lt, _handler(lt, e == ">"), snap, div, tsoff


def _bad_bom(buf: _Buf, off: int) -> str:
    got = bytes(buf[off + 8 : off + 12]).hex(" ")
    return f"bad pcapng byte-order magic at byte {off + 8}: {got} (expected 1a 2b 3c 4d, either order)"


def _block_name(btype: int) -> str:
    return _BLOCK_NAMES.get(btype, f"block of type 0x{btype:08x}")


_BLOCK_NAMES: Final[dict[int, str]] = {
    _PCAPNG_SHB: "Section Header Block",
    _BT_IDB: "Interface Description Block",
    _BT_OPB: "Packet Block",
    _BT_SPB: "Simple Packet Block",
    0x00000004: "Name Resolution Block",
    0x00000005: "Interface Statistics Block",
    _BT_EPB: "Enhanced Packet Block",
    0x0000000A: "Decryption Secrets Block",
    0x00000BAD: "Custom Block",
    0x40000BAD: "Custom Block",
}


def iter_packets(path: str | os.PathLike[str]) -> Iterator[tuple[float, bytes]]:
    """``(timestamp seconds, IP packet bytes)`` for every IP packet in a pcap/pcapng file."""
    yield from Reader(path)


def read_all(path: str | os.PathLike[str] | Path) -> tuple[list[tuple[float, bytes]], CaptureStats]:
    """Every packet and the stats; for tests and small files."""
    r = Reader(path)
    pkts = list(r)
    return pkts, r.stats
