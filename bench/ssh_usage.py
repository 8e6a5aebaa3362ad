#!/usr/bin/env python3
"""What keeping SSH flows in view past NEWKEYS costs: replay of the SSH usage captures with
the usage watcher and without it (the engine pinning at the banner, as before), side by side.

Interleaved rounds, best of N per variant (these machines are shared and noisy): only the
ratio is meaningful. Also prints how many packets reached the engine's detectors per flow
with each variant (the live daemon's per-flow Python cost follows that count, because the
kernel stops queueing a flow once it is pinned).

Usage: bench/ssh_usage.py [--rounds N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from egressd.engine import PIN_ALLOW, PIN_DENY, Engine
from egressd.paths import default_policy
from egressd.pcapio import Reader
from egressd.policy import load_policy

PCAPS = sorted((Path(__file__).resolve().parents[1] / "pcaps").glob("ssh-use-*.pcap"))


def _load() -> list[list[tuple[float, bytes]]]:
    return [list(Reader(p)) for p in PCAPS]


def _run(caps: list[list[tuple[float, bytes]]], watch: bool) -> tuple[float, int, int]:
    """Seconds for one replay of every capture; packets judged before the pin; flows."""
    policy = load_policy(default_policy())
    original = Engine._start_usage
    if not watch:
        Engine._start_usage = lambda self, flow, det: None  # type: ignore[method-assign]
    try:
        judged = flows = 0
        t0 = time.perf_counter()
        for cap in caps:
            e = Engine(policy)
            pinned: set[int] = set()
            for ts, raw in cap:
                v = e.feed(raw, ts)
                if v in (PIN_ALLOW, PIN_DENY):
                    pinned.add(id(e))
                if id(e) not in pinned:
                    judged += 1
            flows += e.counters.flows
        return time.perf_counter() - t0, judged, flows
    finally:
        Engine._start_usage = original  # type: ignore[method-assign]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    caps = _load()
    packets = sum(len(c) for c in caps)
    best = {True: float("inf"), False: float("inf")}
    judged = {True: 0, False: 0}
    flows = 0
    for _ in range(args.rounds):
        for watch in (False, True):
            took, judged[watch], flows = _run(caps, watch)
            best[watch] = min(best[watch], took)
    print(f"{len(caps)} captures, {packets} packets, {flows} flows, best of {args.rounds} rounds")
    for watch in (False, True):
        name = "usage watcher on " if watch else "pinned at banner"
        rate, per_flow = packets / best[watch], judged[watch] / flows
        print(f"  {name}: {rate:9.0f} packets/s, {per_flow:5.1f} packets/flow before the pin")
    print(f"  ratio (on/off): {best[False] / best[True]:.2f} of the throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
