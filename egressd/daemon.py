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

from egressd import ctevents, kernellog, kernelsets, netfilter, nfq, procstats, sdnotify, verdict
from egressd.attribution.sink import AttributedSink  # issue 8
from egressd.dnsnames import TTL_GRACE
from egressd.engine import DIR_FRESH, DIR_ORIGINAL, DIR_REPLY, Engine
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
CLOSE_DRAIN_BATCHES = 16  # at most this many queue batches are read ahead of logged closes
KERNEL_DEBOUNCE = 0.5  # seconds a reload's compiled policy waits, so a burst of reloads installs once
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
    metrics_allow_remote: bool = False  # --metrics-allow-remote: a non-loopback --metrics address
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
        self._ct: ctevents.Events | None = None  # conntrack destroy events: where flows end
        self.ct_error = ""
        self._klog: kernellog.KernelLog | None = None  # the compiled policy's drops, for their events
        self._plan_policy: Policy | None = None  # the policy the compiled rules came from
        self._plan: kernelsets.Plan | None = None  # the compiled policy in the kernel
        self._plan_sig: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._kernel_busy = False  # a reload's compiled policy is being installed off the loop
        self._kernel_next: Policy | None = None
        self._kernel_fut: asyncio.Future[Any] | None = None
        self._kernel_timer: asyncio.TimerHandle | None = None
        self.kernel_error = ""
        self._gen = 0
        self.dns_mirrored = 0
        self.closes_logged = 0  # FINs of connections being judged, learned from NFLOG (not queued)
        self.pins_forgotten = 0  # allowed pins dropped because conntrack end events were lost
        self.dns_set_error = ""
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
        d = DIR_REPLY if mark & netfilter.MARK_REPLY else DIR_ORIGINAL
        if mark & netfilter.MARK_FRESH:
            d |= DIR_FRESH
        v = self.engine.feed(data, self._now, d)
        if self.engine.dns.learned:
            self._mirror_dns()  # before the verdict: the answer must not reach the client first
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

    def _mirror_dns(self) -> None:
        """Addresses a DNS answer gave for a compiled name rule's names go into its kernel set.

        A drop rule's set is written before the answer's own verdict is given (one ``ipset``
        call, and only for the answers that name what the rule drops, a mining pool): the
        client cannot connect before the kernel knows to refuse it. Accept sets are written off
        the loop; until then the engine decides those connections, with the same result."""
        learned = self.engine.dns.learned
        if learned is None:
            return
        plan, gen = self._plan, self._gen
        now_lines: list[str] = []
        later: list[str] = []
        if plan is not None:
            for ip, name, ttl in learned:
                fam = 4 if len(ip) == 4 else 6
                for e in plan.name_entries:
                    doms = e.match.domains
                    if doms is None or doms.match(name) is None:
                        continue
                    line = (
                        f"add {kernelsets.set_name(gen, e.index, 'n', fam)} {kernelsets.address_text(ip)} "
                        f"timeout {kernelsets.dns_timeout(ttl, TTL_GRACE)}"
                    )
                    (now_lines if e.action == "drop" else later).append(line)
        learned.clear()
        try:
            if now_lines:
                netfilter.add_learned(now_lines)
                self.dns_mirrored += len(now_lines)
        except netfilter.NetfilterError as e:
            self.dns_set_error = str(e)
        if later:
            self.dns_mirrored += len(later)
            asyncio.get_running_loop().run_in_executor(None, self._add_later, later)

    def _refill_dns_sets(self) -> None:
        """A new generation of sets starts empty: give it what the engine's name cache knows."""
        plan, now = self._plan, time.time()
        if plan is None:
            return
        lines: list[str] = []
        for ip, names, expiry in self.engine.dns.live(now):
            fam = 4 if len(ip) == 4 else 6
            for e in plan.name_entries:
                doms = e.match.domains
                if doms is not None and doms.match_any(names) is not None:
                    name = kernelsets.set_name(self._gen, e.index, "n", fam)
                    lines.append(f"add {name} {kernelsets.address_text(ip)} timeout {max(1, int(expiry - now))}")
        try:
            netfilter.add_learned(lines)
        except netfilter.NetfilterError as e:
            self.dns_set_error = str(e)

    def _add_later(self, lines: list[str]) -> None:
        try:
            netfilter.add_learned(lines)
        except netfilter.NetfilterError as e:
            self.dns_set_error = str(e)

    def _klog_readable(self) -> None:
        """The kernel reset connections by compiled drop rules: each gets its event. And
        connections being judged closed (netfilter.CHAIN_CLOSE): the engine reads each close."""
        klog, pol = self._klog, self._plan_policy
        if klog is None:
            return
        closes: list[kernellog.Closed] = []
        try:
            got = klog.read(closes)
        except OSError as e:
            self.dns_set_error = f"kernel log: {e}"
            return
        if closes:
            self._closed(closes)
        if pol is None or not got:
            return
        now = time.time()
        for index, proto, src, sport, dst, dport in got:
            decision = pol.rules[index].decision if index < len(pol.rules) else pol.default_decision
            self.engine.kernel_dropped(decision, proto, src, sport, dst, dport, now)
        self._drain_events()

    def _closed(self, closes: list[kernellog.Closed]) -> None:
        """Feed logged closes to the engine, after every packet queued before them.

        A side's data segment is queued before its FIN is logged, on another socket: reading
        the queue dry first keeps the engine's order the stream's order (a close must not make
        the detectors give up before they saw the data that came before it). Bounded: under a
        flood the queue may never run dry, and a close is evidence, not a verdict. The
        engine's verdict is not sent anywhere: the packet has passed. A verdict that pins the
        flow reaches the kernel with the connection's next queued packet, if any; its event
        is written now."""
        for _ in range(CLOSE_DRAIN_BATCHES):
            if self._readable() < BATCH:  # conntrack ends, then a batch of the queue
                break
        now = self._now = time.time()
        feed = self.engine.feed
        for pkt, mark in closes:
            feed(pkt, now, DIR_REPLY if mark & netfilter.MARK_REPLY else DIR_ORIGINAL)
        self.closes_logged += len(closes)
        self._drain_events()

    def _ct_readable(self) -> None:
        """Conntrack destroyed some connections: their flows end now (``Engine.end``)."""
        ct = self._ct
        if ct is None:
            return
        lost = ct.overflows
        try:
            ended = ct.read()
        except OSError as e:
            self.ct_error = str(e)
            return
        if ct.overflows != lost:
            self.pins_forgotten += self.engine.forget_allowed()
        now = time.time()
        for _mtype, (proto, src, sport, dst, dport), mark in ended:
            if not self.engine.end(proto, src, sport, dst, dport, now) and mark & netfilter.MARK_FRESH:
                # A connection this node opened that never carried data: the kernel let its
                # handshake pass without a verdict, and its end is its flow record.
                self.engine.dataless_end(proto, src, sport, dst, dport, now)
        if ended:
            self._drain_events()

    def _open_conntrack_events(self) -> None:
        """Subscribe to conntrack destroy events before the rules send any traffic our way.

        Without them (no CAP_NET_ADMIN over ctnetlink, nf_conntrack_netlink missing) flows
        end by idle timeout, as they always could: said once, and in ``egressd status``."""
        try:
            self._ct = ctevents.Events(ctevents.NFNLGRP_CONNTRACK_DESTROY)
        except OSError as e:
            self.ct_error = f"no conntrack events ({e}): flows end by idle timeout"
            print(f"egressd: warning: {self.ct_error}", file=sys.stderr, flush=True)

    def _readable(self) -> int:
        """A batch of the queue (conntrack ends first); how many packets it held."""
        q = self._queue
        if q is None:
            return 0
        if self._ct is not None:
            # Ends first: a connection that ended before this batch was queued must be
            # forgotten before its 4-tuple's next connection is judged, or that one's first
            # data segment would get the old flow's pinned verdict (the kernel sends the
            # destroy event before it creates the new entry, so it is waiting by now).
            self._ct_readable()
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
        return n

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
        if self._rules_installed and netfilter.kernel_head(new_s) == netfilter.kernel_head(old_s):
            if _plan_signature(new) != self._plan_sig or self._kernel_busy or self._kernel_timer is not None:
                self._rewrite_kernel_later(new)
        elif self._rules_installed:
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
            "kernel_policy": {
                "compiled": [e.rule for e in self._plan.entries] if self._plan is not None else [],
                "generation": self._gen,
                "dns_addresses_added": self.dns_mirrored,
                "error": self.dns_set_error or self.kernel_error,
            },
            "closes_logged": self.closes_logged,
            "conntrack_events": {
                "listening": self._ct is not None,
                "destroyed": self._ct.messages if self._ct is not None else 0,
                "overflows": self._ct.overflows if self._ct is not None else 0,
                "allowed_pins_forgotten": self.pins_forgotten,
                "error": self.ct_error,
            },
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
        self._open_conntrack_events()
        with contextlib.suppress(OSError):  # without it the kernel's drops still happen, unrecorded
            self._klog = kernellog.KernelLog(self.queue_num)
        if self.opts.install_rules:
            try:
                self._install_rules(self.policy)
            except BaseException:
                self._queue.close()
                if self._ct is not None:
                    self._ct.close()
                raise
        if self._ct is not None:
            loop.add_reader(self._ct.fileno(), self._ct_readable)
        if self._klog is not None:
            loop.add_reader(self._klog.fileno(), self._klog_readable)
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
            host, port = parse_metrics_address(self.opts.metrics, self.opts.metrics_allow_remote)
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
            if self._ct is not None:
                loop.remove_reader(self._ct.fileno())
                self._ct.close()
            if self._klog is not None:
                loop.remove_reader(self._klog.fileno())
                self._klog.close()
            for s in self._servers:
                s.close()
            if self._kernel_timer is not None:
                self._kernel_timer.cancel()
            if self._kernel_fut is not None and not self._kernel_fut.done():
                # A reload's install still running in its thread: let it finish, or it could
                # put rules back after they were removed.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._kernel_fut), 30)
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
        """The queue rules, and what the policy decides from addresses (egressd.kernelsets).

        The compiled part goes in as a new generation of sets beside the old one, the rules
        are swapped in one transaction per table, then the old sets are destroyed. Without
        ipset or CAP_NET_RAW (``netfilter.sets_usable``) the address rules are plain rules and
        the DNS-learned names stay with the engine (said in ``egressd status``)."""
        self._adopt(policy, self._write_kernel(policy))
        if not self.guard_ifaces:  # a reload re-installs the iptables rules only; the guard stays
            self._install_guard()

    def _write_kernel(self, policy: Policy) -> tuple[kernelsets.Plan | None, int, bool]:
        """Compile and install (subprocesses only, no daemon state touched: a reload runs it in
        a worker thread). Returns (the plan now in the kernel or None, its generation, sets used)."""
        plan = kernelsets.compile_policy(policy)
        rendered: tuple[kernelsets.Rendered, ...] = ()
        use_sets = netfilter.sets_usable()
        gen = 0
        if plan.entries or plan.default is not None:
            if use_sets:
                gen = netfilter.next_generation()
            rendered = tuple(
                kernelsets.render(
                    plan,
                    fam,
                    gen,
                    state_mask=netfilter.MARK_MASK,
                    allow=netfilter.MARK_ALLOW,
                    deny=netfilter.MARK_DENY,
                    deny_chain=netfilter.CHAIN_DENY,
                    log_group=self.queue_num if self._klog is not None else None,
                    use_sets=use_sets,
                )
                for fam in (4, 6)
            )
            if use_sets:
                netfilter.create_sets([*rendered[0].ipset, *rendered[1].ipset])
        netfilter.install(
            self.queue_num,
            fail_open=self.fail_open,
            max_packets=netfilter.kernel_head(policy.settings),
            forward_ifaces=self.opts.forward_ifaces,
            policy=(tuple(rendered[0].rules), tuple(rendered[1].rules)) if rendered else ((), ()),
            sets=[*rendered[0].sets, *rendered[1].sets] if rendered else (),
            log_closes=self.queue_num if self._klog is not None else None,
        )
        return (plan if rendered else None), gen, use_sets

    def _adopt(self, policy: Policy, done: tuple[kernelsets.Plan | None, int, bool]) -> None:
        """On the loop: remember what the kernel now holds, mirror DNS names into it if it can."""
        plan, gen, use_sets = done
        self._plan, self._gen, self._plan_policy = plan, gen, policy
        self._plan_sig = _plan_signature(policy)
        if plan is not None and not use_sets:
            self.dns_set_error = (
                "no ipset, or no CAP_NET_RAW for iptables' set match: address rules as plain "
                "rules, names learned over DNS decided in Python"
            )
        self.engine.dns.learned = [] if plan is not None and use_sets and plan.name_entries else None
        if self.engine.dns.learned is not None:
            self._refill_dns_sets()
        self._rules_installed = True

    def _rewrite_kernel_later(self, policy: Policy) -> None:
        """A reload changed only the compiled part: install it off the loop (subprocesses take
        tens to hundreds of milliseconds; verdicts must not wait), at most one at a time and
        after a short pause, so a burst of reloads installs only the last policy. Until it is
        in, the kernel decides new connections by the previous compiled part, which was the
        policy in force until then (and the engine, already on the new policy, judges the rest)."""
        self._kernel_next = policy
        if self._kernel_busy or self._kernel_timer is not None:
            return
        self._kernel_timer = asyncio.get_running_loop().call_later(KERNEL_DEBOUNCE, self._start_kernel_job)

    def _start_kernel_job(self) -> None:
        self._kernel_timer = None
        policy, self._kernel_next = self._kernel_next, None
        if policy is None or not self._rules_installed or _plan_signature(policy) == self._plan_sig:
            return
        self._kernel_busy = True
        fut = asyncio.get_running_loop().run_in_executor(None, self._write_kernel, policy)
        self._kernel_fut = fut

        def finished(f: asyncio.Future[tuple[kernelsets.Plan | None, int, bool]]) -> None:
            self._kernel_busy = False
            try:
                self._adopt(policy, f.result())
            except netfilter.NetfilterError as e:
                self.kernel_error = f"kernel rules for the reloaded policy: {e}"
                print(f"egressd: {self.kernel_error}", file=sys.stderr, flush=True)
            if self._kernel_next is not None:
                self._kernel_timer = asyncio.get_running_loop().call_later(KERNEL_DEBOUNCE, self._start_kernel_job)

        fut.add_done_callback(finished)

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


