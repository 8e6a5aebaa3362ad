"""Real peers for the namespace lab: sshd, a TLS server, a resolver, a bulk HTTP server, a pool.

Why real programs and not stand-ins: the demo (``make run``), the capture script
(``pcaps/make.py``) and the daemon's end-to-end tests
must show egressd stopping what OpenSSH, curl, dig and a miner really put on the wire, with
their real timeouts and error paths (a reset must make ``ssh`` give up in milliseconds, a
dropped DNS answer must make ``dig`` time out). Each starter here

* writes what the program needs (keys, certificates, configuration, the file to serve)
  into a temporary directory the caller owns,
* starts the program through ``Lab.spawn`` in the lab's "inet" (or "node") namespace, so
  ``Lab.close()`` ends it by pid whatever happens to the caller,
* waits until it really listens (``ss`` in that namespace), bounded, and raises
  ``PeerError`` with the program's own output when it does not,
* returns a small handle that says where it listens and where its log is.

``start_egressd`` starts the daemon under test the same way (it is a peer of the workload
it judges), with its event log and status socket in the temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from egressd_lab.netns import SERVICES, Lab

PY: Final = sys.executable
SSHD: Final = "/usr/sbin/sshd"
START_TIMEOUT: Final = 10.0  # seconds a peer gets to start listening

# Names the lab's resolver answers, by SERVICES role. The pool names are real pool domains
# (the shipped policy lists them); nothing outside the lab ever sees a query for them.
LAB_NAMES: Final[dict[str, str]] = {
    "tls.example.net": "tls",
    "bulk.example.net": "bulk",
    "pool.example.net": "pool",
    "git.example.org": "ssh_named",
    "bastion.example.org": "ssh_allowed",
    "xmr.nanopool.org": "pool",
    "xmr-eu1.nanopool.org": "tls_pool",
}


class PeerError(RuntimeError):
    """A peer did not start; the message carries what it printed."""


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def lab_dns_names() -> dict[str, list[str]]:
    """``LAB_NAMES`` resolved to the SERVICES addresses (A and AAAA)."""
    return {name: list(SERVICES[role]) for name, role in LAB_NAMES.items()}


# -- processes and waiting -------------------------------------------------------------------
@dataclass
class Peer:
    """A program this lab started. ``log`` holds its stdout/stderr (or its own log file)."""

    name: str
    ns: str  # "inet" or "node"
    proc: subprocess.Popen[bytes]
    log: Path
    listen: tuple[tuple[str | None, int], ...] = ()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _spawn(lab: Lab, ns: str, argv: Sequence[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        kw.setdefault("stdout", fh)
        kw.setdefault("stderr", subprocess.STDOUT if kw["stdout"] is fh else fh)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return lab.spawn(ns, list(argv), **kw)


def listening(lab: Lab, ns: str, port: int, addr: str | None = None, udp: bool = False) -> bool:
    """True when a socket in ``ns`` listens on ``addr:port`` (any address when ``addr`` is None)."""
    run = lab.run_node if ns == "node" else lab.run_inet
    out = run(["ss", "-Hln" + ("u" if udp else "t")], timeout=5).stdout
    # A wildcard socket serves every address (ncat in proxy mode binds the wildcard).
    wanted = {f"0.0.0.0:{port}", f"[::]:{port}", f"*:{port}"}
    if addr:
        wanted.add(hostport(addr, port))
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and ((addr is None and cols[3].endswith(f":{port}")) or _strip_scope(cols[3]) in wanted):
            return True
    return False


def _strip_scope(local: str) -> str:
    """``203.0.113.53%lo:53`` / ``[fe80::1%lo]:53`` -> without the ``%interface`` part."""
    pct = local.find("%")
    if pct < 0:
        return local
    end = local.find("]", pct)
    if end < 0:
        end = local.rfind(":")
    return local[:pct] + local[end:]


def wait_listening(
    lab: Lab,
    ns: str,
    endpoints: Iterable[tuple[str | None, int]],
    udp: bool = False,
    timeout: float = START_TIMEOUT,
    peer: Peer | None = None,
) -> None:
    """Poll until every ``(addr, port)`` listens; bounded. A peer that exits early fails at once."""
    pending = list(endpoints)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [(a, p) for a, p in pending if not listening(lab, ns, p, a, udp)]
        if not pending:
            return
        if peer is not None and not peer.alive():
            raise PeerError(f"{peer.name} exited ({peer.proc.returncode}): {peer.log_text()[-800:]}")
        if time.monotonic() > deadline:
            what = ", ".join(hostport(a, p) if a else f"*:{p}" for a, p in pending)
            tail = peer.log_text()[-800:] if peer is not None else ""
            raise PeerError(f"nothing listens on {what} in {ns} after {timeout:g} s {tail}".rstrip())
        time.sleep(0.05)


P = TypeVar("P", bound=Peer)


def _started(lab: Lab, peer: P, udp: bool = False) -> P:
    try:
        wait_listening(lab, peer.ns, peer.listen, udp=udp, peer=peer)
    except PeerError:
        lab.stop(peer.proc)
        raise
    return peer


def _run(argv: Sequence[str], timeout: float = 30.0) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise PeerError(f"{' '.join(argv)} -> exit {p.returncode}: {(p.stderr or p.stdout).strip()}")


# -- OpenSSH --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SshKeys:
    host_key: Path
    client_key: Path
    authorized_keys: Path


def make_ssh_keys(tmp: Path) -> SshKeys:
    """A fresh ed25519 host key and client key; the client key is the only authorized one."""
    keys = SshKeys(tmp / "ssh_host_key", tmp / "ssh_client_key", tmp / "ssh_authorized_keys")
    for path, comment in ((keys.host_key, "egressd-lab-host"), (keys.client_key, "egressd-lab-client")):
        if not path.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    keys.authorized_keys.write_bytes(keys.client_key.with_suffix(".pub").read_bytes())
    return keys


@dataclass
class Sshd(Peer):
    config: Path = Path("/dev/null")

    def inetd_argv(self) -> list[str]:
        """``sshd -i`` with this server's configuration: one session on stdin/stdout."""
        return [SSHD, "-i", "-e", "-f", str(self.config)]


