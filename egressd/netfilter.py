"""The kernel rules that feed egressd's queue: install them, remove exactly them, show them.

Why these rules look the way they do (every point measured on this kernel, see
docs/architecture.md and tests/e2e/test_kernel_*.py):

* Only the *head* of a connection goes to Python, and of the head only what the engine can
  use: every packet that carries payload (the detectors' input), the close of a connection
  being judged (a RST is queued; a FIN is logged to the daemon when the daemon installed the
  rules, see ``_enqueue_rules``) and, under ``fail: closed`` only, the originator's SYN. A TCP
  segment with exactly zero payload and SYN, RST and FIN all clear (a pure ACK, a window
  update) carries nothing a detector reads, and neither does a dataless SYN-ACK (the engine
  takes the reply's initial sequence number from its first data segment or from the ack
  number of the originator's first ACK): those pass without a verdict. Since the fast path
  (docs/fast-path.md) a connection nobody has judged queues nothing until its first data
  segment, so a dataless connect() + close() costs no verdict at all.
* The daemon's verdict is written into the
  packet mark (``pkt.set_mark`` + ``pkt.repeat()``); the repeated packet re-enters our
  chain, ``CONNMARK --save-mark`` copies it to the conntrack entry, and from then on the
  kernel alone handles the flow. A plain ``accept()`` would resume at the next hook and no
  rule of ours would ever see the mark, so verdicts that must stick always use repeat.
* A drop on the first packet is never remembered (the conntrack entry of a dropped packet
  is not confirmed), so a denied SYN is answered with a TCP reset / ICMP error at once:
  ``connect()`` fails in well under a millisecond instead of retrying for two minutes.
* ``connbytes`` needs conntrack accounting. Entries created without it never match, either
  way round — and a connection opened before the daemon (or while it was down in fail-open
  mode) would otherwise slip past as "beyond the head". So the rules queue every packet of
  a connection the daemon has *never seen*, whatever its count, until the daemon marks it
  at least SEEN. No conntrack flush: a flush loses NAT state, and the entry conntrack
  re-creates mid-stream takes the direction of the first packet it sees — when the remote
  side talks first, the node's own connection looks inbound and is never judged
  (measured: 0 packets queued, the connection carried on). The same happens to a
  connection older than *any* conntrack user in the namespace (no entry at all): start
  egressd, or any stateful rule, before the workloads. Hosts running Docker/kube-proxy
  track everything already, and those entries keep their true direction.

Connection states live in two bits of the mark / connmark (``MARK_MASK``; the other 30 bits
belong to other software and survive untouched, every match and save uses the mask)::

    00  unseen   never judged: every packet is queued (head or not)*
    01  SEEN     the daemon looked and has not decided: the first max_packets packets of
                 each direction are queued*, the rest pass (the head bound)
    10  ALLOW    pinned: nothing more is queued
    11  DENY     pinned: every later packet is reset (TCP), rejected (UDP) or dropped

(* except the dataless ones, below; they still count towards max_packets.)

How the daemon answers (``with_verdict`` keeps the other bits)::

    undecided      set_mark(with_verdict(m, MARK_SEEN)); repeat()   the head keeps coming, never the bulk
    pin allow      set_mark(with_verdict(m, MARK_ALLOW)); repeat()  nothing more is queued
    deny           set_mark(with_verdict(m, MARK_DENY)); repeat()   reset/rejected now and from now on
    keep watching  accept()   nothing saved: an unseen flow (one met mid-stream) keeps coming until pinned
    drop one       drop()     nothing saved: on_error drops the unreadable packet, not its connection

A packet without conntrack (INVALID) keeps its verdict only for itself; the next one is
queued again. A SEEN flow first met mid-stream sends no more packets (it is past its
head), so decide such a flow on the packet you get, or answer plain ``accept()``.

``MARK_REPLY`` is set on reply-direction packets just before they are queued, so the
daemon knows the conntrack direction of every packet it is given (FORWARD carries both).
It is never saved to the connmark. The bits were chosen high (0x70000000) because
kube-proxy uses 0x4000/0x8000, Calico allocates upwards from 0x10000, Tailscale uses
0xff0000 and wg-quick 0xca6c; a mangle OUTPUT rule clears them on locally generated
packets so a process with SO_MARK cannot pre-allow itself.

Layout (both families; the same text is rendered for iptables and ip6tables)::

    filter OUTPUT  -> EGRESSD-OUT  (not lo, not replies of inbound connections) -> EGRESSD-QORIG
    filter INPUT   -> EGRESSD-IN   (reply direction only: banners, DNS answers)  -> EGRESSD-QREPLY
    filter FORWARD -> EGRESSD-FWD  (containers; inbound DNATed connections skipped)
    EGRESSD-QORIG  -g EGRESSD-ENQ-ORIG   (the packets that would be queued, and only those)
    EGRESSD-QREPLY -g EGRESSD-ENQ-REPLY
    mangle OUTPUT  -> EGRESSD-SCRUB

The two ENQ chains are where "nothing to read" is decided, so their rules cost nothing for
packets that were never going to be queued (pinned flows never get there, a SEEN flow past
its head RETURNs before). They are entered by goto: their RETURN goes back to the chain
that called QORIG/QREPLY, exactly as if the packet had not been a queue candidate, so a
skipped packet is neither queued nor marked and the connmark keeps whatever state it had
(an unseen flow stays unseen, a SEEN flow stays SEEN). INVALID packets (crafted, no
connection to pin on) are still judged one by one, dataless or not.

"Exactly zero payload" has to be exact (one byte of data must reach the detectors), and
iptables cannot subtract, so the test is a ``u32`` match (xt_u32) per TCP data offset
(5..15 words; 11 rules per chain): the IP length field equals the headers' length. It only
accepts the plain layout, anything else is queued as before::

    IPv4  byte 0 = 0x45 (no IP options), total length (bytes 2-3) = 20 + 4*doff, MF and the
          fragment offset (bytes 6-7 & 0x3FFF) zero, protocol (byte 9) = 6, and the TCP data
          offset (high nibble of byte 32) = doff
    IPv6  payload length (bytes 4-5) = 4*doff and next header (byte 6) = 6 (so no extension
          header, no fragment header), and the data offset (high nibble of byte 52) = doff
    flags (byte 33 / 53): SYN, RST, FIN clear (ACK either way); in the reply direction also
          exactly SYN+ACK (with RST, FIN clear)

Conntrack reassembles fragments before these hooks, so the fragment test is a second line
of defence. The length fields are what the receiving stack believes (it trims a longer
packet to them), so a segment that says "no payload" delivers none.

Reordering: a segment that skips the queue can overtake one of the same flow that waits
for its verdict (before, the whole head went through the queue in order; past the head
this was already so). TCP copes, with one visible cost, measured: in a simultaneous close
the peer's FIN waits in the queue while its ACK of our FIN passes; the ACK turns our
orphaned socket into a TIME_WAIT one, and the FIN, which early demux had already tied to
the old socket, is then dropped on delivery. The peer sends its FIN again one RTO later
(>= 200 ms), which is queued again: the close takes longer on the peer's side, no data is
lost. (Seen for about half the connections of a server that closes right after accept();
none with net.ipv4.tcp_early_demux=0.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from egressd.policy import Settings

# -- mark bits (the daemon's half of the contract) -----------------------------------------
MARK_MASK: Final = 0x30000000  # the verdict state bits (see the table above)
MARK_SEEN: Final = 0x10000000
MARK_ALLOW: Final = 0x20000000
MARK_DENY: Final = 0x30000000
MARK_REPLY: Final = 0x40000000  # set by the rules on queued reply-direction packets
# In the connmark: the kernel saw this connection's SYN and no daemon has judged any of its
# packets yet. Copied to the packet mark of a queued packet, it tells the daemon that the
# first data segment it gets is the start of the stream (the SYN itself is not queued), and
# a verdict saved with repeat() clears it. docs/fast-path.md says why it is needed.
MARK_FRESH: Final = 0x08000000
MARK_BITS: Final = MARK_MASK | MARK_REPLY | MARK_FRESH  # the bits egressd's rules own (scrubbed on local packets)
_SAVE_MASK: Final = MARK_MASK | MARK_FRESH  # what a repeated verdict writes to the connmark
# Set on every packet that leaves the IP layer (the guard's postrouting chain, last of all);
# the link guard drops IP frames without it. Never scrubbed, never saved to the connmark.
MARK_PASSED: Final = 0x80000000
_U32: Final = 0xFFFFFFFF


def kernel_head(settings: Settings) -> int:
    """The kernel's per-direction head bound (``RuleConfig.max_packets``) for a policy's settings.

    The one place it is derived: ``egressd run`` (install and every reload) and
    ``egressd rules install`` both call it, so rules installed apart from the daemon
    (``run --no-rules``) bound the head exactly as the daemon's own would. It must exceed
    what the engine can need, or a sender cutting its first bytes into 1-byte segments
    outlasts it and the rest of its flow passes unseen: the engine pins a flow within
    2 * head_bytes + max_packets packets of a direction (Engine._inspect: each direction's
    head holds head_bytes, a segment carries at least one byte), whatever the peers do.
    """
    return 2 * settings.head_bytes + settings.max_packets + 16


def with_verdict(mark: int, verdict: int) -> int:
    """The mark to give ``pkt.set_mark`` before ``pkt.repeat()``: other software's bits kept.

    ``verdict`` is MARK_SEEN, MARK_ALLOW or MARK_DENY.
    """
    return (mark & ~MARK_BITS & _U32) | verdict


def is_reply(mark: int) -> bool:
    """True when the rules queued this packet as the reply direction of its connection."""
    return bool(mark & MARK_REPLY)


def is_fresh(mark: int) -> bool:
    """True when the kernel saw this packet's connection start and nobody has judged it yet."""
    return bool(mark & MARK_FRESH)


