"""Rule and settings nodes -> compiled :class:`Rule` objects and :class:`Settings`.

Runs after every file was read, so a ``$list`` may be defined in any of the policy's files.
Each condition's literal values and referenced lists are merged into one matcher (a rule with
``dst: [$a, $b, 192.0.2.0/24]`` tests one :class:`CidrSet`). A rule with any problem is
reported and left out; the policy-wide checks (duplicate names, rules that can never match
because a catch-all comes first) run over the rest.
"""

from __future__ import annotations

import math
from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.policy.matchers import CidrSet, DomainSet, IPNetwork, Match, PortSet
from egressd.policy.model import ACTIONS, CONTENT_VALUES, DOMAIN_SETTINGS, SETTINGS_LIMITS, Decision, Rule, Settings
from egressd.policy.shapes import State, as_choice, as_text, is_null, known_keys, location, pairs, values_of
from egressd.policy.source import FLOAT_TAG, INT_TAG, STR_TAG, node_kind, quote
from egressd.policy.values import (
    KIND_PATTERNS,
    KNOWN_KINDS,
    domain_or_error,
    parse_cidr,
    parse_kind,
    parse_port_range,
    parse_proto,
    suggest,
)
from egressd.policy.who import WHO_KEYS, WhoMatch, check_who_rule, parse_severity, parse_who
from egressd.protocols import PORT_PROTOS

RULE_KEYS: Final = ("name", "description", "match", "action", "respond", "severity")
MATCH_KEYS: Final = ("proto", "src", "dst", "src_port", "dst_port", "dst_domain", "detection", "content", "not")
SETTING_KEYS: Final = (*SETTINGS_LIMITS, *DOMAIN_SETTINGS)

_CONDITION_TYPES: Final = {
    "src": "cidr",
    "dst": "cidr",
    "src_port": "port",
    "dst_port": "port",
    "dst_domain": "domain",
}


# ---------------------------------------------------------------------------------- rules


def _values(key: str, node: Node, st: State) -> tuple[list[IPNetwork], list[tuple[int, int]], list[str]] | None:
    """Literal values and $list references of one address/port/name condition, merged."""
    want = _CONDITION_TYPES[key]
    scalars = values_of(node, st, f"{quote(key)}")
    if scalars is None:
        return None
    cidrs: list[IPNetwork] = []
    ports: list[tuple[int, int]] = []
    domains: list[str] = []
    ok = True
    for item in scalars:
        value = str(item.value)
        if value.startswith("$"):
            ref = value[1:]
            ldef = st.lists.get(ref)
            if ldef is None:
                st.report.node(item, f"list {quote(value)} is not defined{suggest(ref, tuple(st.lists))}")
                ok = False
            elif ldef.type is not None and ldef.type != want:
                hint = "; match names with dst_domain" if ldef.type == "domain" and want == "cidr" else ""
                hint = "; match addresses with dst" if ldef.type == "cidr" and want == "domain" else hint
                st.report.node(
                    item,
                    f"list {quote(value)} is a {ldef.type} list, but {quote(key)} needs a {want} list{hint}",
                )
                ok = False
            else:
                cidrs.extend(ldef.cidrs)
                ports.extend(ldef.ports)
                domains.extend(ldef.domains)
            continue
        if want == "cidr":
            net = parse_cidr(value)
            if isinstance(net, str):
                st.report.node(item, net)
                ok = False
            else:
                cidrs.append(net)
        elif want == "port":
            rng = parse_port_range(value)
            if isinstance(rng, str):
                st.report.node(item, rng)
                ok = False
            else:
                ports.append(rng)
        else:
            dom, err = domain_or_error(value)
            if dom is None:
                st.report.node(item, err)
                ok = False
            else:
                domains.append(dom)
    return (cidrs, ports, domains) if ok else None


