"""Policy file -> YAML node graph with a position on every node; nothing is ever constructed.

Why nodes and not ``yaml.safe_load``: a security team fixing a policy needs ``file:line:col``
for every problem, and only the composed node graph keeps a mark on each scalar, list and
mapping. Composing also means no Python object is built from the document at all — values
are read from node text by the loader, so no tag can make anything execute.

What is refused, and why:

* aliases (``*name``) — the billion-laughs expansion needs them, and a policy reviewer must
  see every value where it applies. Anchors (``&name``) are refused with them: an anchor
  only exists to be aliased. Named lists (``$name``) are the supported way to reuse values.
* explicit tags other than the plain YAML ones (``!!python/object``, ``!custom``).
* nesting deeper than :data:`MAX_DEPTH` (the composer recurses; a hostile file could exhaust
  the Python stack) and files larger than :data:`MAX_FILE_BYTES`.

Problems found while composing (alias, anchor, tag) are reported and composing continues, so
one run reports all of them; a YAML syntax error stops that file (PyYAML cannot resume).
"""

from __future__ import annotations

from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.policy.model import Diagnostic

MAX_DEPTH: Final = 64
MAX_FILE_BYTES: Final = 1 << 20

TAG_PREFIX: Final = "tag:yaml.org,2002:"
STR_TAG: Final = TAG_PREFIX + "str"
INT_TAG: Final = TAG_PREFIX + "int"
FLOAT_TAG: Final = TAG_PREFIX + "float"
BOOL_TAG: Final = TAG_PREFIX + "bool"
NULL_TAG: Final = TAG_PREFIX + "null"
# Tag of the inert node that stands in for a refused alias (never a tag a file can produce:
# it has no "!" handle), so problems *at* the alias are not reported a second time.
ALIAS_TAG: Final = "egressd:refused-alias"
_ALLOWED_TAGS: Final = frozenset(TAG_PREFIX + t for t in ("str", "int", "float", "bool", "null", "seq", "map")) | {"!"}


MAX_DIAGNOSTICS: Final = 100


class TooManyProblems(Exception):
    """Raised once a file has produced MAX_DIAGNOSTICS problems: a hostile file (a megabyte
    of aliases) must be refused in bounded time and memory, and nobody reads problem 101."""

    def __init__(self, items: list[Diagnostic]) -> None:
        super().__init__(f"more than {MAX_DIAGNOSTICS} problems")
        self.items = items


class Reporter:
    """Collects diagnostics; every message is a plain sentence for the person editing the file."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def _add(self, d: Diagnostic) -> None:
        self.items.append(d)
        if len(self.items) >= MAX_DIAGNOSTICS:
            self.items.append(Diagnostic(d.file, d.line, d.col, f"more than {MAX_DIAGNOSTICS} problems; stopping here"))
            raise TooManyProblems(self.items)

    def at(self, file: str, line: int, col: int, message: str) -> None:
        self._add(Diagnostic(file, line, col, message))

    def mark(self, mark: yaml.Mark, message: str) -> None:
        self._add(Diagnostic(str(mark.name), mark.line + 1, mark.column + 1, message))

    def node(self, node: Node, message: str) -> None:
        if node.tag == ALIAS_TAG:
            return  # the alias itself was reported; anything said about its stand-in is noise
        self.mark(node.start_mark, message)


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__("too deep")
        self.mark = mark


def show_tag(tag: str) -> str:
    return "!!" + tag[len(TAG_PREFIX) :] if tag.startswith(TAG_PREFIX) else tag


class _NodeLoader(yaml.SafeLoader):
    """SafeLoader whose composer reports aliases, anchors and foreign tags instead of using them."""

    def __init__(self, text: str, name: str, report: Reporter) -> None:
        super().__init__(text)
        self.name = name  # every Mark created from now on carries the file name
        self._report = report
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]
            self._report.mark(
                event.start_mark,
                f"YAML aliases (*{event.anchor}) are not allowed in policy files; use a named list "
                '($name) to reuse values (a wildcard domain must be quoted: "*.example.com")',
            )
            return ScalarNode(ALIAS_TAG, "", event.start_mark, event.end_mark)
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if event.anchor is not None:
            self._report.mark(
                event.start_mark,
                f"YAML anchors (&{event.anchor}) are not allowed in policy files; "
                "use a named list ($name) to reuse values",
            )
            event.anchor = None
        tag = event.tag
        if tag is not None and tag not in _ALLOWED_TAGS:
            self._report.mark(
                event.start_mark,
                f"the YAML tag {show_tag(tag)!s} is not allowed in policy files; "
                "only plain values, lists and mappings are",
            )
            event.tag = None
            if isinstance(event, yaml.ScalarEvent):
                event.implicit = (True, True)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _TooDeep(event.start_mark)
        try:
            node: Node | None = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None  # the parser only hands the composer scalar/sequence/mapping events
        return node


def _position(text: str, index: int) -> tuple[int, int]:
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def _syntax_message(err: yaml.MarkedYAMLError) -> str:
    problem = err.problem or "invalid YAML"
    if err.context == "while scanning an alias" or err.context == "while scanning an anchor":
        return f"YAML syntax error: {problem} (a value starting with '*' or '&' must be quoted, e.g. \"*.example.com\")"
    if err.context and err.context_mark is not None:
        return f"YAML syntax error: {problem} ({err.context} at line {err.context_mark.line + 1})"
    if err.context:
        return f"YAML syntax error: {problem} ({err.context})"
    return f"YAML syntax error: {problem}"


def read_text(path: str) -> tuple[str | None, str]:
    """(text, "") or (None, reason). Reasons are sentences for the user."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None, "the file does not exist"
    except IsADirectoryError:
        return None, "this is a directory, not a policy file"
    except PermissionError:
        return None, "permission denied reading the file"
    except (OSError, ValueError) as exc:
        return None, f"cannot read the file: {exc}"
    if len(data) > MAX_FILE_BYTES:
        return None, f"the file is larger than {MAX_FILE_BYTES >> 20} MiB; policy files are small text files"
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return None, f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})"


