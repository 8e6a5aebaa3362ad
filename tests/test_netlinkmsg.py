"""The one netlink framing walk (egressd.netlinkmsg) and the NFLOG parser built on it."""

from __future__ import annotations

import socket
import struct

from egressd import kernellog, netfilter
from egressd import netlinkmsg as nl


def _msg(mtype: int, body: bytes, seq: int = 7) -> bytes:
    raw = nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(body), mtype, 0, seq, 0) + body
    return raw + b"\0" * (nl.align(len(raw)) - len(raw))


def test_messages_yield_type_seq_and_body_bounds_of_each_message() -> None:
    data = _msg(5, b"abc", seq=1) + _msg(6, b"", seq=2)
    got = list(nl.messages(data))
    assert [(t, s) for t, s, _, _ in got] == [(5, 1), (6, 2)]
    _, _, body, end = got[0]
    assert data[body:end] == b"abc"


def test_a_length_shorter_than_the_header_ends_the_walk() -> None:
    bad = nl.NLMSGHDR.pack(3, 5, 0, 1, 0)
    assert list(nl.messages(bad + _msg(6, b"x"))) == []


def test_a_truncated_message_is_bounded_by_the_datagram() -> None:
    data = _msg(5, b"abcdef")[:-4]
    [(_, _, body, end)] = nl.messages(data)
    assert end == len(data) and body <= end


def test_attrs_strip_flag_bits_and_stop_at_an_attribute_past_its_container() -> None:
    a = nl.attr(0x8000 | 3, b"\x01\x02") + nl.attr(4, b"wxyz")
    got = [(t, a[s:e]) for t, s, e in nl.attrs(a, 0, len(a))]
    assert got == [(3, b"\x01\x02"), (4, b"wxyz")]
    overlong = struct.pack("=HH", 200, 1) + b"\0" * 8
    assert list(nl.attrs(overlong, 0, len(overlong))) == []


def test_kernellog_parses_rule_index_and_five_tuple_of_a_logged_syn() -> None:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton("198.51.100.10")
    ip += socket.inet_aton("203.0.113.30") + struct.pack("!HH", 41234, 3333) + b"\0" * 16
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += nl.attr(kernellog.NFULA_PREFIX, b"egd 3\0") + nl.attr(kernellog.NFULA_PAYLOAD, ip)
    mtype = (kernellog.NFNL_SUBSYS_ULOG << 8) | kernellog.NFULNL_MSG_PACKET
    [(index, proto, src, sport, dst, dport)] = kernellog.parse(_msg(mtype, body))
    assert (index, proto, sport, dport) == (3, 6, 41234, 3333)
    assert socket.inet_ntoa(src) == "198.51.100.10" and socket.inet_ntoa(dst) == "203.0.113.30"


def test_kernellog_skips_a_packet_without_its_prefix() -> None:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + nl.attr(kernellog.NFULA_PREFIX, b"other 3\0")
    mtype = (kernellog.NFNL_SUBSYS_ULOG << 8) | kernellog.NFULNL_MSG_PACKET
    assert kernellog.parse(_msg(mtype, body)) == []


def test_kernellog_hands_back_a_logged_close_whole_with_its_mark() -> None:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton("203.0.113.30")
    ip += socket.inet_aton("198.51.100.10") + struct.pack("!HH", 3333, 41234) + b"\0" * 16
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += nl.attr(kernellog.NFULA_MARK, struct.pack("!I", 0x40000000))
    body += nl.attr(kernellog.NFULA_PREFIX, kernellog.CLOSE_PREFIX + b"\0") + nl.attr(kernellog.NFULA_PAYLOAD, ip)
    mtype = (kernellog.NFNL_SUBSYS_ULOG << 8) | kernellog.NFULNL_MSG_PACKET
    closes: list[kernellog.Closed] = []
    # A close is not a compiled drop: it is not in the drops, and it is in the closes.
    assert kernellog.parse(_msg(mtype, body), closes) == []
    assert closes == [(ip, 0x40000000)]
    assert kernellog.CLOSE_PREFIX.decode() == netfilter.CLOSE_PREFIX


def test_drain_reads_what_waits_up_to_its_budget_and_stops_when_empty() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        b.setblocking(False)
        for i in range(3):
            a.send(bytes([i]))
        assert nl.drain(b, 2) == ([b"\x00", b"\x01"], 0)
        assert nl.drain(b, 5) == ([b"\x02"], 0)
        assert nl.drain(b, 5) == ([], 0)
    finally:
        a.close()
        b.close()
