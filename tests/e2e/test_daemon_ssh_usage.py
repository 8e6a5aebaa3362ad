"""The live daemon against OpenSSH: what an SSH session to an *allowed* bastion is used for.

Real ``ssh``/``scp``/``sshd`` in the lab, ``egressd run`` on the shipped default policy. The
bastion 203.0.113.10 is in ``ssh_allowed``, so only the session's use (learned from the
sizes of its encrypted packets, egressd/detect/ssh_usage.py) can drop it: ``ssh -R`` is a
reverse tunnel and is dropped; a command and a copy are ordinary and pass.
"""

from __future__ import annotations

import shlex
import subprocess
import time

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, local_hop_events, one_event

from egressd_lab import peers
from egressd_lab.netns import NODE_LOCAL_V4, SERVICES

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

ALLOWED = SERVICES["ssh_allowed"][0]
CIPHERS = {
    "chacha20-poly1305": ["-c", "chacha20-poly1305@openssh.com"],  # OpenSSH's default: lengths encrypted
    "aes256-gcm": ["-c", "aes256-gcm@openssh.com"],  # lengths in clear
    "aes128-ctr+etm": ["-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"],  # lengths in clear
    "aes256-ctr+hmac": ["-c", "aes256-ctr", "-o", "MACs=hmac-sha2-512"],  # lengths encrypted, coarse
}


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
def test_ssh_remote_forward_to_the_allowed_bastion_is_dropped(
    dlab: DaemonLab, daemon: peers.Egressd, cipher: str
) -> None:
    port = 2240 + sorted(CIPHERS).index(cipher)
    secret = dlab.lab.spawn(  # what the tunnel would expose: a service only the node reaches
        "node", ["ncat", "-lk", NODE_LOCAL_V4, str(port), "--sh-exec", "echo node-secret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # ServerAliveInterval: an idle `ssh -N` learns of the reset only when it next sends.
    opts = [*CIPHERS[cipher], "-N", "-R", f"{port}:{NODE_LOCAL_V4}:{port}", "-o", "ExitOnForwardFailure=yes"]
    opts += ["-o", "ServerAliveInterval=1"]
    tun = dlab.lab.spawn("node", dlab.peers.ssh(ALLOWED, options=opts), stdin=subprocess.DEVNULL)
    try:
        peers.wait_listening(dlab.lab, "node", [(NODE_LOCAL_V4, port)])
        ev = one_event(daemon, ALLOWED, 22, timeout=10.0)
        assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == (
            "drop-ssh-remote-forward",
            "blocked",
            "ssh.forward.remote",
        )
        assert "tcpip-forward" in ev["detection"]["evidence"]
        assert tun.wait(10.0) != 0, "ssh -R exited 0"
        # Cut before the request reached the server (lengths encrypted: the request's own
        # packet decides), or at its answer (lengths in clear): the far side may still
        # listen in the second case, but nothing it accepts reaches the node any more. The
        # lab's sshd binds remote forwards on every address (GatewayPorts yes), so the far
        # side's port is dialled at the bastion's own address.
        through = dlab.lab.run_inet(["ncat", "--recv-only", "-w", "3", "-i", "3", ALLOWED, str(port)], timeout=15)
        assert "node-secret" not in through.stdout
        assert local_hop_events(daemon) == []
    finally:
        dlab.lab.stop(tun)
        dlab.lab.stop(secret)


def test_ssh_command_to_the_allowed_bastion_runs_and_is_not_a_forward(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    p, _ = dlab.run(dlab.peers.ssh(ALLOWED, "echo", "bastion-ok"))
    assert (p.returncode, p.stdout.strip()) == (0, "bastion-ok"), p.stderr
    ev = one_event(daemon, ALLOWED, 22)
    assert (ev["rule"], ev["action"], ev["detections"]) == ("default", "allowed", ["ssh"])


@pytest.mark.parametrize("mode", ["sftp", "legacy"])
def test_scp_from_the_allowed_bastion_copies_and_is_not_a_forward(
    dlab: DaemonLab, daemon: peers.Egressd, mode: str
) -> None:
    src = dlab.tmp / f"scp-src-{mode}.bin"
    src.write_bytes(bytes(range(256)) * 64)
    dst = dlab.tmp / f"scp-dst-{mode}.bin"
    ssh = dlab.peers.ssh(ALLOWED)
    opts = ssh[1 : ssh.index(f"root@{ALLOWED}")]
    opts = [o if o != "-p" else "-P" for o in opts]  # scp's port flag
    argv = ["scp", *(["-O"] if mode == "legacy" else []), *opts, f"root@{ALLOWED}:{src}", str(dst)]
    p, _ = dlab.run(argv)
    assert p.returncode == 0, p.stderr
    assert dst.read_bytes() == src.read_bytes()
    ev = one_event(daemon, ALLOWED, 22)
    assert (ev["rule"], ev["action"], ev["detections"]) == ("default", "allowed", ["ssh"])


def test_ssh_local_forward_to_the_allowed_bastion_works_and_is_recorded(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    # -L to the bastion's own sshd: what comes back through the tunnel is its banner.
    # Bound at the node's own address, the lab's stand-in for ssh's default (loopback).
    opts = ["-N", "-L", f"{NODE_LOCAL_V4}:9050:{ALLOWED}:22", "-o", "ExitOnForwardFailure=yes"]
    tun = dlab.lab.spawn("node", dlab.peers.ssh(ALLOWED, options=opts), stdin=subprocess.DEVNULL)
    try:
        peers.wait_listening(dlab.lab, "node", [(NODE_LOCAL_V4, 9050)])
        p, _ = dlab.run(["ncat", "--recv-only", "-w", "3", "-i", "2", NODE_LOCAL_V4, "9050"])
        assert p.stdout.startswith("SSH-2.0-OpenSSH"), (p.stdout, p.stderr)
        ev = one_event(daemon, ALLOWED, 22, timeout=5.0)
        assert (ev["rule"], ev["verdict"], ev["action"], ev["detection"]["kind"]) == (
            "alert-ssh-forwards",
            "alert",
            "allowed",
            "ssh.forward.local",
        )
        assert "direct-tcpip" in ev["detection"]["evidence"]
        assert tun.poll() is None, "an alerted forward keeps working"
        assert local_hop_events(daemon) == []
    finally:
        dlab.lab.stop(tun)


def test_sshuttle_through_the_allowed_bastion_works_and_is_recorded_as_a_tun(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    """sshuttle (a VPN over an ordinary `ssh host cmd` session) routes the TLS server's address
    through the bastion: the HTTPS request works (it never leaves the node directly: no flow
    to the TLS server is seen) and the SSH flow is recorded as ssh.forward.tun (alert)."""
    tls = SERVICES["tls"][0]
    ssh = dlab.peers.ssh(ALLOWED)
    ssh_cmd = " ".join(shlex.quote(x) for x in ssh[: ssh.index(f"root@{ALLOWED}")])
    err = dlab.tmp / "sshuttle.err"
    with open(err, "wb") as fh:
        vpn = dlab.lab.spawn(
            "node", ["sshuttle", "-r", f"root@{ALLOWED}", f"{tls}/32", "-e", ssh_cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20.0
        while "Connected to server" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Connected to server" in err.read_text(), err.read_text()[-800:]
        # Its redirect rules go in after the server answered: until then a request goes direct.
        while "-A OUTPUT -j sshuttle" not in dlab.lab.run_node(["iptables", "-t", "nat", "-S"]).stdout:
            assert time.monotonic() < deadline, "sshuttle installed no redirect"
            time.sleep(0.2)
        p, _ = dlab.curl_tls("tls.example.net", tls)
        assert p.stdout.strip() == "200", p.stderr
        ev = one_event(daemon, ALLOWED, 22, timeout=5.0)
        got = (ev["rule"], ev["verdict"], ev["detection"]["kind"])
        assert got == ("alert-ssh-forwards", "alert", "ssh.forward.tun"), ev
        assert "sshuttle" in ev["detection"]["evidence"]
        around = [e for e in daemon.events() if e["dest_ip"] == tls]
        assert not around, f"the request went around the tunnel: {around}"
    finally:
        dlab.lab.stop(vpn)
