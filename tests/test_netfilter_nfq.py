"""egressd.nfq without a kernel: the netlink messages byte for byte, the ack wait, the batch budget."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from egressd import nfq


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield a, b
    a.close()
    b.close()


def _packet_message(packet_id: int, queue_num: int = 3) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: a hook attr first, then the packet header."""
    hook_attr = struct.pack("=HH", 8, 9) + b"\0\0\0\x01"  # some other attribute first
    hdr = struct.pack("!IHB", packet_id, 0x0800, 3) + b"\0"
    hdr_attr = struct.pack("=HH", 4 + 7, nfq.NFQA_PACKET_HDR | 0x4000) + hdr  # with a flag bit set
    body = struct.pack("!BBH", 2, 0, queue_num) + hook_attr + hdr_attr
    kind = (nfq.NFNL_SUBSYS_QUEUE << 8) | nfq.NFQNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def _ack(seq: int, err: int = 0) -> bytes:
    body = struct.pack("=i", -err) + struct.pack("=IHHII", 36, 0x0302, 5, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), nfq.NLMSG_ERROR, 0, seq, 0) + body


# -- message layout ------------------------------------------------------------------------
def test_config_flags_message_layout() -> None:
    m = nfq.config_flags_message(queue_num=0x0102, mask=5, flags=4, seq=77)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", m)
    assert (length, kind, flags, seq, pid) == (len(m), 0x0302, nfq.NLM_F_REQUEST | nfq.NLM_F_ACK, 77, 0)
    assert m[16:20] == bytes([socket.AF_UNSPEC, 0, 0x01, 0x02])  # nfgenmsg, queue number big endian
    assert m[20:32] == struct.pack("=HH", 8, nfq.NFQA_CFG_MASK) + struct.pack("!I", 5) + struct.pack(
        "=HH", 8, nfq.NFQA_CFG_FLAGS
    )
    assert m[32:36] == struct.pack("!I", 4)
    assert len(m) == 36


def test_verdict_message_layout() -> None:
    m = nfq.verdict_message(queue_num=9, packet_id=0xDEADBEEF, verdict=nfq.NF_REPEAT)
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", m)
    assert (length, kind, flags) == (len(m), 0x0301, nfq.NLM_F_REQUEST)
    assert m[16:20] == bytes([0, 0, 0, 9])
    assert m[20:24] == struct.pack("=HH", 12, nfq.NFQA_VERDICT_HDR)
    assert struct.unpack_from("!II", m, 24) == (nfq.NF_REPEAT, 0xDEADBEEF)


def test_iter_messages_walks_several_and_stops_at_a_truncated_one() -> None:
    buf = _ack(1) + _packet_message(5) + _ack(2)[:20]
    kinds = [(k, s) for k, _f, s, _p in nfq.iter_messages(buf)]
    assert kinds == [(nfq.NLMSG_ERROR, 1), ((3 << 8) | 0, 0)]


def test_iter_messages_survives_a_zero_length_header() -> None:
    assert list(nfq.iter_messages(b"\0" * 32)) == []


def test_packet_id_found_past_other_attributes_and_flag_bits() -> None:
    payload = _packet_message(123456)[16:]
    assert nfq.packet_id(payload) == 123456


def test_packet_id_absent_or_malformed_is_none() -> None:
    assert nfq.packet_id(b"\0\0\0\0") is None
    assert nfq.packet_id(b"\0\0\0\0" + struct.pack("=HH", 2, 1)) is None  # attr shorter than its header


# -- waiting for the ack ---------------------------------------------------------------------
def test_await_ack_returns_on_success_and_repeats_packets_met_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    kernel.send(_packet_message(41))
    kernel.send(_packet_message(42))
    kernel.send(_ack(seq=99))
    sent: list[bytes] = []
    nfq.await_ack(ours, sent.append, queue_num=3, seq=99, timeout=2)
    assert sent == [nfq.verdict_message(3, 41, nfq.NF_REPEAT), nfq.verdict_message(3, 42, nfq.NF_REPEAT)]


def test_await_ack_ignores_acks_for_other_sequence_numbers(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    kernel.send(_ack(seq=1, err=errno.EPERM))
    kernel.send(_ack(seq=2))
    nfq.await_ack(ours, lambda b: None, queue_num=3, seq=2, timeout=2)


def test_await_ack_raises_the_kernel_error(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    kernel.send(_ack(seq=7, err=errno.EPERM))
    with pytest.raises(nfq.NfqError, match="refused the queue flags: Operation not permitted"):
        nfq.await_ack(ours, lambda b: None, queue_num=3, seq=7, timeout=2)


def test_await_ack_times_out_with_a_clear_error(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(nfq.NfqError, match="no answer"):
        nfq.await_ack(pair[0], lambda b: None, queue_num=3, seq=7, timeout=0.1)


# -- the batch budget ------------------------------------------------------------------------
def test_budget_reader_stops_with_eagain_after_the_budget(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    ours.setblocking(False)
    for i in range(10):
        peer.send(b"m%d" % i)
    r = nfq._BudgetReader(ours)
    r.left = 3
    got = [r.recv(4096) for _ in range(3)]
    with pytest.raises(BlockingIOError) as e:
        r.recv(4096)
    assert got == [b"m0", b"m1", b"m2"] and r.messages == 3
    assert e.value.args[0] == errno.EAGAIN  # what run_socket looks at to stop


def test_budget_reader_returns_messages_longer_than_netfilterqueue_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    ours.setblocking(False)
    peer.send(b"x" * 4100)  # measured: an INPUT packet with GSO on and a 4016-byte copy
    r = nfq._BudgetReader(ours)
    r.left = 1
    assert len(r.recv(4096)) == 4100


def test_budget_reader_passes_eagain_through_when_nothing_is_pending(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    ours.setblocking(False)
    r = nfq._BudgetReader(ours)
    r.left = 5
    with pytest.raises(BlockingIOError):
        r.recv(4096)
    assert r.left == 4 and r.messages == 0


# -- the guard ---------------------------------------------------------------------------------
class FakePacket:
    def __init__(self) -> None:
        self.verdicts: list[str] = []

    def accept(self) -> None:
        if self.verdicts:
            raise RuntimeError("Verdict already given for this packet")
        self.verdicts.append("accept")

    def drop(self) -> None:
        if self.verdicts:
            raise RuntimeError("Verdict already given for this packet")
        self.verdicts.append("drop")


def _boom(pkt: FakePacket) -> None:
    raise ValueError("engine bug")


@pytest.mark.parametrize(("fail_open", "verdict"), [(True, "accept"), (False, "drop")])
def test_guard_gives_the_fail_policy_verdict_when_the_callback_raises(fail_open: bool, verdict: str) -> None:
    errors: list[BaseException] = []
    g = nfq.Guard(_boom, fail_open, errors.append)
    p = FakePacket()
    g(p)
    assert p.verdicts == [verdict] and g.errors == 1 and isinstance(errors[0], ValueError)


def test_guard_keeps_a_verdict_given_before_the_exception() -> None:
    def drop_then_fail(pkt: FakePacket) -> None:
        pkt.drop()
        raise KeyError("late")

    g = nfq.Guard(drop_then_fail, fail_open=True)
    p = FakePacket()
    g(p)
    assert p.verdicts == ["drop"] and g.errors == 1


def test_guard_is_transparent_when_the_callback_works() -> None:
    g = nfq.Guard(lambda pkt: pkt.accept(), fail_open=False)
    p = FakePacket()
    g(p)
    assert p.verdicts == ["accept"] and g.errors == 0