def _kinds(node: Node, st: State) -> tuple[str, ...] | None:
    scalars = values_of(node, st, "'detection'")
    if scalars is None:
        return None
    kinds: list[str] = []
    ok = True
    for item in scalars:
        value = str(item.value)
        if value.startswith("$"):
            st.report.node(item, f"'detection' takes detection kinds, not lists ({quote(value)})")
            ok = False
            continue
        kind = parse_kind(value)
        if kind is None:
            st.report.node(
                item,
                f"unknown detection kind {quote(value)}; known kinds are {', '.join(KNOWN_KINDS)} "
                "(a prefix such as 'mining' matches all 'mining.*')"
                f"{suggest(value.strip().lower(), KIND_PATTERNS)}",
            )
            ok = False
        elif kind not in kinds:
            kinds.append(kind)
    return tuple(kinds) if ok else None


def _content(node: Node, st: State) -> frozenset[str] | None:
    """``content``: none | unclassified | classified, or a list of them."""
    scalars = values_of(node, st, "'content'")
    if scalars is None:
        return None
    values: set[str] = set()
    ok = True
    for item in scalars:
        value = str(item.value).strip().lower()
        if value not in CONTENT_VALUES:
            st.report.node(
                item,
                f"unknown content {quote(str(item.value))}; use {', '.join(CONTENT_VALUES)} "
                f"(what the flow's payload turned out to be once inspected){suggest(value, CONTENT_VALUES)}",
            )
            ok = False
        else:
            values.add(value)
    return frozenset(values) if ok else None


def _protos(node: Node, st: State) -> tuple[bool, frozenset[int] | None]:
    """(ok, protocol numbers or None for any)."""
    scalars = values_of(node, st, "'proto'")
    if scalars is None:
        return False, None
    numbers: set[int] = set()
    any_proto = False
    ok = True
    for item in scalars:
        parsed = parse_proto(str(item.value))
        if isinstance(parsed, str):
            st.report.node(item, parsed)
            ok = False
        elif parsed is None:
            any_proto = True
        else:
            numbers.add(parsed)
    return ok, None if any_proto else frozenset(numbers)


def _match(node: Node, st: State, what: str) -> Match | None:
    """A compiled match block, or None if it had problems (reported)."""
    items = pairs(node, st, what)
    if items is None:
        return None
    keys = known_keys(items, MATCH_KEYS, st, what)
    ok = len(keys) == len(items)
    protos: frozenset[int] | None = None
    sets: dict[str, CidrSet | PortSet | DomainSet] = {}
    kinds: tuple[str, ...] | None = None
    content: frozenset[str] | None = None
    nots: list[Match] = []
    for key, (_, vnode) in keys.items():
        if key == "proto":
            good, protos = _protos(vnode, st)
            ok = ok and good
        elif key == "detection":
            kinds = _kinds(vnode, st)
            ok = ok and kinds is not None
        elif key == "content":
            content = _content(vnode, st)
            ok = ok and content is not None
        elif key == "not":
            got = _nots(vnode, st)
            if got is None:
                ok = False
            else:
                nots.extend(got)
        else:
            vals = _values(key, vnode, st)
            if vals is None:
                ok = False
                continue
            cidrs, ports, domains = vals
            want = _CONDITION_TYPES[key]
            sets[key] = CidrSet(cidrs) if want == "cidr" else PortSet(ports) if want == "port" else DomainSet(domains)
    if protos is not None and not (protos & PORT_PROTOS):
        for key in ("dst_port", "src_port"):
            if key in keys:
                st.report.node(
                    keys[key][0],
                    f"{quote(key)} can never match: the protocols in 'proto' have no ports (only "
                    "tcp, udp, sctp, dccp and udplite do)",
                )
                ok = False
    if not ok:
        return None
    src = sets.get("src")
    dst = sets.get("dst")
    sport = sets.get("src_port")
    dport = sets.get("dst_port")
    dom = sets.get("dst_domain")
    assert src is None or isinstance(src, CidrSet)
    assert dst is None or isinstance(dst, CidrSet)
    assert sport is None or isinstance(sport, PortSet)
    assert dport is None or isinstance(dport, PortSet)
    assert dom is None or isinstance(dom, DomainSet)
    return Match(
        protos=protos,
        src=src,
        dst=dst,
        src_ports=sport,
        dst_ports=dport,
        domains=dom,
        kinds=kinds,
        content=content,
        nots=tuple(nots),
    )


