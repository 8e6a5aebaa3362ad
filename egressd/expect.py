"""Expectation files for ``egressd test --expect``: what a capture must replay to.

Security teams keep a capture of each traffic pattern they care about next to the policy
and fail their CI when a policy change alters what egressd does with it. The format is
deliberately small (see pcaps/*.expect.yaml)::

    policy: ../rules/default.yaml     # optional, relative to this file
    flows:
      - match: {proto: tcp, dst: 203.0.113.20, dst_port: 22}
        verdict: drop                 # accept | drop | alert
        detection: ssh                # a kind (dotted prefix), or "none"
        rule: drop-ssh-not-allowed    # optional
        count: 1                      # optional: exactly this many flows match

Errors in the file are reported with file:line like policy errors, because the same people
write both.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from egressd.detect.base import kind_matches
from egressd.events import Event
from egressd.protocols import POLICY_NAMES, eve_name


class ExpectError(Exception):
    """The expectation file itself is unusable (exit code 2)."""


_MATCH_KEYS = {"proto", "src", "src_port", "dst", "dst_port"}
_ITEM_KEYS = {"match", "verdict", "detection", "rule", "count", "domain"}
_VERDICTS = {"accept", "drop", "alert"}


@dataclass(frozen=True)
class Expectation:
    line: int
    match: dict[str, Any]
    verdict: str | None
    detection: str | None
    rule: str | None
    count: int | None
    domain: str | None

    def describe(self) -> str:
        m = " ".join(f"{k}={v}" for k, v in self.match.items()) or "any flow"
        return f"line {self.line}: {m}"


@dataclass(frozen=True)
class ExpectFile:
    path: str
    policy: Path | None
    items: tuple[Expectation, ...]


MAX_BYTES = 1 << 20
MAX_DEPTH = 16


def load(path: str | Path) -> ExpectFile:
    """Parse and check an expectation file; anything wrong with it is an ExpectError (exit 2)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ExpectError(f"{p}: cannot read expectation file: {e.strerror or e}") from e
    if len(raw) > MAX_BYTES:
        raise ExpectError(f"{p}: larger than {MAX_BYTES >> 20} MiB; expectation files are small text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExpectError(f"{p}: not UTF-8 text (byte {e.start})") from e
    try:
        _refuse_yaml_features(p, text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ExpectError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        # SafeLoader's constructors fail with plain exceptions on values like "!!int x".
        raise ExpectError(f"{p}: a value cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("flows"), list):
        raise ExpectError(f"{p}:1:1: an expectation file is a mapping with a 'flows' list")
    lines = _item_lines(node)
    items = []
    for i, item in enumerate(data["flows"]):
        line = lines[i] if i < len(lines) else 0
        items.append(_item(f"{p}:{line}", line, item))
    pol = data.get("policy")
    if pol is not None and (not isinstance(pol, str) or "\0" in pol):
        raise ExpectError(f"{p}: 'policy' is a path to a policy file")
    policy = (p.parent / pol).resolve() if pol else None
    return ExpectFile(str(p), policy, tuple(items))


def _refuse_yaml_features(p: Path, text: str) -> None:
    """No anchors/aliases (a billion-laughs file would expand when printed) and bounded nesting."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
            raise ExpectError(f"{p}:{_where(ev)}: YAML anchors and aliases are not allowed here")
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ExpectError(f"{p}:{_where(ev)}: nested more than {MAX_DEPTH} levels")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _where(ev: yaml.Event) -> str:
    m = ev.start_mark
    return f"{m.line + 1}:{m.column + 1}" if m is not None else "1:1"


def _item(where: str, line: int, raw: object) -> Expectation:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ExpectError(f"{where}: each entry of 'flows' is a mapping with text keys")
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise ExpectError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ITEM_KEYS)}")
    match = raw.get("match") or {}
    if not isinstance(match, dict) or not all(isinstance(k, str) for k in match) or set(match) - _MATCH_KEYS:
        raise ExpectError(f"{where}: 'match' takes only {sorted(_MATCH_KEYS)}")
    match = dict(match)
    for k, v in match.items():
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ExpectError(f"{where}: match.{k} must be a single value, not {type(v).__name__}")
    for k in ("src", "dst"):
        if k in match:
            try:
                match[k] = str(ipaddress.ip_address(str(match[k])))
            except ValueError as e:
                raise ExpectError(f"{where}: match.{k}: {match[k]!r} is not an IP address") from e
    if "proto" in match:
        # A policy's name (tcp, icmpv6, 47) -> the event's name (TCP, IPv6-ICMP, GRE), upper-cased.
        text = str(match["proto"]).strip().lower()
        number = POLICY_NAMES.get(text, int(text) if text.isdigit() else -1)
        match["proto"] = (eve_name(number) if number >= 0 else text).upper()
    verdict = raw.get("verdict")
    if verdict is not None and (not isinstance(verdict, str) or verdict not in _VERDICTS):
        raise ExpectError(f"{where}: verdict must be one of {sorted(_VERDICTS)}, not {verdict!r}")
    count = raw.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ExpectError(f"{where}: count must be a whole number >= 0")
    for k in ("detection", "rule", "domain"):
        v = raw.get(k)
        if v is not None and not isinstance(v, str):
            raise ExpectError(f"{where}: {k} must be text")
    return Expectation(
        line, match, verdict, _opt_str(raw, "detection"), _opt_str(raw, "rule"), count, _opt_str(raw, "domain")
    )


def _opt_str(raw: dict[Any, Any], key: str) -> str | None:
    v = raw.get(key)
    return None if v is None else str(v)


def _item_lines(node: yaml.Node | None) -> list[int]:
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == "flows" and isinstance(v, yaml.SequenceNode):
            return [n.start_mark.line + 1 for n in v.value]
    return []


def _matches(e: Event, m: dict[str, Any]) -> bool:
    for k, want in m.items():
        have: object
        if k == "proto":
            have = e.proto.upper()
        elif k == "src":
            have = e.src_ip
        elif k == "dst":
            have = e.dest_ip
        elif k == "src_port":
            have = e.src_port
        else:
            have = e.dest_port
        if str(have) != str(want):
            return False
    return True


def check(exp: ExpectFile, events: list[Event]) -> list[str]:
    """Every way the final per-flow events differ from the expectations (empty = all as expected)."""
    problems: list[str] = []
    for x in exp.items:
        hits = [e for e in events if _matches(e, x.match)]
        if x.count is not None and len(hits) != x.count:
            problems.append(f"{x.describe()}: expected {x.count} flow(s), found {len(hits)}")
            if not hits:
                continue
        if not hits:
            problems.append(f"{x.describe()}: no flow matches")
            continue
        for e in hits:
            flow = f"{e.proto} {e.src_ip}:{e.src_port} -> {e.dest_ip}:{e.dest_port}"
            if x.verdict is not None and e.verdict != x.verdict:
                problems.append(f"{x.describe()}: {flow} verdict {e.verdict} (rule {e.rule}), expected {x.verdict}")
            if x.rule is not None and e.rule != x.rule:
                problems.append(f"{x.describe()}: {flow} decided by rule {e.rule}, expected {x.rule}")
            if x.detection is not None:
                if x.detection == "none":
                    if e.detections:
                        problems.append(f"{x.describe()}: {flow} has detections {e.detections}, expected none")
                elif not any(kind_matches(x.detection, k) for k in e.detections):
                    problems.append(
                        f"{x.describe()}: {flow} detections {e.detections or 'none'}, expected {x.detection}"
                    )
            if x.domain is not None and e.domain != x.domain:
                problems.append(f"{x.describe()}: {flow} domain {e.domain}, expected {x.domain}")
    return problems
