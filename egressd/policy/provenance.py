"""Where each part of a merged policy came from: ``file:line`` for every list item and rule.

Why a record of its own: with layered policies (a site file that ``extends`` the shipped
default, appends to its lists and overrides its rules) the question a reviewer asks is no
longer "what does line 40 say" but "why is 198.51.100.7 allowed SSH, and who put it there".
The compiled :class:`~egressd.policy.model.Policy` is built for speed and forgets positions;
this record keeps them, beside it, for ``egressd validate --print-merged``, ``egressd
explain`` and ``egressd learn``. It is filled while the files are read (the loader calls
:func:`note_list` and the layering pass fills ``rules``) and costs nothing at judge time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


def where(node: Node) -> str:
    """ "file:line" of a node (1-based line)."""
    return f"{node.start_mark.name}:{node.start_mark.line + 1}"


@dataclass(slots=True)
class ItemSource:
    """One list item as written: its text, where, and whether a layer appended it."""

    value: str
    where: str
    appended: bool = False


@dataclass(slots=True)
class ListSource:
    name: str
    type: str
    where: str
    description: str = ""
    items: list[ItemSource] = field(default_factory=list)
    appended_at: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RuleSource:
    """A rule after layering. ``changes`` names each override: ("action", "drop", "site.yaml:14")."""

    name: str
    where: str
    node: Node  # the rule as compiled (overrides already applied to its fields)
    enabled: bool = True
    enabled_where: str = ""
    priority: str = ""
    priority_where: str = ""
    changes: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Sources:
    """Everything a reviewer needs to trace a merged policy back to the lines that made it."""

    files: list[str] = field(default_factory=list)
    extends: list[str] = field(default_factory=list)  # "layer -> base" in reading order
    lists: dict[str, ListSource] = field(default_factory=dict)
    rules: list[RuleSource] = field(default_factory=list)
    top: dict[str, Node] = field(default_factory=dict)  # mode, default, ... as finally in force
    settings: dict[str, Node] = field(default_factory=dict)  # merged settings, key -> value node

    def rule(self, name: str) -> RuleSource | None:
        for r in self.rules:
            if r.name == name:
                return r
        return None


def scalar_items(node: Node | None) -> list[ScalarNode]:
    """The scalar items of an ``items:`` node (other shapes are the loader's to report)."""
    if isinstance(node, SequenceNode):
        return [n for n in node.value if isinstance(n, ScalarNode)]
    return []


def note_list(src: Sources, name: str, type_: str | None, knode: Node, vnode: Node) -> None:
    """Record a list definition as written (the loader has checked or reported its shape)."""
    if name in src.lists or not isinstance(vnode, MappingNode):
        return
    ls = ListSource(name, type_ or "?", where(knode))
    for k, v in vnode.value:
        if isinstance(k, ScalarNode) and k.value == "description" and isinstance(v, ScalarNode):
            ls.description = " ".join(str(v.value).split())
        if isinstance(k, ScalarNode) and k.value == "items":
            ls.items = [ItemSource(str(n.value).strip(), where(n)) for n in scalar_items(v)]
    src.lists[name] = ls
