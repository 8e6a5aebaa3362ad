"""``egressd explain``: why one flow got its verdict, rule by rule, down to the list item.

"Why was this dropped?" is answered by the event's ``rule``; "why did *this* rule match, and
why did the ones before it not?" needs more: every rule in policy order, whether it matched,
the condition that ruled it out, and for the first that matched, which condition and which
list item (with the ``file:line`` where that item is written, even in a layer) decided.

How: each condition of each rule is evaluated item by item from the rule as written (its
node, with ``$lists`` expanded from :mod:`egressd.policy.provenance`), which is what names
the item. The compiled matcher's own answer (``Match.test``, what the engine runs) is then
compared with the item-by-item one; they must agree, and a disagreement is printed as an
egressd bug rather than hidden. Explaining is never on the hot path: clarity over speed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.detect.base import kind_matches
from egressd.policy import FlowFacts, Policy
from egressd.policy.matchers import CONTENT_PENDING, DomainSet
from egressd.policy.provenance import RuleSource, Sources, where
from egressd.policy.values import domain_or_error, parse_cidr, parse_port_range, parse_proto
from egressd.protocols import PORT_PROTOS
from egressd.recorded import Flow, printable


@dataclass(slots=True)
class Item:
    value: str
    where: str
    list_name: str = ""  # "" for a value written in the rule itself

    def show(self) -> str:
        origin = f"${self.list_name}, " if self.list_name else ""
        return f"{self.value!r} ({origin}{self.where})"


@dataclass(slots=True)
class Condition:
    key: str
    holds: bool
    detail: str
    item: Item | None = None  # the item that made it hold (or, inside 'not', that made the block hold)
    nested: list[Condition] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"condition": self.key, "holds": self.holds, "detail": self.detail}
        if self.item is not None:
            d["item"] = {"value": self.item.value, "where": self.item.where, "list": self.item.list_name or None}
        if self.nested:
            d["nested"] = [c.as_dict() for c in self.nested]
        return d


@dataclass(slots=True)
class RuleResult:
    position: int
    name: str
    where: str
    action: str
    matched: bool
    conditions: list[Condition]
    engine_agrees: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "rule": self.name,
            "where": self.where,
            "action": self.action,
            "matched": self.matched,
            "conditions": [c.as_dict() for c in self.conditions],
            "engine_agrees": self.engine_agrees,
        }


# ---------------------------------------------------------------------------------- conditions


def _items(node: Node, src: Sources) -> list[Item]:
    """The values of a condition, ``$lists`` expanded to their items with positions."""
    scalars = node.value if isinstance(node, SequenceNode) else [node]
    out: list[Item] = []
    for s in scalars:
        if not isinstance(s, ScalarNode):
            continue
        text = str(s.value).strip()
        if text.startswith("$") and text[1:] in src.lists:
            ls = src.lists[text[1:]]
            out.extend(Item(i.value, i.where, ls.name) for i in ls.items)
        else:
            out.append(Item(text, where(s)))
    return out


def _first(items: list[Item], test: Any) -> Item | None:
    for it in items:
        if test(it.value):
            return it
    return None


def _in_cidr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    def test(value: str) -> bool:
        net = parse_cidr(value)
        return not isinstance(net, str) and net.version == addr.version and addr in net

    return test


def _in_ports(port: int) -> Any:
    def test(value: str) -> bool:
        rng = parse_port_range(value)
        return not isinstance(rng, str) and rng[0] <= port <= rng[1]

    return test


def _proto_is(proto: int) -> Any:
    def test(value: str) -> bool:
        p = parse_proto(value)
        return p is None or p == proto

    return test


def _domain_hits(names: tuple[str, ...]) -> Any:
    def test(value: str) -> bool:
        dom, _ = domain_or_error(value)
        return dom is not None and DomainSet([dom]).match_any(names) is not None

    return test


def _kind_hits(kinds: tuple[str, ...]) -> Any:
    def test(value: str) -> bool:
        return any(kind_matches(value.strip().lower(), k) for k in kinds)

    return test


def _condition(key: str, node: Node, f: FlowFacts, src: Sources) -> Condition:
    if key == "not":
        return _not(node, f, src)
    items = _items(node, src)
    many = f"{len(items)} item(s)"
    if key == "proto":
        hit = _first(items, _proto_is(f.proto))
        return Condition(
            key, hit is not None, f"protocol {f.proto} " + ("is " + hit.show() if hit else f"not in {many}"), hit
        )
    if key in ("src", "dst"):
        addr = ipaddress.ip_address(f.src if key == "src" else f.dst)
        hit = _first(items, _in_cidr(addr))
        return Condition(
            key, hit is not None, f"{addr} " + ("is in " + hit.show() if hit else f"is in none of {many}"), hit
        )
    if key in ("src_port", "dst_port"):
        port = f.sport if key == "src_port" else f.dport
        if f.proto not in PORT_PROTOS:
            return Condition(key, False, f"protocol {f.proto} has no ports")
        hit = _first(items, _in_ports(port))
        return Condition(
            key, hit is not None, f"port {port} " + ("is " + hit.show() if hit else f"is in none of {many}"), hit
        )
    if key == "dst_domain":
        if not f.domains:
            return Condition(key, False, "the flow has no name (no DNS answer, SNI or CONNECT host seen)")
        hit = _first(items, _domain_hits(f.domains))
        names = ", ".join(f.domains)
        return Condition(
            key, hit is not None, f"names {names} " + ("match " + hit.show() if hit else f"match none of {many}"), hit
        )
    if key == "detection":
        if not f.detections:
            return Condition(key, False, "the flow has no detection")
        hit = _first(items, _kind_hits(f.detections))
        kinds = ", ".join(f.detections)
        return Condition(
            key,
            hit is not None,
            f"detections {kinds} " + ("match " + hit.show() if hit else f"match none of {many}"),
            hit,
        )
    if key == "content":
        if f.content == CONTENT_PENDING:
            return Condition(key, False, "what the flow carries is not known yet (inspection had not ended)")
        hit = _first(items, lambda v: v.strip().lower() == f.content)
        detail = f"content {f.content} " + ("is " + hit.show() if hit else f"is none of {many}")
        return Condition(key, hit is not None, detail, hit)
    return Condition(key, False, f"unknown condition {key!r}")  # pragma: no cover - the loader refuses it


def _mentions_content(node: Node) -> bool:
    if isinstance(node, MappingNode):
        return any((isinstance(k, ScalarNode) and k.value == "content") or _mentions_content(v) for k, v in node.value)
    if isinstance(node, SequenceNode):
        return any(_mentions_content(v) for v in node.value)
    return False


def _block(node: Node, f: FlowFacts, src: Sources) -> list[Condition]:
    if not isinstance(node, MappingNode):
        return []
    conds = [_condition(str(k.value), v, f, src) for k, v in node.value if isinstance(k, ScalarNode)]
    if f.content == CONTENT_PENDING and _mentions_content(node) and not any(c.key == "content" for c in conds):
        # The matcher's rule: a block that looks at the content anywhere, even under 'not',
        # holds for no flow whose content is still pending ("not none" is not known either).
        conds.append(Condition("content", False, "a 'not' block looks at the content, not known yet"))
    return conds


def _not(node: Node, f: FlowFacts, src: Sources) -> Condition:
    blocks = node.value if isinstance(node, SequenceNode) else [node]
    nested: list[Condition] = []
    for b in blocks:
        conds = _block(b, f, src)
        held = all(c.holds for c in conds)
        label = ", ".join(c.key for c in conds)
        if held:
            deciding = next((c.item for c in conds if c.item is not None), None)
            nested.append(
                Condition(f"not [{label}]", False, "this block holds: " + "; ".join(c.detail for c in conds), deciding)
            )
        else:
            failing = next(c for c in conds if not c.holds)
            nested.append(Condition(f"not [{label}]", True, f"this block does not hold: {failing.detail}"))
    excluded = next((c for c in nested if not c.holds), None)
    if excluded is None:
        return Condition("not", True, "no excluded case applies", None, nested)
    return Condition("not", False, f"an excluded case applies ({excluded.detail})", excluded.item, nested)


# ---------------------------------------------------------------------------------- rules


def explain(policy: Policy, src: Sources, f: FlowFacts) -> tuple[list[RuleResult], str, str]:
    """(every enabled rule in order, action, deciding rule name) for the flow's facts."""
    results: list[RuleResult] = []
    compiled = {r.name: r for r in policy.rules}
    src_int = int.from_bytes(f.src, "big")
    dst_int = int.from_bytes(f.dst, "big")
    decided: tuple[str, str] | None = None
    pos = 0
    for rs in src.rules:
        rule = compiled.get(rs.name)
        if not rs.enabled or rule is None:
            continue
        pos += 1
        match = next((v for k, v in rs.node.value if isinstance(k, ScalarNode) and k.value == "match"), None) \
            if isinstance(rs.node, MappingNode) else None  # fmt: skip
        conds = _block(match, f, src) if match is not None else []
        matched = all(c.holds for c in conds)
        engine = rule.match.test(f, src_int, dst_int)
        results.append(RuleResult(pos, rule.name, rs.where, rule.action, matched, conds, engine == matched))
        if engine and decided is None:
            decided = (rule.action, rule.name)
    if decided is None:
        decided = (policy.default, "default")
    return results, decided[0], decided[1]


