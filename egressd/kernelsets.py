"""What the policy can decide from addresses alone, compiled into the kernel (ipset + ``-m set``).

Why: a connection the policy decides by its addresses and ports (a trusted registry, a
blocklist, a pool address a DNS answer just named) need not wait for Python at all. Its SYN is
decided by one chain of rules, EGRESSD-POLICY, walked once per new connection: an accept sets
the connmark to ALLOW (the kernel's fast path from then on, nothing is ever queued), a drop to
DENY (the SYN is reset at once, as a daemon's drop would be).

What may be compiled (and nothing else, or the kernel would decide differently from the
engine). The engine asks the policy again whenever it learns something (a detection, a TLS
SNI, a CONNECT host), and the first rule that matches decides. So a rule R may be compiled
only where no rule before it could ever match the same connection *on facts the kernel does
not have*. Walking the rules in order:

* a **static** rule (its match and its ``not`` blocks use only protocol, addresses and ports)
  with action accept or drop is compiled when it is disjoint from every *shadow* before it;
* a **name** rule (``dst_domain`` plus static conditions) is compiled the same way, into a
  set of the addresses DNS answers gave for its names (with the answer's TTL); its own space
  then becomes a shadow too, because a TLS SNI or CONNECT host can still bring its names to a
  flow the kernel let through;
* every other rule (detections, content, ``alert``, a drop in ``mode: monitor``) is a shadow.

"Disjoint" is decided on the positive conditions only (protocols, port ranges, CIDR ranges):
ignoring ``not`` blocks can only make a space look larger, so the test errs towards not
compiling. The default is compiled only when there is no shadow at all. ``Plan.decide`` is the
kernel's decision as a pure function, so tests hold it against the engine's own decisions on
real captures (tests/test_kernelsets.py).

Kernel sets are named ``egd<generation>-...``: a reload builds the next generation beside the
running one, swaps the chain in one ``iptables-restore`` transaction, then destroys the old
sets, so no packet ever sees half a policy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from egressd.policy.matchers import CidrSet, Match, PortSet
from egressd.policy.model import FlowFacts
from egressd.protocols import PORT_PROTOS

if TYPE_CHECKING:
    from egressd.policy import Policy

SET_PREFIX: Final = "egd"
DEFAULT_INDEX: Final = 99999  # the NFLOG prefix index of a compiled default drop
CHAIN_POLICY: Final = "EGRESSD-POLICY"
DNS_SET_MAX: Final = 65536  # addresses per name rule and family; a full set refuses, the engine still judges
DNS_TIMEOUT_MAX: Final = 86_400
_ALL_PROTOS: Final = frozenset(range(256))
_PROTO_NAMES: Final = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp", 136: "udplite"}


@dataclass(frozen=True)
class Entry:
    """One compiled rule: where it sits in the policy and what the kernel does on a match."""

    index: int  # position in policy.rules
    rule: str
    action: str  # "accept" | "drop"
    match: Match
    by_name: bool  # a name rule: the kernel matches the DNS-learned addresses of its names


@dataclass
class Plan:
    """The compiled part of one policy, in policy order."""

    entries: list[Entry] = field(default_factory=list)
    default: str | None = None  # compiled default action, when no rule shadows anything
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rule, why it stays in Python)

    @property
    def name_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.by_name]

    def decide(
        self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, names: tuple[str, ...] = ()
    ) -> tuple[str, str] | None:
        """(action, rule) the kernel gives a new connection (originator first), or None when
        it goes to the queue. ``names``: what the DNS-learned sets hold for ``dst``."""
        version = 4 if len(src) == 4 else 6
        for e in self.entries:
            facts = FlowFacts(proto, version, src, dst, sport, dport, names if e.by_name else ())
            if e.match.test(facts, int.from_bytes(src, "big"), int.from_bytes(dst, "big")):
                return e.action, e.rule
        if self.default is not None:
            return self.default, "default"
        return None


def _is_static(m: Match, *, allow_names: bool = False, depth: int = 0) -> bool:
    if m.kinds is not None or m.content is not None:
        return False
    if m.domains is not None and not allow_names:
        return False
    if m.nots and depth > 0:
        return False  # a not inside a not: not rendered, stays in Python
    return all(_is_static(n, depth=depth + 1) for n in m.nots)


def _protos(m: Match) -> frozenset[int]:
    p = m.protos if m.protos is not None else _ALL_PROTOS
    if m.dst_ports is not None or m.src_ports is not None:
        p = p & PORT_PROTOS
    return p


def _ranges_meet(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def _cidr_ranges(c: CidrSet, version: int) -> tuple[tuple[int, int], ...]:
    return tuple((int(n.network_address), int(n.broadcast_address)) for n in c.networks if n.version == version)


def _cidrs_meet(a: CidrSet | None, b: CidrSet | None) -> bool:
    if a is None or b is None:
        return True
    return any(_ranges_meet(_cidr_ranges(a, v), _cidr_ranges(b, v)) for v in (4, 6))


def _ports_meet(a: PortSet | None, b: PortSet | None) -> bool:
    return a is None or b is None or _ranges_meet(a.ranges, b.ranges)


def disjoint(a: Match, b: Match) -> bool:
    """True when no flow can match both blocks' positive conditions (nots ignored)."""
    if not _protos(a) & _protos(b):
        return True
    if not _ports_meet(a.dst_ports, b.dst_ports) or not _ports_meet(a.src_ports, b.src_ports):
        return True
    return not _cidrs_meet(a.dst, b.dst) or not _cidrs_meet(a.src, b.src)


