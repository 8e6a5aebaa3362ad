"""Layered policies: a site file builds on the shipped default without editing it.

Why layers: a security team that copies ``rules/default.yaml`` to change one list owns a
fork of every rule in it, and silently misses the next release's new detection rule. Falco
solved this for its rules files (append to a list, override a rule, disable a rule); egressd
policies layer the same way::

    extends: default.yaml            # the base policy, relative to this file (or "egressd:default")
    default: drop                    # top-level keys and settings override the base's, key by key
    lists:
      ssh_allowed: {append: [198.51.100.7/32]}    # add items to a list of the base or an include
      registries: {type: domain, items: [pypi.org]}
    rules:
      - override: alert-vpn-tunnels  # change a rule of the base: action, description, priority
        action: drop
        priority: critical
      - override: alert-mining-ports
        enabled: false               # leave a rule out
      - name: accept-registries      # new rules come after the base's rules
        match: {proto: tcp, dst_port: 443, dst_domain: $registries}
        action: accept

Every rule may also carry ``priority`` (Falco's names: emergency, alert, critical, error,
warning, notice, informational, debug); it sets the EVE ``alert.severity`` of the events it
decides (critical and above -> 1, error/warning -> 2, the rest -> 3), which otherwise follows
the detection kind. ``enabled: false`` on a rule of one's own file leaves it out too.

Rules are order-sensitive, lists are not: an override or an append applies to what was read
*before* it (the base, then the includes, then this file, top to bottom), so it can never
refer to something a later file defines. Every problem is reported at the layer's line.
This pass runs between reading the files and compiling the rules: overrides are applied to
copies of the rule nodes, so the compiler (and its error messages) see one plain rule whose
overridden fields carry the layer's positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode

from egressd.policy.model import Decision, Rule
from egressd.policy.provenance import ItemSource, RuleSource, scalar_items, where
from egressd.policy.shapes import ListDef, State, as_choice, as_text, known_keys, pairs
from egressd.policy.source import BOOL_TAG, STR_TAG, node_kind, quote
from egressd.policy.values import suggest

# Falco's priorities, highest first, and the EVE severity (1 = high) each one gives.
PRIORITIES: Final = ("emergency", "alert", "critical", "error", "warning", "notice", "informational", "debug")
SEVERITY: Final = {p: (1 if i <= 2 else 2 if i <= 4 else 3) for i, p in enumerate(PRIORITIES)}
OVERRIDE_KEYS: Final = ("override", "action", "description", "enabled", "priority")
APPEND_KEYS: Final = ("append",)
_LAYER_ONLY: Final = ("enabled", "priority")  # rule keys this pass takes off before compiling

ItemReader = Callable[[ListDef, Node, State, str], None]


# ---------------------------------------------------------------------------------- lists


def append_to_list(name: str, knode: ScalarNode, vnode: Node, st: State, read_items: ItemReader) -> bool:
    """Handle ``name: {append: [...]}``; False when the entry is an ordinary list definition."""
    if not isinstance(vnode, MappingNode) or not any(
        isinstance(k, ScalarNode) and k.value == "append" for k, _ in vnode.value
    ):
        return False
    what = f"list {quote(name)}"
    fields = pairs(vnode, st, what)
    if fields is None:  # pragma: no cover - vnode is a mapping
        return True
    keys = known_keys(fields, APPEND_KEYS, st, f"an append to {what}")
    ldef = st.lists.get(name)
    if ldef is None:
        st.report.node(
            knode,
            f"cannot append to {what}: no file this one extends or includes defines it "
            f"(define it here with 'type:' and 'items:'){suggest(name, tuple(st.lists))}",
        )
        return True
    items = keys["append"][1]
    before = len(st.report.items)
    read_items(ldef, items, st, f"the items appended to {what}")
    src = st.sources.lists.get(name)
    if src is not None and len(st.report.items) == before:
        src.items.extend(ItemSource(str(n.value).strip(), where(n), appended=True) for n in scalar_items(items))
        src.appended_at.append(where(knode))
    return True


# ---------------------------------------------------------------------------------- rules


def _text_key(node: MappingNode, key: str) -> Node | None:
    for k, v in node.value:
        if isinstance(k, ScalarNode) and k.value == key:
            found: Node = v
            return found
    return None


def _with(node: MappingNode, key: str, knode: Node, vnode: Node) -> MappingNode:
    """A copy of ``node`` whose ``key`` holds ``vnode`` (added when absent)."""
    out = [(k, v) for k, v in node.value if not (isinstance(k, ScalarNode) and k.value == key)]
    out.append((knode, vnode))
    return MappingNode(node.tag, out, node.start_mark, node.end_mark, node.flow_style)


def _without(node: MappingNode, keys: tuple[str, ...]) -> MappingNode:
    out = [(k, v) for k, v in node.value if not (isinstance(k, ScalarNode) and k.value in keys)]
    return MappingNode(node.tag, out, node.start_mark, node.end_mark, node.flow_style)


def _enabled(node: Node, st: State) -> bool | None:
    if isinstance(node, ScalarNode) and node.tag == BOOL_TAG:
        return str(node.value).lower() in ("true", "yes", "on", "y")
    st.report.node(node, f"'enabled' must be true or false, not {node_kind(node)}")
    return None


def _layer_fields(node: MappingNode, src: RuleSource, st: State) -> None:
    """``enabled``/``priority`` written on a rule (its own or an override) into its record."""
    for k, v in node.value:
        if not isinstance(k, ScalarNode):
            continue
        if k.value == "enabled":
            on = _enabled(v, st)
            if on is not None:
                src.enabled, src.enabled_where = on, where(v)
        elif k.value == "priority":
            prio = as_choice(v, st, "priority", PRIORITIES)
            if prio is not None:
                src.priority, src.priority_where = prio, where(v)


def prepare_rules(st: State) -> None:
    """Apply overrides and ``enabled: false`` to ``st.rule_nodes``; record every rule's origin.

    Afterwards ``st.rule_nodes`` holds only the enabled definitions, as the compiler should
    see them, and ``st.sources.rules`` every definition (disabled ones too) in policy order.
    """
    records: list[RuleSource] = []
    by_name: dict[str, RuleSource] = {}
    for node in st.rule_nodes:
        target = _text_key(node, "override") if isinstance(node, MappingNode) else None
        if target is None:
            if not isinstance(node, MappingNode):
                records.append(RuleSource("", where(node), node))  # the compiler reports its shape
                continue
            name_node = _text_key(node, "name")
            name = str(name_node.value).strip() if isinstance(name_node, ScalarNode) else ""
            rec = RuleSource(name, where(node), _without(node, _LAYER_ONLY))
            _layer_fields(node, rec, st)
            records.append(rec)
            if name and name not in by_name:
                by_name[name] = rec
            continue
        assert isinstance(node, MappingNode)  # target was found in it
        _override(node, target, by_name, st)
    st.sources.rules = [r for r in records if r.name]
    st.rule_nodes = [r.node for r in records if r.enabled]


def _override(node: MappingNode, target: Node, by_name: dict[str, RuleSource], st: State) -> None:
    fields = pairs(node, st, "a rule override")
    if fields is None:  # pragma: no cover - node is a mapping
        return
    keys = known_keys(fields, OVERRIDE_KEYS, st, "a rule override ('override:' changes a rule defined before it)")
    name = as_text(target, st, "'override' (the name of the rule to change)")
    if name is None:
        return
    name = name.strip()
    rec = by_name.get(name)
    if rec is None:
        st.report.node(
            target,
            f"'override' names rule {quote(name)}, which no file read before this one defines"
            f"{suggest(name, tuple(by_name))}",
        )
        return
    if len(fields) == 1:
        st.report.node(node, f"this override of rule {quote(name)} changes nothing; give action, description, "
                       "enabled or priority")  # fmt: skip
        return
    for key in ("action", "description"):
        if key in keys:
            knode, vnode = keys[key]
            if key == "description" and not (isinstance(vnode, ScalarNode) and vnode.tag == STR_TAG):
                st.report.node(vnode, f"the description must be text, not {node_kind(vnode)}")
                continue
            assert isinstance(rec.node, MappingNode)  # only named mappings are override targets
            rec.node = _with(rec.node, key, knode, vnode)
            rec.changes.append((key, " ".join(str(vnode.value).split()), where(vnode)))
    _layer_fields(MappingNode(node.tag, [keys[k] for k in ("enabled", "priority") if k in keys]), rec, st)
    if "enabled" in keys and rec.enabled_where == where(keys["enabled"][1]):
        rec.changes.append(("enabled", "true" if rec.enabled else "false", rec.enabled_where))
    if "priority" in keys and rec.priority_where == where(keys["priority"][1]):
        rec.changes.append(("priority", rec.priority, rec.priority_where))


def finish_rules(rules: list[Rule], st: State) -> list[Rule]:
    """Give each compiled rule its priority's severity (carried by its Decision)."""
    prio = {r.name: r.priority for r in st.sources.rules if r.priority}
    out = []
    for rule in rules:
        p = prio.get(rule.name)
        if p:
            dec = Decision(rule.action, rule.name, rule.description, SEVERITY[p])
            rule = dataclasses.replace(rule, decision=dec)
        out.append(rule)
    return out
