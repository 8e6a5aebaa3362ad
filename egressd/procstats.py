"""Queue health from /proc/net/netfilter/nfnetlink_queue: the only place overflow shows.

A full queue or netlink buffer loses packets silently — ``sendto()`` in the sender still
returns 0 — unless someone reads these counters. The file is per network namespace (the
reader's), one line per bound queue, written by the kernel as::

    "%5u %6u %5u %1u %5u %5u %5u %8u %2d\n"
    queue_num peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1

``queue_total`` is packets waiting for a verdict now; ``queue_dropped`` counts packets
lost because ``queue_total`` reached max_len (or passed, with the FAIL_OPEN flag);
``user_dropped`` counts messages the kernel could not put in the socket's receive buffer;
``id_sequence`` is the id of the last packet queued (a packets-queued counter that wraps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROC_PATH: Final = Path("/proc/net/netfilter/nfnetlink_queue")
COPY_MODES: Final = {0: "none", 1: "meta", 2: "packet"}


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue_num: int
    peer_portid: int
    queue_total: int
    copy_mode: int
    copy_range: int
    queue_dropped: int
    user_dropped: int
    id_sequence: int

    @property
    def copy_mode_name(self) -> str:
        return COPY_MODES.get(self.copy_mode, str(self.copy_mode))

    @property
    def dropped(self) -> int:
        """Everything lost (or, fail-open, passed uninspected) since the queue was bound."""
        return self.queue_dropped + self.user_dropped


def parse(text: str) -> list[QueueStats]:
    """Every well-formed line of the file; malformed lines are skipped, never raised on."""
    out: list[QueueStats] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            nums = [int(f) for f in fields[:8]]
        except ValueError:
            continue
        if any(n < 0 for n in nums):
            continue
        out.append(QueueStats(*nums))
    return out


def read(path: Path | str = PROC_PATH) -> list[QueueStats]:
    """The queues bound in the reader's network namespace; [] when none or no nfnetlink_queue."""
    try:
        return parse(Path(path).read_text())
    except OSError:
        return []


def find(stats: list[QueueStats], queue_num: int) -> QueueStats | None:
    for s in stats:
        if s.queue_num == queue_num:
            return s
    return None
