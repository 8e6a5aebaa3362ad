#!/usr/bin/env python3
"""The long adversarial runs against the live daemon: flood, queue overload, reload storm.

tests/e2e/test_adversarial_load.py runs 3-second slices of these in CI; this runs them for
as long as asked and prints what a reviewer needs to judge the daemon under load:

* flood: hold-open TCP connections plus unanswered DNS datagrams, every one from a fresh
  source port, at a daemon whose flow table holds 256 flows (``on_overload`` drop and
  accept); the daemon's RSS, tracked flows, overload count and event-log size are sampled
  every half second, and three Stratum handshakes are tried in the middle of the flood;
* queue: UDP datagrams, every one a new flow, as fast as one process sends them, at several
  ``queue_len`` values, fail open and fail closed, while miners send Stratum in 1-byte
  segments; what reached the inet side vs what egressd judged, the kernel's counters, and
  the packets that passed uninspected (NFQUEUE rule hits minus packets the kernel queued);
* storm: SIGHUPs at a bounded rate for ``--storm-seconds`` while HTTP downloads (sha256
  checked) and Stratum handshakes loop.

Needs root (namespaces, iptables, NFQUEUE). Everything runs in namespaces named ``egadvb<pid>-*``
on documentation addresses, bounded in time and count, stopped by pid.

Usage: bench/flood.py [--seconds 10] [--queue-seconds 5] [--storm-seconds 60] [--storm-rate 100]
                      [--queue-lens 8,64,512,4096] [--only flood,queue,storm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from egressd_lab import peers
from egressd_lab.harness import (
    BULK_V4,
    FLOOD,
    HOLD_SERVER,
    POOL_V4,
    WHY,
    adv_lab,
    finish,
    rss_kb,
    spawn_inet_py,
    spawn_node_py,
    stratum,
    write_policy,
)
from egressd_lab.load import MAX_FLOWS, run_queue_overflow, run_reload_storm

PREFIX = f"egadvb{os.getpid() % 100000}"  # never a test run's lab: the bench may run beside them


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.rjust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def bench_flood(seconds: float, on_overload: str) -> None:
    print(f"\n## flood: {seconds:g} s, max_flows {MAX_FLOWS}, on_overload {on_overload}")
    with adv_lab(PREFIX) as lb, tempfile.TemporaryDirectory(prefix="egadvb-") as t:
        tmp = Path(t)
        pool = peers.start_pool(lb, tmp, "v1", POOL_V4, 3333)
        spawn_inet_py(lb, HOLD_SERVER, BULK_V4, "8080", str(seconds + 30))
        peers.wait_listening(lb, "inet", [(BULK_V4, 8080)])
        pol = write_policy(tmp, top={"on_overload": on_overload}, settings={"max_flows": MAX_FLOWS})
        d = peers.start_egressd(lb, tmp, pol)
        time.sleep(1.2)
        rows: list[list[Any]] = []
        t0 = time.monotonic()
        gen = spawn_node_py(lb, FLOOD, BULK_V4, "8080", "53", str(seconds), "2000000", "2000000")
        attempts: list[dict[str, Any]] = []

        def miners() -> None:
            time.sleep(seconds / 2)
            attempts.extend(stratum(lb, POOL_V4, 3333, timeout=2) for _ in range(3))

        th = threading.Thread(target=miners)
        th.start()
        while True:
            st = d.status()
            size = d.events_path.stat().st_size if d.events_path.exists() else 0
            e = st["engine"]
            row = [f"{time.monotonic() - t0:5.1f}", rss_kb(d.proc.pid), st["flows_tracked"], e["flows"]]
            row += [e["overload"], e["packets"], st["events"]["written"], f"{size / 1e6:.1f}"]
            rows.append([*row, st["verdict_latency_us"]["max"]])
            if gen.poll() is not None:
                break
            time.sleep(0.5)
        th.join()
        gen_out = finish(lb, gen, timeout=30)
        cols = "t s|RSS kB|tracked|flows|overload|packets|events|log MB|max lat us"
        print(table(cols.split("|"), rows))
        print(f"generator: {gen_out.strip()}")
        done = sum(a["handshake_complete"] for a in attempts)
        reqs = len(pool.requests())
        print(f"Stratum during the flood: {done}/{len(attempts)} completed, pool saw {reqs} requests")
        d.stop()


def bench_queue(seconds: float, lens: list[int]) -> None:
    print(f"\n## queue overflow: {seconds:g} s bursts from one sender; Stratum in 1-byte segments meanwhile")
    rows: list[list[Any]] = []
    for fail in ("closed", "open"):
        for qlen in lens:
            with adv_lab(PREFIX) as lb, tempfile.TemporaryDirectory(prefix="egadvb-") as t:
                q = run_queue_overflow(lb, Path(t), fail, seconds=seconds, queue_len=qlen)
            k = q.status["kernel_queue"]
            done = sum(a["handshake_complete"] for a in q.attempts)
            row = [fail, qlen, q.sent, q.delivered, q.judged, k["queue_dropped"], k["user_dropped"]]
            row += [max(0, q.rule_hits - k["id_sequence"]), q.status["netlink_enobufs"]]
            rows.append([*row, f"{done}/{len(q.attempts)}", q.pool_requests])
    cols = "fail|queue_len|sent|delivered|judged|q_dropped|u_dropped|not queued|enobufs|stratum ok|pool reqs"
    print(table(cols.split("|"), rows))
    print(
        "uninspected = NFQUEUE rule hits - packets the kernel queued (fail-open overflow; no counter has it)"
    )


def bench_storm(seconds: float, rate: float) -> None:
    n = int(seconds * rate)
    print(f"\n## reload storm: {n} SIGHUPs at {rate:g}/s with HTTP + Stratum loops")
    with adv_lab(PREFIX) as lb, tempfile.TemporaryDirectory(prefix="egadvb-") as t:
        s = run_reload_storm(lb, Path(t), sighups=n, rate=rate)
    st = s.status
    handled = s.handled_ok + s.handled_rejected
    cols = "sent|secs|reloads|rejected|merged|alive|cb errors|http ok|http bad|stratum blocked|stratum ok"
    cols += "|pool reqs|lat mean us|lat max us"
    lat = st["verdict_latency_us"]
    row = [s.sent, f"{s.seconds:.1f}", st["reloads"], st["reload_failures"], s.sent - handled, s.alive]
    row += [st["callback_errors"], s.http_ok, len(s.http_bad), s.stratum_blocked, s.stratum_done]
    row += [s.pool_requests, lat["mean"], lat["max"]]
    print(table(cols.split("|"), [row]))
    print("merged = SIGHUPs the kernel folded into one still pending (standard signals do not queue)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=10.0, help="flood and queue burst length (default 10)")
    ap.add_argument("--queue-seconds", type=float, default=5.0, help="each queue burst (default 5)")
    ap.add_argument("--storm-seconds", type=float, default=60.0, help="reload storm length (default 60)")
    ap.add_argument("--storm-rate", type=float, default=100.0, help="SIGHUPs per second (default 100)")
    ap.add_argument("--queue-lens", default="8,64,512,4096", help="queue_len values (default 8,64,512,4096)")
    ap.add_argument("--only", default="flood,queue,storm", help="which runs (default all)")
    args = ap.parse_args()
    if WHY:
        print(f"bench/flood.py: {WHY}", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    if "flood" in only:
        for act in ("drop", "accept"):
            bench_flood(args.seconds, act)
    if "queue" in only:
        bench_queue(args.queue_seconds, [int(x) for x in args.queue_lens.split(",")])
    if "storm" in only:
        bench_storm(args.storm_seconds, args.storm_rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