def render(
    flow: Flow | None,
    f: FlowFacts,
    policy: Policy,
    results: list[RuleResult],
    action: str,
    rule: str,
    disabled: list[RuleSource] | tuple[RuleSource, ...] = (),
) -> str:
    out: list[str] = []
    if flow is not None:
        out.append(f"flow {flow.label()}  (from {flow.source})")
    out.append(f"  names: {', '.join(f.domains) or '-'}   detections: {', '.join(f.detections) or '-'}")
    if flow is not None and not flow.complete:
        out.append("  (from an event: only the first name of the flow is known)")
    if flow is not None and (flow.process or flow.container):
        proc, cont = flow.process or {}, flow.container or {}
        pname = proc.get("name") or proc.get("executable") or "?"
        who = [f"process {pname} (pid {proc.get('pid', '?')})"] if proc else []
        who += [f"container {cont.get('name') or cont.get('id') or '?'}"] if cont else []
        out.append("  who: " + ", ".join(who))
    out.append(
        f"policy {policy.path} (mode {policy.mode}, default {policy.default}); rules in order, first match decides:"
    )
    first_seen = False
    for r in results:
        if r.matched and not first_seen:
            first_seen = True
            out.append(f"{r.position:3}. {r.name} ({r.where})  MATCHED -> {r.action}")
            for c in r.conditions:
                out.extend(_cond_lines(c, "       "))
        else:
            state = "matches too (not reached)" if r.matched else "no"
            if r.matched:
                out.append(f"{r.position:3}. {r.name} ({r.where})  {state}")
            else:
                failing = next(c for c in r.conditions if not c.holds)
                out.append(f"{r.position:3}. {r.name} ({r.where})  no: {failing.key}: {failing.detail}")
        if not r.engine_agrees:
            out.append(
                "       !! the compiled matcher disagrees with this explanation (an egressd bug; please report it)"
            )
    for rs in disabled:
        out.append(f"  -. {rs.name} ({rs.where})  disabled (enabled: false at {rs.enabled_where})")
    if rule == "default":
        out.append(f"  no rule matched: the policy default decides -> {action}")
    out.append(f"decision: {action} by {rule}")
    if flow is not None and (flow.verdict, flow.rule) != (action, rule):
        out.append(
            f"recorded: {flow.verdict} by {flow.rule} (decisions only get stricter while a flow is judged, "
            "and a recording may come from another policy)"
        )
    return printable("\n".join(out)) + "\n"


