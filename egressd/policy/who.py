"""Rules on *who* is behind a flow: process, user, container or pod, cgroup, GPU.

Match keys (in a rule's ``match:``, beside the flow conditions)::

    process:                 # all given fields must hold
      name: "xmrig*"         # glob on the process name (comm)
      executable: "/tmp/*"   # glob on the executable's path
      user: [alice, bob]     # user name(s)
      uid: [4242, "1000-1999"]
    container: any           # any | none | container id(s) (the full id or a prefix of 12+)
    pod: 5e393aad-0b0b-...   # Kubernetes pod UID(s)
    cgroup: "/kubepods.slice/*"   # glob(s) on the cgroup-v2 path
    gpu: true                # the process, or a process of its cgroup, holds an NVIDIA GPU

Why such rules never decide a verdict: these facts come from ``/proc`` and the cgroup tree,
which the daemon reads off the verdict path (a verdict never waits for ``/proc``). So a rule
with any of these keys is evaluated once the flow's attribution is done, against the event:
it can raise the alert's ``severity``, mark the event with its name (``who_rule``) and
trigger a ``respond:`` — and its ``action`` must be ``alert``. The first matching such rule
applies. ``egressd test`` has no processes: it reports these rules as not evaluated for every
flow whose flow conditions held, instead of treating them as false.

Globs are ``fnmatch`` patterns (``*``, ``?``, ``[...]``), matched case-sensitively.
"""

from __future__ import annotations

import fnmatch
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from yaml.nodes import MappingNode, Node, ScalarNode

from egressd.policy.shapes import State, known_keys, pairs, values_of
from egressd.policy.source import BOOL_TAG, INT_TAG, node_kind, quote

if TYPE_CHECKING:
    from egressd.events import Event
    from egressd.policy.model import FlowFacts, Rule

WHO_KEYS: Final = ("process", "container", "pod", "cgroup", "gpu")
PROCESS_KEYS: Final = ("name", "executable", "user", "uid")
_HEX: Final = frozenset("0123456789abcdef")
_PROTOS: Final = {"TCP": 6, "UDP": 17, "ICMP": 1, "IPv6-ICMP": 58, "GRE": 47, "ESP": 50, "AH": 51}


@dataclass(frozen=True, slots=True)
class WhoMatch:
    """Compiled who-conditions; ``None`` means no condition on that fact."""

    names: tuple[str, ...] | None = None
    executables: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    uids: tuple[tuple[int, int], ...] | None = None
    container: str | None = None  # "any" | "none" | None (ids in container_ids)
    container_ids: tuple[str, ...] | None = None
    pods: tuple[str, ...] | None = None
    cgroups: tuple[str, ...] | None = None
    gpu: bool | None = None

    def test(self, who: dict[str, Any]) -> bool:
        """``who`` is ``Who.facts()`` from the attribution: name, executable, user, uid,
        cgroup, container (dict or None), gpu (bool)."""
        if self.names is not None and not _glob_any(who.get("name"), self.names):
            return False
        if self.executables is not None and not _glob_any(who.get("executable"), self.executables):
            return False
        if self.users is not None and who.get("user") not in self.users:
            return False
        if self.uids is not None:
            uid = who.get("uid")
            if not isinstance(uid, int) or not any(lo <= uid <= hi for lo, hi in self.uids):
                return False
        ctr = who.get("container")
        if self.container == "none" and (ctr is not None or not who.get("known")):
            return False  # unknown is not "none": a lookup that failed proves nothing
        if self.container == "any" and ctr is None:
            return False
        if self.container_ids is not None:
            cid = ctr.get("id", "") if ctr else ""
            if not cid or not any(cid.startswith(x) for x in self.container_ids):
                return False
        if self.pods is not None and (not ctr or ctr.get("pod_uid") not in self.pods):
            return False
        if self.cgroups is not None and not _glob_any(who.get("cgroup"), self.cgroups):
            return False
        if self.gpu is None:
            return True
        held = who.get("gpu")
        return held is not None and bool(held) == self.gpu  # unknown (fds unreadable) proves nothing


def _glob_any(value: object, patterns: tuple[str, ...]) -> bool:
    return isinstance(value, str) and any(fnmatch.fnmatchcase(value, p) for p in patterns)


# ---------------------------------------------------------------------------------- parsing


def _texts(node: Node, st: State, what: str) -> tuple[str, ...] | None:
    items = values_of(node, st, what)
    if items is None:
        return None
    out: list[str] = []
    for item in items:
        value = str(item.value).strip()
        if not value:
            st.report.node(item, f"{what} has an empty value")
            return None
        if value.startswith("$"):
            st.report.node(item, f"{what} takes values, not lists ({quote(value)})")
            return None
        out.append(value)
    return tuple(out) if len(out) == len(items) else None


def _uids(node: Node, st: State) -> tuple[tuple[int, int], ...] | None:
    items = values_of(node, st, "'process.uid'")
    if items is None:
        return None
    out: list[tuple[int, int]] = []
    for item in items:
        text = str(item.value).strip()
        lo_t, sep, hi_t = text.partition("-")
        try:
            lo = int(lo_t)
            hi = int(hi_t) if sep else lo
        except ValueError:
            st.report.node(item, f"'process.uid' must be a uid or a range 'first-last', not {quote(text)}")
            return None
        if not 0 <= lo <= hi < 1 << 32:
            st.report.node(item, f"'process.uid' {quote(text)} is out of range (0-4294967295, first <= last)")
            return None
        out.append((lo, hi))
    return tuple(out)