# -- names ------------------------------------------------------------------------------
CHAIN_OUT: Final = "EGRESSD-OUT"
CHAIN_IN: Final = "EGRESSD-IN"
CHAIN_FWD: Final = "EGRESSD-FWD"
CHAIN_QORIG: Final = "EGRESSD-QORIG"
CHAIN_QREPLY: Final = "EGRESSD-QREPLY"
CHAIN_ENQ_ORIG: Final = "EGRESSD-ENQ-ORIG"
CHAIN_ENQ_REPLY: Final = "EGRESSD-ENQ-REPLY"
CHAIN_DENY: Final = "EGRESSD-DENY"
CHAIN_SCRUB: Final = "EGRESSD-SCRUB"
CHAIN_POLICY: Final = "EGRESSD-POLICY"  # the compiled policy (egressd.kernelsets); its sub-chains share the prefix
CHAIN_CLOSE: Final = "EGRESSD-CLOSE"  # the dataless FIN of a connection being judged: logged, not queued
CLOSE_PREFIX: Final = "egd close"  # the NFLOG prefix of those (egressd.kernellog)

# table -> our chains, and table -> (builtin chain, our chain) jumps, in install order.
CHAINS: Final[dict[str, tuple[str, ...]]] = {
    "filter": (
        CHAIN_OUT,
        CHAIN_IN,
        CHAIN_FWD,
        CHAIN_QORIG,
        CHAIN_QREPLY,
        CHAIN_ENQ_ORIG,
        CHAIN_ENQ_REPLY,
        CHAIN_DENY,
        CHAIN_POLICY,
        CHAIN_CLOSE,
    ),
    "mangle": (CHAIN_SCRUB,),
}


def _is_ours(table: str, chain: str) -> bool:
    """One of egressd's chains, including the compiled policy's per-rule sub-chains."""
    return chain in CHAINS.get(table, ()) or (table == "filter" and chain.startswith(CHAIN_POLICY + "-"))


JUMPS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "filter": (("OUTPUT", CHAIN_OUT), ("INPUT", CHAIN_IN), ("FORWARD", CHAIN_FWD)),
    "mangle": (("OUTPUT", CHAIN_SCRUB),),
}
BUILTIN: Final[dict[str, frozenset[str]]] = {
    "filter": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
    "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
}

_ACCT: Final = "net/netfilter/nf_conntrack_acct"


class NetfilterError(RuntimeError):
    """A rule operation failed; the message names the command and the kernel's complaint."""


@dataclass(frozen=True)
class RuleConfig:
    """Everything the rendered rules depend on (so a render is a pure function of it)."""

    queue_num: int
    fail_open: bool
    max_packets: int
    ipv6: bool = True
    # Interfaces that lead to containers (iptables wildcards like "veth+" allowed). Empty:
    # judge every forwarded connection except inbound ones that were DNATed to a container.
    forward_ifaces: tuple[str, ...] = ()
    # Queue TCP/UDP packets conntrack calls INVALID (a raw-socket sender's crafted packets
    # have no connection to pin a verdict on): judged one by one.
    judge_invalid: bool = True
    # The EGRESSD-POLICY chain's lines (and sub-chain declarations) per family, from
    # egressd.kernelsets: what the policy decides from addresses alone, decided at the SYN.
    policy4: tuple[str, ...] = ()
    policy6: tuple[str, ...] = ()
    # Queue the SYN of a connection nobody has judged (fail: closed). Without it a SYN passes
    # in the kernel, and "no daemon" could not refuse a connection: only its data, which a
    # fail-closed queue without a listener drops. With it, no daemon means no connection.
    queue_syn: bool = False
    # The NFLOG group the daemon reads (egressd.kernellog), or None. With it, the dataless
    # FIN of a connection being judged (SEEN) is logged there instead of queued: the
    # detectors still learn "this side closed", but the close never waits for a verdict.
    log_closes: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.queue_num <= 0xFFFF:
            raise ValueError(f"queue_num {self.queue_num} is outside 0..65535")
        if self.log_closes is not None and not 0 <= self.log_closes <= 0xFFFF:
            raise ValueError(f"log_closes group {self.log_closes} is outside 0..65535")
        if not 1 <= self.max_packets <= 1_000_000:
            raise ValueError(f"max_packets {self.max_packets} is outside 1..1000000")
        for name in self.forward_ifaces:
            if not name or len(name) > 15 or any(c.isspace() or c in "'\"" for c in name):
                raise ValueError(f"bad interface name {name!r}")


# -- rendering (pure) ---------------------------------------------------------------------
def _hex(v: int) -> str:
    return f"0x{v:x}"


def _fast_allow(chain: str) -> str:
    """The first rule of OUT/IN/FWD: the bulk of traffic belongs to connections pinned ALLOW,
    and carries no verdict mark of its own (only packets the daemon just repeated do), so it
    leaves with one cheap match instead of walking the loopback/addrtype/conntrack checks.
    Measured: bulk throughput with egressd 0.89 of without before, see bench/live.py."""
    m = _hex(MARK_MASK)
    return f"-A {chain} -m mark --mark 0x0/{m} -m connmark --mark {_hex(MARK_ALLOW)}/{m} -j RETURN"


