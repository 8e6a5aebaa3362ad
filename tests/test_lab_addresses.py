"""The end-to-end tests name documentation addresses only (docs/lab-addresses.md).

A source scan, not a traffic check: every IPv4 literal in the code strings of tests/e2e/ must be
in 198.51.100.0/24 or 203.0.113.0/24 or be 0.0.0.0 (the unspecified address, a wildcard bind:
it names no host), and neither ``::1`` nor ``localhost`` may appear, except the few uses
listed in ``KEPT`` with the reason each is kept. IPv6 literals other than ``::1`` are not
checked. A new loopback target or a
private range slipped into a test fails here, before it ever runs as root.
"""

from __future__ import annotations

import ast
import ipaddress
import re
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent / "e2e"
LAB_V4 = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
UNSPECIFIED = ipaddress.ip_address("0.0.0.0")
V4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
LOOPBACK_NAMES = re.compile(r"(?<![\w:])::1(?![\w:])|\blocalhost\b", re.IGNORECASE)

# (file, literal): why it is not a lab address.
KEPT: dict[tuple[str, str], str] = {
    ("test_adversarial_privilege.py", "127.0.0.1"): "metrics served on loopback only is what the test checks",
    ("test_kernel_guard.py", "255.255.255.255"): "destination of a crafted DHCP DISCOVER frame",
    ("test_kernel_guard.py", "192.0.2.1"): "RFC 5737 TEST-NET-1 on a second veth between the test's namespaces",
    ("test_kernel_guard.py", "192.0.2.2"): "RFC 5737 TEST-NET-1 on a second veth between the test's namespaces",
    ("test_daemon_guard.py", "192.0.2.1"): "RFC 5737 TEST-NET-1 on a second veth between the test's namespaces",
    ("test_daemon_guard.py", "192.0.2.2"): "RFC 5737 TEST-NET-1 on a second veth between the test's namespaces",
}


def _strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module (f-string parts included) with their line, docstrings
    and other bare string statements left out: an address a test uses is a string in its
    code; one a comment or docstring mentions is prose."""
    tree = ast.parse(path.read_text(), str(path))
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in prose
    ]


def _found(path: Path) -> list[tuple[int, str]]:
    hits = []
    for n, text in _strings(path):
        for m in V4.finditer(text):
            ip = ipaddress.ip_address(m.group(1))
            if ip != UNSPECIFIED and not any(ip in net for net in LAB_V4):
                hits.append((n, m.group(1)))
        hits += [(n, m.group(0)) for m in LOOPBACK_NAMES.finditer(text)]
    return sorted(hits)


@pytest.mark.parametrize("path", sorted(E2E.glob("*.py")), ids=lambda p: p.name)
def test_e2e_module_names_only_lab_addresses(path: Path) -> None:
    bad = [f"{path.name}:{n}: {lit}" for n, lit in _found(path) if (path.name, lit) not in KEPT]
    assert bad == [], "not a documentation address (see docs/lab-addresses.md): " + ", ".join(bad)


def test_every_kept_exception_is_still_used() -> None:
    # A stale entry would silently allow the literal back in that file.
    used = {(p.name, lit) for p in E2E.glob("*.py") for _, lit in _found(p)}
    assert sorted(set(KEPT) - used) == []


def test_the_scan_finds_loopback_and_private_literals(tmp_path: Path) -> None:
    src = tmp_path / "t.py"
    src.write_text(
        '"""A docstring may say 127.0.0.1."""\n'
        'a = "127.0.0.1:22"  # so may a comment: localhost\n'
        'b = f"[::1]:{a}"\n'
        'c = ["ssh", "-R", "2222:localhost:22"]\n'
        'd = "10.99.0.1/27"\n'
        'e = "203.0.113.7"\n'
        'f = ("0.0.0.0", 0)\n'
    )
    assert _found(src) == [(2, "127.0.0.1"), (3, "::1"), (4, "localhost"), (5, "10.99.0.1")]
