"""The Containerfile and the runtime-free builder describe the same image (issue 12).

The Containerfile cannot be built here (no container runtime); what it shares with
deploy/container/build_image.py, whose image tests/e2e/test_image.py runs, is checked instead:
the package list, the user, the entrypoint and command, the venv path.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTAINER = REPO / "deploy" / "container"
sys.path.insert(0, str(CONTAINER))
import build_image  # noqa: E402


def _instructions() -> list[tuple[str, str]]:
    text = (CONTAINER / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _run_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    return ins[froms[-1] :]


def test_both_start_from_debian_12() -> None:
    assert all(rest.split()[0] == "debian:12-slim" for w, rest in _instructions() if w == "FROM")
    assert build_image.SUITE == "bookworm"


def test_runtime_packages_come_from_the_one_list() -> None:
    run = " ".join(rest for w, rest in _run_stage() if w in ("RUN", "COPY"))
    assert "deploy/container/packages.txt" in run
    assert "$(sed -e 's/#.*//' /tmp/packages.txt)" in run
    assert "--no-install-recommends" in run
    # the build stage's compilers never reach the run stage
    for tool in ("build-essential", "python3-dev", "libnetfilter-queue-dev"):
        assert tool not in run
    assert build_image.packages() == ["python3", "libnetfilter-queue1", "iptables", "nftables"]


def test_same_user_entrypoint_and_command() -> None:
    run = _run_stage()
    body = " ".join(rest for w, rest in run if w == "RUN")
    assert f"useradd -u {build_image.UID} -g {build_image.UID}" in body
    assert f"groupadd -g {build_image.UID} egressd" in body
    (entry,) = [rest for w, rest in run if w == "ENTRYPOINT"]
    (cmd,) = [rest for w, rest in run if w == "CMD"]
    (user,) = [rest for w, rest in run if w == "USER"]
    assert json.loads(entry) == ["/usr/local/bin/egressd"]
    assert json.loads(cmd) == ["run", "--events-stdout"]
    assert user == "0:0"  # the entrypoint drops to the egressd user (entrypoint.sh says why)
    copies = [rest for w, rest in run if w == "COPY"]
    assert any(re.search(r"deploy/container/entrypoint\.sh /usr/local/bin/egressd$", c) for c in copies)
    assert any(c.endswith("/opt/egressd /opt/egressd") for c in copies)


def test_the_entrypoint_passes_on_only_the_measured_capabilities() -> None:
    sh = (CONTAINER / "entrypoint.sh").read_text()
    (loop,) = [ln for ln in sh.splitlines() if ln.startswith("for c in ")]
    assert loop.split()[3:6] == ["net_admin", "sys_ptrace", "dac_read_search"]
    assert "--reuid=egressd --regid=egressd --clear-groups" in sh
    assert "/opt/egressd/bin/egressd" in sh