MAX_EVENTS: Final = 100_000  # YAML events (values, list/mapping starts and ends) in one file
_FastLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _too_many_values(text: str) -> Any:
    """Count YAML events with libyaml's C parser before the (pure-Python, line-tracking)
    composer runs: a megabyte of ``{}, `` must be refused in milliseconds, not seconds.
    Syntax errors are left to the composer, which reports them with their position."""
    try:
        for i, ev in enumerate(yaml.parse(text, Loader=_FastLoader)):
            if i >= MAX_EVENTS:
                return ev.start_mark
    except yaml.YAMLError:
        return None
    return None


def compose(text: str, name: str, report: Reporter) -> Node | None:
    """The document's root node, or None when it is empty or unusable (already reported)."""
    mark = _too_many_values(text)
    if mark is not None:
        line, col = mark.line + 1, mark.column + 1
        report.at(name, line, col, f"more than {MAX_EVENTS} YAML values in one file; split it or shorten it")
        return None
    try:
        loader = _NodeLoader(text, name, report)
    except yaml.reader.ReaderError as exc:
        line, col = _position(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else 0
        report.at(name, line, col, f"the file contains a control character YAML does not allow (U+{char:04X})")
        return None
    try:
        root: Node | None = loader.get_single_node()
    except _TooDeep as exc:
        report.mark(exc.mark, f"values are nested more than {MAX_DEPTH} levels deep")
        return None
    except yaml.reader.ReaderError as exc:  # pragma: no cover - str input is checked up front
        line, col = _position(text, exc.position)
        report.at(name, line, col, f"the file contains a character YAML does not allow: {exc.reason}")
        return None
    except yaml.MarkedYAMLError as exc:
        if exc.problem == "expected a single document in the stream" or (
            exc.context == "expected a single document in the stream"
        ):
            mark = exc.problem_mark or exc.context_mark
            message = "a policy file holds one YAML document; remove the second '---' document"
        else:
            mark = exc.problem_mark or exc.context_mark
            message = _syntax_message(exc)
        if mark is None:
            report.at(name, 1, 1, message)
        else:
            report.mark(mark, message)
        return None
    except yaml.YAMLError as exc:
        report.at(name, 1, 1, f"YAML syntax error: {exc}")
        return None
    finally:
        loader.dispose()
    return root


def node_kind(node: Node) -> str:
    """How a node reads to a person: 'a list', 'a mapping', 'a number', 'text'..."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag
    if tag == NULL_TAG:
        return "an empty value"
    if tag == BOOL_TAG:
        return f"the boolean {node.value!s}"
    if tag in (INT_TAG, FLOAT_TAG):
        return f"the number {node.value!s}"
    return f"the text {quote(str(node.value))}"


def quote(value: str, limit: int = 60) -> str:
    """A user value inside a message: quoted, escaped, shortened (files can be hostile)."""
    shown = value if len(value) <= limit else value[:limit] + "..."
    out = []
    for ch in shown:
        if ch == "'" or ch == "\\":
            out.append("\\" + ch)
        elif ch.isprintable() and not ("\ud800" <= ch <= "\udfff"):
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return "'" + "".join(out) + "'"