def _cond_lines(c: Condition, indent: str) -> list[str]:
    mark = "yes" if c.holds else "no "
    lines = [f"{indent}{mark} {c.key}: {c.detail}"]
    for n in c.nested:
        lines.extend(_cond_lines(n, indent + "    "))
    return lines


def select(flows: list[Flow], match: dict[str, str]) -> list[Flow]:
    """Flows selected like ``--expect``'s ``match`` (proto, src, src_port, dst, dst_port)."""
    out = []
    for fl in flows:
        have = {
            "proto": fl.proto.upper(),
            "src": fl.src_ip,
            "dst": fl.dest_ip,
            "src_port": str(fl.src_port),
            "dst_port": str(fl.dest_port),
        }
        if all(have[k] == v for k, v in match.items()):
            out.append(fl)
    return out


MATCH_KEYS = ("proto", "src", "src_port", "dst", "dst_port")


def parse_match(pairs: list[str]) -> dict[str, str]:
    """``key=value`` arguments -> normalised match; ValueError with a sentence."""
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        key = key.strip()
        if not sep or key not in MATCH_KEYS:
            raise ValueError(f"--match {p!r}: expected KEY=VALUE with KEY one of {', '.join(MATCH_KEYS)}")
        value = value.strip()
        if key in ("src", "dst"):
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                raise ValueError(f"--match {p!r}: {value!r} is not an IP address") from None
        elif key == "proto":
            value = value.upper().replace("ICMPV6", "IPV6-ICMP")
        elif not value.isdigit():
            raise ValueError(f"--match {p!r}: a port is a number")
        out[key] = value
    return out