def _unjudged_dataless(chain: str, family: int, *, syn: bool) -> list[str]:
    """Second rule of OUT/IN/FWD: a segment without data of a connection nobody has judged.

    Such a segment is never queued (``_enqueue_rules``), but without this rule it found that
    out only at the end of the walk: loopback, two addrtype route look-ups, the verdict
    checks, connbytes, then the skip tests. A connection without data is made of nothing
    else, and each of its packets paid that walk (measured once, 2 rounds: with the rules and no
    daemon a connect-and-close loop ran at 0.85 and 0.77 of conntrack alone). One test for the usual layout (Linux puts
    timestamps on every segment: data offset 8) sends them back at once; other layouts take
    the long way to the same answer. ``syn`` False: an originator's SYN still takes the long
    way, because it walks the compiled policy and marks the connection FRESH (a SYN the
    loose conntrack pick-up makes NEW mid-stream is judged by the engine instead, the same way).
    """
    m = _hex(MARK_MASK)
    # Replies (``syn``: INPUT) also for data offset 10, the SYN-ACK with its options.
    offsets = (8, 10) if syn else (8,)
    return [
        f"-A {chain} -p tcp -m mark --mark 0x0/{m} -m connmark --mark 0x0/{m} "
        f'-m u32 --u32 "{nodata_u32(family, d, clear=0 if syn else _TCP_SYN)}" -j RETURN'
        for d in offsets
    ]


def _verdict_rules(chain: str) -> list[str]:
    """Shared head of OUT/IN/FWD: remember a verdict the daemon just gave, enforce pinned ones."""
    m = _hex(MARK_MASK)
    sm = _hex(_SAVE_MASK)
    return [
        f"-A {chain} -m mark ! --mark 0x0/{m} -j CONNMARK --save-mark --nfmask {sm} --ctmask {sm}",
        f"-A {chain} -m connmark --mark {_hex(MARK_DENY)}/{m} -j {CHAIN_DENY}",
        # A packet without conntrack (INVALID) keeps its verdict only in its own mark.
        f"-A {chain} -m mark --mark {_hex(MARK_DENY)}/{m} -j {CHAIN_DENY}",
        f"-A {chain} -m mark ! --mark 0x0/{m} -j RETURN",
        f"-A {chain} -m connmark --mark {_hex(MARK_ALLOW)}/{m} -j RETURN",
    ]


def _queue_target(cfg: RuleConfig) -> str:
    return f"-j NFQUEUE --queue-num {cfg.queue_num}" + (" --queue-bypass" if cfg.fail_open else "")


# -- what is not worth a verdict ----------------------------------------------------------
TCP_DATA_OFFSETS: Final = range(5, 16)  # the TCP header is 5..15 32-bit words (RFC 9293)
# The order the skip rules try them: the common ones first (Linux: 8 words on every segment
# with timestamps, 10 on a SYN/SYN-ACK with options, 5 without options), so a dataless
# segment leaves after one to three u32 tests instead of up to eleven.
_SKIP_ORDER: Final = (8, 10, 5, 6, 7, 9, 11, 12, 13, 14, 15)
_TCP_SYN: Final = 0x02
_TCP_RST: Final = 0x04
_TCP_ACK: Final = 0x10
_TCP_SYN_RST_FIN: Final = 0x07


