"""Every detection kind and family, in one registry: adding a kind is one line here.

Why one registry: a kind is named by the detector that finds it, ranked by the engine (which
finding an event shows first), rated by the event record (EVE severity and category, and
whether it makes the event an alert) and validated in policies (``detection: tunnel``).
Four lists of the same names drift apart; here a *family* (a dotted prefix) carries the
properties and a *kind* only its name and what it means.

* A new kind in an existing family: one ``kind(...)`` line below, e.g.
  ``TUNNEL_IODINE: Final = kind("tunnel.iodine", "DNS tunnel (iodine handshake)")``.
* A new family: one ``Family(...)`` line in ``FAMILIES`` (its place in the tuple is its
  rank), then its kinds.

A kind belongs to the family with the longest matching prefix (``ssh.reverse`` and
``ssh.forward`` have their own families; ``ssh.x`` falls under ``ssh``). Lookups are cached per kind string, so the
engine and the event writer pay a dict hit, not a scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Family:
    """What every kind under ``prefix`` shares."""

    prefix: str
    severity: int  # EVE alert.severity: 1 high, 2 medium, 3 low
    category: str  # EVE alert.category
    alert: bool  # a finding of this family alone makes the event an alert (not a plain flow record)
    rank: int = 0  # filled in from the position in FAMILIES: lower is shown first


_MINING: Final = "Crypto Currency Mining Activity Detected"
_PRIVACY: Final = "Potential Corporate Privacy Violation"
_EVASION: Final = "Attempted Evasion"
_POLICY: Final = "Policy Violation"

# In rank order: when a flow has several findings, the event names the first family's.
FAMILIES: Final[tuple[Family, ...]] = tuple(
    Family(f.prefix, f.severity, f.category, f.alert, rank)
    for rank, f in enumerate(
        (
            Family("mining", 1, _MINING, alert=True),
            Family("ssh.reverse", 1, _PRIVACY, alert=True),
            Family("ssh.forward", 1, _PRIVACY, alert=True),  # what the session is used for: a tunnel
            Family("evasion", 1, _EVASION, alert=True),
            Family("ssh", 2, _PRIVACY, alert=True),
            Family("tunnel", 2, _PRIVACY, alert=True),
            Family("proxy", 2, _PRIVACY, alert=True),
            Family("tls", 3, _POLICY, alert=False),  # what the flow is, not a finding
            Family("dns", 3, _POLICY, alert=False),
            Family("rpc", 3, _POLICY, alert=False),
        )
    )
)
# A kind outside every family (never registered, so only from a bug): ranked last, low.
UNKNOWN_FAMILY: Final = Family("", 3, _POLICY, alert=True, rank=len(FAMILIES))

KINDS: Final[dict[str, str]] = {}  # kind -> what it means (for docs, `egressd validate` messages)


def kind(name: str, meaning: str) -> str:
    """Register a kind (its family must exist); returns the name, for a module constant."""
    if name in KINDS:
        raise ValueError(f"detection kind {name!r} registered twice")
    if _lookup(name) is UNKNOWN_FAMILY:
        raise ValueError(f"detection kind {name!r} belongs to no family in FAMILIES")
    KINDS[name] = meaning
    return name


def kind_matches(pattern: str, name: str) -> bool:
    """``mining`` matches ``mining`` and ``mining.xmr``, but not ``miningfoo``."""
    return name == pattern or (name.startswith(pattern) and name[len(pattern)] == ".")


def _lookup(name: str) -> Family:
    best = UNKNOWN_FAMILY
    for fam in FAMILIES:
        if kind_matches(fam.prefix, name) and len(fam.prefix) > len(best.prefix):
            best = fam
    return best


_CACHE: dict[str, Family] = {}


def family_of(name: str) -> Family:
    """The family of a kind (cached: kinds are a small fixed set of strings)."""
    fam = _CACHE.get(name)
    if fam is None:
        fam = _lookup(name)
        if len(_CACHE) < 4096:  # bounded even if a bug fed it arbitrary strings
            _CACHE[name] = fam
    return fam


# -- the kinds --------------------------------------------------------------------------------
SSH: Final = kind("ssh", "an SSH session (identification line that stands, RFC 4253 §4.2)")
SSH_REVERSE: Final = kind("ssh.reverse", "SSH with the roles inverted: the originator is the SSH server")
# What an SSH session is used for, from its encrypted packet sizes (detect/ssh_usage.py).
SSH_FORWARD_REMOTE: Final = kind("ssh.forward.remote", "ssh -R: a tcpip-forward request, server-opened channels")
SSH_FORWARD_LOCAL: Final = kind("ssh.forward.local", "ssh -L / -D / -W: direct-tcpip channels the client opens")
SSH_FORWARD_DYNAMIC: Final = kind("ssh.forward.dynamic", "ssh -D (on the wire as -L: named ssh.forward.local)")
SSH_FORWARD_TUN: Final = kind("ssh.forward.tun", "ssh -w (tun@openssh.com) or a VPN bootstrapped over SSH (sshuttle)")
MINING_STRATUM: Final = kind("mining.stratum", "Stratum v1 client (mining.subscribe/authorize/...)")
MINING_ETH: Final = kind("mining.eth-stratum", "EthereumStratum / eth_submitLogin / eth_getWork")
MINING_XMR: Final = kind("mining.xmr", "CryptoNote / XMRig login JSON-RPC")
MINING_GETWORK: Final = kind("mining.getwork", "getwork / getblocktemplate in an HTTP POST")
MINING_POOL: Final = kind("mining.pool", "a pool's side: mining.notify, set_difficulty, job blobs")
MINING_POOL_DOMAIN: Final = kind("mining.pool-domain", "TLS SNI, CONNECT host or DNS query naming a pool")
TLS: Final = kind("tls", "a TLS ClientHello (SNI, ALPN)")
DNS: Final = kind("dns", "a DNS query")
RPC_JSONRPC: Final = kind("rpc.jsonrpc", "JSON-RPC read in full and found not to be mining")
PROXY_CONNECT: Final = kind("proxy.http-connect", "an HTTP CONNECT request through a proxy")
PROXY_SOCKS: Final = kind("proxy.socks", "a SOCKS 4/5 connect request")
TUNNEL_WIREGUARD: Final = kind("tunnel.wireguard", "WireGuard handshake initiation/response")
TUNNEL_IKE: Final = kind("tunnel.ike", "IPsec key exchange (IKEv1/IKEv2)")
TUNNEL_OPENVPN: Final = kind("tunnel.openvpn", "OpenVPN hard-reset handshake, over TCP or UDP")
# Tunnels that are not SSH (docs/tunnels.md says how each is told).
TUNNEL_WEBSOCKET: Final = kind(
    "tunnel.websocket", "SSH, Stratum, SOCKS, TLS or a VPN handshake inside WebSocket frames; wstunnel's upgrade"
)
TUNNEL_REVERSE_HTTP: Final = kind(
    "tunnel.reverse-http", "the far side sends HTTP requests down the node's connection (localtunnel, PageKite, relays)"
)
TUNNEL_HTTP: Final = kind(
    "tunnel.http", "TCP carried in HTTP bodies (httptunnel), a fake WebSocket upgrade (simple-obfs)"
)
TUNNEL_DNS: Final = kind(
    "tunnel.dns", "data in DNS query names (iodine, dns2tcp, dnscat2) or tunnel framing on port 53"
)
TUNNEL_ICMP: Final = kind("tunnel.icmp", "a protocol or changing data inside ICMP echo (ptunnel, hans, icmptunnel)")
TUNNEL_TINC: Final = kind("tunnel.tinc", "tinc's meta-protocol ID line, or UDP with a tinc peer")
TUNNEL_NEBULA: Final = kind("tunnel.nebula", "Nebula handshake header (stage 1)")
TUNNEL_TOR: Final = kind("tunnel.tor", "Tor link handshake (random www name, no ALPN, VERSIONS-sized first record)")
TUNNEL_PPTP: Final = kind("tunnel.pptp", "PPTP Start-Control-Connection-Request (RFC 2637)")
TUNNEL_TEREDO: Final = kind("tunnel.teredo", "IPv6 in UDP with Teredo framing (RFC 4380)")
TUNNEL_GRE: Final = kind("tunnel.gre", "GRE (IP protocol 47) with a known carried protocol")
TUNNEL_IPSEC: Final = kind("tunnel.ipsec", "IPsec ESP or AH (IP protocols 50, 51)")
TUNNEL_IP_IN_IP: Final = kind("tunnel.ip-in-ip", "IPv4 or IPv6 directly inside IP (protocols 4, 41)")
# A tunnel service recognised by the name the node asks for, whatever the protocol inside
# (rules/lists/tunnel-services.yaml, settings.tunnel_service_domains; docs/tunnels.md).
TUNNEL_SERVICE_DOMAIN: Final = kind(
    "tunnel.service-domain", "a DNS query, TLS SNI or CONNECT host naming a tunnel service (ngrok, cloudflared, ...)"
)
TUNNEL_UNKNOWN_ENCRYPTED: Final = kind(
    "tunnel.unknown-encrypted",
    "no plaintext structure either way to an unnamed destination (Shadowsocks AEAD, obfs4, VMess)",
)
# Relays that expose a node's port and small VPNs with a clear-text opening (detect/relays.py).
TUNNEL_FRP: Final = kind("tunnel.frp", "frp client: Login/work-connection messages, in yamux or not, its TLS head byte")
TUNNEL_BORE: Final = kind("tunnel.bore", "bore's NUL-delimited JSON control messages (Hello, Accept, Challenge)")
TUNNEL_VTUN: Final = kind("tunnel.vtun", "vtun's server greeting (VTUN server ver) and the client's HOST line")
TUNNEL_YGGDRASIL: Final = kind("tunnel.yggdrasil", "Yggdrasil peering link metadata ('meta', version, key)")
TUNNEL_RATHOLE: Final = kind("tunnel.rathole", "rathole's control/data channel hellos (bincode, fixed sizes)")
TUNNEL_GOST: Final = kind("tunnel.gost", "a gost relay request (version 1, command, features) parsed exactly")
STREAM_INCONSISTENT: Final = kind(
    "evasion.inconsistent-retransmission", "a retransmission overlapping earlier bytes with different content"
)
FRAGMENT_OVERLAP: Final = kind("evasion.fragment-overlap", "IP fragments that overlap with different bytes")
EVASION_SSH_LONG_BANNER: Final = kind(
    "evasion.ssh-long-banner", "an SSH identification line longer than RFC 4253's 255 bytes (padding)"
)
EVASION_SSH_MALFORMED: Final = kind(
    "evasion.ssh-malformed-packet", "binary bytes after an SSH banner that are no valid SSH packet"
)
EVASION_SSH_CLIENT_PREAMBLE: Final = kind(
    "evasion.ssh-client-preamble", "lines before the SSH client's banner (RFC 4253 allows them from servers only)"
)