def _plan_signature(policy: Policy) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The compiled policy's rules as text, generation aside: equal means "nothing to swap"."""
    plan = kernelsets.compile_policy(policy)
    kw: dict[str, Any] = {
        "state_mask": netfilter.MARK_MASK,
        "allow": netfilter.MARK_ALLOW,
        "deny": netfilter.MARK_DENY,
        "deny_chain": netfilter.CHAIN_DENY,
    }
    r4, r6 = kernelsets.render(plan, 4, 0, **kw), kernelsets.render(plan, 6, 0, **kw)
    return (tuple(r4.rules + r4.ipset), tuple(r6.rules + r6.ipset))


def parse_metrics_address(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """HOST:PORT for --metrics; the host must be a loopback address unless ``allow_remote``.

    The counters say what the node's policy is and what it caught: by default they are for a
    local scraper (or an SSH tunnel), never for the network the node's workloads can reach.
    A cluster's Prometheus scrapes a hostNetwork pod at the node's address, so
    ``--metrics-allow-remote`` (never a default) accepts any IP literal; a name is refused
    either way, so what is bound is exactly what the operator wrote.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9713")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        need = "an IP address" if allow_remote else "a loopback address (127.0.0.1 or ::1)"
        raise ValueError(f"--metrics {text!r}: the host must be {need}") from None
    if not ip.is_loopback and not allow_remote:
        raise ValueError(
            f"--metrics {text!r}: {host} is not a loopback address; metrics are served locally only "
            "unless --metrics-allow-remote is given"
        )
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
    if os.geteuid() != 0 and not netfilter.has_net_admin():
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
            parse_metrics_address(opts.metrics, opts.metrics_allow_remote)
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
