"""The policy's ``content`` condition: validated with file:line, and never true while pending."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from egressd.policy import FlowFacts, PolicyError, load_policy, validate

POLICY = """\
default: accept
rules:
  - name: alert-unknown-payload-on-3333
    description: payload nobody recognised
    match:
      dst_port: 3333
      content: {content}
    action: alert
"""


def facts(content: str, dport: int = 3333) -> FlowFacts:
    a, b = ipaddress.ip_address("198.51.100.2").packed, ipaddress.ip_address("203.0.113.9").packed
    return FlowFacts(6, 4, a, b, 40000, dport, (), (), content)


def write(tmp_path: Path, content: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(POLICY.format(content=content))
    return p


def test_unknown_content_value_is_reported_at_its_line_with_a_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, "unclasified")
    diags = validate(p)
    assert len(diags) == 1
    d = diags[0]
    assert (d.line, d.col) == (7, 16)
    assert "unknown content 'unclasified'" in d.message and "did you mean 'unclassified'" in d.message
    with pytest.raises(PolicyError):
        load_policy(p)


@pytest.mark.parametrize(
    ("written", "holds_for"),
    [
        ("unclassified", {"unclassified"}),
        ("none", {"none"}),
        ("[none, unclassified]", {"none", "unclassified"}),
        ("classified", {"classified"}),
    ],
)
def test_content_holds_only_for_its_values_and_never_while_pending(
    tmp_path: Path, written: str, holds_for: set[str]
) -> None:
    pol = load_policy(write(tmp_path, written))
    for content in ("pending", "none", "unclassified", "classified"):
        want = "alert" if content in holds_for else "accept"
        assert pol.judge(facts(content)).action == want, content
    assert pol.needs_content()


def test_a_negated_content_condition_is_not_known_while_pending_either(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(
        textwrap.dedent(
            """\
            default: accept
            rules:
              - name: payload-to-3333
                description: anything with payload
                match: {dst_port: 3333, not: {content: none}}
                action: alert
            """
        )
    )
    pol = load_policy(p)
    assert pol.judge(facts("unclassified")).action == "alert"
    assert pol.judge(facts("none")).action == "accept"
    assert pol.judge(facts("pending")).action == "accept"  # "not none" is no more known than "none"


def test_a_policy_without_content_rules_is_not_judged_again(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("default: accept\nrules: []\n")
    assert not load_policy(p).needs_content()
