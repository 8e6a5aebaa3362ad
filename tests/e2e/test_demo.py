"""The demo as ``make run`` runs it (``python -m egressd_lab.demo``): a subprocess, its output, its exit code."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from daemon_fixtures import NEEDS_KERNEL

from egressd_lab import demo, peers
from egressd_lab.harness import policy_copy, set_key

DEMO_TIMEOUT = 120  # the demo itself takes about 5 s on two cores


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "240"}  # no wrapped lines to match against
    return subprocess.run(
        [peers.PY, "-m", "egressd_lab.demo", *args],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        env=env,
        check=False,
    )


def _demo_namespaces(out: str) -> list[str]:
    """The demo's own namespaces (named in its first line) that still exist; other runs' are not ours."""
    mine = set(re.findall(r"\begdemo\d+-\w+", out))
    assert mine, f"the demo did not name its namespaces:\n{out[:2000]}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [ln.split()[0] for ln in listed.splitlines() if ln.split() and ln.split()[0] in mine]


@pytest.mark.skipif(bool(demo._missing_tools()), reason=f"demo needs {demo._missing_tools()}")
@pytest.mark.timeout(DEMO_TIMEOUT + 30)
@NEEDS_KERNEL[0]
@NEEDS_KERNEL[1]
def test_demo_shows_every_step_as_the_default_policy_intends_and_removes_its_lab() -> None:
    p = _demo()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = p.stdout
    for line in (
        "blocked by rule drop-mining-pool-lookups, detection mining.pool-domain",
        "blocked by rule drop-mining-pool-names, detection mining.pool-domain",
        "blocked by rule drop-ssh-unlisted, detection ssh",
        "blocked by rule drop-mining, detection mining.stratum",
        "sha256 intact",
        "decisions by rule",
        "all 9 steps behaved as the default policy intends",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert out.count("✓ as the default policy intends") == 9
    assert "works: tls.example.net -> 203.0.113.40" in out
    # Every event says who was behind it (issue 8): a process, or why it could not be named.
    assert out.count("who: ") >= out.count("egressd: blocked") + out.count("egressd: allowed"), out
    assert re.search(r"who: pid \d+ curl \(user root\)", out), out
    assert _demo_namespaces(p.stdout) == []


@pytest.mark.skipif(bool(demo._missing_tools()), reason=f"demo needs {demo._missing_tools()}")
@pytest.mark.timeout(DEMO_TIMEOUT + 30)
@NEEDS_KERNEL[0]
@NEEDS_KERNEL[1]
def test_demo_exits_1_and_names_the_steps_a_monitor_policy_lets_through(tmp_path: Path) -> None:
    p = _demo("--policy", str(policy_copy(tmp_path, lambda t: set_key(t, "mode", "monitor"))))
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    assert "5 step(s) did not behave as the default policy intends" in p.stdout
    assert "  - Reverse SSH tunnel to an outside server" in p.stdout
    assert "monitor mode: would drop" in p.stdout
    assert _demo_namespaces(p.stdout) == []


def test_demo_without_root_exits_2_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.run_demo(None, keep=False) == 2
    assert "needs root" in capsys.readouterr().err


def test_the_installed_egressd_has_no_demo_and_says_to_run_make_run() -> None:
    p = subprocess.run([*peers.egressd_argv(), "demo"], capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 2
    assert "make run" in p.stderr and "checkout" in p.stderr
