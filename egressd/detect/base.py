"""The contract every detector keeps: *need more bytes* / *not this protocol* / *detection*.

Why three outcomes and not a bool: a detector looks at the reassembled head of a flow while
it is still arriving. "Not enough yet" is the normal state of a streaming parser (a banner
split over three segments), and the engine must be able to tell it apart from "this is
certainly not my protocol", which lets it stop calling the detector and, once every
detector has given up, pin the verdict in the kernel so the rest of the flow never reaches
Python. Detectors never raise on hostile input: malformed bytes are NOT_THIS (or a
detection, when the malformation itself is the evidence).

Detection kinds are dotted names; a policy rule that matches ``mining`` matches
``mining.stratum``, ``mining.xmr`` and so on (see :func:`kind_matches`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# Detection kinds live in one registry (egressd.detect.kinds); re-exported for the detectors.
from egressd.detect.kinds import (
    DNS,
    EVASION_SSH_CLIENT_PREAMBLE,
    EVASION_SSH_LONG_BANNER,
    EVASION_SSH_MALFORMED,
    FRAGMENT_OVERLAP,
    MINING_ETH,
    MINING_GETWORK,
    MINING_POOL,
    MINING_POOL_DOMAIN,
    MINING_STRATUM,
    MINING_XMR,
    PROXY_CONNECT,
    PROXY_SOCKS,
    RPC_JSONRPC,
    SSH,
    SSH_FORWARD_DYNAMIC,
    SSH_FORWARD_LOCAL,
    SSH_FORWARD_REMOTE,
    SSH_FORWARD_TUN,
    SSH_REVERSE,
    STREAM_INCONSISTENT,
    TLS,
    TUNNEL_BORE,
    TUNNEL_DNS,
    TUNNEL_FRP,
    TUNNEL_GOST,
    TUNNEL_GRE,
    TUNNEL_HTTP,
    TUNNEL_ICMP,
    TUNNEL_IKE,
    TUNNEL_IP_IN_IP,
    TUNNEL_IPSEC,
    TUNNEL_NEBULA,
    TUNNEL_OPENVPN,
    TUNNEL_PPTP,
    TUNNEL_RATHOLE,
    TUNNEL_REVERSE_HTTP,
    TUNNEL_SERVICE_DOMAIN,
    TUNNEL_TEREDO,
    TUNNEL_TINC,
    TUNNEL_TOR,
    TUNNEL_UNKNOWN_ENCRYPTED,
    TUNNEL_VTUN,
    TUNNEL_WEBSOCKET,
    TUNNEL_WIREGUARD,
    TUNNEL_YGGDRASIL,
    kind_matches,
)


class Outcome(enum.Enum):
    """The two non-detection outcomes. Identity-compared, never allocated per call."""

    NEED_MORE = "need-more"
    NOT_THIS = "not-this"


NEED_MORE: Final = Outcome.NEED_MORE
NOT_THIS: Final = Outcome.NOT_THIS


@dataclass(frozen=True, slots=True)
class Detection:
    """What a detector found, with the evidence a security engineer needs to trust it.

    ``evidence`` is short, printable and safe to log (detectors escape raw bytes with
    :func:`printable`); ``info`` carries protocol facts (SNI, client software, HASSH,
    CONNECT target ...) that the engine and the event log use. ``refine`` says the detector
    may still upgrade this finding if it sees more bytes (an SSH banner now, a role
    inversion from the KEX messages later), so the engine keeps feeding it.
    ``inner_fwd``/``inner_rev`` are set by wrapper protocols (HTTP CONNECT, SOCKS): the
    offsets in each direction's head where the tunnelled stream begins, so the other
    detectors can be run again on what is inside. ``anomalies`` are further findings of
    other kinds made on the way (``evasion.*``: a padded banner, a malformed packet); the
    engine records each as a finding of its own, so a policy can match it.
    """

    kind: str
    evidence: str
    confidence: float = 1.0
    info: dict[str, str] = field(default_factory=dict)
    refine: bool = False
    inner_fwd: int = -1
    inner_rev: int = -1
    anomalies: tuple[Detection, ...] = ()


Result = Detection | Outcome


# Every byte's evidence form, and the bytes that stand for themselves (printable ASCII but
# the backslash, which would make an escape ambiguous). Evidence is written for every finding
# and often for every candidate message (stratum, TLS): the common all-printable case is one
# ``translate`` scan and one ``decode`` in C instead of a Python step per byte.
_ESCAPED: Final = tuple(
    chr(b) if 0x20 <= b < 0x7F and b != 0x5C else "\\n" if b == 0x0A else "\\r" if b == 0x0D else f"\\x{b:02x}"
    for b in range(256)
)
_PLAIN: Final = bytes(b for b in range(0x20, 0x7F) if b != 0x5C)


def printable(data: bytes, limit: int = 96) -> str:
    """Bytes as a short ASCII string for evidence: printable kept, the rest as \\xNN."""
    head = data[:limit]
    plain = not head.translate(None, _PLAIN)
    text = head.decode("ascii") if plain else "".join([_ESCAPED[b] for b in head])
    return text + "..." if len(data) > limit else text


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What a TCP stream detector may know besides the bytes.

    ``fwd`` is always originator -> responder. ``fwd_closed``/``rev_closed`` say that
    direction has ended (FIN/RST seen), so NEED_MORE can no longer be satisfied there.
    ``fwd_full``/``rev_full`` say the head buffer reached its cap: nothing more will come.
    ``head`` is that cap, the policy's ``head_bytes``: the one byte limit every detector uses
    (a detector with a limit of its own would wait for bytes that can never come, or give
    up on bytes the head holds).
    """

    sport: int
    dport: int
    fwd_closed: bool = False
    rev_closed: bool = False
    fwd_full: bool = False
    rev_full: bool = False
    head: int = 8192  # the default head_bytes (egressd.policy.model.Settings)


