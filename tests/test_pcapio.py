"""egressd.pcapio: every format and link type it claims, built byte by byte, and every way a
file can be broken (which must surface as CaptureError, never as another exception)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.pcapio import (
    MAX_CAPLEN,
    SUPPORTED_LINKTYPES,
    CaptureError,
    Reader,
    iter_packets,
    read_all,
)

# -- IP packets (hand-made: the reader never looks inside, but they should be real) -------------
IP4 = bytes.fromhex("4500001c0001000040110000c0000201cb007114") + struct.pack("!HHHH", 1234, 53, 8, 0)
IP6 = (
    bytes.fromhex("6000000000081140")
    + bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + struct.pack("!HHHH", 1234, 53, 8, 0)
)
MAC2 = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def eth(payload: bytes, ethertype: int = 0x0800, tags: Sequence[tuple[int, int]] = ()) -> bytes:
    """Ethernet frame; ``tags`` are (TPID, VLAN id) pairs, outermost first."""
    out = MAC2
    for tpid, vid in tags:
        out += struct.pack("!HH", tpid, vid)
    return out + struct.pack("!H", ethertype) + payload


# -- classic pcap ---------------------------------------------------------------------------
def pcap(
    frames: Iterable[bytes | tuple[float, bytes]],
    linktype: int = 1,
    endian: str = "<",
    nano: bool = False,
    modified: bool = False,
    snaplen: int = 65535,
) -> bytes:
    magic = 0xA1B2CD34 if modified else 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for i, fr in enumerate(frames):
        ts, data = fr if isinstance(fr, tuple) else (1_700_000_000.0 + i, fr)
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nano else 1e6))
        out += struct.pack(endian + "IIII", sec, frac, len(data), len(data))
        if modified:
            out += struct.pack(endian + "iHBB", 2, 0x0800, 0, 0)
        out += data
    return out


# -- pcapng -----------------------------------------------------------------------------------
def block(btype: int, body: bytes, e: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def opt(code: int, value: bytes, e: str = "<") -> bytes:
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(e: str = "<", major: int = 1) -> bytes:
    return block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, major, 0, -1), e)


def idb(linktype: int = 1, e: str = "<", snaplen: int = 0, options: bytes = b"") -> bytes:
    if options:
        options += opt(0, b"", e)
    return block(1, struct.pack(e + "HHI", linktype, 0, snaplen) + options, e)


def epb(data: bytes, iface: int = 0, ts: int = 1_700_000_000_000_000, e: str = "<") -> bytes:
    return block(6, struct.pack(e + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data, e)


def opb(data: bytes, iface: int = 0, ts: int = 1_700_000_000_000_000, e: str = "<") -> bytes:
    body = struct.pack(e + "HHIIII", iface, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data
    return block(2, body, e)


def spb(data: bytes, origlen: int | None = None, e: str = "<") -> bytes:
    return block(3, struct.pack(e + "I", len(data) if origlen is None else origlen) + data, e)


def write(tmp_path: Path, data: bytes, name: str = "c.pcap") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def packets(tmp_path: Path, data: bytes) -> list[bytes]:
    return [b for _, b in iter_packets(write(tmp_path, data))]


def error(tmp_path: Path, data: bytes) -> CaptureError:
    with pytest.raises(CaptureError) as ei:
        read_all(write(tmp_path, data))
    return ei.value


# ============================ classic pcap ==============================================
def test_little_endian_microsecond_pcap_yields_ip_packets_and_timestamps(tmp_path: Path) -> None:
    got, stats = read_all(write(tmp_path, pcap([(1.5, eth(IP4)), (2.25, eth(IP6, 0x86DD))])))
    assert got == [(1.5, IP4), (2.25, IP6)]
    assert (stats.format, stats.packets, stats.records, stats.bytes) == ("pcap", 2, 2, len(IP4) + len(IP6))


def test_big_endian_pcap_reads_the_same(tmp_path: Path) -> None:
    got, _ = read_all(write(tmp_path, pcap([(3.000001, eth(IP4))], endian=">")))
    assert got == [(3.000001, IP4)]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_nanosecond_magic_scales_the_fraction_by_1e9(tmp_path: Path, endian: str) -> None:
    got, stats = read_all(write(tmp_path, pcap([(10.123456789, eth(IP4))], endian=endian, nano=True)))
    assert got[0][0] == pytest.approx(10.123456789, abs=1e-9)
    assert stats.format == "pcap-ns"


def test_modified_pcap_records_have_eight_extra_header_bytes(tmp_path: Path) -> None:
    got, stats = read_all(write(tmp_path, pcap([eth(IP4), eth(IP6, 0x86DD)], modified=True)))
    assert [b for _, b in got] == [IP4, IP6]
    assert stats.format == "pcap-modified"


def test_header_with_no_records_is_an_empty_capture(tmp_path: Path) -> None:
    got, stats = read_all(write(tmp_path, pcap([])))
    assert got == [] and stats.records == 0


def test_fcs_flags_in_the_linktype_field_are_ignored(tmp_path: Path) -> None:
    assert packets(tmp_path, pcap([eth(IP4)], linktype=0x14000001)) == [IP4]


def test_absurd_header_snaplen_is_tolerated_like_libpcap(tmp_path: Path) -> None:
    assert packets(tmp_path, pcap([eth(IP4)], snaplen=0x7FFFFFFF)) == [IP4]


def test_offset_reaches_size_and_stats_count_link_types(tmp_path: Path) -> None:
    p = write(tmp_path, pcap([eth(IP4)] * 3))
    r = Reader(p)
    assert r.size == p.stat().st_size and r.offset == 24
    assert len(list(r)) == 3
    assert r.offset == r.size
    assert r.stats.link_types == {1: 3}


def test_a_reader_is_a_single_pass(tmp_path: Path) -> None:
    r = Reader(write(tmp_path, pcap([eth(IP4)])))
    list(r)
    with pytest.raises(RuntimeError):
        iter(r)


def test_yielded_packets_are_bytes_that_outlive_the_reader(tmp_path: Path) -> None:
    got = packets(tmp_path, pcap([eth(IP4)]))
    assert type(got[0]) is bytes and got[0] == IP4


# ============================ pcapng ====================================================
@pytest.mark.parametrize("e", ["<", ">"])
def test_pcapng_enhanced_packet_blocks_in_either_byte_order(tmp_path: Path, e: str) -> None:
    data = shb(e) + idb(1, e) + epb(eth(IP4), ts=2_500_000, e=e) + epb(eth(IP6, 0x86DD), ts=3_000_001, e=e)
    got, stats = read_all(write(tmp_path, data))
    assert got == [(2.5, IP4), (3.000001, IP6)]
    assert (stats.format, stats.sections) == ("pcapng", 1)


def test_pcapng_sections_reset_interfaces_and_may_change_byte_order(tmp_path: Path) -> None:
    data = shb("<") + idb(1, "<") + epb(eth(IP4)) + shb(">") + idb(101, ">") + epb(IP6, e=">")
    got, stats = read_all(write(tmp_path, data))
    assert [b for _, b in got] == [IP4, IP6]
    assert stats.sections == 2 and stats.link_types == {1: 1, 101: 1}


def test_pcapng_interface_ids_from_an_earlier_section_are_gone(tmp_path: Path) -> None:
    data = shb() + idb(1) + idb(1) + shb() + idb(1) + epb(eth(IP4), iface=1)
    err = error(tmp_path, data)
    assert "interface 1" in str(err) and "1 interface(s)" in str(err)


def test_pcapng_each_interface_has_its_own_link_type(tmp_path: Path) -> None:
    data = shb() + idb(1) + idb(101) + idb(113) + epb(IP4, iface=1) + epb(eth(IP6, 0x86DD), iface=0)
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\0" * 8, 0x0800) + IP4
    data += epb(sll, iface=2)
    assert packets(tmp_path, data) == [IP4, IP6, IP4]


def test_pcapng_if_tsresol_power_of_ten(tmp_path: Path) -> None:
    data = shb() + idb(1, options=opt(9, b"\x09")) + epb(eth(IP4), ts=1_700_000_000_123_456_789)
    ((ts, _),) = read_all(write(tmp_path, data))[0]
    assert ts == pytest.approx(1_700_000_000.123456789, abs=1e-6)


def test_pcapng_if_tsresol_power_of_two(tmp_path: Path) -> None:
    data = shb() + idb(1, options=opt(9, b"\x94")) + epb(eth(IP4), ts=(5 << 20) + (1 << 19))
    ((ts, _),) = read_all(write(tmp_path, data))[0]
    assert ts == 5.5


def test_pcapng_if_tsoffset_is_added_in_seconds(tmp_path: Path) -> None:
    data = shb() + idb(1, options=opt(14, struct.pack("<q", 1000))) + epb(eth(IP4), ts=1_000_000)
    ((ts, _),) = read_all(write(tmp_path, data))[0]
    assert ts == 1001.0


def test_pcapng_other_options_before_tsresol_are_skipped(tmp_path: Path) -> None:
    options = opt(2, b"eth0") + opt(3, b"a description of odd length") + opt(9, b"\x03")
    data = shb() + idb(1, options=options) + epb(eth(IP4), ts=1500)
    ((ts, _),) = read_all(write(tmp_path, data))[0]
    assert ts == 1.5


def test_pcapng_simple_packet_block_uses_interface_zero_and_previous_timestamp(tmp_path: Path) -> None:
    data = shb() + idb(1) + epb(eth(IP4), ts=7_000_000) + spb(eth(IP6, 0x86DD))
    got, _ = read_all(write(tmp_path, data))
    assert got == [(7.0, IP4), (7.0, IP6)]


def test_pcapng_simple_packet_block_is_cut_to_the_interface_snaplen(tmp_path: Path) -> None:
    frame = eth(IP4)
    data = shb() + idb(1, snaplen=30) + spb(frame + b"\0" * 2, origlen=len(frame) + 100)
    assert packets(tmp_path, data) == [frame[14:30]]


def test_pcapng_obsolete_packet_block_is_read(tmp_path: Path) -> None:
    data = shb() + idb(1) + idb(101) + opb(IP4, iface=1, ts=4_000_000)
    got, _ = read_all(write(tmp_path, data))
    assert got == [(4.0, IP4)]


def test_pcapng_unknown_and_metadata_blocks_are_skipped_by_length(tmp_path: Path) -> None:
    nrb = block(4, struct.pack("<HH", 0, 0))
    isb = block(5, struct.pack("<III", 0, 0, 0))
    custom = block(0x00000BAD, struct.pack("<I", 32473) + b"vendor data")
    unknown = block(0x12345678, b"x" * 13)
    data = shb() + nrb + idb(1) + isb + custom + epb(eth(IP4)) + unknown + epb(eth(IP4))
    got, stats = read_all(write(tmp_path, data))
    assert len(got) == 2 and stats.blocks_skipped == 4


# ============================ link types ================================================
@pytest.mark.parametrize(
    "tags",
    [
        [(0x8100, 5)],
        [(0x88A8, 100), (0x8100, 5)],
        [(0x9100, 100), (0x8100, 5)],
        [(0x8100, 1), (0x8100, 2), (0x8100, 3)],
    ],
    ids=["802.1Q", "802.1ad", "QinQ-9100", "three-tags"],
)
def test_ethernet_vlan_stacks_are_walked(tmp_path: Path, tags: list[tuple[int, int]]) -> None:
    assert packets(tmp_path, pcap([eth(IP4, 0x0800, tags), eth(IP6, 0x86DD, tags)])) == [IP4, IP6]


def test_ethernet_llc_snap_ipv4(tmp_path: Path) -> None:
    snap = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + IP4
    assert packets(tmp_path, pcap([MAC2 + struct.pack("!H", len(snap)) + snap])) == [IP4]


def test_ethernet_mpls_stack_then_ip(tmp_path: Path) -> None:
    labels = struct.pack("!I", (100 << 12) | 255) + struct.pack("!I", (200 << 12) | (1 << 8) | 255)
    assert packets(tmp_path, pcap([eth(labels + IP4, 0x8847), eth(labels + IP6, 0x8847)])) == [IP4, IP6]


def test_ethernet_pppoe_session(tmp_path: Path) -> None:
    pppoe = struct.pack("!BBHH", 0x11, 0, 0x1234, len(IP4) + 2) + struct.pack("!H", 0x0021)
    assert packets(tmp_path, pcap([eth(pppoe + IP4, 0x8864)])) == [IP4]


def test_linux_sll(tmp_path: Path) -> None:
    hdr = struct.pack("!HHH8sH", 4, 1, 6, b"\x02" * 6 + b"\0\0", 0x86DD)
    assert packets(tmp_path, pcap([hdr + IP6], linktype=113)) == [IP6]


def test_linux_sll_with_vlan_tag_reinserted(tmp_path: Path) -> None:
    hdr = struct.pack("!HHH8sH", 0, 1, 6, b"\0" * 8, 0x8100) + struct.pack("!HH", 7, 0x0800)
    assert packets(tmp_path, pcap([hdr + IP4], linktype=113)) == [IP4]


def test_linux_sll2(tmp_path: Path) -> None:
    hdr = struct.pack("!HHIHBB8s", 0x0800, 0, 3, 1, 4, 6, b"\0" * 8)
    assert packets(tmp_path, pcap([hdr + IP4], linktype=276)) == [IP4]


@pytest.mark.parametrize("linktype", [101, 12, 14])
def test_raw_ip_link_types(tmp_path: Path, linktype: int) -> None:
    assert packets(tmp_path, pcap([IP4, IP6], linktype=linktype)) == [IP4, IP6]


def test_linktype_ipv4_and_ipv6_accept_only_their_version(tmp_path: Path) -> None:
    assert packets(tmp_path, pcap([IP4, IP6], linktype=228)) == [IP4]
    assert packets(tmp_path, pcap([IP4, IP6], linktype=229)) == [IP6]


@pytest.mark.parametrize("af6", [10, 24, 28, 30])
@pytest.mark.parametrize("host_order", ["<", ">"])
def test_bsd_null_loopback_families_in_either_host_order(tmp_path: Path, af6: int, host_order: str) -> None:
    frames = [struct.pack(host_order + "I", 2) + IP4, struct.pack(host_order + "I", af6) + IP6]
    assert packets(tmp_path, pcap(frames, linktype=0)) == [IP4, IP6]


def test_bsd_null_unknown_family_is_skipped(tmp_path: Path) -> None:
    _, stats = read_all(write(tmp_path, pcap([struct.pack("<I", 7) + IP4], linktype=0)))
    assert stats.packets == 0 and stats.non_ip == 1


def test_openbsd_loop_is_network_order(tmp_path: Path) -> None:
    frames = [struct.pack("!I", 2) + IP4, struct.pack("!I", 24) + IP6, struct.pack("<I", 2) + IP4]
    got, stats = read_all(write(tmp_path, pcap(frames, linktype=108)))
    assert [b for _, b in got] == [IP4, IP6] and stats.non_ip == 1


@pytest.mark.parametrize(
    "header",
    [b"\xff\x03\x00\x21", b"\x00\x21", b"\x21", b"\xff\x03\x21"],
    ids=["hdlc-framing", "bare", "pfc", "hdlc-pfc"],
)
def test_ppp_variants(tmp_path: Path, header: bytes) -> None:
    assert packets(tmp_path, pcap([header + IP4], linktype=9)) == [IP4]


def test_ppp_ipv6_and_non_ip_protocols(tmp_path: Path) -> None:
    frames = [b"\xff\x03\x00\x57" + IP6, b"\xff\x03\xc0\x21" + b"\x01\x01\x00\x04"]  # IPv6, LCP
    got, stats = read_all(write(tmp_path, pcap(frames, linktype=9)))
    assert [b for _, b in got] == [IP6] and stats.non_ip == 1


def test_ppp_hdlc_cisco_framing(tmp_path: Path) -> None:
    assert packets(tmp_path, pcap([b"\x0f\x00\x08\x00" + IP4], linktype=50)) == [IP4]


def test_ppp_ether_link_type(tmp_path: Path) -> None:
    frame = struct.pack("!BBHH", 0x11, 0, 1, len(IP6) + 2) + b"\x00\x57" + IP6
    assert packets(tmp_path, pcap([frame], linktype=51)) == [IP6]


def test_cisco_hdlc(tmp_path: Path) -> None:
    assert packets(tmp_path, pcap([b"\x0f\x00\x86\xdd" + IP6], linktype=104)) == [IP6]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_nflog_payload_tlv(tmp_path: Path, endian: str) -> None:
    def tlv(t: int, v: bytes) -> bytes:
        return struct.pack(endian + "HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)

    frame = b"\x02\x00\x00\x05" + tlv(1, b"\x08\x00\x03\x00") + tlv(10, b"pfx\0\0") + tlv(9, IP4)
    assert packets(tmp_path, pcap([frame], linktype=239, endian=endian)) == [IP4]


def test_non_ip_frames_are_skipped_and_counted_by_kind(tmp_path: Path) -> None:
    arp = eth(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20, 0x0806)
    lldp = eth(b"\x02\x07\x04" + b"\0" * 20, 0x88CC)
    stp = MAC2 + struct.pack("!H", 38) + b"\x42\x42\x03" + b"\0" * 35
    odd = eth(b"\0" * 20, 0x1234)
    got, stats = read_all(write(tmp_path, pcap([arp, eth(IP4), lldp, arp, stp, odd])))
    assert [b for _, b in got] == [IP4]
    assert stats.non_ip == 5 and stats.records == 6
    assert stats.non_ip_kinds == {"ARP": 2, "LLDP": 1, "802.3 LLC": 1, "ethertype 0x1234": 1}


def test_runt_frames_are_non_ip_not_errors(tmp_path: Path) -> None:
    _, stats = read_all(write(tmp_path, pcap([b"", b"\x01\x02", MAC2 + b"\x81\x00\x00"])))
    assert stats.non_ip == 3 and stats.packets == 0


def test_supported_link_types_cover_the_documented_set() -> None:
    assert {0, 1, 9, 12, 14, 50, 51, 101, 104, 108, 113, 228, 229, 239, 276} <= SUPPORTED_LINKTYPES


# ============================ errors ======================================================
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot read"):
        Reader(tmp_path / "nope.pcap")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot read") as ei:
        Reader(tmp_path)
    assert ei.value.path == str(tmp_path)


def test_zero_length_file(tmp_path: Path) -> None:
    err = error(tmp_path, b"")
    assert "empty file" in str(err) and err.offset == 0 and err.packets == 0


def test_wrong_magic_shows_the_bytes_and_the_supported_formats(tmp_path: Path) -> None:
    err = error(tmp_path, b"GET / HTTP/1.1\r\n")
    assert "47 45 54 20" in str(err) and "pcap" in str(err) and "pcapng" in str(err)
    assert "text" in str(err)


def test_gzip_file_is_named_as_such(tmp_path: Path) -> None:
    assert "gzip" in str(error(tmp_path, b"\x1f\x8b\x08\x00" + b"\0" * 30))


def test_file_shorter_than_a_magic(tmp_path: Path) -> None:
    assert "too short" in str(error(tmp_path, b"\xd4\xc3"))


def test_truncated_file_header(tmp_path: Path) -> None:
    err = error(tmp_path, pcap([])[:20])
    assert "truncated pcap file header" in str(err)


def test_truncated_record_message_names_offset_packets_and_lengths(tmp_path: Path) -> None:
    data = pcap([eth(IP4), eth(IP4)])
    cut = len(data) - 10
    err = error(tmp_path, data[:cut])
    second = 24 + 16 + len(eth(IP4))
    assert (err.offset, err.packets) == (second, 1)
    assert f"at byte {second} after 1 packets" in str(err)
    assert f"header says {len(eth(IP4))} bytes, {len(eth(IP4)) - 10} remain" in str(err)


def test_packets_before_a_truncation_are_still_delivered(tmp_path: Path) -> None:
    data = pcap([eth(IP4), eth(IP4)])
    got: list[bytes] = []
    with pytest.raises(CaptureError):
        for _, b in iter_packets(write(tmp_path, data[:-1])):
            got.append(b)
    assert got == [IP4]


def test_absurd_caplen(tmp_path: Path) -> None:
    data = pcap([]) + struct.pack("<IIII", 0, 0, MAX_CAPLEN + 1, MAX_CAPLEN + 1) + b"\0" * 64
    err = error(tmp_path, data)
    assert "exceeds" in str(err) and err.offset == 24


def test_unsupported_link_type_is_named_and_alternatives_listed(tmp_path: Path) -> None:
    err = error(tmp_path, pcap([b"\0" * 30], linktype=127))
    assert "IEEE802_11_RADIOTAP (127)" in str(err) and "ETHERNET (1)" in str(err) and "LINUX_SLL2" in str(err)


def test_unsupported_link_type_in_pcapng_fails_at_its_first_packet(tmp_path: Path) -> None:
    data = shb() + idb(1) + idb(189) + epb(eth(IP4)) + epb(b"\0" * 40, iface=1)
    got: list[bytes] = []
    with pytest.raises(CaptureError, match=r"USB_LINUX \(189\) on interface 1") as ei:
        for _, b in iter_packets(write(tmp_path, data)):
            got.append(b)
    assert got == [IP4] and ei.value.packets == 1


def test_pcapng_trailing_length_mismatch(tmp_path: Path) -> None:
    good = epb(eth(IP4))
    bad = good[:-4] + struct.pack("<I", len(good) + 4)
    err = error(tmp_path, shb() + idb(1) + bad)
    assert "at the end" in str(err)


def test_pcapng_length_not_multiple_of_four(tmp_path: Path) -> None:
    err = error(tmp_path, shb() + struct.pack("<II", 1, 21) + b"\0" * 13 + struct.pack("<I", 21))
    assert "multiple of 4" in str(err)


def test_pcapng_truncated_block(tmp_path: Path) -> None:
    data = shb() + idb(1) + epb(eth(IP4))
    err = error(tmp_path, data[:-8])
    assert "truncated pcapng Enhanced Packet Block" in str(err)
    assert err.offset == len(shb() + idb(1))


def test_pcapng_bad_byte_order_magic(tmp_path: Path) -> None:
    data = bytearray(shb() + idb(1))
    data[8:12] = b"\x01\x02\x03\x04"
    assert "byte-order magic" in str(error(tmp_path, bytes(data)))


def test_pcapng_unsupported_version(tmp_path: Path) -> None:
    assert "version 2.0" in str(error(tmp_path, shb(major=2) + idb(1)))


def test_pcapng_first_section_header_is_checked_when_the_reader_opens(tmp_path: Path) -> None:
    data = bytearray(shb() + idb(1) + epb(eth(IP4)))
    data[8:12] = b"\x01\x02\x03\x04"
    with pytest.raises(CaptureError, match="byte-order magic"):
        Reader(write(tmp_path, bytes(data)))


def test_pcapng_later_section_header_with_bad_byte_order_magic(tmp_path: Path) -> None:
    second = bytearray(shb())
    second[8:12] = b"\0\0\0\0"
    err = error(tmp_path, shb() + idb(1) + epb(eth(IP4)) + bytes(second))
    assert "byte-order magic" in str(err) and err.packets == 1


def test_pcapng_simple_packet_block_shorter_than_its_header(tmp_path: Path) -> None:
    assert "Simple Packet Block" in str(error(tmp_path, shb() + idb(1) + block(3, b"")))


def test_pcapng_captured_length_larger_than_block(tmp_path: Path) -> None:
    b = bytearray(epb(eth(IP4)))
    struct.pack_into("<I", b, 20, 4000)
    assert "does not fit" in str(error(tmp_path, shb() + idb(1) + bytes(b)))


def test_pcapng_simple_packet_block_before_an_interface(tmp_path: Path) -> None:
    assert "before any Interface" in str(error(tmp_path, shb() + spb(eth(IP4))))


def test_pcapng_option_running_past_its_block(tmp_path: Path) -> None:
    bad = block(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 2, 200) + b"eth0")
    assert "runs past" in str(error(tmp_path, shb() + bad))


# ============================ truncation and fuzzing ========================================
def _small_pcap() -> bytes:
    return pcap([eth(IP4), eth(IP6, 0x86DD, [(0x8100, 3)]), eth(b"\0" * 28, 0x0806)])


def _small_pcapng() -> bytes:
    return (
        shb() + idb(1, options=opt(9, b"\x09")) + epb(eth(IP4)) + spb(eth(IP6, 0x86DD))
        + block(5, b"\0" * 12) + shb(">") + idb(101, ">") + epb(IP4, e=">")
    )  # fmt: skip


def _boundaries_pcap(data: bytes) -> dict[int, int]:
    """Offsets at which a cut leaves only whole records -> records before the cut."""
    out, off, n = {24: 0}, 24, 0
    while off < len(data):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
        n += 1
        out[off] = n
    return out


@pytest.mark.parametrize("make", [_small_pcap, _small_pcapng], ids=["pcap", "pcapng"])
def test_truncation_at_every_byte_raises_capture_error_or_stops_at_a_boundary(tmp_path: Path, make: object) -> None:
    data = make()  # type: ignore[operator]
    assert isinstance(data, bytes)
    full = len(read_all(write(tmp_path, data))[0])
    clean_stops = 0
    for cut in range(len(data)):
        p = write(tmp_path, data[:cut], f"cut{cut}")
        try:
            got, _ = read_all(p)
        except CaptureError as e:
            assert 0 <= e.offset <= cut and e.packets >= 0
        else:
            clean_stops += 1
            assert len(got) <= full
        os.unlink(p)
    assert clean_stops >= 1  # at least the bare header / first SHB boundary


def test_pcap_truncation_stops_cleanly_only_on_record_boundaries(tmp_path: Path) -> None:
    data = _small_pcap()
    bounds = _boundaries_pcap(data)
    for cut in range(24, len(data)):
        p = write(tmp_path, data[:cut], f"cut{cut}")
        if cut in bounds:
            assert read_all(p)[1].records == bounds[cut]
        else:
            with pytest.raises(CaptureError):
                read_all(p)


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_or_capture_error(tmp_path: Path, data: bytes) -> None:
    p = write(tmp_path, data, "fuzz")
    try:
        r = Reader(p)
        for ts, pkt in r:
            assert isinstance(ts, float) and isinstance(pkt, bytes)
    except CaptureError:
        pass


@_FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_capture_error(tmp_path: Path, data: bytes) -> None:
    _read_or_capture_error(tmp_path, data)


@_FUZZ
@given(
    head=st.sampled_from([pcap([]), pcap([], endian=">", nano=True), pcap([], linktype=0), shb(), shb(">")]),
    tail=st.binary(max_size=400),
)
def test_valid_header_then_arbitrary_bytes_raise_only_capture_error(tmp_path: Path, head: bytes, tail: bytes) -> None:
    _read_or_capture_error(tmp_path, head + tail)


@_FUZZ
@given(
    lt=st.sampled_from(sorted(SUPPORTED_LINKTYPES)),
    frames=st.lists(st.binary(max_size=80), max_size=6),
    e=st.sampled_from(["<", ">"]),
)
def test_arbitrary_frames_on_every_link_type_never_crash(tmp_path: Path, lt: int, frames: list[bytes], e: str) -> None:
    got, stats = read_all(write(tmp_path, pcap(frames, linktype=lt, endian=e), "f"))
    assert stats.packets + stats.non_ip == len(frames) == stats.records
    assert all(b[0] >> 4 in (4, 6) or lt in (1, 0, 108, 9, 50, 51, 104, 113, 276) for _, b in got if b)


# ============================ scapy's writers =============================================
def test_reads_scapy_wrpcap_output(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether
    from scapy.utils import wrpcap

    pkts = [Ether() / IP(dst="203.0.113.1") / TCP(dport=443), Ether() / ARP(), Ether() / IP() / TCP()]
    p = tmp_path / "s.pcap"
    wrpcap(str(p), pkts)
    got, stats = read_all(p)
    assert [b for _, b in got] == [bytes(pkts[0][IP]), bytes(pkts[2][IP])]
    assert stats.non_ip_kinds == {"ARP": 1}


def test_reads_scapy_pcapng_writer_output(tmp_path: Path) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.utils import PcapNgWriter

    pkts = [Ether() / Dot1Q(vlan=9) / IPv6(dst="2001:db8::1") / UDP(dport=53) for _ in range(3)]
    p = tmp_path / "s.pcapng"
    w = PcapNgWriter(str(p))
    for i, pk in enumerate(pkts):
        pk.time = 100 + i
        w.write(pk)
    w.close()
    got, _ = read_all(p)
    assert got == [(100.0 + i, bytes(pk[IPv6])) for i, pk in enumerate(pkts)]


# ============================ the shared corpus ===========================================
def _corpus() -> Path | None:
    env = os.environ.get("EGRESSD_CORPUS")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/corpus"
    return p if p.is_dir() else None


def test_record_counts_match_scapy_on_every_corpus_capture() -> None:
    root = _corpus()
    if root is None:
        pytest.skip("corpus not found (../shared/corpus or EGRESSD_CORPUS)")
    from scapy.utils import RawPcapReader

    files = sorted(f for f in root.rglob("*") if f.suffix in (".pcap", ".pcapng") and f.is_file())
    assert files
    mismatches = []
    for f in files:
        r = Reader(f)
        ours = sum(1 for _ in r)
        with RawPcapReader(str(f)) as sr:  # dispatches to the pcapng reader by magic
            theirs = sum(1 for _ in sr)
        if r.stats.records != theirs or ours + r.stats.non_ip != r.stats.records:
            mismatches.append((f.name, r.stats.records, theirs))
    assert mismatches == []


# ============================ the shipped captures =========================================
PCAPS = Path(__file__).resolve().parents[1] / "pcaps"


def test_every_shipped_capture_reads_cleanly_and_has_an_expectation_file() -> None:
    caps = sorted(PCAPS.glob("*.pcap"))
    if not caps:
        pytest.skip("no captures in pcaps/ (run pcaps/make.sh)")
    for cap in caps:
        got, stats = read_all(cap)
        assert got and stats.non_ip == 0 and stats.link_types == {1: stats.records}, cap.name
        assert (PCAPS / f"{cap.stem}.expect.yaml").is_file(), f"{cap.name} has no expectation file"
    expects = {p.name.removesuffix(".expect.yaml") for p in PCAPS.glob("*.expect.yaml")}
    assert expects == {c.stem for c in caps}
