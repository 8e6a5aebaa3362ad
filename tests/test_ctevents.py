"""The ctnetlink parser (egressd.ctevents) on messages built by hand, as the kernel lays them out."""

from __future__ import annotations

import struct

from egressd import ctevents as ct


def _nla(atype: int, value: bytes, nested: bool = False) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, atype | (0x8000 if nested else 0)) + value + b"\0" * (-length % 4)


def _message(mtype: int, src: bytes, dst: bytes, sport: int, dport: int, mark: int | None) -> bytes:
    ip = _nla(ct.CTA_TUPLE_IP, _nla(1, src) + _nla(2, dst), nested=True)
    proto = _nla(
        ct.CTA_TUPLE_PROTO,
        _nla(1, b"\x06") + _nla(2, struct.pack(">H", sport)) + _nla(3, struct.pack(">H", dport)),
        nested=True,
    )
    body = struct.pack("=BBH", 2, 0, 0) + _nla(ct.CTA_TUPLE_ORIG, ip + proto, nested=True)
    if mark is not None:
        body += _nla(ct.CTA_MARK, struct.pack(">I", mark))
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def test_a_destroy_message_gives_the_original_tuple_and_the_mark() -> None:
    a, b = bytes([198, 51, 100, 2]), bytes([203, 0, 113, 30])
    data = _message(ct.MSG_DELETE, a, b, 40000, 3333, 0x08000000) + _message(ct.MSG_NEW, b, a, 53, 5353, None)
    assert ct.parse(data) == [
        (ct.MSG_DELETE, (6, a, 40000, b, 3333), 0x08000000),
        (ct.MSG_NEW, (6, b, 53, a, 5353), 0),
    ]


def test_truncated_or_foreign_messages_are_skipped() -> None:
    a, b = bytes(4), bytes([1, 2, 3, 4])
    whole = _message(ct.MSG_DELETE, a, b, 1, 2, 5)
    # Cut inside the mark: the message is shorter than its header says; what is whole is read.
    assert ct.parse(whole[:-6]) == [(ct.MSG_DELETE, (6, a, 1, b, 2), 0)]
    assert ct.parse(whole[:30]) == []  # cut inside the tuple: nothing
    assert ct.parse(_message(0x0105, a, b, 1, 2, 5)) == []  # not ctnetlink's NEW/DELETE
    assert ct.parse(b"\x00" * 7) == []
