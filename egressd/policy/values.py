"""Parsers for the values a policy names: networks, ports, domain patterns, protocols, kinds.

Each parser takes the text of one YAML scalar and returns either the parsed value or a plain
sentence saying what is wrong with it (never raises: the loader collects every problem of a
file before reporting). Strictness is deliberate: a policy is a security boundary, and
``10.0.0.5/8`` or ``a.*.example.com`` are far more often typos than intentions.
"""

from __future__ import annotations

import difflib
import ipaddress
from typing import Final

from egressd.detect.kinds import KINDS
from egressd.policy.matchers import IPNetwork
from egressd.policy.source import quote
from egressd.protocols import POLICY_NAMES

PROTOCOLS: Final = POLICY_NAMES  # names a policy may give ``proto`` (egressd.protocols)

_DOMAIN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


KNOWN_KINDS: Final = tuple(sorted(KINDS))  # the registry in egressd.detect.kinds
# A rule may name a kind or any dotted prefix of one ("mining" covers "mining.xmr").
KIND_PATTERNS: Final = frozenset(
    k[:i] for k in KNOWN_KINDS for i in [*(j for j, c in enumerate(k) if c == "."), len(k)]
)


def suggest(word: str, choices: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    """'; did you mean 'x'?' or '' — for unknown names."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {quote(close[0])}?" if close else ""


def parse_cidr(text: str) -> IPNetwork | str:
    value = text.strip()
    if not value:
        return "an empty address"
    if "%" in value:
        return f"{quote(value)} has a zone id (%...); zone ids are not supported in policies"
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(value, strict=False)
            return (
                f"{quote(value)} has host bits set after the prefix length; "
                f"did you mean {fixed} (the network) or {value.split('/')[0]} (one address)?"
            )
    hint = ""
    if any(c.isalpha() for c in value) and "." in value and ":" not in value:
        hint = "; to match a name use dst_domain"
    return f"{quote(value)} is not a valid IPv4/IPv6 address or CIDR network{hint}"


def _port(text: str) -> int | None:
    t = text.strip()
    if not t or len(t) > 5 or not (t.isascii() and t.isdigit()):
        return None
    return int(t)


def parse_port_range(text: str) -> tuple[int, int] | str:
    value = text.strip()
    if "-" in value[1:]:
        lo_text, _, hi_text = value.partition("-")
        lo, hi = _port(lo_text), _port(hi_text)
        if lo is None or hi is None:
            return f"{quote(value)} is not a valid port range; write it as 'first-last', e.g. 14444-14446"
        for p in (lo, hi):
            if p > 65535:
                return f"port {p} in {quote(value)} is out of range (0-65535)"
        if lo > hi:
            return f"the port range {quote(value)} is backwards: {lo} is greater than {hi}"
        return lo, hi
    port = _port(value)
    if port is None:
        return f"{quote(value)} is not a valid port; use a number 0-65535 or a range like 14444-14446"
    if port > 65535:
        return f"port {port} is out of range (0-65535)"
    return port, port


def domain_or_error(text: str) -> tuple[str | None, str]:
    """(normalised pattern, "") or (None, error sentence).

    Normalisation: lower case, trailing dot removed, non-ASCII labels converted to their
    A-label (``xn--``) form as they appear on the wire.
    """
    raw = text.strip()
    value = raw.lower()
    if value.endswith(".") and value != ".":
        value = value[:-1]
    if not value:
        return None, "an empty domain name"
    wildcard = value.startswith("*.")
    name = value[2:] if wildcard else value
    if "*" in name:
        return None, (
            f"{quote(raw)} is not a valid domain pattern: the only wildcard allowed is a leading "
            "'*.' (as in \"*.example.com\")"
        )
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None, f"{quote(raw)} is not a valid internationalised domain name"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return None, f"{quote(raw)} is an address, not a name; match addresses with dst (a cidr list)"
    if len(name) > 253:
        return None, f"{quote(raw)} is longer than the 253 characters a domain name may have"
    for label in name.split("."):
        if not label:
            return None, f"{quote(raw)} is not a valid domain name (empty label between dots)"
        if len(label) > 63:
            return None, f"{quote(raw)} has a label longer than 63 characters"
        if not set(label) <= _DOMAIN_CHARS:
            bad = next(c for c in label if c not in _DOMAIN_CHARS)
            return None, f"{quote(raw)} is not a valid domain name (character {quote(bad)} is not allowed)"
    return ("*." + name if wildcard else name), ""


def parse_kind(text: str) -> str | None:
    """The detection kind pattern, or None when it is not a known kind or prefix of one."""
    value = text.strip().lower()
    return value if value in KIND_PATTERNS else None


def parse_proto(text: str) -> int | str | None:
    """Protocol number, None for 'any', or an error sentence."""
    value = text.strip().lower()
    if value == "any":
        return None
    if value in PROTOCOLS:
        return PROTOCOLS[value]
    if value.isascii() and value.isdigit() and len(value) <= 3 and int(value) <= 255:
        return int(value)
    others = ", ".join(sorted(set(PROTOCOLS) - {"tcp", "udp", "icmp", "icmpv6"}))
    return (
        f"unknown protocol {quote(text)}; use tcp, udp, icmp, icmpv6, any, one of ({others}) "
        f"or a number 0-255{suggest(value, tuple(PROTOCOLS))}"
    )