def parse_who(keys: dict[str, tuple[ScalarNode, Node]], st: State, what: str) -> WhoMatch | None:
    """The who-conditions among a match block's keys (the loader passes only WHO_KEYS);
    None when any had a problem (reported at its line)."""
    ok = True
    fields: dict[str, Any] = {}
    for key, (_knode, vnode) in keys.items():
        if key == "process":
            items = pairs(vnode, st, "'process'")
            if items is None:
                ok = False
                continue
            if not items:
                st.report.node(vnode, "'process' needs at least one of " + ", ".join(PROCESS_KEYS))
                ok = False
            pk = known_keys(items, PROCESS_KEYS, st, "'process'")
            ok = ok and len(pk) == len(items)
            for sub, (_k, sub_node) in pk.items():
                if sub == "uid":
                    uids = _uids(sub_node, st)
                    ok = ok and uids is not None
                    fields["uids"] = uids
                else:
                    vals = _texts(sub_node, st, f"'process.{sub}'")
                    ok = ok and vals is not None
                    fields[{"name": "names", "executable": "executables", "user": "users"}[sub]] = vals
        elif key == "container":
            vals = _texts(vnode, st, "'container'")
            if vals is None:
                ok = False
                continue
            if len(vals) == 1 and vals[0] in ("any", "none"):
                fields["container"] = vals[0]
                continue
            ids: list[str] = []
            for v in vals:
                low = v.lower()
                if low in ("any", "none") or len(low) < 12 or len(low) > 64 or not set(low) <= _HEX:
                    st.report.node(
                        vnode,
                        f"'container' must be any, none, or container ids (12 to 64 hex digits), not {quote(v)}",
                    )
                    ok = False
                ids.append(low)
            fields["container_ids"] = tuple(ids)
        elif key == "pod":
            vals = _texts(vnode, st, "'pod'")
            if vals is None:
                ok = False
                continue
            for v in vals:
                if len(v) != 36 or v.count("-") != 4:
                    st.report.node(vnode, f"'pod' must be a pod UID (8-4-4-4-12 hex digits), not {quote(v)}")
                    ok = False
            fields["pods"] = tuple(v.lower() for v in vals)
        elif key == "cgroup":
            vals = _texts(vnode, st, "'cgroup'")
            if vals is None:
                ok = False
                continue
            for v in vals:
                if not v.startswith(("/", "*")):
                    st.report.node(vnode, f"'cgroup' patterns match cgroup-v2 paths, which start with '/': {quote(v)}")
                    ok = False
            fields["cgroups"] = vals
        elif key == "gpu":
            if not isinstance(vnode, ScalarNode) or vnode.tag != BOOL_TAG:
                st.report.node(vnode, f"'gpu' must be true or false, not {node_kind(vnode)}")
                ok = False
                continue
            fields["gpu"] = str(vnode.value).lower() in ("true", "yes", "on")
    if not ok:
        return None
    return WhoMatch(**fields)


def check_who_rule(node: MappingNode | Node, st: State, label: str, action: str | None, keys: dict[str, Any]) -> None:
    """A rule with who-conditions can only alert (see the module docstring)."""
    if action is not None and action != "alert":
        st.report.node(
            node,
            f"{label} matches on who is behind the flow ({', '.join(k for k in WHO_KEYS if k in keys)}), which is "
            "known only after the verdict (attribution never delays one); its action must be alert (it can set "
            "'severity' and 'respond', never drop or accept)",
        )


def parse_severity(node: Node, st: State) -> int | None:
    if not isinstance(node, ScalarNode) or node.tag != INT_TAG or str(node.value) not in ("1", "2", "3"):
        st.report.node(node, "'severity' must be 1 (high), 2 or 3 (low), as in EVE alerts")
        return None
    return int(str(node.value))


# ---------------------------------------------------------------------------------- judging


def facts_of_event(ev: Event) -> FlowFacts:
    """The flow facts an event still carries (its first domain only)."""
    from egressd.policy.model import FlowFacts

    fam = socket.AF_INET6 if ":" in ev.src_ip else socket.AF_INET
    try:
        src = socket.inet_pton(fam, ev.src_ip)
        dst = socket.inet_pton(fam, ev.dest_ip)
    except OSError:
        src = dst = b""
    return FlowFacts(
        _PROTOS.get(ev.proto, int(ev.proto) if ev.proto.isdigit() else -1),
        6 if fam == socket.AF_INET6 else 4,
        src,
        dst,
        ev.src_port,
        ev.dest_port,
        (ev.domain,) if ev.domain else (),
        tuple(ev.detections),
    )


def flow_part_holds(rule: Rule, facts: FlowFacts) -> bool:
    src = int.from_bytes(facts.src, "big") if facts.src else 0
    dst = int.from_bytes(facts.dst, "big") if facts.dst else 0
    return rule.match.test(facts, src, dst)


def judge_who(rules: tuple[Rule, ...], ev: Event, who: dict[str, Any]) -> Rule | None:
    """The first who-rule whose flow conditions and who-conditions both hold, or None."""
    if not rules:
        return None
    facts = facts_of_event(ev)
    for r in rules:
        if r.who is not None and r.who.test(who) and flow_part_holds(r, facts):
            return r
    return None


def unevaluated(rules: tuple[Rule, ...], ev: Event) -> list[str]:
    """Who-rules whose flow conditions hold for this event: what a capture cannot decide."""
    if not rules:
        return []
    facts = facts_of_event(ev)
    return [r.name for r in rules if flow_part_holds(r, facts)]
