"""--metrics stays loopback-only unless --metrics-allow-remote says otherwise (issue 12)."""

from __future__ import annotations

import pytest

from egressd.cli import build_parser
from egressd.daemon import parse_metrics_address


@pytest.mark.parametrize("text", ["0.0.0.0:9713", "198.51.100.2:9713", "[2001:db8::2]:9713", "[::]:9713"])
def test_a_non_loopback_address_is_refused_without_the_opt_in(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics-allow-remote"):
        parse_metrics_address(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [("198.51.100.2:9713", ("198.51.100.2", 9713)), ("[2001:db8::2]:9100", ("2001:db8::2", 9100))],
)
def test_the_opt_in_binds_exactly_the_address_given(text: str, want: tuple[str, int]) -> None:
    assert parse_metrics_address(text, allow_remote=True) == want


def test_loopback_needs_no_opt_in() -> None:
    assert parse_metrics_address("127.0.0.1:9713") == ("127.0.0.1", 9713)
    assert parse_metrics_address("[::1]:9713") == ("::1", 9713)


@pytest.mark.parametrize("text", ["node.example:9713", "198.51.100.2", "198.51.100.2:0", "198.51.100.2:70000"])
def test_names_and_bad_ports_are_refused_even_with_the_opt_in(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics"):
        parse_metrics_address(text, allow_remote=True)


def test_the_flag_is_off_unless_given() -> None:
    p = build_parser()
    assert p.parse_args(["run"]).metrics_allow_remote is False
    assert p.parse_args(["run", "--metrics-allow-remote"]).metrics_allow_remote is True