def nodata_u32(family: int, doff: int, *, reply: bool = False, clear: int | None = None) -> str:
    """The ``u32`` test: a TCP segment of data offset ``doff`` with zero payload, nothing to read.

    The IP length field must equal the IP plus TCP header length for this one data offset
    (u32 has no arithmetic, hence one test per offset). The word holding the data offset
    and the flags is masked to doff + SYN/RST/FIN (+ ACK for the reply's SYN-ACK) and
    compared with a list of allowed values. The length comes first: it rejects nearly
    every packet that carries data, so a data packet costs one comparison per rule.

    ``clear``: instead of that flag test, only these flag bits must be clear (0: any flags,
    as for a connection nobody has judged, whose SYN and close carry nothing either;
    ``_TCP_SYN``: any but a SYN; ``_TCP_SYN | _TCP_RST``: what is left after the ACK skips
    is a FIN). ``reply`` then plays no part.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    if doff not in TCP_DATA_OFFSETS:
        raise ValueError(f"TCP data offset {doff} is outside 5..15")
    if clear is None:
        flags = (0, _TCP_ACK, _TCP_SYN | _TCP_ACK) if reply else (0,)
        mask = 0xF000 | _TCP_SYN_RST_FIN | (_TCP_ACK if reply else 0)
    else:
        flags, mask = (0,), 0xF000 | clear
    values = ",".join(f"0x{doff << 12 | f:04X}" for f in flags)
    if family == 4:
        # Word 0: version 4 + IHL 5 (no options) and the total length; word 4: MF + offset;
        # word 8: protocol; word 32 (TCP bytes 12-15): data offset, flags.
        return f"0&0xFF00FFFF=0x4500{20 + 4 * doff:04X} && 4&0x3FFF=0 && 8>>16&0xFF=6 && 32>>16&0x{mask:04X}={values}"
    # Word 4: payload length + next header (TCP, so no extension header); word 52: TCP 12-15.
    return f"4&0xFFFFFF00=0x{4 * doff:04X}0600 && 52>>16&0x{mask:04X}={values}"


def _enqueue_rules(
    chain: str, family: int, q: str, *, reply: bool, queue_syn: bool = False, log_closes: bool = False
) -> list[str]:
    """The tail every queued packet goes through: dataless segments RETURN, the rest is queued.

    A connection nobody has judged yet (connmark state 00) carries nothing to read until its
    first data segment: its dataless SYN, ACKs, FIN and RST all pass, so a connection that
    never carries data costs no verdict. The originator's SYN marks the connection FRESH
    first, so the daemon knows that first data segment starts the stream. A connection the
    daemon is classifying (SEEN) still queues its FIN/RST: "the peer closed" is evidence
    the detectors read (a silent SSH client, a line followed by a close). ``queue_syn``
    (fail: closed) queues the SYN as before, so that no daemon means no connection at all.

    ``log_closes``: that FIN goes to ``CHAIN_CLOSE`` (NFLOG to the daemon) instead of the
    queue. It was half the verdicts of a short request/response connection (request, reply,
    two FINs), and a verdict is where the packet's whole way on through the kernel is paid,
    inside the daemon's system call. The close is evidence, not something to stop: it
    carries no data, and once a side closed that side can send nothing more. A FIN that
    passes ahead of its side's data still waiting in the queue is held by the receiver until
    the data arrives (TCP orders by sequence number). A RST is not: the receiver would act on
    it at once and throw away the data it overtook (a server that resets after its answer), so
    a RST stays queued, behind that data.
    """
    m = _hex(MARK_MASK)
    fresh = _hex(MARK_FRESH)
    out: list[str] = []
    if not reply:
        out.append(
            f"-A {chain} -p tcp -m tcp --syn -m conntrack --ctstate NEW -m connmark --mark 0x0/{m} "
            f"-j CONNMARK --set-xmark {fresh}/{fresh}"
        )
        if queue_syn:
            out.append(f"-A {chain} -p tcp -m tcp --syn -m connmark --mark 0x0/{m} {q}")
    unseen = f"-p tcp -m connmark --mark 0x0/{m} -m u32 --u32"
    out += [f'-A {chain} {unseen} "{nodata_u32(family, d, clear=0)}" -j RETURN' for d in _SKIP_ORDER]
    out += [f'-A {chain} -p tcp -m u32 --u32 "{nodata_u32(family, d, reply=reply)}" -j RETURN' for d in _SKIP_ORDER]
    if log_closes:  # what is left without data and without SYN/RST: the FIN of a judged connection
        out += [
            f'-A {chain} -p tcp -m u32 --u32 "{nodata_u32(family, d, clear=_TCP_SYN | _TCP_RST)}" -g {CHAIN_CLOSE}'
            for d in _SKIP_ORDER
        ]
    out.append(f"-A {chain} -m connmark --mark {fresh}/{fresh} -j MARK --or-mark {fresh}")
    return [*out, f"-A {chain} {q}"]


def render(
    cfg: RuleConfig,
    family: int,
    present_jumps: frozenset[tuple[str, str, str]] = frozenset(),
    stale_chains: Sequence[str] = (),
) -> str:
    """The ``iptables-restore --noflush`` input that installs (or replaces) egressd's rules.

    Declaring a chain that exists flushes it, so a re-install replaces our rules in one
    transaction per table; jumps already in ``present_jumps`` ((table, builtin, chain)) are
    not added twice.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    q = _queue_target(cfg)
    n = cfg.max_packets
    seen = f"-m connmark --mark {_hex(MARK_SEEN)}/{_hex(MARK_MASK)}"
    cb = "-m connbytes --connbytes 0:{n} --connbytes-dir {d} --connbytes-mode packets"
    # Not for TCP: a TCP segment is never multicast or broadcast, and each addrtype test is a
    # route look-up that every packet of an unjudged connection would pay.
    skip_multicast = "! -p tcp -m addrtype --dst-type MULTICAST -j RETURN"

    policy = cfg.policy4 if family == 4 else cfg.policy6
    decls = [ln for ln in policy if ln.startswith(":")]
    f: list[str] = ["*filter", *(f":{c} - [0:0]" for c in CHAINS["filter"]), *decls]
    # Sub-chains of a previous compiled policy: flushed and deleted in the same transaction.
    declared = {ln[1:].split()[0] for ln in decls}
    stale = [c for c in stale_chains if c not in declared]
    f += [f"-F {c}" for c in stale] + [f"-X {c}" for c in stale]
    # A new connection nobody has judged walks the compiled policy once, at its first packet;
    # a match sets the connmark (ALLOW/DENY) that the verdict rules below enforce.
    to_policy = f"-m conntrack --ctstate NEW -m connmark --mark 0x0/{_hex(MARK_MASK)} -j {CHAIN_POLICY}"
    # Locally originated: everything but loopback and the replies of inbound connections.
    f += [_fast_allow(CHAIN_OUT), *_unjudged_dataless(CHAIN_OUT, family, syn=False)]
    f += [f"-A {CHAIN_OUT} -o lo -j RETURN", f"-A {CHAIN_OUT} -m conntrack --ctdir REPLY -j RETURN"]
    f += [f"-A {CHAIN_OUT} {skip_multicast}"]
    if family == 4:
        f += [f"-A {CHAIN_OUT} ! -p tcp -m addrtype --dst-type BROADCAST -j RETURN"]
    if policy:
        f += [f"-A {CHAIN_OUT} {to_policy}"]
    f += _verdict_rules(CHAIN_OUT)
    f += [f"-A {CHAIN_OUT} -j {CHAIN_QORIG}"]
    # Arriving: only the replies of connections this node originated.
    f += [_fast_allow(CHAIN_IN), *_unjudged_dataless(CHAIN_IN, family, syn=True)]
    f += [f"-A {CHAIN_IN} -i lo -j RETURN", f"-A {CHAIN_IN} -m conntrack --ctdir ORIGINAL -j RETURN"]
    f += _verdict_rules(CHAIN_IN)
    f += [f"-A {CHAIN_IN} -j {CHAIN_QREPLY}"]
    # Forwarded: connections from containers, both directions.
    f += [_fast_allow(CHAIN_FWD), *_unjudged_dataless(CHAIN_FWD, family, syn=False)]
    if policy:
        if cfg.forward_ifaces:
            f += [f"-A {CHAIN_FWD} -i {ifc} {to_policy}" for ifc in cfg.forward_ifaces]
        else:
            f += [f"-A {CHAIN_FWD} -m conntrack ! --ctstate DNAT {to_policy}"]
    f += _verdict_rules(CHAIN_FWD)
    if cfg.forward_ifaces:
        for ifc in cfg.forward_ifaces:
            f += [
                f"-A {CHAIN_FWD} -i {ifc} -m conntrack --ctdir ORIGINAL -j {CHAIN_QORIG}",
                f"-A {CHAIN_FWD} -o {ifc} -m conntrack --ctdir REPLY -j {CHAIN_QREPLY}",
            ]
    else:
        f += [
            f"-A {CHAIN_FWD} -m conntrack --ctstate DNAT -j RETURN",
            f"-A {CHAIN_FWD} {skip_multicast}",
            f"-A {CHAIN_FWD} -m conntrack --ctdir ORIGINAL -j {CHAIN_QORIG}",
            f"-A {CHAIN_FWD} -m conntrack --ctdir REPLY -j {CHAIN_QREPLY}",
        ]
    # Original direction: the head; an unseen connection whatever its age; INVALID packets.
    # -g, not -j: a RETURN in the ENQ chain ends QORIG too (the packet is not queued).
    f += [
        f"-A {CHAIN_QORIG} {cb.format(n=n, d='original')} -g {CHAIN_ENQ_ORIG}",
        f"-A {CHAIN_QORIG} {seen} -j RETURN",
        f"-A {CHAIN_QORIG} -m conntrack --ctstate NEW,RELATED,ESTABLISHED -g {CHAIN_ENQ_ORIG}",
    ]
    if cfg.judge_invalid:
        f += [f"-A {CHAIN_QORIG} -p {p} -m conntrack --ctstate INVALID {q}" for p in ("tcp", "udp")]
    # Reply direction: tag it for the daemon, then the same three-way split.
    f += [
        f"-A {CHAIN_QREPLY} -j MARK --or-mark {_hex(MARK_REPLY)}",
        f"-A {CHAIN_QREPLY} {cb.format(n=n, d='reply')} -g {CHAIN_ENQ_REPLY}",
        f"-A {CHAIN_QREPLY} {seen} -j RETURN",
        f"-A {CHAIN_QREPLY} -m conntrack --ctstate RELATED,ESTABLISHED -g {CHAIN_ENQ_REPLY}",
    ]
    # Queue what the engine can use; dataless ACKs (and the reply's dataless SYN-ACK) pass.
    logc = cfg.log_closes is not None
    f += _enqueue_rules(CHAIN_ENQ_ORIG, family, q, reply=False, queue_syn=cfg.queue_syn, log_closes=logc)
    f += _enqueue_rules(CHAIN_ENQ_REPLY, family, q, reply=True, log_closes=logc)
    if cfg.log_closes is not None:
        # Headers only: the daemon reads the flags, the sequence numbers and the mark (direction).
        f += [
            f'-A {CHAIN_CLOSE} -j NFLOG --nflog-group {cfg.log_closes} --nflog-prefix "{CLOSE_PREFIX}" --nflog-size 128'
        ]
    # Denied: fail fast, never answer a reset with a reset.
    udp_reject = "icmp-port-unreachable" if family == 4 else "icmp6-adm-prohibited"
    f += [
        f"-A {CHAIN_DENY} -p tcp -m tcp ! --tcp-flags RST RST -j REJECT --reject-with tcp-reset",
        f"-A {CHAIN_DENY} -p udp -j REJECT --reject-with {udp_reject}",
        f"-A {CHAIN_DENY} -j DROP",
    ]
    f += [ln for ln in policy if not ln.startswith(":")]
    f += _jumps("filter", present_jumps)
    f += ["COMMIT"]

    mg: list[str] = ["*mangle", f":{CHAIN_SCRUB} - [0:0]"]
    keep = _hex(~MARK_BITS & _U32)
    mg += [f"-A {CHAIN_SCRUB} -m mark ! --mark 0x0/{_hex(MARK_BITS)} -j MARK --and-mark {keep}"]
    mg += _jumps("mangle", present_jumps)
    mg += ["COMMIT"]
    return "\n".join([*f, *mg]) + "\n"