def _nots(node: Node, st: State) -> list[Match] | None:
    """``not:`` is one match block, or a list of blocks none of which may hold."""
    blocks = node.value if isinstance(node, SequenceNode) else [node]
    if isinstance(node, SequenceNode) and not blocks:
        st.report.node(node, "'not' is an empty list; give it at least one match block")
        return None
    out: list[Match] = []
    ok = True
    for block in blocks:
        if isinstance(block, MappingNode) and not block.value:
            st.report.node(block, "'not' needs at least one condition (an empty block matches everything)")
            ok = False
            continue
        if is_null(block):
            st.report.node(block, "'not' has no conditions")
            ok = False
            continue
        m = _match(block, st, "'not'")
        if m is None:
            ok = False
        else:
            out.append(m)
    return out if ok else None


def _rule(node: Node, st: State, names: dict[str, str]) -> tuple[str | None, Rule | None]:
    """(name if it could be read, compiled rule if it had no problems)."""
    before = len(st.report.items)
    fields = pairs(node, st, "a rule")
    if fields is None:
        return None, None
    label = "a rule"
    for key, _, vnode in fields:
        if key == "name" and isinstance(vnode, ScalarNode) and vnode.tag == STR_TAG:
            label = f"rule {quote(str(vnode.value))}"
    keys = known_keys(fields, RULE_KEYS, st, label)
    name: str | None = None
    if "name" in keys:
        vnode = keys["name"][1]
        name = as_text(vnode, st, "a rule's name")
        if name is not None:
            name = name.strip()
            if not name:
                st.report.node(vnode, "a rule's name cannot be empty")
                name = None
            elif name == "default":
                st.report.node(vnode, "the rule name 'default' is reserved: decisions by the policy default use it")
                name = None
            elif name in names:
                st.report.node(vnode, f"duplicate rule name {quote(name)} (first defined at {names[name]})")
            else:
                names[name] = location(vnode)
    else:
        st.report.node(node, "a rule needs a 'name:'")
    description = ""
    if "description" in keys:
        description = as_text(keys["description"][1], st, f"the description of {label}") or ""
    action: str | None = None
    if "action" in keys:
        action = as_choice(keys["action"][1], st, "action", ACTIONS)
    else:
        st.report.node(node, f"{label} needs an 'action:' ({', '.join(ACTIONS)})")
    match: Match | None = Match()
    # -- who-conditions (issue 8): taken out of the match block, compiled by policy.who
    who: WhoMatch | None = None
    who_ok = True
    mnode = keys["match"][1] if "match" in keys else None
    if isinstance(mnode, MappingNode):
        who_items = {
            str(k.value): (k, v) for k, v in mnode.value if isinstance(k, ScalarNode) and str(k.value) in WHO_KEYS
        }
        if who_items:
            rest = [(k, v) for k, v in mnode.value if not (isinstance(k, ScalarNode) and str(k.value) in WHO_KEYS)]
            mnode = MappingNode(mnode.tag, rest, mnode.start_mark, mnode.end_mark, mnode.flow_style)
            who = parse_who(who_items, st, label)
            who_ok = who is not None
            check_who_rule(keys["action"][1] if "action" in keys else node, st, label, action, who_items)
            if not rest:
                mnode = None
    respond = ""
    if "respond" in keys:
        respond = as_choice(keys["respond"][1], st, "respond", ("freeze", "kill")) or ""
        if respond and action == "accept":
            st.report.node(keys["respond"][1], f"{label} accepts the flow; 'respond' only goes with drop or alert")
    severity = 0
    if "severity" in keys:
        severity = parse_severity(keys["severity"][1], st) or 0
    if mnode is not None and not is_null(mnode):
        match = _match(mnode, st, f"the match of {label}")
    if len(st.report.items) != before or name is None or action is None or match is None or not who_ok:
        return name, None
    where = node.start_mark
    rule = Rule(
        name=name,
        description=description.strip(),
        action=action,
        match=match,
        file=str(where.name),
        line=where.line + 1,
        decision=Decision(action, name, description.strip()),
        who=who,
        respond=respond,
        severity=severity,
    )
    return name, rule


