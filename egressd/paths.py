"""Where the shipped rules are, wherever egressd was installed from.

A source checkout or editable install has them beside the package (``<repo>/rules``); a
wheel installs them under ``<prefix>/share/egressd/rules``; the systemd install copies them
to ``/etc/egressd``. ``egressd test`` without ``--policy`` must find the shipped default in
each case, so the search order is explicit here and reported in ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def rules_dirs() -> list[Path]:
    return [_PKG.parent / "rules", Path(sys.prefix) / "share" / "egressd" / "rules", Path("/etc/egressd")]


def default_policy() -> Path:
    for d in rules_dirs():
        p = d / "default.yaml"
        if p.is_file():
            return p
    searched = ", ".join(str(d / "default.yaml") for d in rules_dirs())
    raise FileNotFoundError(f"the shipped default policy was not found (looked in {searched}); pass --policy")


def add_policy_argument(p: argparse.ArgumentParser) -> None:
    """``--policy FILE``, as every command that runs a policy takes it (default: the shipped one)."""
    p.add_argument("--policy", metavar="FILE", help="policy YAML (default: the shipped rules/default.yaml)")