def _jumps(table: str, present: frozenset[tuple[str, str, str]]) -> list[str]:
    # -I 1: ahead of anything that ACCEPTs (Docker, kube-proxy) in the same builtin chain.
    return [f"-I {b} 1 -j {c}" for b, c in JUMPS[table] if (table, b, c) not in present]


# -- iptables-save parsing (pure) ---------------------------------------------------------
@dataclass
class TableState:
    """One table as iptables-save shows it: chains with their policy, rules in order."""

    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user chains)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, the rest of the -A line)
    counters: list[str] = field(default_factory=list)  # "[pkts:bytes]" per rule when saved with -c


def parse_save(text: str) -> dict[str, TableState]:
    """Parse ``iptables-save`` output (with or without -c counters) into tables."""
    tables: dict[str, TableState] = {}
    cur: TableState | None = None
    for raw in text.splitlines():
        line = raw.strip()
        counter = ""
        if line.startswith("[") and "] " in line:  # -c counters prefix: "[pkts:bytes] -A ..."
            counter, line = line.split(" ", 1)
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], TableState())
        elif cur is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            parts = line[1:].split()
            if parts:
                cur.chains[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            if len(parts) >= 2:
                cur.rules.append((parts[1], parts[2] if len(parts) > 2 else ""))
                cur.counters.append(counter)
    return tables


def present_jumps(tables: dict[str, TableState]) -> frozenset[tuple[str, str, str]]:
    """Our jumps already in place, as (table, builtin chain, our chain)."""
    out: set[tuple[str, str, str]] = set()
    for table, jumps in JUMPS.items():
        st = tables.get(table)
        if st is None:
            continue
        for b, c in jumps:
            if (b, f"-j {c}") in st.rules:
                out.add((table, b, c))
    return frozenset(out)


def render_remove(tables: dict[str, TableState]) -> str:
    """The ``iptables-restore --noflush`` input that deletes our jumps and chains; "" if none."""
    out: list[str] = []
    for table, ours in CHAINS.items():
        st = tables.get(table)
        if st is None:
            continue
        lines = [f"-D {b} -j {c}" for b, rest in st.rules for c in ours if rest == f"-j {c}" and b not in ours]
        present = [c for c in ours if c in st.chains] + [c for c in st.chains if c not in ours and _is_ours(table, c)]
        lines += [f"-F {c}" for c in present]
        lines += [f"-X {c}" for c in present]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def ours_only(tables: dict[str, TableState]) -> str:
    """The part of a save that is egressd's: our chains, their rules and the jumps to them."""
    out: list[str] = []
    for table, ours in CHAINS.items():
        st = tables.get(table)
        if st is None:
            continue
        lines = [f":{c} {st.chains[c]}" for c in st.chains if _is_ours(table, c)]
        jumps = {f"-j {c}" for c in ours}
        lines += [
            f"{cnt} -A {ch} {rest}".lstrip()
            for (ch, rest), cnt in zip(st.rules, st.counters, strict=True)
            if _is_ours(table, ch) or rest in jumps
        ]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out)


def _empty_table(st: TableState, table: str) -> bool:
    """No rules, no user chains, every policy ACCEPT: the table has no effect on any packet."""
    return (
        not st.rules
        and set(st.chains) <= BUILTIN.get(table, frozenset())
        and all(p == "ACCEPT" for p in st.chains.values())
    )


# -- running the tools --------------------------------------------------------------------
def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _run(argv: Sequence[str], netns: str | None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*_prefix(netns), *argv]
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise NetfilterError(f"{cmd[0]} not found: install iptables (and iproute2 for --netns)") from e
    except subprocess.TimeoutExpired as e:
        raise NetfilterError(f"{' '.join(cmd)} did not finish in 60 s (xtables lock held?)") from e


def _check(p: subprocess.CompletedProcess[str], what: str, stdin: str | None = None) -> str:
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip()
        detail = f"\n--- input ---\n{stdin}" if stdin else ""
        raise NetfilterError(f"{what} failed (exit {p.returncode}): {msg}{detail}")
    return p.stdout


def _tool(family: int, suffix: str = "") -> str:
    return ("iptables" if family == 4 else "ip6tables") + suffix


def _save(family: int, netns: str | None, counters: bool = False) -> dict[str, TableState]:
    argv = [_tool(family, "-save"), *(["-c"] if counters else [])]
    return parse_save(_check(_run(argv, netns), " ".join(argv)))


def _restore(family: int, text: str, netns: str | None) -> None:
    # -w: wait for the xtables lock instead of failing when kube-proxy/docker hold it.
    argv = [_tool(family, "-restore"), "-w", "10", "--noflush"]
    _check(_run(argv, netns, stdin=text), " ".join(argv), stdin=text)


def backend(netns: str | None = None) -> str:
    """'nf_tables' or 'legacy': which iptables flavour the system's iptables is."""
    out = _check(_run(["iptables", "-V"], netns), "iptables -V")
    return "nf_tables" if "nf_tables" in out else "legacy"


def _drop_empty_tables(family: int, netns: str | None) -> None:
    """Delete filter/mangle tables our install created and nobody else uses.

    With the nf_tables backend a table appears the first time any rule is added to it and
    stays, empty, after our chains are gone. Removing it makes remove() leave no trace (an
    empty table with ACCEPT policies does nothing but cost a hook call per packet). The
    base chains are deleted first in the same transaction: the kernel refuses to delete a
    chain that still has rules, so a rule someone added meanwhile aborts the whole delete.
    """
    if shutil.which("nft") is None or backend(netns) != "nf_tables":
        return
    fam = "ip" if family == 4 else "ip6"
    for table, st in _save(family, netns).items():
        if table not in CHAINS or not _empty_table(st, table):
            continue
        # iptables-save lists every builtin chain; nft has only those ever used.
        listing = _run(["nft", "list", "table", fam, table], netns)
        if listing.returncode != 0:
            continue
        chains = [ln.split()[1] for ln in listing.stdout.splitlines() if ln.strip().startswith("chain ")]
        script = "".join(f"delete chain {fam} {table} {c}\n" for c in chains)
        script += f"delete table {fam} {table}\n"
        _run(["nft", "-f", "-"], netns, stdin=script)  # best effort: a refusal leaves it as it was


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _read_sysctl(name: str, netns: str | None) -> str | None:
    if netns:
        p = _run(["cat", str(_sysctl_path(name))], netns)
        return p.stdout.strip() if p.returncode == 0 else None
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str, netns: str | None) -> bool:
    if netns:
        return _run(["sysctl", "-qw", f"{name.replace('/', '.')}={value}"], netns).returncode == 0
    try:
        _sysctl_path(name).write_text(value)
    except OSError:
        return False
    return True