def _blind_at_first_judgement(m: Match) -> bool:
    """True when the block cannot hold on a flow's first judgement (no detection yet, content
    still pending): it needs a detection, or it looks at the content."""
    return m.kinds is not None or m.needs_content


def _harmless(action: str, shadow: Match, shadow_action: str) -> bool:
    """Can a compiled rule with ``action`` sit after this overlapping shadow?

    Only a drop can: the engine pins a drop on the judgement that makes it, so what counts is
    the flow's first judgement, where a shadow that needs a detection or the content cannot
    hold yet; one that can hold there must drop as well (the kernel's drop writes no event,
    so only the rule name would differ, and it is not seen). An accept can be overturned
    later by any overlapping shadow (a detection arrives), so it never sits after one."""
    if action != "drop":
        return False
    return _blind_at_first_judgement(shadow) or shadow_action == "drop"


# DNS in either direction (dnsnames.is_dns_port): an accept in the kernel would hide the
# answers the engine learns names from, and with them the decisions of every name rule.
_DNS_PORTS: Final = PortSet([(53, 53), (5353, 5353)])
_DNS: Final = Match(protos=frozenset({6, 17}), dst_ports=_DNS_PORTS)
_DNS_REPLY: Final = Match(protos=frozenset({6, 17}), src_ports=_DNS_PORTS)


def compile_policy(policy: Policy) -> Plan:
    """The rules the kernel can decide exactly as the engine would (see the module doc)."""
    plan = Plan()
    shadows: list[tuple[Match, str]] = []
    enforce = policy.mode == "enforce"
    for i, r in enumerate(policy.rules):
        m = r.match
        why = ""
        if r.action not in ("accept", "drop"):
            why = f"action {r.action} is recorded by the daemon"
        elif r.action == "drop" and not enforce:
            why = "mode: monitor drops nothing"
        elif not _is_static(m, allow_names=True):
            why = "needs what only the payload shows (detection or content)"
        if not why:
            hit = next((s for s, act in shadows if not disjoint(m, s) and not _harmless(r.action, s, act)), None)
            if hit is not None:
                why = "an earlier rule that needs the payload may match the same connections"
        if why:
            plan.skipped.append((r.name, why))
            shadows.append((m, r.action))
            continue
        by_name = m.domains is not None
        km = m
        if r.action == "accept" and not (disjoint(m, _DNS) and disjoint(m, _DNS_REPLY)):
            # DNS stays with the engine, which must read the answers (the names later rules
            # and later flows are judged by); it decides those flows by this same rule.
            km = Match(
                protos=m.protos,
                src=m.src,
                dst=m.dst,
                src_ports=m.src_ports,
                dst_ports=m.dst_ports,
                domains=m.domains,
                nots=(*m.nots, _DNS, _DNS_REPLY),
            )
        plan.entries.append(Entry(i, r.name, r.action, km, by_name))
        if by_name:
            shadows.append((m, r.action))
    if not shadows and policy.default == "accept":
        # Every flow but DNS (the engine must read the answers: see the accept rules above).
        catch = Match(nots=(_DNS, _DNS_REPLY))
        plan.entries.append(Entry(len(policy.rules), "default", "accept", catch, False))
    elif not shadows and policy.default == "drop" and enforce:
        plan.default = policy.default
    return plan