def write_sshd_config(
    tmp: Path, name: str, keys: SshKeys, listen: Sequence[tuple[str, int]], gateway_ports: bool = False
) -> Path:
    cfg = tmp / f"sshd_{name}.conf"
    lines = [f"ListenAddress {hostport(a, p)}" for a, p in listen] + [
        f"HostKey {keys.host_key}",
        f"AuthorizedKeysFile {keys.authorized_keys}",
        "PidFile none",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "AllowTcpForwarding yes",
        "Subsystem sftp internal-sftp",  # scp's default mode since OpenSSH 9.0, and sftp
        "PermitTunnel yes",  # ssh -w (the SSH usage captures)
        f"GatewayPorts {'yes' if gateway_ports else 'no'}",
        "PrintMotd no",
        "PrintLastLog no",
        "LoginGraceTime 20",
        "MaxStartups 64",
        "LogLevel VERBOSE",
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def start_sshd(
    lab: Lab,
    tmp: Path,
    keys: SshKeys,
    listen: Sequence[tuple[str, int]],
    ns: str = "inet",
    name: str = "sshd",
    gateway_ports: bool = False,
) -> Sshd:
    """OpenSSH's sshd in the foreground (``-D -e``) on every ``(addr, port)`` of ``listen``."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    cfg = write_sshd_config(tmp, name, keys, listen, gateway_ports)
    log = tmp / f"{name}.log"
    proc = _spawn(lab, ns, [SSHD, "-D", "-e", "-f", str(cfg)], log)
    return _started(lab, Sshd(name, ns, proc, log, tuple(listen), config=cfg))


def ssh_argv(
    keys: SshKeys, host: str, *command: str, options: Sequence[str] = (), port: int = 22, connect_timeout: int = 5
) -> list[str]:
    """An ``ssh`` client command for the lab: the lab key only, no prompts, no known_hosts.

    ``options`` go before the destination (``-N``, ``-R ...``, ``-o ...``), ``command`` after it.
    """
    return [
        "ssh", "-F", "/dev/null", "-i", str(keys.client_key), "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={connect_timeout}", "-o", "LogLevel=ERROR", "-p", str(port),
        *options, f"root@{host}", *command,
    ]  # fmt: skip


# -- TLS --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path
    names: tuple[str, ...]


def make_cert(tmp: Path, names: Sequence[str], stem: str = "tls") -> Cert:
    """A self-signed P-256 certificate whose SANs are ``names`` (the first is also the CN)."""
    c = Cert(tmp / f"{stem}.crt", tmp / f"{stem}.key", tuple(names))
    sans = ",".join(f"DNS:{n}" for n in names)
    _run([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "30", "-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={sans}",
        "-keyout", str(c.key), "-out", str(c.cert),
    ])  # fmt: skip
    return c


def start_tls_server(
    lab: Lab, tmp: Path, cert: Cert, addr: str, port: int = 443, name: str | None = None, www: Path | None = None
) -> Peer:
    """``openssl s_server -www``: answers any TLS client with a status page (HTTP 200).

    With ``www``, ``-WWW`` instead: serves the files of that directory (an HTTPS download).
    """
    name = name or f"s_server-{addr}-{port}"
    log = tmp / f"{name}.log"
    argv = [
        "openssl", "s_server", "-accept", hostport(addr, port), "-naccept", "100000",
        "-cert", str(cert.cert), "-key", str(cert.key), "-WWW" if www else "-www", "-quiet",
    ]  # fmt: skip
    if ":" in addr:
        argv.append("-6")
    proc = _spawn(lab, "inet", argv, log, cwd=str(www) if www else None)
    return _started(lab, Peer(name, "inet", proc, log, ((addr, port),)))


# -- DNS --------------------------------------------------------------------------------------
def start_dnsmasq(
    lab: Lab, tmp: Path, names: Mapping[str, Sequence[str]], listen: Sequence[str], name: str = "dnsmasq"
) -> Peer:
    """dnsmasq answering only ``names`` (each with its A/AAAA addresses); no upstream, no hosts file.

    Every query is logged (``--log-queries``) to the peer's log, so a test can tell a query
    that reached the resolver from one that was dropped on the way.
    """
    log = tmp / f"{name}.log"
    argv = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
        *(f"--listen-address={a}" for a in listen), "--port=53", "--user=root", "--group=root",
        "--pid-file=", "--log-queries", "--log-facility=-", "--cache-size=0",
        *(f"--address=/{n}/{a}" for n, addrs in names.items() for a in addrs),
    ]  # fmt: skip
    proc = _spawn(lab, "inet", argv, log)
    return _started(lab, Peer(name, "inet", proc, log, tuple((a, 53) for a in listen)), udp=True)


# -- HTTP bulk ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BulkFile:
    path: Path
    size: int
    sha256: str


def make_bulk_file(directory: Path, size: int, name: str = "blob.bin", seed: bytes | None = None) -> BulkFile:
    """``size`` incompressible bytes, written in 1 MiB pieces; returns its sha256.

    Random by default; with ``seed``, a sha256 chain from it, so a capture of the download is
    the same file on every run (``pcaps/make.py``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            if seed is None:
                chunk = os.urandom(n)
            else:
                parts = []
                for _ in range((n + 31) // 32):
                    seed = hashlib.sha256(seed).digest()
                    parts.append(seed)
                chunk = b"".join(parts)[:n]
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return BulkFile(path, size, h.hexdigest())


def start_http_server(lab: Lab, tmp: Path, directory: Path, addr: str, port: int = 80) -> Peer:
    """Python's ``http.server`` serving ``directory`` on ``addr:port`` (threaded, HTTP/1.0)."""
    name = f"http-{addr}-{port}"
    log = tmp / f"{name}.log"
    argv = [PY, "-m", "http.server", "--bind", addr, "--directory", str(directory), str(port)]
    proc = _spawn(lab, "inet", argv, log)
    return _started(lab, Peer(name, "inet", proc, log, ((addr, port),)))


# -- HTTP CONNECT proxy -------------------------------------------------------------------------
def start_http_proxy(lab: Lab, tmp: Path, addr: str, port: int = 3128) -> Peer:
    """ncat as an HTTP proxy (CONNECT and plain GET), many clients, until the lab closes."""
    name = f"ncat-proxy-{addr}-{port}"
    log = tmp / f"{name}.log"
    argv = ["ncat", "-l", addr, str(port), "--proxy-type", "http", "--keep-open"]
    proc = _spawn(lab, "inet", argv, log, stdout=subprocess.DEVNULL)
    return _started(lab, Peer(name, "inet", proc, log, ((addr, port),)))


def start_socks_proxy(lab: Lab, tmp: Path, addr: str, port: int = 1080) -> Peer:
    """microsocks: a SOCKS5 proxy (no authentication) until the lab closes."""
    name = f"microsocks-{addr}-{port}"
    log = tmp / f"{name}.log"
    proc = _spawn(lab, "inet", ["microsocks", "-i", addr, "-p", str(port)], log, stdout=subprocess.DEVNULL)
    return _started(lab, Peer(name, "inet", proc, log, ((addr, port),)))


# -- the mining pool ----------------------------------------------------------------------------
@dataclass
class Pool(Peer):
    """``egressd_lab.stratum pool``; ``log`` is its JSON-lines event log (open, request, close)."""

    variant: str = "v1"

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Events from line ``since`` on (``mark()`` gives the current line count)."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines()[since:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def mark(self) -> int:
        return len(self.log_text().splitlines())

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The complete request lines the pool received (what a blocked miner must not get through)."""
        return [e for e in self.events(since) if e.get("event") == "request"]


def start_pool(
    lab: Lab, tmp: Path, variant: str, addr: str, port: int, lifetime: float = 900.0, idle_timeout: float = 30.0
) -> Pool:
    """The lab pool, logging to ``Pool.log``.

    ``idle_timeout`` decides when the pool logs a connection egressd reset: the REJECT
    answers the sender only (the node), so the pool learns of it, and logs the ``close``
    event with the bytes it received, only when the connection has been idle that long.
    """
    name = f"pool-{variant}-{addr}-{port}"
    log = tmp / f"{name}.jsonl"
    argv = [
        PY, "-m", "egressd_lab.stratum", "pool", "--listen", hostport(addr, port), "--variant", variant,
        "--log", str(log), "--lifetime", str(lifetime), "--idle-timeout", str(idle_timeout),
    ]  # fmt: skip
    log.touch()
    proc = _spawn(lab, "inet", argv, tmp / f"{name}.out")
    return _started(lab, Pool(name, "inet", proc, log, ((addr, port),), variant=variant))


def stratum_client(
    lab: Lab, target: str, variant: str = "v1", *extra: str, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """One miner handshake (``egressd_lab.stratum client``) from the node: (exit code, its JSON report).

    A client that printed no report (killed, crashed) gives ``handshake_complete: False``,
    ``no_report: True`` and an ``error`` with what it printed, so silence is never a handshake.
    """
    argv = [PY, "-m", "egressd_lab.stratum", "client", "--connect", target, "--variant", variant]
    p = lab.run_node([*argv, "--timeout", str(timeout), *extra], timeout=timeout + 10)
    try:
        rep: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        error = f"the stratum client printed no report: {p.stdout!r} {p.stderr[-300:]!r}"
        return p.returncode, {"handshake_complete": False, "no_report": True, "error": error}
    return p.returncode, rep


# -- the standard set ---------------------------------------------------------------------------
POOLS: Final[tuple[tuple[str, str, int], ...]] = (
    # (variant, SERVICES index 0 = v4 / 1 = v6, port)
    ("v1", "v4", 3333),
    ("v1", "v4", 443),
    ("xmr", "v4", 14444),
    ("eth", "v4", 4444),
    ("v1", "v6", 3333),
)
POOL_IDLE: Final = 3.0  # seconds: a reset miner's connection shows up in the pool's log this soon
PROXY_PORT: Final = 3128
BULK_PORT: Final = 80


@dataclass
class LabPeers:
    """Every peer the demo and the daemon tests talk to, started once per lab."""

    tmp: Path
    keys: SshKeys
    cert: Cert
    bulk: BulkFile
    sshd: Sshd
    dns: Peer
    tls: list[Peer] = field(default_factory=list)
    http: list[Peer] = field(default_factory=list)
    proxy: Peer | None = None
    pools: dict[tuple[str, str, int], Pool] = field(default_factory=dict)

    def pool(self, variant: str, port: int, v6: bool = False) -> Pool:
        return self.pools[(variant, "v6" if v6 else "v4", port)]

    def ssh(self, host: str, *command: str, options: Sequence[str] = (), port: int = 22) -> list[str]:
        return ssh_argv(self.keys, host, *command, options=options, port=port)


def start_lab_peers(lab: Lab, tmp: Path, bulk_bytes: int = 20 * 1024 * 1024) -> LabPeers:
    """Start the standard peers in ``lab``'s inet namespace (about a second on two cores).

    sshd on the outside server (ssh_evil :22 and :443) and on the two allowed ones
    (ssh_allowed, ssh_named :22, IPv4 and IPv6); dnsmasq answering ``LAB_NAMES``; TLS on
    tls and tls_pool (:443, IPv4, and tls over IPv6); the bulk file over HTTP (:80, both
    families); an HTTP CONNECT proxy; the pools of ``POOLS``.
    """
    keys = make_ssh_keys(tmp)
    cert = make_cert(tmp, [n for n in LAB_NAMES if LAB_NAMES[n] in ("tls", "tls_pool", "bulk")])
    bulk = make_bulk_file(tmp / "www", bulk_bytes)
    evil, allowed, named = SERVICES["ssh_evil"], SERVICES["ssh_allowed"], SERVICES["ssh_named"]
    listen = [(evil[0], 22), (evil[0], 443), (evil[1], 22)]
    listen += [(allowed[0], 22), (allowed[1], 22), (named[0], 22), (named[1], 22)]
    # GatewayPorts yes: a remote forward (ssh -R) that got through would listen on every
    # address of the inet namespace, so a test can dial it at a documentation address (the
    # bastion's own) instead of the inet namespace's 127.0.0.1. The client's request is the
    # same either way (it asks for "localhost"); only where sshd binds it changes.
    sshd = start_sshd(lab, tmp, keys, listen, name="sshd-inet", gateway_ports=True)
    dns = start_dnsmasq(lab, tmp, lab_dns_names(), list(SERVICES["dns"]))
    peers = LabPeers(tmp, keys, cert, bulk, sshd, dns)
    for addr in (SERVICES["tls"][0], SERVICES["tls"][1], SERVICES["tls_pool"][0]):
        peers.tls.append(start_tls_server(lab, tmp, cert, addr))
    for addr in SERVICES["bulk"]:
        peers.http.append(start_http_server(lab, tmp, bulk.path.parent, addr, BULK_PORT))
    peers.proxy = start_http_proxy(lab, tmp, SERVICES["proxy"][0], PROXY_PORT)
    for variant, fam, port in POOLS:
        addr = SERVICES["pool"][1 if fam == "v6" else 0]
        peers.pools[(variant, fam, port)] = start_pool(lab, tmp, variant, addr, port, idle_timeout=POOL_IDLE)
    return peers


# -- the daemon under test ----------------------------------------------------------------------
@dataclass
class Egressd:
    """``egressd run`` in the lab's node namespace; events, status socket and stderr in ``tmp``."""

    lab: Lab
    proc: subprocess.Popen[bytes]
    policy: Path
    events_path: Path
    socket: Path
    stderr_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        from egressd.daemon import read_status

        return read_status(str(self.socket), timeout)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text().splitlines()[since:]
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def mark(self) -> int:
        try:
            return len(self.events_path.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_events(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 3.0, since: int = 0, count: int = 1
    ) -> list[dict[str, Any]]:
        """Events matching ``pred`` once there are ``count`` of them, or all there are at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            got = [e for e in self.events(since) if pred(e)]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_stderr(self, needle: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.stderr_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal it (by pid) and wait; SIGKILL after ``timeout``. Returns the exit status."""
        if self.alive():
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc in self.lab.procs:
            self.lab.procs.remove(self.proc)
        return self.proc.returncode


def egressd_argv() -> list[str]:
    """The console script beside this interpreter, or ``python -m egressd.cli``."""
    script = Path(PY).parent / "egressd"
    return [str(script)] if script.is_file() else [PY, "-m", "egressd.cli"]


def start_egressd(
    lab: Lab,
    tmp: Path,
    policy: Path | None = None,
    extra: Sequence[str] = (),
    name: str = "egressd",
    timeout: float = 20.0,
    *,
    wrapper: Sequence[str] = (),
    events: Path | None = None,
) -> Egressd:
    """Start ``egressd run`` in the node namespace and wait until its status socket answers.

    ``wrapper`` goes before the command (``setpriv ...`` to drop privileges); ``events`` is
    the event log (default ``<tmp>/<name>.events.jsonl``).
    """
    from egressd.paths import default_policy

    pol = policy or default_policy()
    events = events or tmp / f"{name}.events.jsonl"
    sock, err = tmp / f"{name}.sock", tmp / f"{name}.stderr"
    argv = [
        *wrapper, *egressd_argv(), "run", "--policy", str(pol), "--events", str(events),
        "--status-socket", str(sock),
    ]  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # a SIGKILLed predecessor leaves its socket file behind
    proc = _spawn(lab, "node", [*argv, *extra], err, stdout=subprocess.DEVNULL)
    d = Egressd(lab, proc, pol, events, sock, err)
    deadline = time.monotonic() + timeout
    while True:
        if not d.alive():
            lab.procs.remove(proc)
            raise PeerError(f"egressd run exited ({proc.returncode}): {d.stderr_text()[-1500:]}")
        if sock.exists():
            with contextlib.suppress(OSError, ValueError):
                d.status(timeout=1.0)
                return d
        if time.monotonic() > deadline:
            d.stop(signal.SIGKILL)
            raise PeerError(f"egressd run did not answer on {sock} in {timeout:g} s: {d.stderr_text()[-1500:]}")
        time.sleep(0.05)


def read_until(p: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Read ``p``'s stdout until ``needle`` appears (bounded); returns what was read."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk
    return seen