def ensure_conntrack_accounting(netns: str | None = None) -> None:
    """Turn ``nf_conntrack_acct`` on (connbytes counts nothing without it) and check it is on.

    Inserting a connbytes rule turns it on too; this makes it explicit and survives a
    read-only /proc/sys (systemd's ProtectKernelTunables) when the value is already 1.
    """
    if _read_sysctl(_ACCT, netns) == "1":
        return
    _write_sysctl(_ACCT, "1", netns)
    if _read_sysctl(_ACCT, netns) != "1":
        raise NetfilterError(
            "net.netfilter.nf_conntrack_acct could not be set to 1 (read-only /proc/sys?): "
            "set it before starting egressd (sysctl.d or ExecStartPre=+)"
        )


# -- the link guard: frames that never met the IP hooks ----------------------------------
GUARD_TABLE: Final = "egressd"  # "table netdev egressd" (the guard) and "table inet egressd" (the mark)
GUARD_POSTROUTING_PRIORITY: Final = 500  # after mangle (-150) and nat (100): nothing clears the bit later
# Ethertypes that carry IP (directly, or inside a VLAN/QinQ tag, PPPoE session or MPLS label): a
# frame of one of these types without MARK_PASSED did not come through the IP layer.
IP_CARRIERS: Final = (0x0800, 0x86DD, 0x8100, 0x88A8, 0x9100, 0x8864, 0x8847, 0x8848)
_IP_PROTOCOLS: Final = (0x0800, 0x86DD)


class GuardUnavailable(NetfilterError):
    """The link guard could not be installed (no nft, or a kernel without the netdev egress hook)."""


def check_iface(name: str) -> str:
    """``name`` if it can be an interface name in the guard's nft rules, else ValueError."""
    if not name or len(name) > 15 or any(c.isspace() or c in "'\"*+/{},;" for c in name):
        raise ValueError(f"bad interface name {name!r}")
    return name


def render_guard(ifaces: Sequence[str]) -> str:
    """The ``nft -f`` input that installs (or replaces, in one transaction) the link guard.

    Why: a process with CAP_NET_RAW can write whole frames through a packet socket
    (AF_PACKET, with or without PACKET_QDISC_BYPASS); they start below the IP layer and never
    meet egressd's iptables chains. The netfilter egress hook (netdev family) sees every frame
    a device transmits, those included. So every packet the IP layer sends is marked last of
    all in postrouting (``MARK_PASSED``), and at the egress hook of the guarded interfaces a
    frame that carries IP without that mark is dropped. Frames that do not carry IP pass (ARP,
    LLDP, LACP, PTP, 802.1X); so do DHCP client broadcasts (dhclient and systemd-networkd send
    DISCOVER/REQUEST through packet sockets; a broadcast stays on the link). ``meta protocol``
    is what the sender told the kernel and ``ether type`` what is on the wire: both must be
    non-IP. A device without an Ethernet header (tun, WireGuard) carries nothing but IP, so
    there only ARP passes unmarked.
    """
    if not ifaces:
        raise ValueError("the link guard needs at least one interface")
    devs = ", ".join(f'"{check_iface(i)}"' for i in ifaces)
    carriers = ", ".join(f"0x{t:04x}" for t in IP_CARRIERS)
    ip_protocols = ", ".join(f"0x{t:04x}" for t in _IP_PROTOCOLS)
    m = _hex(MARK_PASSED)
    return "\n".join(
        [
            # "table X" then "delete table X": replace whatever is there, or nothing, atomically.
            f"table inet {GUARD_TABLE}",
            f"delete table inet {GUARD_TABLE}",
            f"table netdev {GUARD_TABLE}",
            f"delete table netdev {GUARD_TABLE}",
            f"table inet {GUARD_TABLE} {{",
            "\tchain passed {",
            f"\t\ttype filter hook postrouting priority {GUARD_POSTROUTING_PRIORITY}; policy accept;",
            f"\t\tmeta mark set meta mark | {m}",
            "\t}",
            "}",
            f"table netdev {GUARD_TABLE} {{",
            "\tchain guard {",
            f"\t\ttype filter hook egress devices = {{ {devs} }} priority 0; policy accept;",
            f"\t\tmeta mark & {m} == {m} accept",
            f"\t\tmeta oiftype ether ether type != {{ {carriers} }} meta protocol != {{ {ip_protocols} }} accept",
            "\t\tmeta oiftype != ether meta protocol arp accept",
            "\t\tmeta oiftype ether ether type ip meta protocol ip ip protocol udp udp sport 68 udp dport 67 "
            "ip daddr 255.255.255.255 accept",
            "\t\tcounter drop",
            "\t}",
            "}",
            "",
        ]
    )


def render_guard_remove() -> str:
    """The ``nft -f`` input that removes the guard's two tables (present or not)."""
    return "".join(f"table {f} {GUARD_TABLE}\ndelete table {f} {GUARD_TABLE}\n" for f in ("inet", "netdev"))


def _nft(script: str, netns: str | None, what: str) -> None:
    if shutil.which("nft") is None:
        raise GuardUnavailable("nft not found (apt install nftables): the link guard needs it")
    p = _run(["nft", "-f", "-"], netns, stdin=script)
    if p.returncode != 0:
        raise GuardUnavailable(f"{what}: nft -f failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()}")


def install_guard(ifaces: Sequence[str], *, netns: str | None = None) -> None:
    """Install (or replace) the link guard on ``ifaces`` (names; see ``render_guard``).

    A name that does not exist yet is accepted by this kernel (6.18, measured), which hooks
    the device when it appears and again when it is re-created; a kernel that refuses such a
    name makes this raise. docs/link-guard.md says what the guard does and does not stop.
    """
    _nft(render_guard(ifaces), netns, f"installing the link guard on {', '.join(ifaces)}")


def remove_guard(*, netns: str | None = None) -> None:
    """Delete the guard's tables; nothing else. Idempotent (no nft: nothing to remove)."""
    if shutil.which("nft") is None:
        return
    p = _run(["nft", "-f", "-"], netns, stdin=render_guard_remove())
    if p.returncode != 0:
        raise NetfilterError(f"removing the link guard: nft -f failed: {(p.stderr or p.stdout).strip()}")


def guard_installed(*, netns: str | None = None) -> list[str]:
    """The interfaces the installed guard watches ([] when there is none)."""
    if shutil.which("nft") is None:
        return []
    p = _run(["nft", "list", "chain", "netdev", GUARD_TABLE, "guard"], netns)
    if p.returncode != 0:
        return []
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("type filter hook egress"):
            if " devices = {" in line:
                inner = line.split("{", 1)[1].split("}", 1)[0]
                return [d.strip().strip('"') for d in inner.split(",") if d.strip()]
            if ' device "' in line or " device " in line:
                return [line.split(" device ", 1)[1].split()[0].strip('"')]
    return []


