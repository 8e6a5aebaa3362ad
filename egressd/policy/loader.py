"""Policy files -> validated, compiled :class:`Policy`, or every problem with its position.

Two phases, so that one run reports everything and order in the files does not matter:

1. read (this module): each file is composed to a node graph (:mod:`egressd.policy.source`),
   includes are followed depth first, named lists are parsed and checked, rule nodes are
   collected in policy order (an included file's rules come before the including file's own);
2. compile (:mod:`egressd.policy.rules`): rules are parsed against the complete table of
   lists, settings are resolved, and the policy-wide checks run.

A rule or list with a problem is reported and left out; checking continues with the rest, and
the policy is only built when nothing at all was reported. The format is documented in
:mod:`egressd.policy`.
"""

from __future__ import annotations

import os
from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.policy import layers
from egressd.policy.model import (
    ACTIONS,
    ERROR_ACTIONS,
    FAIL_MODES,
    MODES,
    OVERLOAD_ACTIONS,
    Diagnostic,
    Policy,
    PolicyError,
)
from egressd.policy.provenance import Sources, note_list
from egressd.policy.rules import compile_rules, compile_settings
from egressd.policy.shapes import ListDef, State, as_choice, as_text, is_null, known_keys, location, pairs
from egressd.policy.source import TooManyProblems, compose, node_kind, quote, read_text
from egressd.policy.values import domain_or_error, parse_cidr, parse_port_range

TOP_KEYS: Final = (
    "extends",
    "mode",
    "default",
    "fail",
    "on_overload",
    "on_error",
    "include",
    "settings",
    "lists",
    "rules",
)
INCLUDED_FILE_KEYS: Final = ("include", "lists", "rules")
LIST_KEYS: Final = ("type", "items", "description")
LIST_TYPES: Final = ("cidr", "port", "domain")
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


# ---------------------------------------------------------------------------------- files


def _read(
    display: str,
    real: str,
    stack: list[tuple[str, str]],
    st: State,
    site: Node | None,
    text: str | None = None,
    base: bool = False,
) -> None:
    """Read one file (and, depth first, what it extends and includes) into the state.

    ``base``: the file is the base of a layered policy (``extends:``); its top-level keys are
    in force unless the file that extends it sets them again."""
    is_main = site is None
    main_like = is_main or base
    st.loaded.add(real)
    if text is None:
        text, why = read_text(display)
        if text is None:
            if site is None:
                st.report.at(display, 1, 1, f"cannot load the policy: {why}")
            elif why == "the file does not exist":
                st.report.node(site, f"included file {quote(str(site.value))} does not exist (looked for {display})")
            else:
                st.report.node(site, f"cannot include {quote(str(site.value))}: {why}")
            return
    st.files.append(display)
    before = len(st.report.items)
    root = compose(text, display, st.report)
    if root is None or is_null(root):
        if len(st.report.items) == before:
            what = "the policy file" if is_main else "the extended file" if base else "the included file"
            st.report.at(
                display,
                1,
                1,
                f"{what} is empty; it needs at least " + ("'default:'" if main_like else "'lists:'"),
            )
        return
    if not isinstance(root, MappingNode):
        st.report.node(
            root,
            f"the top level of a policy file must be a mapping of keys such as 'rules:' and 'lists:', "
            f"not {node_kind(root)}",
        )
        return
    items = pairs(root, st, "the policy file")
    if items is None:  # pragma: no cover - root is a mapping
        return
    if main_like:
        if is_main:
            st.main_root = root
        keys = known_keys(items, TOP_KEYS, st, "the policy file")
    else:
        keys = {}
        for key, knode, vnode in items:
            if key in TOP_KEYS and key not in INCLUDED_FILE_KEYS:
                st.report.node(knode, f"{quote(key)} can only be set in the main policy file, not in an included file")
            else:
                keys.update(known_keys([(key, knode, vnode)], INCLUDED_FILE_KEYS, st, "an included file"))
    if "extends" in keys:
        _extends(keys["extends"][1], display, [*stack, (real, display)], st)
    if "include" in keys:
        _includes(keys["include"][1], display, [*stack, (real, display)], st)
    if "lists" in keys:
        _lists(keys["lists"][1], st)
    if "rules" in keys:
        rules = keys["rules"][1]
        if isinstance(rules, SequenceNode):
            st.rule_nodes.extend(rules.value)
        elif not is_null(rules):
            st.report.node(rules, f"'rules' must be a list of rules (lines starting with '- '), not {node_kind(rules)}")
    if main_like:
        _merge_main(st, {k: v for k, (_, v) in keys.items() if k != "extends"})


def _merge_main(st: State, keys: dict[str, Node]) -> None:
    """A layer's top-level keys replace its base's; ``settings`` are replaced key by key."""
    old = st.main.get("settings")
    new = keys.get("settings")
    if isinstance(old, MappingNode) and isinstance(new, MappingNode):
        mine = {k.value for k, _ in new.value if isinstance(k, ScalarNode)}
        kept = [(k, v) for k, v in old.value if not (isinstance(k, ScalarNode) and k.value in mine)]
        keys["settings"] = MappingNode(new.tag, kept + list(new.value), new.start_mark, new.end_mark)
    st.main.update(keys)


