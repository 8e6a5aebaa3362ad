"""``egressd learn``: recorded flows -> the default-drop policy a security engineer would write.

The only posture that stops a covert channel nobody wrote a detector for is deny-by-default,
and what keeps teams from it is the work of writing down what a node's jobs need. egressd
sees every flow with its names, so it can draft that list; a person reviews it. The draft is:

* **complete and valid**: ``default: drop``, every list and every non-accept rule of the base
  policy (the shipped default unless ``--base``) first, in order, then the learned accept
  rules. An ``alert`` rule of the base becomes ``drop``: under ``default: drop`` an alert rule
  placed before the accept rules would let through whatever it matches (a VPN handshake to
  anywhere, any connection to a mining port) — the opposite of deny-by-default;
* **by name first**: a destination is learned by the names the engine tied to it (DNS answer,
  TLS SNI, CONNECT host); an address is learned only when no flow ever named it. DNS itself
  (port 53) is learned by resolver address, the queried names being evidence, not a match;
* **conservative with wildcards**: ``*.parent`` only when at least ``wildcard_min`` distinct
  names were seen below ``parent``, and never above a registrable domain — the Public Suffix
  List (the ``publicsuffixlist`` package, which bundles the list) says where that is, private
  suffixes included, so neither ``*.com`` nor ``*.s3.amazonaws.com`` nor ``*.github.io`` is
  ever proposed. The comment on each wildcard says how many names support it;
* **never from a flow that had a mining, reverse-SSH, tunnel or evasion detection**, nor from
  one that a kept rule of the base (e.g. SSH outside ``ssh_allowed``) would drop, nor from one
  that a rule other than the default dropped when it was recorded: those are listed in a
  separate section, "would still be dropped". Nor, unless asked (``--learn-uninspected``),
  from an event of a flow the default dropped at its first packet: no detector saw its bytes
  (a node in ``mode: monitor`` with ``default: drop`` records every unlisted flow that way, a
  miner included), so record with an accept-default policy in monitor mode instead, e.g.
  ``extends: egressd:default`` and ``mode: monitor``: every flow is then inspected to the end,
  with its names and detections, and nothing is dropped either way;
* **annotated**: each item with its count of flows, first and last seen, and the processes
  and containers that used it when the events carry them (``process``, ``container``);
* **deterministic**: items sorted, no generation time, so the same inputs give the same file
  and a re-run diffs cleanly in review.

Finally the draft is loaded like any policy and every learned flow is judged by it: a flow it
would not accept is reported (and makes ``learn`` fail), so "accepts what was seen" is checked,
not assumed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from publicsuffixlist import PublicSuffixList
from yaml.nodes import MappingNode, ScalarNode

from egressd.detect.base import kind_matches
from egressd.policy import Policy, load_policy_text
from egressd.policy.merged import COMMENT_COL, flow, scalar
from egressd.policy.provenance import RuleSource, Sources
from egressd.policy.source import quote
from egressd.policy.values import domain_or_error
from egressd.protocols import PORT_PROTOS
from egressd.recorded import Flow, from_capture

# Detections that make a flow unlearnable, whatever any policy says about it.
NEVER_LEARN: Final = ("mining", "ssh.reverse", "tunnel", "evasion")
DNS_PORTS: Final = frozenset({53})
MAX_WHO: Final = 4  # processes/containers named per item; more are counted

_psl: PublicSuffixList | None = None


def registrable(name: str) -> str | None:
    """The registrable domain of ``name`` (one label below its public suffix), or None."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()  # the bundled list; no network access
    reg: str | None = _psl.privatesuffix(name)
    return reg