def guard_drops(*, netns: str | None = None) -> int:
    """Frames the link guard has dropped since it was installed (its counter; 0 when absent)."""
    if shutil.which("nft") is None:
        return 0
    p = _run(["nft", "list", "chain", "netdev", GUARD_TABLE, "guard"], netns)
    for line in p.stdout.splitlines() if p.returncode == 0 else ():
        words = line.split()
        if words[-1:] == ["drop"] and "counter" in words:
            i = words.index("counter")
            if words[i + 1 : i + 2] == ["packets"]:
                return int(words[i + 2])
    return 0


def _read_proc(path: str, netns: str | None) -> str:
    if netns:
        p = _run(["cat", path], netns)
        return p.stdout if p.returncode == 0 else ""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


_RTF_UP: Final = 0x0001
_RTF_REJECT: Final = 0x0200


def uplinks(*, netns: str | None = None) -> list[str]:
    """The interfaces of the main table's default routes, IPv4 and IPv6, sorted.

    What the guard protects unless told otherwise: the way out. Read from /proc/net (the
    caller's namespace), no subprocess, so the daemon can re-check it every few seconds.
    Unreachable/blackhole defaults (RTF_REJECT, or on lo) lead nowhere and are skipped.
    """
    out: set[str] = set()
    for line in _read_proc("/proc/net/route", netns).splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000":
            flags = int(f[3], 16)
            if flags & _RTF_UP and not flags & _RTF_REJECT and f[0] != "lo":
                out.add(f[0])
    for line in _read_proc("/proc/net/ipv6_route", netns).splitlines():
        f = line.split()
        if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00":
            flags = int(f[8], 16)
            if flags & _RTF_UP and not flags & _RTF_REJECT and f[9] != "lo":
                out.add(f[9])
    return sorted(out)


# -- the API the daemon and the CLI use ---------------------------------------------------
# -- kernel sets (ipset) for the compiled policy (egressd.kernelsets) ------------------------
def ipset_available() -> bool:
    return shutil.which("ipset") is not None


CAP_NET_RAW: Final = 13


def sets_usable(status: str | None = None) -> bool:
    """Can this process install rules with ``-m set``? ipset itself needs CAP_NET_ADMIN, but
    iptables' set match (libxt_set) opens a raw socket to look the set up: CAP_NET_RAW, which
    the unprivileged service does not hold (measured: "Can't open socket to ipset"). Without
    it the compiled policy is rendered as plain ``-d``/``-s`` rules and names stay in Python."""
    return ipset_available() and has_capability(CAP_NET_RAW, status)


def _ipset(args: Sequence[str], netns: str | None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return _run(["ipset", *args], netns, stdin=stdin)


def our_sets(*, netns: str | None = None) -> list[str]:
    """The ipset sets egressd made (every name with the kernelsets prefix), [] without ipset."""
    from egressd.kernelsets import SET_PREFIX

    if not ipset_available():
        return []
    p = _ipset(["list", "-n"], netns)
    k = len(SET_PREFIX)
    return [n for n in p.stdout.split() if n.startswith(SET_PREFIX) and n[k : k + 1].isdigit()]


def next_generation(*, netns: str | None = None) -> int:
    """A set generation not in use: the sets of a new compiled policy are built beside the old."""
    from egressd.kernelsets import SET_PREFIX

    gens = {int(n[len(SET_PREFIX) :].split("-", 1)[0]) for n in our_sets(netns=netns)}
    return max(gens, default=0) % 9999 + 1


def create_sets(lines: Sequence[str], *, netns: str | None = None) -> None:
    """Create and fill sets in one ``ipset restore`` (a set that exists is an error: names are new)."""
    if not lines:
        return
    if not ipset_available():
        raise NetfilterError("ipset not found (apt install ipset): the compiled policy needs it")
    text = "\n".join(lines) + "\n"
    _check(_ipset(["restore"], netns, stdin=text), "ipset restore", stdin=text)


def destroy_sets(names: Sequence[str], *, netns: str | None = None) -> None:
    """Destroy sets no rule refers to any more (best effort: one in use stays, and says so)."""
    errors = []
    for n in names:
        p = _ipset(["destroy", n], netns)
        if p.returncode != 0 and "does not exist" not in p.stderr:
            errors.append(f"{n}: {p.stderr.strip()}")
    if errors:
        raise NetfilterError("ipset destroy: " + "; ".join(errors))


def add_learned(lines: Sequence[str], *, netns: str | None = None) -> None:
    """``add <set> <ip> timeout <s>`` lines in one ``ipset restore -exist`` (refreshes the timeout)."""
    if lines:
        text = "\n".join(lines) + "\n"
        _check(_ipset(["restore", "-exist"], netns, stdin=text), "ipset restore -exist", stdin=text)


def _stale_policy_chains(tables: dict[str, TableState]) -> list[str]:
    st = tables.get("filter")
    return [c for c in st.chains if c.startswith(CHAIN_POLICY + "-")] if st is not None else []


def install(
    queue_num: int,
    *,
    fail_open: bool,
    max_packets: int,
    ipv6: bool = True,
    forward_ifaces: Sequence[str] = (),
    judge_invalid: bool = True,
    netns: str | None = None,
    policy: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
    sets: Sequence[str] = (),
    queue_syn: bool | None = None,
    log_closes: int | None = None,
) -> None:
    """Install (or replace) egressd's rules for IPv4 and, unless ``ipv6=False``, IPv6.

    Each family is one ``iptables-restore`` transaction per table, so a half-written rule
    set cannot happen within a family; if IPv6 fails after IPv4 succeeded, IPv4 is removed
    again and the error raised. ``netns`` runs every command inside that named namespace.
    """
    cfg = RuleConfig(
        queue_num=queue_num,
        fail_open=fail_open,
        max_packets=max_packets,
        ipv6=ipv6,
        forward_ifaces=tuple(forward_ifaces),
        judge_invalid=judge_invalid,
        policy4=policy[0],
        policy6=policy[1],
        queue_syn=not fail_open if queue_syn is None else queue_syn,
        log_closes=log_closes,
    )
    with contextlib.suppress(NetfilterError):
        ensure_conntrack_accounting(netns)  # nf_conntrack may not be loaded yet; checked again below
    families = (4, 6) if ipv6 else (4,)
    try:
        for fam in families:
            saved = _save(fam, netns)
            _restore(fam, render(cfg, fam, present_jumps(saved), _stale_policy_chains(saved)), netns)
        if not ipv6:
            _remove_family(6, netns)  # a previous install may have had IPv6
        ensure_conntrack_accounting(netns)
        # The new rules refer only to ``sets``: the previous generation goes now.
        with contextlib.suppress(NetfilterError):
            destroy_sets([n for n in our_sets(netns=netns) if n not in set(sets)], netns=netns)
    except NetfilterError:
        with contextlib.suppress(NetfilterError):
            remove(netns=netns)
        raise


def _remove_family(family: int, netns: str | None) -> None:
    if shutil.which(_tool(family, "-save")) is None:
        return
    script = render_remove(_save(family, netns))
    if script:
        _restore(family, script, netns)
    _drop_empty_tables(family, netns)


def remove(*, netns: str | None = None) -> None:
    """Delete egressd's jumps and chains (both families), the link guard, and nothing else. Idempotent."""
    errors: list[str] = []
    for fam in (4, 6):
        try:
            _remove_family(fam, netns)
        except NetfilterError as e:
            errors.append(str(e))
    try:
        destroy_sets(our_sets(netns=netns), netns=netns)
    except NetfilterError as e:
        errors.append(str(e))
    try:
        remove_guard(netns=netns)
    except NetfilterError as e:
        errors.append(str(e))
    if errors:
        raise NetfilterError("; ".join(errors))


def installed(*, netns: str | None = None) -> bool:
    """True when the IPv4 rules are in place (our chain exists and OUTPUT jumps to it)."""
    tables = _save(4, netns)
    f = tables.get("filter")
    return f is not None and CHAIN_OUT in f.chains and ("OUTPUT", f"-j {CHAIN_OUT}") in f.rules


def show(*, netns: str | None = None) -> str:
    """egressd's rules as iptables-save prints them, with packet counters, per family."""
    parts: list[str] = []
    for fam in (4, 6):
        if shutil.which(_tool(fam, "-save")) is None:
            continue
        body = ours_only(_save(fam, netns, counters=True))
        parts.append(f"# IPv{fam} ({_tool(fam)})\n" + (body or "# not installed"))
    guard = ""
    if shutil.which("nft") is not None:
        listing = [_run(["nft", "list", "table", f, GUARD_TABLE], netns) for f in ("inet", "netdev")]
        guard = "".join(p.stdout for p in listing if p.returncode == 0)
    parts.append("# link guard (nft)\n" + (guard.rstrip() or "# not installed"))
    parts.append(f"# net.netfilter.nf_conntrack_acct = {_read_sysctl(_ACCT, netns) or 'unavailable'}")
    return "\n".join(parts) + "\n"


def queue_hits(*, netns: str | None = None, families: tuple[int, ...] = (4, 6)) -> int:
    """Packets egressd's NFQUEUE rules were hit by (their counters, summed over the families).

    Hits minus what the queue accepted (id_sequence) and dropped is what a fail-open queue
    let through uninspected: the kernel counts that nowhere else (docs/architecture.md)."""
    total = 0
    for fam in families:
        if shutil.which(_tool(fam, "-save")) is None:
            continue
        for line in ours_only(_save(fam, netns, counters=True)).splitlines():
            if "-j NFQUEUE" in line and line.startswith("["):
                with contextlib.suppress(ValueError):
                    total += int(line[1:].split(":", 1)[0])
    return total


# -- CLI front (wired to `egressd rules install|remove|show`) -----------------------------
CAP_NET_ADMIN: Final = 12


def has_net_admin(status: str | None = None) -> bool:
    """CAP_NET_ADMIN in the effective set: what iptables-nft and NFQUEUE need (not uid 0).

    The systemd unit runs egressd as an unprivileged user with the capability ambient.
    """
    return has_capability(CAP_NET_ADMIN, status)


def has_capability(bit: int, status: str | None = None) -> bool:
    """Is capability ``bit`` in the effective set (``CapEff`` of /proc/self/status, or ``status``)?

    What a process may do is its capabilities, not its uid; only when the set cannot be read
    at all does uid 0 stand in for it.
    """
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return os.geteuid() == 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> bit & 1)
            except (IndexError, ValueError):
                return False
    return os.geteuid() == 0


