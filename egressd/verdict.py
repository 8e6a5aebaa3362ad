"""Verdicts, and the two state machines they move, each in one table.

What a verdict is: the engine's answer for one packet (``Engine.feed`` returns it), which the
shell turns into one action on the packet *and* at most one change of the connection's state
in the kernel (the two mark bits of the connmark, see ``egressd/netfilter.py``). A name says
both halves, because they are independent: dropping one packet that cannot be read is not
the same as dropping the connection it belongs to.

=============== =========== ============================ ==========================================
verdict          the packet  the connection in the kernel  used for
=============== =========== ============================ ==========================================
PASS_MARK_SEEN   passes      unseen -> SEEN               the first packet of a fresh flow: the
                                                          kernel now sends only its head
PASS             passes      left as it is                every later undecided packet; a flow met
                                                          mid-stream (it must stay "unseen": past
                                                          its head the kernel would send no more)
PIN_ALLOW        passes      -> ALLOW (final)             decided: nothing more reaches Python
PIN_DENY         dropped     -> DENY (final)              decided: every later packet is reset or
                                                          rejected by the kernel
DROP_PACKET      dropped     left as it is                ``on_error: drop``: a packet the engine
                                                          cannot read; the next one is judged again
=============== =========== ============================ ==========================================

The flow's own state (``egressd.flow``) moves in step, by :data:`TRANSITIONS` only: the engine
names what happened (an :data:`EVENTS` value) and the table gives the new state and the
verdict. A pinned flow never leaves its state, and nothing leads from a drop back to an
accept. :data:`KERNEL` is the same for the two mark bits; the shell reads :data:`MARK_OF`.

Why ints and tables: ``feed`` runs per packet, so a verdict is a small int (no allocation)
and a step is two dict look-ups of prebuilt tuples; the tables are what a reader checks.
"""

from __future__ import annotations

from typing import Final

from egressd.flow import PENDING, PINNED_ACCEPT, PINNED_DROP, SETTLED

# -- verdicts ---------------------------------------------------------------------------------
PASS_MARK_SEEN: Final = 0
PIN_ALLOW: Final = 1
PIN_DENY: Final = 2
PASS: Final = 3
DROP_PACKET: Final = 4

NAMES: Final = {
    PASS_MARK_SEEN: "pass-mark-seen",
    PIN_ALLOW: "pin-allow",
    PIN_DENY: "pin-deny",
    PASS: "pass",
    DROP_PACKET: "drop-packet",
}
PACKET_DROPPED: Final = frozenset({PIN_DENY, DROP_PACKET})  # the verdicts that drop this packet

# -- the connection's state in the kernel (two mark bits; netfilter.py has the bit values) -----
UNSEEN: Final = "unseen"
SEEN: Final = "SEEN"
ALLOW: Final = "ALLOW"
DENY: Final = "DENY"

# What each verdict writes to the mark (None: nothing, the connection keeps its state).
MARK_OF: Final[dict[int, str | None]] = {
    PASS_MARK_SEEN: SEEN,
    PIN_ALLOW: ALLOW,
    PIN_DENY: DENY,
    PASS: None,
    DROP_PACKET: None,
}

# (kernel state, verdict) -> kernel state after. ALLOW and DENY are final: the kernel queues
# no packet of such a connection, so no verdict can reach it.
KERNEL: Final[dict[tuple[str, int], str]] = {
    (UNSEEN, PASS_MARK_SEEN): SEEN,
    (UNSEEN, PASS): UNSEEN,
    (UNSEEN, DROP_PACKET): UNSEEN,
    (UNSEEN, PIN_ALLOW): ALLOW,
    (UNSEEN, PIN_DENY): DENY,
    (SEEN, PASS_MARK_SEEN): SEEN,  # a SYN retransmitted after the daemon restarted
    (SEEN, PASS): SEEN,
    (SEEN, DROP_PACKET): SEEN,
    (SEEN, PIN_ALLOW): ALLOW,
    (SEEN, PIN_DENY): DENY,
}

# -- what happens to a flow (the engine names one per packet it judges) -----------------------
FIRST_PACKET: Final = 0  # a fresh flow's first packet, still undecided
UNDECIDED: Final = 1  # any later packet (or a mid-stream flow's first) that decided nothing
ANSWERED: Final = 2  # DNS answered: reported and evictable, but every later query is judged
ALLOWED: Final = 3  # the engine decided to accept (classified, limit reached, closed)
DENIED: Final = 4  # the policy decided to drop
LATE: Final = 5  # a packet of a pinned flow (a capture replays them; live, the kernel rarely sends one)

EVENTS: Final = {
    FIRST_PACKET: "first-packet",
    UNDECIDED: "undecided",
    ANSWERED: "answered",
    ALLOWED: "allowed",
    DENIED: "denied",
    LATE: "late",
}

# flow state -> {event -> (flow state after, verdict)}. Missing pairs cannot happen; the
# engine raising KeyError for one would be a bug, and feed() turns it into on_error.
TRANSITIONS: Final[dict[int, dict[int, tuple[int, int]]]] = {
    PENDING: {
        FIRST_PACKET: (PENDING, PASS_MARK_SEEN),
        UNDECIDED: (PENDING, PASS),
        ANSWERED: (SETTLED, PASS),
        ALLOWED: (PINNED_ACCEPT, PIN_ALLOW),
        DENIED: (PINNED_DROP, PIN_DENY),
    },
    SETTLED: {
        UNDECIDED: (SETTLED, PASS),
        DENIED: (PINNED_DROP, PIN_DENY),
    },
    PINNED_ACCEPT: {LATE: (PINNED_ACCEPT, PIN_ALLOW)},
    PINNED_DROP: {LATE: (PINNED_DROP, PIN_DENY)},
}

# Packets judged without a flow: the policy's knobs, per packet.
ON_ERROR: Final = {"accept": PASS, "drop": DROP_PACKET}  # a packet the engine cannot read
# A new flow while the table is full of flows still being judged: "drop" refuses the new
# connection (TCP reset / ICMP error, at once); "accept" passes the packet unpinned, so the
# connection is judged (mid-stream) as soon as there is room.
ON_OVERLOAD: Final = {"accept": PASS, "drop": PIN_DENY}