@dataclass(slots=True)
class Seen:
    """The evidence behind one learned item."""

    flows: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    processes: set[str] = field(default_factory=set)
    containers: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # for wildcards: the names it covers; for DNS: the queries

    def add(self, f: Flow) -> None:
        self.flows += 1
        self.first = min(self.first, f.first_ts)
        self.last = max(self.last, f.last_ts)
        p = f.process or {}
        pname = p.get("name") or os.path.basename(str(p.get("executable") or "")) or ""
        if pname:
            self.processes.add(str(pname))
        c = f.container or {}
        cname = c.get("name") or str(c.get("id") or "")[:12]
        if cname:
            self.containers.add(str(cname))

    def merge(self, o: Seen) -> None:
        self.flows += o.flows
        self.first = min(self.first, o.first)
        self.last = max(self.last, o.last)
        self.processes |= o.processes
        self.containers |= o.containers
        self.names |= o.names

    def note(self) -> str:
        def t(x: float) -> str:
            return _dt.datetime.fromtimestamp(x, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        parts = [f"{self.flows} flow{'s' if self.flows != 1 else ''}", f"{t(self.first)} .. {t(self.last)}"]
        for label, who in (("processes", self.processes), ("containers", self.containers)):
            if who:
                names = sorted(who)
                more = f" +{len(names) - MAX_WHO}" if len(names) > MAX_WHO else ""
                parts.append(f"{label}: {', '.join(names[:MAX_WHO])}{more}")
        return "; ".join(parts)


@dataclass(slots=True)
class Service:
    """What was learned for one protocol and port: names, and addresses nobody named."""

    proto: str  # "tcp", "udp", "icmp", "58" ...
    port: int | None
    names: dict[str, Seen] = field(default_factory=dict)
    addresses: dict[str, Seen] = field(default_factory=dict)
    wildcards: dict[str, Seen] = field(default_factory=dict)
    late: dict[str, str] = field(default_factory=dict)  # address -> why it is listed although named

    @property
    def slug(self) -> str:
        return f"{self.proto}_{self.port}" if self.port is not None else self.proto

    @property
    def is_dns(self) -> bool:
        return self.port in DNS_PORTS


@dataclass(slots=True)
class Proposal:
    text: str
    policy: Policy
    services: list[Service]
    learned: list[Flow]
    would_drop: list[tuple[Flow, str]]  # (flow, why)
    not_accepted: list[tuple[Flow, str]]  # learned flows the draft still would not accept (a bug if any)


def _proto_name(f: Flow) -> str:
    p = f.proto.lower()
    return {"ipv6-icmp": "icmpv6"}.get(p, p)


def _never(f: Flow) -> str | None:
    for kind in f.detections:
        for bad in NEVER_LEARN:
            if kind_matches(bad, kind):
                return f"detection {kind}"
    return None


def _guard(base: Policy, src: Sources) -> list[RuleSource]:
    """The base rules the draft keeps, in order: every rule that is not an accept."""
    compiled = {r.name: r for r in base.rules}
    return [r for r in src.rules if r.enabled and r.name in compiled and compiled[r.name].action != "accept"]


@functools.lru_cache(maxsize=65536)
def _policy_name(name: str) -> bool:
    """A name a policy can hold as it is (events are written from traffic: anything goes)."""
    return domain_or_error(name)[0] == name


def _collect(flows: Iterable[Flow]) -> list[Service]:
    services: dict[tuple[str, int | None], Service] = {}
    named_addresses: set[str] = set()
    for f in flows:
        proto = _proto_name(f)
        key = (proto, f.dest_port if f.facts().proto in PORT_PROTOS else None)
        svc = services.setdefault(key, Service(*key))
        if svc.is_dns:
            seen = svc.addresses.setdefault(f.dest_ip, Seen())
            seen.add(f)
            seen.names.update(f.domains)
            continue
        names = [n for n in f.domains if _policy_name(n)]
        if names:
            named_addresses.add(f.dest_ip)
            for name in names:
                svc.names.setdefault(name, Seen()).add(f)
        else:
            svc.addresses.setdefault(f.dest_ip, Seen()).add(f)
    for svc in services.values():
        if not svc.is_dns:
            for addr in [a for a in svc.addresses if a in named_addresses]:
                del svc.addresses[addr]  # named elsewhere: learned by its names only
    return [services[k] for k in sorted(services, key=lambda k: (k[0], -1 if k[1] is None else k[1]))]


def _wildcards(svc: Service, minimum: int) -> None:
    """Replace groups of >= ``minimum`` names below one parent by ``*.parent`` (deepest first,
    never above the registrable domain)."""
    if minimum <= 0:
        return
    below: dict[str, set[str]] = {}
    for name in svc.names:
        reg = registrable(name)
        if reg is None or name == reg:
            continue
        labels = name.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            below.setdefault(parent, set()).add(name)
            if parent == reg:
                break
    covered: set[str] = set()
    for parent in sorted(below, key=lambda p: (-p.count("."), p)):
        names = below[parent] - covered
        if len(names) >= minimum:
            seen = Seen()
            for n in sorted(names):
                seen.merge(svc.names[n])
            seen.names = set(names)
            svc.wildcards["*." + parent] = seen
            covered |= names
    for n in covered:
        del svc.names[n]


# ---------------------------------------------------------------------------------- rendering


def _safe(text: str, limit: int = 300) -> str:
    """Recorded text (process and container names, names from traffic) made fit for a YAML
    comment: events are written from what programs and peers chose, and a line break in a
    process name must not become a line of the proposed *policy*."""
    out = []
    for ch in text[:limit]:
        out.append(ch if ch.isprintable() and ch not in "\u2028\u2029\x85" else f"\\x{ord(ch):02x}")
    return "".join(out) + ("..." if len(text) > limit else "")


def _line(text: str, comment: str = "") -> str:
    return f"{text.ljust(COMMENT_COL - 1)} # {_safe(comment, 1000)}" if comment else text


def _addr_item(a: str) -> str:
    ip = ipaddress.ip_address(a)
    return f"{ip}/{ip.max_prefixlen}"


def _rule_lines(r: RuleSource, action: str, note: str) -> list[str]:
    assert isinstance(r.node, MappingNode)
    fields = {str(k.value): v for k, v in r.node.value if isinstance(k, ScalarNode)}
    out = [_line(f"  - name: {scalar(r.name)}", f"from {r.where}")]
    desc = fields.get("description")
    if isinstance(desc, ScalarNode):
        out.append(f"    description: {scalar(' '.join(str(desc.value).split()))}")
    if "match" in fields:
        out.append(f"    match: {flow(fields['match'])}")
    out.append(_line(f"    action: {action}", note))
    if r.priority:
        out.append(f"    priority: {r.priority}")
    return out


def render(
    base: Policy,
    src: Sources,
    services: list[Service],
    inputs: list[str],
    flows: int,
    would_drop: list[tuple[Flow, str]],
) -> str:
    out = [
        "# Proposed by `egressd learn`: a default-drop policy accepting what was recorded.",
        f"# Inputs ({flows} flows): {', '.join(inputs)}",
        f"# Base: {base.path} - its lists and every rule that is not an accept come first, unchanged",
        "# except that alert rules become drop (under default: drop, an alert rule before the accept",
        "# rules would let through everything it matches). REVIEW every item before enforcing:",
        "# each says how often it was seen, when, and by which processes/containers.",
        "mode: enforce",
        "default: drop",
    ]
    for key in ("fail", "on_overload", "on_error"):
        out.append(f"{key}: {getattr(base, key)}")
    if src.settings:
        out.append("settings:")
        out.extend(f"  {k}: {flow(v)}" for k, v in src.settings.items())
    out.append("lists:")
    for ls in src.lists.values():
        out.append(_line(f"  {ls.name}:", f"from {ls.where}"))
        out.append(f"    type: {ls.type}")
        if ls.description:
            out.append(f"    description: {scalar(ls.description)}")
        out.append("    items:" if ls.items else "    items: []")
        out.extend(f"      - {i.value if ls.type == 'port' else scalar(i.value)}" for i in ls.items)
    taken = set(src.lists)
    rules: list[list[str]] = []
    for svc in services:
        label = f"{svc.proto.upper()} port {svc.port}" if svc.port is not None else svc.proto.upper()
        match_base = f"proto: {svc.proto}" + (f", dst_port: {svc.port}" if svc.port is not None else "")
        if svc.names or svc.wildcards:
            lname = _unique(f"learned_{svc.slug}_names", taken)
            out.append(f"  {lname}:")
            out.append("    type: domain")
            out.append(f"    description: {scalar(f'Names seen on {label} (learned)')}")
            out.append("    items:")
            for w in sorted(svc.wildcards):
                s = svc.wildcards[w]
                why = f"wildcard: {len(s.names)} distinct names below {w[2:]}: {', '.join(sorted(s.names)[:3])}"
                why += "..." if len(s.names) > 3 else ""
                out.append(_line(f"      - {scalar(w)}", f"{why}; {s.note()}"))
            for n in sorted(svc.names):
                out.append(_line(f"      - {scalar(n)}", svc.names[n].note()))
            rules.append(_accept(f"accept-learned-{svc.slug.replace('_', '-')}-names", label, "names",
                                 f"{{{match_base}, dst_domain: ${lname}}}"))  # fmt: skip
        if svc.addresses:
            lname = _unique(f"learned_{svc.slug}_addresses", taken)
            what = "DNS resolvers" if svc.is_dns else "Addresses never seen with a name"
            out.append(f"  {lname}:")
            out.append("    type: cidr")
            out.append(f"    description: {scalar(f'{what}, {label} (learned)')}")
            out.append("    items:")
            for a in sorted(svc.addresses, key=lambda a: ipaddress.ip_address(a).packed.rjust(16, b"\0")):
                s = svc.addresses[a]
                note = s.note()
                if a in svc.late:
                    note = f"{svc.late[a]}; {note}"
                if svc.is_dns and s.names:
                    q = sorted(s.names)
                    note += f"; {len(q)} names asked: {', '.join(q[:3])}" + ("..." if len(q) > 3 else "")
                out.append(_line(f"      - {scalar(_addr_item(a))}", note))
            rules.append(_accept(f"accept-learned-{svc.slug.replace('_', '-')}-addresses", label, "addresses",
                                 f"{{{match_base}, dst: ${lname}}}"))  # fmt: skip
    out.append("rules:")
    for r in _guard(base, src):
        compiled = base.rule(r.name)
        assert compiled is not None
        note = "was alert in the base; drop under default: drop" if compiled.action == "alert" else ""
        out.extend(_rule_lines(r, "drop", note))
    for lines in rules:
        out.extend(lines)
    out.append("")
    out.append(f"# Would still be dropped ({len(would_drop)} recorded flow(s), never learned):")
    for f, why in sorted(would_drop, key=lambda x: (x[0].dest_ip, x[0].dest_port, x[0].proto, x[0].source)):
        names = f" {','.join(f.domains)}" if f.domains else ""
        out.append(_safe(f"#   {f.label()}{names}: {why} ({f.source})", 1000))
    return "\n".join(out) + "\n"


def _accept(name: str, label: str, by: str, match: str) -> list[str]:
    return [
        f"  - name: {name}",
        f"    description: {scalar(f'{label} to the {by} recorded by egressd learn')}",
        f"    match: {match}",
        "    action: accept",
    ]


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}_{n}", n + 1
    taken.add(out)
    return out


