"""The daemon's NFQUEUE callback does what each verdict says (egressd.verdict), on a stand-in packet.

The kernel side (marks saved to the connmark, DENY resetting the connection) is tested end to
end in tests/e2e/test_kernel_verdicts.py; this checks the callback's half: per-packet
verdicts are a plain accept()/drop() with no mark, connection verdicts a mark and repeat().
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from egressd import netfilter
from egressd.daemon import Daemon, Options
from egressd.policy import load_policy
from tests.test_engine import CLIENT_BANNER, Conn

OTHER_BITS = 0x00000ABC  # another program's mark bits: always kept


class FakePacket:
    """What netfilterqueue's Packet offers the callback, recording what was done with it."""

    def __init__(self, payload: bytes, mark: int = OTHER_BITS) -> None:
        self.payload, self.mark = payload, mark
        self.calls: list[str] = []

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark
        self.calls.append(f"set_mark:{mark:#x}")

    def accept(self) -> None:
        self.calls.append("accept")

    def drop(self) -> None:
        self.calls.append("drop")

    def repeat(self) -> None:
        self.calls.append("repeat")


def daemon(tmp_path: Path, on_error: str) -> Daemon:
    pol = tmp_path / "p.yaml"
    pol.write_text(
        textwrap.dedent(
            f"""\
            default: accept
            on_error: {on_error}
            rules:
              - name: drop-ssh
                description: ssh
                match: {{detection: ssh}}
                action: drop
            """
        )
    )
    return Daemon(Options(policy=pol, status_socket=None), load_policy(pol))


def verdict_of(d: Daemon, payload: bytes) -> list[str]:
    pkt = FakePacket(payload)
    d._on_packet(pkt)
    return pkt.calls


def test_on_error_drop_drops_the_packet_without_touching_the_connection(tmp_path: Path) -> None:
    assert verdict_of(daemon(tmp_path, "drop"), b"\x45\x00garbage") == ["drop"]


def test_on_error_accept_accepts_the_packet_without_touching_the_connection(tmp_path: Path) -> None:
    assert verdict_of(daemon(tmp_path, "accept"), b"\x45\x00garbage") == ["accept"]


def test_connection_verdicts_write_the_mark_and_keep_other_bits(tmp_path: Path) -> None:
    d = daemon(tmp_path, "accept")
    c = Conn("203.0.113.20", 2222)
    seen = OTHER_BITS | netfilter.MARK_SEEN
    assert verdict_of(d, c.syn()) == [f"set_mark:{seen:#x}", "repeat"]
    deny = OTHER_BITS | netfilter.MARK_DENY
    assert verdict_of(d, c.c(CLIENT_BANNER)) == [f"set_mark:{deny:#x}", "repeat"]