def compile_rules(st: State) -> list[Rule]:
    """Every rule that compiled cleanly, in policy order; problems go to ``st.report``."""
    rules: list[Rule] = []
    names: dict[str, str] = {}
    catch_all: tuple[str, str] | None = None
    for node in st.rule_nodes:
        name, rule = _rule(node, st, names)
        if catch_all is not None and name is not None:
            st.report.node(
                node,
                f"rule {quote(name)} can never match: rule {quote(catch_all[0])} ({catch_all[1]}) "
                "comes before it and has no conditions, so it matches every flow",
            )
        if rule is not None:
            rules.append(rule)
            if catch_all is None and rule.match.is_catch_all and rule.who is None:
                catch_all = (rule.name, f"{rule.file}:{rule.line}")
    return rules


# ---------------------------------------------------------------------------------- settings


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(node: Node, st: State, key: str) -> float | None:
    lo, hi = SETTINGS_LIMITS[key]
    is_float = isinstance(getattr(Settings(), key), float)
    if not isinstance(node, ScalarNode) or node.tag not in (INT_TAG, FLOAT_TAG):
        st.report.node(node, f"{quote(key)} must be a number, not {node_kind(node)}")
        return None
    text = str(node.value).replace("_", "")
    value: float | None = None
    if node.tag == INT_TAG or not is_float:
        digits = text[1:] if text[:1] in "+-" else text
        if digits.isascii() and digits.isdigit() and len(digits) <= 15:
            value = int(text)
    else:
        try:
            value = float(text) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):
            value = None
    if value is None:
        kind = "a decimal number" if is_float else "a whole decimal number"
        st.report.node(node, f"{quote(key)} must be {kind}, not {quote(str(node.value))}")
        return None
    if not lo <= value <= hi:
        st.report.node(node, f"{quote(key)} must be between {_num(lo)} and {_num(hi)}, not {_num(value)}")
        return None
    return value


def compile_settings(node: Node | None, st: State) -> tuple[Settings, dict[str, DomainSet]]:
    """The ``settings:`` block and the domain lists its DOMAIN_SETTINGS name (by setting)."""
    if node is None or is_null(node):
        return Settings(), {}
    items = pairs(node, st, "'settings'")
    if items is None:
        return Settings(), {}
    keys = known_keys(items, SETTING_KEYS, st, "'settings'")
    values: dict[str, float | str] = {}
    named: dict[str, DomainSet] = {}
    for key, (_, vnode) in keys.items():
        if key in DOMAIN_SETTINGS:
            name = as_text(vnode, st, f"{quote(key)} (the name of a domain list)")
            if name is None:
                continue
            ref = name[1:] if name.startswith("$") else name
            ldef = st.lists.get(ref)
            if ldef is None:
                st.report.node(vnode, f"list {quote(ref)} is not defined{suggest(ref, tuple(st.lists))}")
            elif ldef.type is not None and ldef.type != "domain":
                st.report.node(vnode, f"list {quote(ref)} is a {ldef.type} list, but {quote(key)} needs a domain list")
            else:
                values[key] = ref
                named[key] = DomainSet(ldef.domains)
            continue
        number = _number(vnode, st, key)
        if number is not None:
            is_float = isinstance(getattr(Settings(), key), float)
            values[key] = float(number) if is_float else int(number)
    try:
        return Settings(**values), named  # type: ignore[arg-type]
    except TypeError:  # pragma: no cover - keys are checked above
        return Settings(), named