# ---------------------------------------------------------------------------------- entry point


def learn(
    flows: list[Flow],
    base: Policy,
    src: Sources,
    inputs: list[str],
    out_path: str,
    wildcard_min: int = 3,
    learn_uninspected: bool = False,
) -> Proposal:
    """Draft the policy from ``flows`` (captures replayed under ``base``, and/or event logs)."""
    guard = _guard_policy(base, src)
    learned: list[Flow] = []
    would_drop: list[tuple[Flow, str]] = []
    for f in flows:
        why = _never(f)
        if why is None and f.reason == "overload":
            why = "never inspected (judged by on_overload: the flow table was full when recorded)"
        if why is None and f.uninspected and not f.complete and not learn_uninspected:
            why = "never inspected (dropped by the default at its first packet when recorded)"
        if why is None and f.blocked and f.rule != "default":
            why = f"dropped by rule {f.rule} when recorded"
        if why is None:
            dec = guard.judge(f.facts())
            if dec.action != "accept":
                why = f"rule {dec.rule} of the base drops it"
        if why is not None:
            would_drop.append((f, why))
        else:
            learned.append(f)
    services = _collect(learned)
    for svc in services:
        _wildcards(svc, wildcard_min)
    text = render(base, src, services, inputs, len(flows), would_drop)
    policy = load_policy_text(text, out_path)  # raises PolicyError: a draft that does not load is a bug
    # A learned flow the draft still drops by its default: it reached an address by no name
    # the policy could know at its first packet (a name seen only later in the flow, from the
    # TLS SNI or a CONNECT host, or none at all where other flows named the address). Its
    # address is added, and the draft says why next to it.
    fallback = [f for f, _, rule in _verdicts(learned, policy) if rule == "default"]
    if fallback:
        by_key = {(s.proto, s.port): s for s in services}
        for f in fallback:
            svc = by_key[(_proto_name(f), f.dest_port if f.facts().proto in PORT_PROTOS else None)]
            svc.addresses.setdefault(f.dest_ip, Seen()).add(f)
            if f.domains:
                svc.late[f.dest_ip] = f"named {', '.join(f.domains)} only after the first packet (no DNS answer seen)"
            else:
                svc.late.setdefault(f.dest_ip, "also reached without a name (no DNS answer seen)")
        text = render(base, src, services, inputs, len(flows), would_drop)
        policy = load_policy_text(text, out_path)
    not_accepted = [(f, f"{v} by {r}") for f, v, r in _verdicts(learned, policy)]
    return Proposal(text, policy, services, learned, would_drop, not_accepted)