# -- rendering ---------------------------------------------------------------------------
def set_name(gen: int, index: int, what: str, family: int) -> str:
    """``egd<gen>-<rule index><what><family>``: what is d (dst), s (src) or n (DNS-learned)."""
    return f"{SET_PREFIX}{gen}-{index}{what}{family}"


def _nets(c: CidrSet, family: int) -> list[str]:
    return [str(n) for n in c.networks if n.version == family]


def _port_chunks(p: PortSet) -> list[str]:
    """``multiport`` takes at most 15 ports, a range counting as two."""
    items = [f"{lo}:{hi}" if lo != hi else str(lo) for lo, hi in p.ranges]
    chunks: list[str] = []
    cur: list[str] = []
    weight = 0
    for it in items:
        w = 2 if ":" in it else 1
        if weight + w > 15:
            chunks.append(",".join(cur))
            cur, weight = [], 0
        cur.append(it)
        weight += w
    if cur:
        chunks.append(",".join(cur))
    return chunks


def _conditions(
    m: Match, family: int, gen: int, index: int, tag: str, use_sets: bool = True
) -> tuple[list[str], list[str]] | None:
    """(match strings, ipset creation lines) expanding one block over protocols and port
    chunks; None when the block cannot hold in this family (no CIDR of this family).
    Without ``use_sets`` each network is a ``-d``/``-s`` of its own line (no ipset)."""
    sets: list[str] = []
    addr_parts: list[str] = [""]
    for what, cidrs, flag in (("d", m.dst, "dst"), ("s", m.src, "src")):
        if cidrs is None:
            continue
        nets = _nets(cidrs, family)
        if not nets:
            return None
        if not use_sets:
            opt = "-d" if flag == "dst" else "-s"
            addr_parts = [f"{a} {opt} {n}".strip() for a in addr_parts for n in nets]
            continue
        name = set_name(gen, index, tag + what, family)
        fam = "inet" if family == 4 else "inet6"
        sets.append(f"create {name} hash:net family {fam} maxelem {max(len(nets), 1)}")
        sets += [f"add {name} {n}" for n in nets]
        addr_parts = [f"{a} -m set --match-set {name} {flag}".strip() for a in addr_parts]
    protos: list[str | None]
    if m.protos is None and m.dst_ports is None and m.src_ports is None:
        protos = [None]
    else:
        other_icmp = 58 if family == 4 else 1  # ICMP of the other family never matches here
        protos = [_PROTO_NAMES.get(p, str(p)) for p in sorted(_protos(m)) if p != other_icmp]
        if not protos:
            return None
    out: list[str] = []
    for proto in protos:
        base = f"-p {proto}" if proto is not None else ""
        port_opts: list[str] = [""]
        if m.dst_ports is not None or m.src_ports is not None:
            port_opts = []
            dchunks = _port_chunks(m.dst_ports) if m.dst_ports is not None else [""]
            schunks = _port_chunks(m.src_ports) if m.src_ports is not None else [""]
            for dc in dchunks:
                for sc in schunks:
                    opt = "-m multiport"
                    opt += f" --dports {dc}" if dc else ""
                    opt += f" --sports {sc}" if sc else ""
                    port_opts.append(opt)
        out += [" ".join(x for x in (base, po, tail) if x) for po in port_opts for tail in addr_parts]
    return out, sets


