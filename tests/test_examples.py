"""The example CI job (examples/policy-repo/ci.sh) on a real git repository: its exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "policy-repo"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "policies-repo"
    shutil.copytree(EXAMPLE, r)
    for name in ("tls-sni", "ssh-on-443"):
        shutil.copy(ROOT / "pcaps" / f"{name}.pcap", r / "captures")
    git(r, "init", "-q", "-b", "main")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "policy")
    git(r, "checkout", "-q", "-b", "change")
    return r


def ci(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", "ci.sh"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": path, "BASE_REF": "main", **env},
    )


def edit_policy(repo: Path, old: str, new: str) -> None:
    p = repo / "policies" / "site.yaml"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new))


def test_unchanged_policy_passes(repo: Path) -> None:
    p = ci(repo)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "policies/site.yaml: ok" in p.stdout
    assert "all expectations in captures/tls-sni.expect.yaml met" in p.stdout
    assert "no recorded flow changes verdict or rule" in p.stdout
    merged = (repo / "egressd-ci" / "merged.yaml").read_text()
    assert "198.51.100.22/32" in merged and "(appended)" in merged


def test_a_change_that_opens_a_recorded_flow_breaks_its_expectation(repo: Path) -> None:
    edit_policy(repo, "      - 198.51.100.22/32", "      - 198.51.100.22/32\n      - 203.0.113.20/32")
    p = ci(repo)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "verdict accept (rule default), expected drop" in p.stdout
    assert "opens: drop by drop-ssh-unlisted -> accept by default" in p.stdout
    doc = json.loads((repo / "egressd-ci" / "diff.json").read_text())
    assert [(c["dest_ip"], c["change"]) for c in doc["changed"]] == [("203.0.113.20", "opens")]


def test_an_accepted_change_passes_unless_strict(repo: Path) -> None:
    edit_policy(repo, "      - 198.51.100.22/32", "      - 198.51.100.22/32\n      - 203.0.113.20/32")
    exp = repo / "captures" / "ssh-on-443.expect.yaml"
    exp.write_text("flows:\n  - match: {proto: tcp, dst: 203.0.113.20, dst_port: 443}\n    verdict: accept\n")
    p = ci(repo)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "recorded flows change" in p.stdout
    assert ci(repo, STRICT_DIFF="1").returncode == 1


def test_a_policy_that_does_not_validate_fails_with_file_and_line(repo: Path) -> None:
    edit_policy(repo, "    action: drop", "    action: block")
    p = ci(repo)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "policies/site.yaml:13:13: unknown action 'block'" in p.stderr


def test_an_expectation_without_its_capture_is_unusable_input(repo: Path) -> None:
    (repo / "captures" / "tls-sni.pcap").unlink()
    p = ci(repo)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no capture captures/tls-sni.pcap" in p.stdout
