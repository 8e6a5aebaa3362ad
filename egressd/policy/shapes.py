"""Reading the shape of a policy's YAML nodes, reporting what does not fit.

Shared by the loader (files, includes, lists) and the rule compiler: each helper either
returns what was asked for or reports, at the offending node, a sentence that names what was
expected and what was found, and returns None. Nothing here raises on odd input, so one pass
reports every problem of a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.policy.matchers import IPNetwork
from egressd.policy.provenance import Sources
from egressd.policy.source import NULL_TAG, STR_TAG, Reporter, node_kind, quote
from egressd.policy.values import suggest


@dataclass(slots=True)
class ListDef:
    """A named list as read, kept even when it had problems so references to it do not
    produce a second, misleading "not defined" error."""

    name: str
    type: str | None  # None when the type itself was wrong (already reported; no cascade)
    where: str  # "file:line" for "first defined at"
    cidrs: list[IPNetwork] = field(default_factory=list)
    ports: list[tuple[int, int]] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)


@dataclass(slots=True)
class State:
    """What one load accumulates across all files. Lists live in one table because list names
    are global to a policy; ``loaded`` holds real paths so a file included twice is read once."""

    report: Reporter = field(default_factory=Reporter)
    lists: dict[str, ListDef] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    rule_nodes: list[Node] = field(default_factory=list)
    main: dict[str, Node] = field(default_factory=dict)
    main_root: Node | None = None
    sources: Sources = field(default_factory=Sources)  # file:line of everything, for layered policies


def location(node: Node) -> str:
    """ "file:line" of a node, for messages that point back at an earlier definition."""
    return f"{node.start_mark.name}:{node.start_mark.line + 1}"


def pairs(node: Node, st: State, what: str, dup: str = "key") -> list[tuple[str, ScalarNode, Node]] | None:
    """Key/value pairs of a mapping node; reports non-mappings, odd keys and duplicate keys."""
    if not isinstance(node, MappingNode):
        st.report.node(node, f"{what} must be a mapping (key: value lines), not {node_kind(node)}")
        return None
    out: list[tuple[str, ScalarNode, Node]] = []
    seen: dict[str, ScalarNode] = {}
    for knode, vnode in node.value:
        if not isinstance(knode, ScalarNode):
            st.report.node(knode, f"keys in {what} must be plain names, not {node_kind(knode)}")
            continue
        key = str(knode.value)
        first = seen.get(key)
        if first is not None:
            st.report.node(
                knode,
                f"duplicate {dup} {quote(key)} in {what} (first defined at line {first.start_mark.line + 1})",
            )
            continue
        seen[key] = knode
        out.append((key, knode, vnode))
    return out


def known_keys(
    items: list[tuple[str, ScalarNode, Node]], allowed: tuple[str, ...], st: State, what: str
) -> dict[str, tuple[ScalarNode, Node]]:
    """The allowed keys; reports the others with the closest valid key."""
    out: dict[str, tuple[ScalarNode, Node]] = {}
    for key, knode, vnode in items:
        if key in allowed:
            out[key] = (knode, vnode)
            continue
        hint = suggest(key, allowed) or f"; valid keys are {', '.join(allowed)}"
        st.report.node(knode, f"unknown key {quote(key)} in {what}{hint}")
    return out


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def as_text(node: Node, st: State, what: str) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == STR_TAG:
        return str(node.value)
    st.report.node(node, f"{what} must be text, not {node_kind(node)}; put it in quotes if you mean the text")
    return None


def as_choice(node: Node, st: State, what: str, choices: tuple[str, ...]) -> str | None:
    if not isinstance(node, ScalarNode) or is_null(node):
        st.report.node(node, f"{what} must be one of {', '.join(choices)}, not {node_kind(node)}")
        return None
    value = str(node.value)
    if value in choices:
        return value
    st.report.node(
        node, f"unknown {what} {quote(value)}; expected one of {', '.join(choices)}{suggest(value, choices)}"
    )
    return None


def values_of(node: Node, st: State, what: str) -> list[ScalarNode] | None:
    """A single value or a list of single values (``dst: 10.0.0.0/8`` or ``dst: [a, b]``)."""
    if isinstance(node, ScalarNode):
        if is_null(node):
            st.report.node(node, f"{what} has no value")
            return None
        return [node]
    if isinstance(node, SequenceNode):
        if not node.value:
            st.report.node(node, f"{what} is an empty list, which never matches; remove it or add values")
            return None
        out: list[ScalarNode] = []
        for item in node.value:
            if isinstance(item, ScalarNode) and not is_null(item):
                out.append(item)
            else:
                st.report.node(item, f"each item of {what} must be a single value, not {node_kind(item)}")
        return out
    st.report.node(node, f"{what} must be a value or a list of values, not {node_kind(node)}")
    return None
