"""StreamHead: what detectors see must not depend on how the sender cut its segments."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.stream import GREW, HELD, NOTHING, StreamHead

BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def test_in_order_segments_concatenate() -> None:
    h = StreamHead(8192)
    h.start(1000)
    assert h.add(1000, b"SSH-2.0-") == GREW
    assert h.add(1008, b"OpenSSH\r\n") == GREW
    assert h.data == b"SSH-2.0-OpenSSH\r\n"


def test_out_of_order_segment_waits_for_the_gap() -> None:
    h = StreamHead(8192)
    h.start(0)
    assert h.add(8, b"OpenSSH\r\n") == HELD
    assert h.data == b""
    assert h.add(0, b"SSH-2.0-") == GREW
    assert h.data == b"SSH-2.0-OpenSSH\r\n"


def test_identical_retransmission_changes_nothing() -> None:
    h = StreamHead(8192)
    h.start(5)
    h.add(5, b"hello ")
    assert h.add(5, b"hello ") == NOTHING
    assert h.data == b"hello "
    assert not h.inconsistent


def test_retransmission_with_different_bytes_keeps_first_copy_and_flags_it() -> None:
    h = StreamHead(8192)
    h.start(0)
    h.add(0, b'{"method":"mining.subscribe"}\n')
    h.add(0, b'{"method":"harmless.methodxx"}\n')
    assert h.data.startswith(b'{"method":"mining.subscribe"}')
    assert h.inconsistent


def test_held_segment_conflicting_with_later_fill_is_flagged() -> None:
    h = StreamHead(8192)
    h.start(0)
    h.add(4, b"XXXX")
    h.add(0, b"abcdefgh")
    assert h.data == b"abcdefgh"
    assert h.inconsistent


def test_partial_overlap_extends_the_stream() -> None:
    h = StreamHead(8192)
    h.start(0)
    h.add(0, b"abcd")
    assert h.add(2, b"cdef") == GREW
    assert h.data == b"abcdef"
    assert not h.inconsistent


def test_head_is_bounded_by_limit() -> None:
    h = StreamHead(16)
    h.start(0)
    h.add(0, b"a" * 10)
    h.add(10, b"b" * 10)
    assert h.data == b"a" * 10 + b"b" * 6
    assert h.full
    assert h.add(20, b"c") == NOTHING


def test_segments_beyond_the_head_are_ignored_and_not_held() -> None:
    h = StreamHead(16)
    h.start(0)
    assert h.add(100, b"x" * 10) == NOTHING
    assert h.pending == {}


def test_sequence_wraparound() -> None:
    h = StreamHead(8192)
    isn = (1 << 32) - 3
    h.start(isn)
    h.add(isn, b"SSH")
    h.add(0, b"-2.0-")
    assert h.data == b"SSH-2.0-"


def test_bytes_before_isn_are_trimmed() -> None:
    h = StreamHead(8192)
    h.start(100)
    h.add(98, b"xxabc")
    assert h.data == b"abc"


def test_truncated_capture_ends_the_head_at_the_captured_bytes() -> None:
    h = StreamHead(8192)
    h.start(0)
    h.add(0, b"abc", truncated=True)
    assert h.full
    assert h.data == b"abc"


def test_pending_bytes_are_bounded() -> None:
    h = StreamHead(64)
    h.start(0)
    for i in range(1, 60):
        h.add(i, b"z")
    assert h.pending_bytes <= 64


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.integers(min_value=0, max_value=2**32 - 1), st.randoms())
def test_any_segmentation_and_order_yields_the_same_stream(data: bytes, isn: int, rnd: random.Random) -> None:
    cuts = sorted(rnd.sample(range(1, len(data)), k=min(len(data) - 1, rnd.randint(0, 20)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    segs = [(bounds[i], data[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
    # add retransmissions of random earlier segments, then shuffle
    segs += [rnd.choice(segs) for _ in range(rnd.randint(0, 5))]
    rnd.shuffle(segs)
    h = StreamHead(8192)
    h.start(isn)
    for off, seg in segs:
        h.add((isn + off) % (1 << 32), seg)
    assert h.data == data
    assert not h.inconsistent


def test_tentative_start_is_rebased_by_a_first_segment_far_outside_the_window() -> None:
    h = StreamHead(8192)
    h.start(1_000_000, tentative=True)  # what the other side claimed to acknowledge
    assert h.add(5, b"SSH-2.0-x\r\n") == GREW
    assert h.data == b"SSH-2.0-x\r\n"


def test_tentative_start_keeps_out_of_order_segments_inside_the_window() -> None:
    h = StreamHead(8192)
    h.start(100, tentative=True)
    assert h.add(104, b"efgh") == HELD
    assert h.add(100, b"abcd") == GREW
    assert h.data == b"abcdefgh"