@dataclass
class Rendered:
    """What installing a plan in one family takes: ipset lines, then the POLICY chain's rules."""

    ipset: list[str]
    rules: list[str]
    sets: list[str]  # every set name the rules use


def render(
    plan: Plan,
    family: int,
    gen: int,
    *,
    state_mask: int,
    allow: int,
    deny: int,
    deny_chain: str,
    log_group: int | None = None,
    use_sets: bool = True,
) -> Rendered:
    """The POLICY chain for ``family``: one line per (rule, protocol, port chunk), in policy order.

    Every line also requires the connmark state to be still unset, so the first rule that
    sets it is the last that acts (first match wins, as in ``Policy.judge``). A rule with
    ``not`` blocks gets a chain of its own whose first lines RETURN on each ``not``.
    """
    m_unset = f"-m connmark --mark 0x0/{state_mask:#x}"
    ipset: list[str] = []
    rules: list[str] = []
    chains: list[str] = []
    for e in plan.entries:
        target = f"--set-xmark {allow if e.action == 'accept' else deny:#x}/{state_mask:#x}"
        conds: list[str]
        if e.by_name and not use_sets:
            continue  # DNS-learned addresses need a set: the engine decides those connections
        if e.by_name:
            name = set_name(gen, e.index, "n", family)
            fam = "inet" if family == 4 else "inet6"
            ipset.append(f"create {name} hash:ip family {fam} timeout 0 maxelem {DNS_SET_MAX}")
            got = _conditions(_without_names(e.match), family, gen, e.index, "")
            if got is None:
                continue
            conds, sets = got
            ipset += sets
            conds = [f"{c} -m set --match-set {name} dst".strip() for c in conds]
        else:
            got = _conditions(e.match, family, gen, e.index, "", use_sets)
            if got is None:
                continue
            conds, sets = got
            ipset += sets
        log = e.action == "drop" and log_group is not None
        if e.match.nots or log:
            sub = f"{CHAIN_POLICY}-{e.index}"
            chains.append(sub)
            for k, n in enumerate(e.match.nots):
                got_n = _conditions(n, family, gen, e.index, f"x{k}", use_sets)
                if got_n is None:
                    continue
                ipset += got_n[1]
                rules += [f"-A {sub} {c} -j RETURN".replace("  ", " ") for c in got_n[0]]
            if log:
                rules.append(f'-A {sub} -j NFLOG --nflog-group {log_group} --nflog-prefix "egd {e.index}"')
            rules.append(f"-A {sub} -j CONNMARK {target}")
            rules += [f"-A {CHAIN_POLICY} {m_unset} {c} -j {sub}".replace("  ", " ") for c in conds]
        else:
            rules += [f"-A {CHAIN_POLICY} {m_unset} {c} -j CONNMARK {target}".replace("  ", " ") for c in conds]
    if plan.default is not None:  # only ever "drop" (a compiled accept default is an entry)
        if log_group is not None:
            rules.append(
                f'-A {CHAIN_POLICY} {m_unset} -j NFLOG --nflog-group {log_group} --nflog-prefix "egd {DEFAULT_INDEX}"'
            )
        rules.append(f"-A {CHAIN_POLICY} {m_unset} -j CONNMARK --set-xmark {deny:#x}/{state_mask:#x}")
    del deny_chain  # the caller's verdict rules send DENY there; kept in the signature for clarity
    sets = [ln.split()[1] for ln in ipset if ln.startswith("create ")]
    return Rendered(ipset, [*(f":{c} - [0:0]" for c in chains), *rules], sets)


def _without_names(m: Match) -> Match:
    return Match(protos=m.protos, src=m.src, dst=m.dst, src_ports=m.src_ports, dst_ports=m.dst_ports, nots=m.nots)


def dns_timeout(ttl: int, grace: float) -> int:
    """The kernel entry's life: the answer's TTL plus the engine's grace (dnsnames.TTL_GRACE),
    so the kernel never holds an address longer than the engine's own name cache would."""
    return max(1, min(DNS_TIMEOUT_MAX, int(max(ttl, 0) + grace)))


def address_text(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))
