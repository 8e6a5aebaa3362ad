"""IP protocols egressd names, in one table: the number, the EVE name, the policy names.

Why one table: the decoder (``packet.py``), the event record (``proto`` in EVE JSON) and the
policy (``proto: tcp``) all name protocols, and three lists drift apart (a protocol a policy
can name but an event prints as a bare number). Adding a protocol is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Protocol:
    number: int
    eve: str  # the name an event record carries ("TCP", "IPv6-ICMP"), as Suricata writes it
    names: tuple[str, ...] = ()  # what a policy may write for it in ``proto:`` (lower case)
    ports: bool = False  # has 16-bit source and destination ports (a ``dst_port`` can match)


PROTOCOLS: Final = (
    Protocol(1, "ICMP", ("icmp",)),
    Protocol(4, "IPIP"),
    Protocol(6, "TCP", ("tcp",), ports=True),
    Protocol(17, "UDP", ("udp",), ports=True),
    Protocol(33, "DCCP", ("dccp",), ports=True),
    Protocol(41, "IPv6"),
    Protocol(47, "GRE", ("gre",)),
    Protocol(50, "ESP", ("esp",)),
    Protocol(51, "AH", ("ah",)),
    Protocol(58, "IPv6-ICMP", ("icmpv6", "ipv6-icmp")),
    Protocol(132, "SCTP", ("sctp",), ports=True),
    Protocol(136, "UDPLite", ("udplite",), ports=True),
)

# Numbers the decoder and the engine compare against (module constants: no lookup per packet).
PROTO_ICMP: Final = 1
PROTO_IPIP: Final = 4
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_IPV6_ENCAP: Final = 41
PROTO_GRE: Final = 47
PROTO_ESP: Final = 50
PROTO_AH: Final = 51
PROTO_ICMPV6: Final = 58

EVE_NAMES: Final[dict[int, str]] = {p.number: p.eve for p in PROTOCOLS}
POLICY_NAMES: Final[dict[str, int]] = {name: p.number for p in PROTOCOLS for name in p.names}
PORT_PROTOS: Final = frozenset(p.number for p in PROTOCOLS if p.ports)


def eve_name(number: int) -> str:
    """The event record's name for a protocol number (the number itself when unnamed)."""
    return EVE_NAMES.get(number) or str(number)