StreamDetector = Callable[[bytes, bytes, StreamContext], Result]
"""``detect_x(fwd, rev, ctx)``: fwd = originator's head bytes, rev = responder's."""

__all__ = [
    "DNS",
    "EVASION_SSH_CLIENT_PREAMBLE",
    "EVASION_SSH_LONG_BANNER",
    "EVASION_SSH_MALFORMED",
    "FRAGMENT_OVERLAP",
    "MINING_ETH",
    "MINING_GETWORK",
    "MINING_POOL",
    "MINING_POOL_DOMAIN",
    "MINING_STRATUM",
    "MINING_XMR",
    "NEED_MORE",
    "NOT_THIS",
    "PROXY_CONNECT",
    "PROXY_SOCKS",
    "RPC_JSONRPC",
    "SSH",
    "SSH_FORWARD_DYNAMIC",
    "SSH_FORWARD_LOCAL",
    "SSH_FORWARD_REMOTE",
    "SSH_FORWARD_TUN",
    "SSH_REVERSE",
    "STREAM_INCONSISTENT",
    "TLS",
    "TUNNEL_BORE",
    "TUNNEL_DNS",
    "TUNNEL_FRP",
    "TUNNEL_GOST",
    "TUNNEL_GRE",
    "TUNNEL_HTTP",
    "TUNNEL_ICMP",
    "TUNNEL_IKE",
    "TUNNEL_IPSEC",
    "TUNNEL_IP_IN_IP",
    "TUNNEL_NEBULA",
    "TUNNEL_OPENVPN",
    "TUNNEL_PPTP",
    "TUNNEL_RATHOLE",
    "TUNNEL_REVERSE_HTTP",
    "TUNNEL_SERVICE_DOMAIN",
    "TUNNEL_TEREDO",
    "TUNNEL_TINC",
    "TUNNEL_TOR",
    "TUNNEL_UNKNOWN_ENCRYPTED",
    "TUNNEL_VTUN",
    "TUNNEL_WEBSOCKET",
    "TUNNEL_WIREGUARD",
    "TUNNEL_YGGDRASIL",
    "Detection",
    "Outcome",
    "Result",
    "StreamContext",
    "StreamDetector",
    "kind_matches",
    "printable",
]