def _extends(node: Node, display: str, stack: list[tuple[str, str]], st: State) -> None:
    """``extends: FILE``: read the base policy first (its rules come first, its keys apply)."""
    name = as_text(node, st, "'extends' (the base policy file)")
    if name is None:
        return
    if name.strip() == "egressd:default":
        from egressd.paths import default_policy

        try:
            target = os.fspath(default_policy())
        except FileNotFoundError as exc:
            st.report.node(node, str(exc))
            return
    else:
        target = os.path.normpath(os.path.join(os.path.dirname(display), name.strip()))
    real = os.path.realpath(target)
    chain = [r for r, _ in stack]
    if real in chain:
        names = [d for _, d in stack[chain.index(real) :]] + [target]
        st.report.node(node, f"extends cycle: {' -> '.join(names)}")
        return
    if real in st.loaded:
        st.report.node(node, f"{quote(name)} was already read (included by another file); a base must be read first")
        return
    st.sources.extends.append(f"{display} -> {target}")
    _read(target, real, stack, st, node, base=True)


def _includes(node: Node, display: str, stack: list[tuple[str, str]], st: State) -> None:
    if is_null(node):
        return
    items = [node] if isinstance(node, ScalarNode) else node.value if isinstance(node, SequenceNode) else None
    if items is None:
        st.report.node(node, f"'include' must be a file name or a list of file names, not {node_kind(node)}")
        return
    for item in items:
        name = as_text(item, st, "an include")
        if name is None:
            continue
        if not name.strip():
            st.report.node(item, "an include names no file")
            continue
        target = os.path.normpath(os.path.join(os.path.dirname(display), name))
        try:
            real = os.path.realpath(target)
        except (OSError, ValueError):
            st.report.node(item, f"{quote(name)} is not a valid file name")
            continue
        chain = [r for r, _ in stack]
        if real in chain:
            names = [d for _, d in stack[chain.index(real) :]] + [target]
            st.report.node(item, f"include cycle: {' -> '.join(names)}")
            continue
        if real in st.loaded:
            continue  # a file included twice (diamond) is read once
        _read(target, real, stack, st, item)


