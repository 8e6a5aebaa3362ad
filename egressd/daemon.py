"""``egressd run``: the engine on live traffic. asyncio on uvloop, NFQUEUE via netfilterqueue.

The shell is thin on purpose (docs/architecture.md): every decision is the engine's, made on exactly the
bytes the kernel copied to us, so a capture of the same traffic replays to the same verdicts.
What lives here is only what a live system needs:

* the queue's fd on the event loop (``loop.add_reader``), drained in bounded batches
  (``nfq.Queue.process(budget)``) so signals, reloads and the status socket stay responsive
  under load — ``nfq.run(block=False)`` drains everything and stalls the loop for up to a
  second (docs/architecture.md);
* the verdict back to the kernel as a mark + ``repeat()``, so the kernel rules pin it
  (netfilter.py explains the mark bits);
* SIGHUP: load the new policy *beside* the old one; only a policy that loads completely
  replaces it, between two packets (a single-threaded loop: no packet is ever judged by a
  half-loaded policy, and none waits for a verdict during the swap); a broken one is
  reported with file:line and the old one keeps running;
* events to a JSON-lines file flushed per decision, counters to ``egressd status`` over a
  local Unix socket (mode 0600) and, optionally, Prometheus text on a loopback port;
* sd_notify READY / RELOADING / STATUS / WATCHDOG / STOPPING.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egressd import netfilter, nfq, procstats, sdnotify, verdict
from egressd.attribution.sink import AttributedSink  # issue 8
from egressd.engine import DIR_ORIGINAL, DIR_REPLY, Engine
from egressd.eventlog import EventLog
from egressd.policy import Policy, PolicyError, load_policy
from egressd.verdict import DROP_PACKET, PASS, PASS_MARK_SEEN, PIN_DENY

# The mark bits each connection-state verdict writes (egressd.verdict.MARK_OF, in bits).
_MARK_BITS: dict[int, int] = {
    v: {verdict.SEEN: netfilter.MARK_SEEN, verdict.ALLOW: netfilter.MARK_ALLOW, verdict.DENY: netfilter.MARK_DENY}[m]
    for v, m in verdict.MARK_OF.items()
    if m is not None
}

BATCH = 64  # packets per wake-up before the loop gets a chance to run other work
TICK = 1.0  # seconds between housekeeping rounds (sweep, rotation, kernel counters, watchdog)
UNINSPECTED_EVERY = 2  # ticks between reads of the rule counters (an iptables-save per family)
GUARD_EVERY = 5  # ticks between looks for a new way out (a default route) to guard


@dataclass
class Options:
    policy: Path
    queue_num: int | None = None
    events: str | None = None
    events_stdout: bool = False
    status_socket: str | None = "/run/egressd/status.sock"
    metrics: str | None = None  # "127.0.0.1:9713"
    install_rules: bool = True
    forward_ifaces: tuple[str, ...] = ()
    watch: bool = False  # reload when the policy files change on disk (egressd/watch.py)
    guard: bool = True  # the link guard (netfilter.render_guard) on guard_ifaces
    guard_ifaces: tuple[str, ...] = ()  # empty: the default routes' interfaces, followed while running
    attribution: bool = True  # issue 8: name the process/container/GPU behind each event
    attribution_timeout: float = 0.5


class Daemon:
    def __init__(self, opts: Options, policy: Policy) -> None:
        self.opts = opts
        self.policy = policy
        self.engine = Engine(policy)
        self.log = EventLog(opts.events, opts.events_stdout)
        self.queue_num = opts.queue_num if opts.queue_num is not None else policy.settings.queue_num
        self.fail_open = policy.fail == "open"
        self.started = time.time()
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error = ""
        self.kernel: procstats.QueueStats | None = None
        self.lat_total_ns = 0
        self.lat_batches = 0
        self.lat_max_ns = 0
        self.callback_errors = 0
        self.uninspected = 0  # queue overflow passed by the kernel without a verdict (fail: open)
        self._ticks = 0
        self._now = time.time()
        self._stop: asyncio.Event | None = None
        self._queue: nfq.Queue | None = None
        self._rules_installed = False
        self.guard_ifaces: list[str] = []  # what the link guard watches now
        self.guard_error = ""
        self.guard_dropped = 0  # frames the guard dropped (read every GUARD_EVERY ticks)
        self._guard_unavailable = False  # no nft, or the kernel refused the egress hook
        self._servers: list[asyncio.AbstractServer] = []
        # -- attribution (issue 8): events go through the sink, which names who is behind them
        self.who: AttributedSink | None = None
        self._overload_seen = 0
        if opts.attribution:
            self.who = AttributedSink(self.log, opts.attribution_timeout)

    # -- the packet path -----------------------------------------------------------------
    def _on_packet(self, pkt: Any) -> None:
        """netfilterqueue calls this per packet; it must end in exactly one verdict.

        ``egressd.verdict`` says what each verdict does: a plain ``accept()``/``drop()`` for
        the per-packet ones (the connection's kernel state is left as it is), a mark and
        ``repeat()`` for those that write the connection's state (the rules save it).
        """
        mark = pkt.get_mark()
        data = pkt.get_payload()
        v = self.engine.feed(data, self._now, DIR_REPLY if mark & netfilter.MARK_REPLY else DIR_ORIGINAL)
        if v == PASS:
            pkt.accept()
            return
        if v == DROP_PACKET:
            pkt.drop()
            return
        if v == PIN_DENY:
            # Write the alert before the verdict reaches the kernel: the peer learns of the
            # drop from the reset, and whatever happens to us next, the reason is on disk.
            # (With attribution the alert is still written here, with what memory holds about
            # who is behind the flow; its socket is looked up first, since the verdict resets
            # it: see egressd.attribution.sink.)
            self._drain_events(reply_drop=bool(mark & netfilter.MARK_REPLY))
        elif v == PASS_MARK_SEEN and self.who is not None:
            # issue 8: a fresh flow: name its process while it surely exists (only used when
            # conntrack events are unavailable)
            self.who.attributor.prefetch(data, bool(mark & netfilter.MARK_REPLY))
        pkt.set_mark(netfilter.with_verdict(mark, _MARK_BITS[v]))
        pkt.repeat()

    def _readable(self) -> None:
        q = self._queue
        if q is None:
            return
        t0 = time.perf_counter_ns()
        self._now = time.time()
        n = q.process(BATCH)
        if self.who is not None and self.engine.counters.overload != self._overload_seen:
            self._overload_seen = self.engine.counters.overload  # issue 8: pause early lookups
            self.who.attributor.paused_until = time.monotonic() + 2.0
        if n:
            dt = time.perf_counter_ns() - t0
            self.lat_total_ns += dt // n
            self.lat_batches += 1
            if dt // n > self.lat_max_ns:
                self.lat_max_ns = dt // n
        self._drain_events()

    def _drain_events(self, reply_drop: bool = False) -> None:
        evs = self.engine.events
        if evs and self.who is not None:
            self.who.take(evs, self.policy, reply_drop)
        elif evs:
            while evs:
                self.log.write(evs.popleft())
            self.log.flush()

    def _on_callback_error(self, e: BaseException) -> None:
        self.callback_errors += 1

    # -- policy reload -------------------------------------------------------------------
    def reload(self) -> bool:
        sdnotify.reloading()
        try:
            new = load_policy(self.opts.policy)
        except (PolicyError, OSError) as e:
            self.reload_failures += 1
            self.last_reload_error = str(e)
            print(
                f"egressd: reload rejected, the running policy stays in force:\n{e}",
                file=sys.stderr,
                flush=True,
            )
            sdnotify.ready(f"reload rejected ({self.reload_failures}); running previous policy")
            return False
        old_s, new_s = self.policy.settings, new.settings
        if (new.fail, new_s.queue_num, new_s.queue_len) != (self.policy.fail, old_s.queue_num, old_s.queue_len):
            print(
                "egressd: note: 'fail', 'settings.queue_num' and 'settings.queue_len' take effect at the next restart",
                file=sys.stderr,
                flush=True,
            )
        if self._rules_installed and netfilter.kernel_head(new_s) != netfilter.kernel_head(old_s):
            # head_bytes/max_packets changed: the kernel's bound must follow, or a larger head
            # could be outlasted by a slow sender. install() replaces the rules in one
            # transaction per table; pinned connections keep their connmarks.
            try:
                self._install_rules(new)
            except netfilter.NetfilterError as e:
                self.reload_failures += 1
                self.last_reload_error = f"kernel rules for the new head size: {e}"
                print(f"egressd: reload rejected: {self.last_reload_error}", file=sys.stderr, flush=True)
                sdnotify.ready("reload rejected; running previous policy")
                return False
        self.engine.reload(new)
        self.policy = new
        self.reloads += 1
        print(
            f"egressd: policy reloaded from {self.opts.policy} ({len(new.rules)} rules)",
            file=sys.stderr,
            flush=True,
        )
        sdnotify.ready(self._status_line())
        return True

    # -- housekeeping --------------------------------------------------------------------
    async def _ticker(self) -> None:
        wd = sdnotify.watchdog_interval()
        while True:
            await asyncio.sleep(TICK if wd is None else min(TICK, wd / 2))
            now = time.time()
            self._now = now
            self.engine.sweep(now)
            self._drain_events()
            if self.who is not None:
                self.who.flush()
            self.log.check_rotation()
            with contextlib.suppress(OSError):
                self.kernel = procstats.find(procstats.read(), self.queue_num)
            self._ticks += 1
            if self._rules_installed and self.fail_open and self._ticks % UNINSPECTED_EVERY == 0:
                self._count_uninspected()
            if self._rules_installed and self._ticks % GUARD_EVERY == 0:
                self._follow_uplinks()
                if self.guard_ifaces:
                    with contextlib.suppress(netfilter.NetfilterError, OSError, ValueError):
                        self.guard_dropped = netfilter.guard_drops()
            sdnotify.watchdog()
            sdnotify.status(self._status_line())

    def _count_uninspected(self) -> None:
        """With fail: open the kernel passes queue overflow uninspected and counts it nowhere
        (docs/architecture.md): the NFQUEUE rules' packet counters minus what the queue accepted
        (id_sequence) and dropped is that number. Reported, never silently lost."""
        k = self.kernel
        if k is None:
            return
        try:
            hits = netfilter.queue_hits()
        except (netfilter.NetfilterError, OSError):
            return
        self.uninspected = max(self.uninspected, hits - k.id_sequence - k.queue_dropped - k.user_dropped)

    def _status_line(self) -> str:
        c = self.engine.counters
        return f"{c.packets} packets, {c.flows} flows, {c.dropped} dropped, policy {self.policy.path}"

    def status(self) -> dict[str, Any]:
        c = self.engine.counters
        k = self.kernel
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "policy": self.policy.path,
            "mode": self.policy.mode,
            "fail": self.policy.fail,
            "queue_num": self.queue_num,
            "link_guard": {"ifaces": self.guard_ifaces, "error": self.guard_error, "dropped": self.guard_dropped},
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "last_reload_error": self.last_reload_error,
            "engine": c.as_dict(),
            "flows_tracked": len(self.engine.table),
            "callback_errors": self.callback_errors,
            "verdict_latency_us": {
                "mean": round(self.lat_total_ns / self.lat_batches / 1000, 1) if self.lat_batches else 0.0,
                "max": round(self.lat_max_ns / 1000, 1),
            },
            "kernel_queue": None
            if k is None
            else {
                "queue_total": k.queue_total,
                "queue_dropped": k.queue_dropped,
                "user_dropped": k.user_dropped,
                "id_sequence": k.id_sequence,
                "uninspected": self.uninspected,
            },
            "netlink_enobufs": self._queue.enobufs if self._queue is not None else 0,
            "events": {
                "written": self.log.written,
                "errors": self.log.errors,
                "last_error": self.log.last_error,
            },
            "attribution": None if self.who is None else self.who.status(),
        }

    async def _serve_status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self.status()).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            body = prometheus_text(self.status()).encode()
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    # -- life cycle ----------------------------------------------------------------------
    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        settings = self.policy.settings
        # Bind the queue first: if another daemon already owns it, fail before touching
        # the kernel rules that daemon relies on.
        self._queue = nfq.Queue(
            self.queue_num,
            self._on_packet,
            fail_open=self.fail_open,
            max_len=settings.queue_len,
            on_error=self._on_callback_error,
        )
        if self.opts.install_rules:
            try:
                self._install_rules(self.policy)
            except BaseException:
                self._queue.close()
                raise
        loop.add_reader(self._queue.fileno(), self._readable)
        if self.who is not None:
            self.who.start(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.opts.status_socket:
            path = Path(self.opts.status_socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old = os.umask(0o177)
            try:
                self._servers.append(await asyncio.start_unix_server(self._serve_status, path=str(path)))
            finally:
                os.umask(old)
        if self.opts.metrics:
            host, port = parse_metrics_address(self.opts.metrics)
            self._servers.append(await asyncio.start_server(self._serve_metrics, host, port))
        ticker = asyncio.create_task(self._ticker())
        watcher = asyncio.create_task(self._watch()) if self.opts.watch else None
        print(
            f"egressd: judging egress on queue {self.queue_num} (policy {self.policy.path}, mode {self.policy.mode}, "
            f"fail {self.policy.fail})",
            file=sys.stderr,
            flush=True,
        )
        sdnotify.ready(self._status_line())
        try:
            await self._stop.wait()
        finally:
            sdnotify.stopping()
            ticker.cancel()
            if watcher is not None:
                watcher.cancel()
            loop.remove_reader(self._queue.fileno())
            for s in self._servers:
                s.close()
            # fail: open -> remove the rules first, so nothing waits on a queue that is about
            # to lose its listener. fail: closed -> leave them: with nobody bound to the queue
            # (and no --queue-bypass) every judged packet is dropped until egressd is back.
            if self.fail_open:
                self._remove_rules()
            else:
                print(
                    "egressd: fail: closed - the kernel rules stay in place; egress is blocked until "
                    "egressd runs again (or `egressd rules remove`)",
                    file=sys.stderr,
                    flush=True,
                )
            self._queue.close()
            self.engine.finish(time.time())
            self._drain_events()
            if self.who is not None:
                self.who.close()
            self.log.close()
            if self.opts.status_socket:
                with contextlib.suppress(OSError):
                    os.unlink(self.opts.status_socket)
        return 0

    async def _watch(self) -> None:
        """--watch: the SIGHUP reload, triggered by the policy's files changing on disk."""
        from egressd import watch

        def files() -> list[str]:
            return [str(self.opts.policy), *self.policy.files]

        await watch.watch(files, self.reload)

    def _install_rules(self, policy: Policy) -> None:
        netfilter.install(
            self.queue_num,
            fail_open=self.fail_open,
            max_packets=netfilter.kernel_head(policy.settings),
            forward_ifaces=self.opts.forward_ifaces,
        )
        self._rules_installed = True
        if not self.guard_ifaces:  # a reload re-installs the iptables rules only; the guard stays
            self._install_guard()

    def _install_guard(self) -> None:
        """The link guard on the named interfaces, or on the way out (the default routes).

        Named interfaces that cannot be guarded are an error (the rules are taken down again
        and the daemon stops); when following the default routes, a system without nft or a
        kernel without the netdev egress hook gets a warning and egressd runs without a guard.
        """
        if not self.opts.guard:
            return
        ifaces = list(self.opts.guard_ifaces) or netfilter.uplinks()
        if not ifaces:
            self.guard_error = "no default route yet: nothing to guard"
            return
        try:
            netfilter.install_guard(ifaces)
        except netfilter.GuardUnavailable as e:
            if self.opts.guard_ifaces:
                self._remove_rules()
                raise
            self.guard_error, self._guard_unavailable = str(e), True
            print(
                f"egressd: warning: no link guard ({e}): frames a CAP_NET_RAW process writes through "
                "a packet socket are not judged",
                file=sys.stderr,
                flush=True,
            )
            return
        self.guard_ifaces, self.guard_error = ifaces, ""

    def _follow_uplinks(self) -> None:
        """A new way out (a default route through an interface not guarded yet): guard it too.

        Only when following the default routes. The set only grows while the daemon runs (the
        kernel re-hooks a guarded name when its interface comes back); /proc/net is read, no
        subprocess, and nft runs only when something changed.
        """
        if not self.opts.guard or self.opts.guard_ifaces or self._guard_unavailable:
            return
        want = sorted(set(self.guard_ifaces) | set(netfilter.uplinks()))
        if not want or want == self.guard_ifaces:
            return
        try:
            netfilter.install_guard(want)
        except netfilter.NetfilterError as e:
            self.guard_error = str(e)
            return
        print(f"egressd: link guard now on {', '.join(want)}", file=sys.stderr, flush=True)
        self.guard_ifaces, self.guard_error = want, ""

    def _remove_rules(self) -> None:
        if self._rules_installed:
            try:
                netfilter.remove()
            except netfilter.NetfilterError as e:
                print(f"egressd: removing the kernel rules failed: {e}", file=sys.stderr, flush=True)
            self._rules_installed = False
            self.guard_ifaces = []


def parse_metrics_address(text: str) -> tuple[str, int]:
    """HOST:PORT for --metrics; the host must be a loopback address. The counters say what the
    node's policy is and what it caught: they are for a local scraper (or an SSH tunnel), never
    for the network the node's workloads can reach."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9713")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--metrics {text!r}: the host must be a loopback address (127.0.0.1 or ::1)") from None
    if not ip.is_loopback:
        raise ValueError(f"--metrics {text!r}: {host} is not a loopback address; metrics are served locally only")
    return host, int(port)


def prometheus_text(st: dict[str, Any]) -> str:
    """Counters in the Prometheus text exposition format (no client library needed)."""
    out: list[str] = []

    def metric(name: str, value: float, help_: str, kind: str = "counter", labels: str = "") -> None:
        out.append(f"# HELP egressd_{name} {help_}")
        out.append(f"# TYPE egressd_{name} {kind}")
        out.append(f"egressd_{name}{labels} {value}")

    e = st["engine"]
    metric("packets_total", e["packets"], "Packets judged by the engine.")
    metric("flows_total", e["flows"], "Flows seen.")
    metric("flows_dropped_total", e["dropped"], "Flows dropped.")
    metric("malformed_total", e["malformed"], "Packets that could not be decoded.")
    metric(
        "errors_total",
        e["errors"] + st["callback_errors"],
        "Internal errors (the packet still got a verdict).",
    )
    metric("overload_total", e["overload"], "New flows judged by on_overload because the flow table was full.")
    metric("flows_tracked", st["flows_tracked"], "Flows in the table.", "gauge")
    metric("reload_failures_total", st["reload_failures"], "Rejected policy reloads.")
    metric("verdict_latency_mean_us", st["verdict_latency_us"]["mean"], "Mean time to judge a packet.", "gauge")
    for kind, n in sorted(e["detections"].items()):
        out.append(f'egressd_detections_total{{kind="{kind}"}} {n}')
    for rule, n in sorted(e["rules"].items()):
        out.append(f'egressd_rule_decisions_total{{rule="{rule}"}} {n}')
    k = st["kernel_queue"]
    if k is not None:
        metric("queue_dropped_total", k["queue_dropped"], "Packets the kernel dropped: queue full.")
        metric("uninspected_total", k["uninspected"], "Packets passed without a verdict: queue full, fail: open.")
        metric("user_dropped_total", k["user_dropped"], "Packets the kernel dropped: netlink buffer full.")
    metric(
        "link_guard_dropped_total",
        st["link_guard"]["dropped"],
        "IP frames that did not come through the IP layer (packet sockets), dropped by the link guard.",
    )
    metric("netlink_enobufs_total", st["netlink_enobufs"], "Netlink receive-buffer overflows reported to us.")
    metric("event_write_errors_total", st["events"]["errors"], "Events that could not be written.")
    return "\n".join(out) + "\n"


def run(opts: Options) -> int:
    """Load the policy (exit 2 with file:line if it is bad), then serve until SIGTERM."""
    try:
        policy = load_policy(opts.policy)
    except PolicyError as e:
        print(f"egressd run: the policy does not load:\n{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"egressd run: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and not _has_net_admin():
        print(
            "egressd run: needs CAP_NET_ADMIN (run as root or with AmbientCapabilities=CAP_NET_ADMIN)",
            file=sys.stderr,
        )
        return 2
    try:
        for name in opts.guard_ifaces:
            netfilter.check_iface(name)
    except ValueError as e:
        print(f"egressd run: --guard-iface: {e}", file=sys.stderr)
        return 2
    if opts.metrics:
        try:
            parse_metrics_address(opts.metrics)
        except ValueError as e:
            print(f"egressd run: {e}", file=sys.stderr)
            return 2
    d = Daemon(opts, policy)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(d.main())
    except (netfilter.NetfilterError, nfq.NfqError) as e:
        print(f"egressd run: {e}", file=sys.stderr)
        return 1


def _has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        return False
    return False


def read_status(path: str, timeout: float = 2.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data
