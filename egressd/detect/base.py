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
    detectors can be run again on what is inside.
    """

    kind: str
    evidence: str
    confidence: float = 1.0
    info: dict[str, str] = field(default_factory=dict)
    refine: bool = False
    inner_fwd: int = -1
    inner_rev: int = -1


Result = Detection | Outcome

# Detection kinds used across the project (policy files name these).
SSH: Final = "ssh"
SSH_REVERSE: Final = "ssh.reverse"
# What an SSH session is used for, from its encrypted packet sizes (detect/ssh_usage.py).
SSH_FORWARD_REMOTE: Final = "ssh.forward.remote"  # ssh -R: tcpip-forward, server-opened channels
SSH_FORWARD_LOCAL: Final = "ssh.forward.local"  # ssh -L / -W: direct-tcpip channels
SSH_FORWARD_DYNAMIC: Final = "ssh.forward.dynamic"  # ssh -D (on the wire as -L: either name is right)
SSH_FORWARD_TUN: Final = "ssh.forward.tun"  # ssh -w: tun@openssh.com channels
MINING_STRATUM: Final = "mining.stratum"  # Stratum v1 client (mining.subscribe/authorize/...)
MINING_ETH: Final = "mining.eth-stratum"  # EthereumStratum / eth_submitLogin / eth_getWork
MINING_XMR: Final = "mining.xmr"  # CryptoNote / XMRig "login" JSON-RPC
MINING_GETWORK: Final = "mining.getwork"  # getwork / getblocktemplate in an HTTP POST
MINING_POOL: Final = "mining.pool"  # the pool's side: mining.notify, set_difficulty, job blobs
MINING_POOL_DOMAIN: Final = "mining.pool-domain"  # TLS SNI or DNS query for a pool domain
TLS: Final = "tls"
DNS: Final = "dns"
PROXY_CONNECT: Final = "proxy.http-connect"
PROXY_SOCKS: Final = "proxy.socks"
STREAM_INCONSISTENT: Final = "evasion.inconsistent-retransmission"
FRAGMENT_OVERLAP: Final = "evasion.fragment-overlap"
TUNNEL_WIREGUARD: Final = "tunnel.wireguard"  # handshake initiation/response
TUNNEL_IKE: Final = "tunnel.ike"  # IPsec key exchange (IKEv1/IKEv2)
TUNNEL_OPENVPN: Final = "tunnel.openvpn"  # OpenVPN over TCP, hard-reset handshake


def kind_matches(pattern: str, kind: str) -> bool:
    """``mining`` matches ``mining`` and ``mining.xmr``, but not ``miningfoo``."""
    return kind == pattern or (kind.startswith(pattern) and kind[len(pattern)] == ".")


_PRINTABLE = bytes(range(0x20, 0x7F))


def printable(data: bytes, limit: int = 96) -> str:
    """Bytes as a short ASCII string for evidence: printable kept, the rest as \\xNN."""
    out = []
    for b in data[:limit]:
        if b in _PRINTABLE and b != 0x5C:
            out.append(chr(b))
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x0D:
            out.append("\\r")
        else:
            out.append(f"\\x{b:02x}")
    if len(data) > limit:
        out.append("...")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What a TCP stream detector may know besides the bytes.

    ``fwd`` is always originator -> responder. ``fwd_closed``/``rev_closed`` say that
    direction has ended (FIN/RST seen), so NEED_MORE can no longer be satisfied there.
    ``fwd_full``/``rev_full`` say the head buffer reached its cap: nothing more will come.
    """

    sport: int
    dport: int
    fwd_closed: bool = False
    rev_closed: bool = False
    fwd_full: bool = False
    rev_full: bool = False


StreamDetector = Callable[[bytes, bytes, StreamContext], Result]
"""``detect_x(fwd, rev, ctx)``: fwd = originator's head bytes, rev = responder's."""