def _valid_name(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and set(name) <= _NAME_CHARS


def _lists(node: Node, st: State) -> None:
    if is_null(node):
        return
    items = pairs(node, st, "'lists'", dup="list name")
    if items is None:
        return
    for name, knode, vnode in items:
        what = f"list {quote(name)}"
        if layers.append_to_list(name, knode, vnode, st, _list_items):
            continue
        if not _valid_name(name):
            st.report.node(
                knode,
                f"{what} has an invalid name; use letters, digits, '_', '-' and '.', starting with a letter",
            )
            continue
        ldef = ListDef(name, None, location(knode))
        first = st.lists.get(name)
        if first is not None:  # still checked below, so its own problems are reported too
            st.report.node(knode, f"duplicate list name {quote(name)} (first defined at {first.where})")
        else:
            st.lists[name] = ldef
        fields = pairs(vnode, st, what)
        if fields is None:
            continue
        keys = known_keys(fields, LIST_KEYS, st, what)
        if "description" in keys:
            as_text(keys["description"][1], st, f"the description of {what}")
        if "type" in keys:
            ldef.type = as_choice(keys["type"][1], st, f"type of {what}", LIST_TYPES)
        else:
            st.report.node(vnode, f"{what} has no 'type:' (one of {', '.join(LIST_TYPES)})")
        if "items" not in keys:
            st.report.node(vnode, f"{what} has no 'items:'")
            continue
        if first is None:
            note_list(st.sources, name, ldef.type, knode, vnode)
        _list_items(ldef, keys["items"][1], st, what)


def _list_items(ldef: ListDef, node: Node, st: State, what: str) -> None:
    if is_null(node):
        return  # an empty list is legitimate: an operator may empty an allowlist on purpose
    if not isinstance(node, SequenceNode):
        st.report.node(
            node,
            f"the items of {what} must be a list ([a, b] or lines starting with '- '), not {node_kind(node)}",
        )
        return
    for item in node.value:
        if not isinstance(item, ScalarNode) or is_null(item):
            st.report.node(item, f"each item of {what} must be a single value, not {node_kind(item)}")
            continue
        value = str(item.value)
        if value.startswith("$"):
            st.report.node(
                item,
                f"a list cannot contain another list ({quote(value)}); name both lists in the rule, as [$a, $b]",
            )
            continue
        if ldef.type == "cidr":
            net = parse_cidr(value)
            if isinstance(net, str):
                st.report.node(item, net)
            else:
                ldef.cidrs.append(net)
        elif ldef.type == "port":
            rng = parse_port_range(value)
            if isinstance(rng, str):
                st.report.node(item, rng)
            else:
                ldef.ports.append(rng)
        elif ldef.type == "domain":
            dom, err = domain_or_error(value)
            if dom is None:
                st.report.node(item, err)
            else:
                ldef.domains.append(dom)


# ---------------------------------------------------------------------------------- entry points


def _load(
    path: str | os.PathLike[str], text: str | None, as_policy: bool, st: State | None = None
) -> tuple[Policy | None, list[Diagnostic]]:
    display = os.fspath(path)
    st = st if st is not None else State()
    try:
        real = os.path.realpath(display)
    except (OSError, ValueError):
        real = display
    _read(display, real, [], st, None, text)
    policy: Policy | None = None
    if st.main_root is not None:
        m = st.main
        mode = as_choice(m["mode"], st, "mode", MODES) if "mode" in m else "enforce"
        default: str | None = None
        list_file = "lists" in m and set(m) <= {"include", "lists"}
        if "default" in m:
            default = as_choice(m["default"], st, "default action", ACTIONS)
        elif list_file and not as_policy:
            pass  # a file of lists, meant to be included: fine on its own, but not a policy
        elif list_file:
            st.report.node(
                st.main_root,
                "this file only defines lists; include it from a policy file, or add 'default:' "
                "and rules to make it a policy",
            )
        else:
            st.report.node(
                st.main_root,
                "the policy does not say what happens to flows no rule matches; add 'default: accept' "
                "or 'default: drop'",
            )
        fail = as_choice(m["fail"], st, "fail mode", FAIL_MODES) if "fail" in m else "open"
        overload = (
            as_choice(m["on_overload"], st, "on_overload action", OVERLOAD_ACTIONS) if "on_overload" in m else "drop"
        )
        on_error = as_choice(m["on_error"], st, "on_error action", ERROR_ACTIONS) if "on_error" in m else "accept"
        settings, named = compile_settings(m.get("settings"), st)
        layers.prepare_rules(st)
        rules = layers.finish_rules(compile_rules(st), st)
        st.sources.files = list(st.files)
        st.sources.top = {k: v for k, v in m.items() if k not in ("include", "lists", "rules", "settings")}
        sn = m.get("settings")
        if isinstance(sn, MappingNode):
            st.sources.settings = {str(k.value): v for k, v in sn.value if isinstance(k, ScalarNode)}
        if not st.report.items and None not in (mode, default, fail, overload, on_error):
            assert mode is not None and default is not None and fail is not None
            assert overload is not None and on_error is not None
            policy = Policy(
                path=display,
                files=tuple(st.files),
                mode=mode,
                default=default,
                fail=fail,
                on_overload=overload,
                on_error=on_error,
                settings=settings,
                pool_domains=named.get("pool_domains"),
                tunnel_service_domains=named.get("tunnel_service_domains"),
                rules=tuple(rules),
            )
    order = {f: i for i, f in enumerate(st.files)}
    diags = sorted(dict.fromkeys(st.report.items), key=lambda d: (order.get(d.file, len(order)), d.line, d.col))
    return (policy if not diags else None), diags


def _guarded(
    path: str | os.PathLike[str], text: str | None, as_policy: bool = True, st: State | None = None
) -> tuple[Policy | None, list[Diagnostic]]:
    """A reload must never take the daemon down: a loader bug becomes a diagnostic too."""
    try:
        return _load(path, text, as_policy, st)
    except TooManyProblems as exc:
        return None, list(exc.items)
    except Exception as exc:  # last line of defence: reported, not swallowed
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
        detail = f"{type(exc).__name__}: {exc}"[:300]
        msg = f"internal error in the policy loader (please report this egressd bug): {detail}"
        return None, [Diagnostic(str(name), 1, 1, msg)]


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load, validate and compile a policy file and its includes; raises :class:`PolicyError`."""
    policy, diags = _guarded(path, None)
    if policy is None:
        raise PolicyError(diags)
    return policy


def load_with_sources(path: str | os.PathLike[str], text: str | None = None) -> tuple[Policy, Sources]:
    """Like :func:`load_policy`, also returning where every list item and rule came from
    (``egressd validate --print-merged``, ``egressd explain``, ``egressd learn``)."""
    st = State()
    policy, diags = _guarded(path, text, True, st)
    if policy is None:
        raise PolicyError(diags)
    return policy, st.sources


def load_policy_text(text: str, path: str | os.PathLike[str] = "<policy>") -> Policy:
    """Like :func:`load_policy` for text held in memory (tests, generated policies).

    ``path`` names the text in diagnostics; includes are resolved relative to its directory.
    """
    policy, diags = _guarded(path, text)
    if policy is None:
        raise PolicyError(diags)
    return policy


def validate(path: str | os.PathLike[str]) -> list[Diagnostic]:
    """Every problem in the policy and its includes, in file order; [] when it is fine.

    A file holding only ``lists:`` (and ``include:``) is checked as a list file meant to be
    included (``rules/lists/*.yaml``): it needs no ``default:``. :func:`load_policy` still
    refuses it, since it is not a policy.
    """
    return _guarded(path, None, as_policy=False)[1]
