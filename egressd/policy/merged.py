"""The merged policy as one YAML file, each value annotated with the ``file:line`` it came from.

``egressd validate --print-merged`` prints it. Why print a whole policy and not a list of
changes: a reviewer of a layered policy wants to read what the daemon will enforce, in the
order it is enforced, and the output is itself a valid, self-contained policy (no includes,
no ``extends``) that loads to the same rules — so it can be diffed between two releases of
the shipped default, or handed to ``egressd test`` on a machine without the layers.
"""

from __future__ import annotations

import json
from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.policy.model import Policy
from egressd.policy.provenance import RuleSource, Sources, where
from egressd.policy.source import STR_TAG

COMMENT_COL: Final = 52
_TOP_DEFAULTS: Final = {"mode": "enforce", "fail": "open", "on_overload": "drop", "on_error": "accept"}
# Characters that end or change a plain scalar somewhere in block or flow context; a value
# holding one is quoted (IPv6 addresses: "::1" is not a plain scalar inside [...]).
_FLOW_UNSAFE: Final = frozenset(",[]{}#&*!|>'\"%@`:?")


def scalar(text: str, quoted: bool = True) -> str:
    """A YAML scalar that reads back as ``text`` (plain when that is safe, JSON-quoted otherwise)."""
    if not quoted:
        return text
    try:
        plain_ok = (
            bool(text)
            and not (set(text) & _FLOW_UNSAFE)
            and ": " not in text
            and yaml.safe_load(text) == text
            and text == text.strip()
        )
    except yaml.YAMLError:
        plain_ok = False
    return text if plain_ok else json.dumps(text, ensure_ascii=False)


def flow(node: Node) -> str:
    """A node in YAML flow style (``{a: 1, b: [x, y]}``)."""
    if isinstance(node, MappingNode):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in node.value) + "}"
    if isinstance(node, SequenceNode):
        return "[" + ", ".join(flow(v) for v in node.value) + "]"
    assert isinstance(node, ScalarNode)
    return scalar(str(node.value), node.tag == STR_TAG)


def _line(text: str, comment: str = "") -> str:
    if not comment:
        return text
    return f"{text.ljust(COMMENT_COL - 1)} # {comment}"


def _field(node: MappingNode, key: str) -> Node | None:
    for k, v in node.value:
        if isinstance(k, ScalarNode) and k.value == key:
            found: Node = v
            return found
    return None


def _rule_lines(r: RuleSource) -> list[str]:
    assert isinstance(r.node, MappingNode)
    changed = {key: at for key, _, at in r.changes}
    out = [_line(f"  - name: {scalar(r.name)}", f"defined at {r.where}")]
    desc = _field(r.node, "description")
    if isinstance(desc, ScalarNode):
        text = " ".join(str(desc.value).split())
        out.append(_line(f"    description: {scalar(text)}", f"overridden at {changed['description']}"
                         if "description" in changed else ""))  # fmt: skip
    match = _field(r.node, "match")
    if match is not None:
        out.append(f"    match: {flow(match)}")
    action = _field(r.node, "action")
    if action is not None:
        note = f"overridden at {changed['action']}" if "action" in changed else ""
        out.append(_line(f"    action: {flow(action)}", note))
    if r.priority:
        out.append(_line(f"    priority: {r.priority}", r.priority_where))
    return out


def render(policy: Policy, src: Sources, title: str = "") -> str:
    """The whole merged policy: top-level keys, settings, every list item and every rule."""
    out: list[str] = [f"# merged policy: {title or policy.path}"]
    out.append(f"# files read: {', '.join(src.files)}")
    for layer in src.extends:
        out.append(f"# layer: {layer}")
    out.append("# Every value says where it was set. This file is itself a complete policy.")
    for key in ("mode", "default", "fail", "on_overload", "on_error"):
        node = src.top.get(key)
        if node is not None:
            out.append(_line(f"{key}: {flow(node)}", where(node)))
        else:
            out.append(_line(f"{key}: {_TOP_DEFAULTS.get(key, getattr(policy, key))}", "not set: egressd's default"))
    if src.settings:
        out.append("settings:")
        for key, node in src.settings.items():
            out.append(_line(f"  {key}: {flow(node)}", where(node)))
    out.append("lists:" if src.lists else "lists: {}")
    for ls in src.lists.values():
        appended = f"; appended at {', '.join(ls.appended_at)}" if ls.appended_at else ""
        out.append(_line(f"  {ls.name}:", f"defined at {ls.where}{appended}"))
        out.append(f"    type: {ls.type}")
        if ls.description:
            out.append(f"    description: {scalar(ls.description)}")
        out.append("    items:" if ls.items else "    items: []")
        for it in ls.items:
            text = it.value if ls.type == "port" else scalar(it.value)  # 3333 reads as a port either way
            out.append(_line(f"      - {text}", f"{it.where}{' (appended)' if it.appended else ''}"))
    enabled = [r for r in src.rules if r.enabled]
    out.append("rules:" if enabled else "rules: []")
    for r in enabled:
        out.extend(_rule_lines(r))
    disabled = [r for r in src.rules if not r.enabled]
    if disabled:
        out.append("# disabled rules (left out of the policy):")
        for r in disabled:
            out.append(f"#   {r.name}: defined at {r.where}, enabled: false at {r.enabled_where}")
    return "\n".join(out) + "\n"