def _verdicts(learned: list[Flow], policy: Policy) -> list[tuple[Flow, str, str]]:
    """(flow, verdict, rule) of each learned flow the draft would not accept: replayed when
    it came from a capture (exactly what the engine does, names arriving when they arrive),
    judged on its recorded facts when it came from an event log."""
    again: dict[tuple[str, str, int, str, int], Flow] = {}
    for cap in sorted({f.source for f in learned if f.complete}):
        for r in from_capture(cap, policy):
            again[(cap, r.proto, r.src_port, r.dest_ip, r.dest_port)] = r
    bad = []
    for f in learned:
        g = again.get((f.source, f.proto, f.src_port, f.dest_ip, f.dest_port)) if f.complete else None
        if g is not None:
            verdict, rule = g.verdict, g.rule
        else:
            dec = policy.judge(f.facts())
            verdict, rule = dec.action, dec.rule
        if verdict != "accept":
            bad.append((f, verdict, rule))
    return bad


def _guard_policy(base: Policy, src: Sources) -> Policy:
    """The kept rules of the base (alerts as drops) over ``default: accept``: what the draft
    will drop whatever is learned. Built as text and loaded like any policy, so the guard and
    the draft can never disagree on what a rule means."""
    lines = ["default: accept"]
    if src.settings:
        lines.append("settings:")
        lines.extend(f"  {k}: {flow(v)}" for k, v in src.settings.items())
    lines.append("lists:")
    for ls in src.lists.values():
        lines.append(f"  {ls.name}:\n    type: {ls.type}\n    items:" + ("" if ls.items else " []"))
        lines.extend(f"      - {scalar(i.value)}" for i in ls.items)
    lines.append("rules:")
    for r in _guard(base, src):
        lines.extend(_rule_lines(r, "drop", ""))
    return load_policy_text("\n".join(lines) + "\n", f"<guard from {quote(base.path)}>")