def add_rules_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``egressd rules``: an action and the install knobs.

    ``install`` reads the policy the daemon runs (``--policy``): the head bound comes from
    its settings through ``kernel_head``, and so do the queue number and the fail mode
    unless given here, so the rules never disagree with the daemon that serves them.
    """
    p.add_argument("action", choices=("install", "remove", "show", "status"))
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="the policy the daemon runs: head bound, queue and fail mode come from it (default: the shipped one)",
    )
    p.add_argument("--queue", type=int, default=None, help="NFQUEUE number (default: the policy's settings.queue_num)")
    p.add_argument(
        "--fail-closed", action="store_true", help="drop when no daemon listens (default: the policy's 'fail')"
    )
    p.add_argument("--no-ipv6", action="store_true", help="IPv4 only")
    p.add_argument("--forward-iface", action="append", default=[], metavar="IFACE", help="container-side interface")
    p.add_argument(
        "--backend",
        choices=("iptables", "nft"),
        default="iptables",
        help="iptables, the only backend (nft is refused with the reason)",
    )
    p.add_argument("--netns", default=None, help="run inside this named network namespace")
    add_guard_arguments(p)


def add_guard_arguments(p: argparse.ArgumentParser) -> None:
    """The link guard's options, shared by ``egressd run`` and ``egressd rules install``."""
    p.add_argument(
        "--guard-iface",
        action="append",
        default=[],
        metavar="IFACE",
        help="drop IP frames that did not come through the IP layer (packet sockets) on this interface "
        "(repeatable; default: the interfaces of the default routes)",
    )
    p.add_argument("--no-guard", action="store_true", help="no link guard (packet-socket frames pass unjudged)")


NFT_REFUSED: Final = (
    "there is no nft backend: egressd writes its rules with iptables-restore, which on an "
    "nf_tables system already installs them as nftables rules (iptables-nft)"
)


def run_rules(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Do what ``add_rules_arguments`` parsed. Exit 0 done, 1 not installed (status), 2 error."""
    if args.backend == "nft":
        print(f"egressd rules: --backend nft: {NFT_REFUSED}", file=err)
        return 2
    if not has_net_admin():
        print("egressd rules: needs CAP_NET_ADMIN (root, or the service's ambient capability)", file=err)
        return 2
    try:
        if args.action == "install":
            from egressd.paths import default_policy
            from egressd.policy import PolicyError, load_policy

            try:
                policy = load_policy(Path(args.policy) if args.policy else default_policy())
            except (PolicyError, OSError) as e:
                print(f"egressd rules install: the policy does not load:\n{e}", file=err)
                return 2
            for name in args.guard_iface:
                check_iface(name)  # before anything is installed
            queue = args.queue if args.queue is not None else policy.settings.queue_num
            head = kernel_head(policy.settings)
            install(
                queue,
                fail_open=policy.fail == "open" and not args.fail_closed,
                max_packets=head,
                ipv6=not args.no_ipv6,
                forward_ifaces=args.forward_iface,
                netns=args.netns,
            )
            print(f"egressd rules installed (queue {queue}, head bound {head} packets per direction)", file=out)
            if args.no_guard:
                print("egressd link guard: off (--no-guard)", file=out)
            elif not (ifaces := list(args.guard_iface) or uplinks(netns=args.netns)):
                print("egressd link guard: no default route, nothing to guard (name one: --guard-iface)", file=err)
            else:
                try:
                    install_guard(ifaces, netns=args.netns)
                except GuardUnavailable as e:
                    if args.guard_iface:
                        with contextlib.suppress(NetfilterError):
                            remove(netns=args.netns)
                        raise
                    print(f"egressd link guard: not installed: {e}", file=err)
                else:
                    print(f"egressd link guard on {', '.join(ifaces)}", file=out)
        elif args.action == "remove":
            remove(netns=args.netns)
            print("egressd rules removed", file=out)
        elif args.action == "show":
            out.write(show(netns=args.netns))
        else:
            ok = installed(netns=args.netns)
            print("installed" if ok else "not installed", file=out)
            return 0 if ok else 1
    except (NetfilterError, ValueError) as e:
        print(f"egressd rules {args.action}: {e}", file=err)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m egressd.netfilter", description="egressd's kernel rules")
    add_rules_arguments(p)
    return run_rules(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
