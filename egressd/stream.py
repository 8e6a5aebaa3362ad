"""In-order reassembly of the *head* of one direction of a TCP stream.

Goal: detectors see exactly the bytes the receiving application would see, whatever the
segmentation — a banner split over three segments, segments out of order, retransmissions.
Only the first ``limit`` bytes (8 KiB by default) are kept: every handshake egressd cares
about is decided long before that, and the bound is what keeps memory per flow constant
whatever a peer sends.

Plan: ``data`` holds the contiguous bytes from the initial sequence number; segments that
arrive ahead of the contiguous edge wait in ``pending`` (offset -> bytes, total bytes
bounded by ``limit``) until the gap is filled. Offsets are ``(seq - isn) mod 2**32`` so
sequence wrap-around is free.

Why "first copy wins": when a retransmission overlaps bytes already received *with
different content*, receivers differ in which copy they keep (the classic IDS evasion of
Ptacek & Newsham). We keep the first copy, never let the second overwrite it, and raise
``inconsistent`` so the engine can report the evasion attempt as a detection of its own.
"""

from __future__ import annotations

from typing import Final

# What add() did with a segment.
NOTHING: Final = 0  # nothing new (duplicate, beyond the head, or dropped at the bound)
HELD: Final = 1  # new bytes ahead of a gap, kept until the gap is filled
GREW: Final = 2  # the contiguous head grew: detectors should look again

_MOD: Final = 1 << 32
_HALF: Final = 1 << 31


class StreamHead:
    __slots__ = ("closed", "data", "full", "inconsistent", "isn", "limit", "pending", "pending_bytes", "tentative")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.isn = -1  # sequence number of the first payload byte; -1 until known
        self.data = b""
        self.pending: dict[int, tuple[bytes, bool]] = {}
        self.pending_bytes = 0
        self.full = False  # no more bytes will be added (limit reached, or a capture gap)
        self.closed = False  # FIN or RST seen from this side
        self.inconsistent = False
        self.tentative = False  # isn was inferred from the peer's ack number, not seen in a SYN

    def start(self, isn: int, tentative: bool = False) -> None:
        """Fix the initial sequence number (SYN seq + 1, or the first seq seen mid-stream).

        ``tentative``: inferred from what the other side acknowledged. A sender controls its
        own ack numbers, so a first segment that lands outside the head window re-bases a
        tentative start instead of being ignored (a bogus ack must not hide the reply)."""
        if self.isn < 0:
            self.isn = isn % _MOD
            self.tentative = tentative

    def add(self, seq: int, payload: bytes, truncated: bool = False) -> int:
        """Place a segment; returns GREW, HELD or NOTHING.

        ``truncated``: the capture holds only the first part of this segment (NFQUEUE copy
        range, GSO super-packet, pcap snaplen). The bytes after it will never be seen, so the
        head ends there once it is reached.
        """
        if self.full or not payload:
            return NOTHING
        if self.isn < 0:
            self.start(seq)
        off = (seq - self.isn) % _MOD
        if self.tentative and not self.data and not self.pending and off >= self.limit:
            self.isn, off = seq % _MOD, 0
        self.tentative = False
        if off >= _HALF:
            # Before the ISN (a retransmission of handshake bytes or garbage): the part that
            # reaches into the stream still has to be checked against what we have.
            back = _MOD - off
            if back >= len(payload):
                return NOTHING
            payload = payload[back:]
            off = 0
        if off >= self.limit:
            return NOTHING
        room = self.limit - off
        if len(payload) > room:
            payload = payload[:room]
            truncated = False  # the cut is ours, not the capture's
        end = off + len(payload)
        have = len(self.data)
        if off < have:
            # Overlap with what we already have: the first copy wins, a different second copy is evasion.
            overlap_end = min(end, have)
            if self.data[off:overlap_end] != payload[: overlap_end - off]:
                self.inconsistent = True
            if end <= have:
                return NOTHING
            payload = payload[have - off :]
            off = have
        if off > have:
            return HELD if self._hold(off, payload, truncated) else NOTHING
        self.data += payload
        if truncated:
            self.full = True
        self._drain()
        if len(self.data) >= self.limit:
            self.full = True
            self.pending.clear()
            self.pending_bytes = 0
        return GREW

    def _hold(self, off: int, payload: bytes, truncated: bool) -> bool:
        """Keep an out-of-order segment (True if anything new was kept); bounded, first copy wins."""
        old = self.pending.get(off)
        if old is not None:
            n = min(len(old[0]), len(payload))
            if old[0][:n] != payload[:n]:
                self.inconsistent = True
            if len(old[0]) >= len(payload):
                return False
            merged = old[0] + payload[len(old[0]) :]
            if self.pending_bytes - len(old[0]) + len(merged) > self.limit:
                return False  # keep the old copy; the bound holds
            self.pending_bytes += len(merged) - len(old[0])
            self.pending[off] = (merged, truncated)
            return True
        if self.pending_bytes + len(payload) > self.limit:
            return False  # bound reached: drop it; the sender retransmits once the gap is filled
        self.pending[off] = (payload, truncated)
        self.pending_bytes += len(payload)
        return True

    def _drain(self) -> None:
        """Move held segments that now touch the contiguous edge into ``data``.

        Held segments overlapping each other are compared here, against ``data``, so the
        first-copy-wins rule holds for out-of-order arrivals too. At most ``limit`` bytes are
        held, so the scan is bounded.
        """
        while self.pending:
            have = len(self.data)
            best = -1
            for off in self.pending:
                if off <= have and (best < 0 or off < best):
                    best = off
            if best < 0:
                return
            seg, cut = self.pending.pop(best)
            self.pending_bytes -= len(seg)
            end = best + len(seg)
            if best < have:
                overlap_end = min(end, have)
                if self.data[best:overlap_end] != seg[: overlap_end - best]:
                    self.inconsistent = True
                if end <= have:
                    continue
                seg = seg[have - best :]
            self.data += seg
            if cut:
                self.full = True
                self.pending.clear()
                self.pending_bytes = 0
                return
