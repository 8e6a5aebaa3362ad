#!/usr/bin/env python3
"""Memory per tracked flow, and the per-packet cost at 1k vs 1M tracked flows, in one run.

What is measured (the engine alone, no kernel: the daemon's flow table is this one):

* bytes per tracked flow: tracemalloc's traced-memory delta after N flows were opened and
  pinned (a SYN, a request, a reset: classified and pinned), divided by N, at
  100,000 and 1,000,000 flows. A pinned flow is what the table holds for almost every
  connection (a flow still being classified also owns its two stream heads, bounded by
  head_bytes each, for the few packets that takes).
* per-packet cost: ``Engine.feed`` of packets of already-pinned flows (what a capture
  replay spends most of its packets on), the flows visited in a random order, with 1,000
  and with 1,000,000 flows in the table; ns per packet, best of 3.

Usage: bench/flows.py [--max 1000000]
"""

from __future__ import annotations

import argparse
import gc
import random
import struct
import time
import tracemalloc

from egressd.engine import Engine
from egressd.paths import default_policy
from egressd.policy import load_policy
from egressd.policy.model import Policy, Settings

DATA = b"GET / HTTP/1.0\r\n\r\n"  # a request; the reset after it ends the flow for both sides


def _csum_free_tcp(src: int, dst: int, sport: int, dport: int, flags: int, seq: int, payload: bytes) -> bytes:
    """An IPv4/TCP packet (checksums zero: the engine does not verify them)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
    return ip + tcp


def _flow_packets(i: int) -> tuple[bytes, bytes, bytes]:
    src = 0xC6336400 | (i >> 16 & 0xFF)  # 198.51.100.x
    dst = 0xCB007100 | (i >> 8 & 0xFF)  # 203.0.113.x
    sport = 1024 + (i & 0xFFFF) % 60000
    dport = 443 + (i >> 24)
    syn = _csum_free_tcp(src, dst, sport, dport, 0x02, 1000, b"")
    data = _csum_free_tcp(src, dst, sport, dport, 0x18, 1001, DATA)
    rst = _csum_free_tcp(src, dst, sport, dport, 0x04, 1001 + len(DATA), b"")
    return syn, data, rst


def _policy(max_flows: int) -> Policy:
    base = load_policy(default_policy())
    s = base.settings
    settings = Settings(**{**{k: getattr(s, k) for k in s.__slots__}, "max_flows": max_flows})
    return Policy(
        path=base.path,
        default=base.default,
        settings=settings,
        pool_domains=base.pool_domains,
        tunnel_service_domains=base.tunnel_service_domains,
        rules=base.rules,
        on_overload=base.on_overload,
        on_error=base.on_error,
    )


def fill(n: int) -> tuple[Engine, list[bytes], int]:
    """An engine with ``n`` pinned flows; their data packets; traced bytes the flows took."""
    eng = Engine(_policy(max(n, 16)))
    pkts = [_flow_packets(i) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, (syn, data, rst) in enumerate(pkts):
        eng.feed(syn, 1.0 + i * 1e-6)
        eng.feed(data, 1.0 + i * 1e-6)
        eng.feed(rst, 1.0 + i * 1e-6)
    eng.events.clear()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if len(eng.table.done) != n:
        raise SystemExit(f"expected {n} pinned flows, the table holds {len(eng.table.done)} ({len(eng.table)} in all)")
    return eng, [d for _, d, _ in pkts], after - before


def per_packet_ns(eng: Engine, pkts: list[bytes], samples: int = 200_000) -> float:
    rng = random.Random(7)
    order = [pkts[rng.randrange(len(pkts))] for _ in range(samples)]
    feed = eng.feed
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for p in order:
            feed(p, 2.0)
        best = min(best, (time.perf_counter_ns() - t0) / samples)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=1_000_000, help="the large table size (default 1,000,000)")
    a = ap.parse_args()
    rows: list[tuple[str, str]] = []
    eng, _pkts, used = fill(100_000)
    rows.append((f"bytes per tracked (pinned) flow, {100_000:,} flows", f"{used / 100_000:.0f} B"))
    del eng, _pkts
    gc.collect()
    big, big_pkts, used = fill(a.max)
    rows.append((f"bytes per tracked (pinned) flow, {a.max:,} flows", f"{used / a.max:.0f} B"))
    ns_big = per_packet_ns(big, big_pkts)
    del big, big_pkts
    gc.collect()
    small, small_pkts, _ = fill(1_000)
    ns_small = per_packet_ns(small, small_pkts)
    rows.append(("ns per packet of a pinned flow, 1,000 flows tracked", f"{ns_small:.0f} ns"))
    rows.append((f"ns per packet of a pinned flow, {a.max:,} flows tracked", f"{ns_big:.0f} ns"))
    rows.append(("ratio large / small table (per packet)", f"{ns_big / ns_small:.2f}"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v:>10}")
    print("target: <= 1 KiB per tracked flow (issue 9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
