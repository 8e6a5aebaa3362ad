#!/usr/bin/env python3
"""What the link guard costs traffic, as ratios from one run (root).

The guard (docs/link-guard.md) adds two nftables chains to every packet that leaves the node:
the postrouting chain that sets MARK_PASSED and the egress chain of the guarded interface that
checks it. This measures only that, nothing of egressd's queue: in a fresh lab (egressd_lab.netns),
rounds without and with the guard alternate (A B A B ...), and each round runs

* bulk TCP: one iperf3 stream node -> inet (GSO: one check per super-packet), and
* small UDP: iperf3 datagrams of 64 bytes at full speed (one check per packet), received
  packets per second.

The table gives the medians of each side and the median of the per-round ratios with/without.
Only ratios from one run mean anything on these shared machines.

Usage: bench/guard.py [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from egressd import netfilter
from egressd_lab.netns import SERVICES, Lab, have_netns, lab

TARGET = SERVICES["bulk"][0]
PORT = 5301


def _iperf(lb: Lab, seconds: float, udp: bool) -> float:
    argv = ["iperf3", "-c", TARGET, "-p", str(PORT), "-t", str(seconds), "-J", "--connect-timeout", "3000"]
    if udp:
        argv += ["-u", "-b", "0", "-l", "64"]
    r = lb.run_node(argv, timeout=seconds + 20)
    j = json.loads(r.stdout)
    end = j["end"]
    if udp:
        s = end["sum"]
        return float(s["packets"] - s["lost_packets"]) / float(s["seconds"])
    return float(end["sum_received"]["bits_per_second"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args(argv)
    if not 1 <= a.rounds <= 20 or not 1 <= a.seconds <= 30:
        ap.error("--rounds 1..20, --seconds 1..30")
    if not have_netns() or shutil.which("iperf3") is None or shutil.which("nft") is None:
        print("bench/guard.py needs root, iperf3 and nft", file=sys.stderr)
        return 2
    rows: dict[str, dict[str, list[float]]] = {"bulk TCP Gbit/s": {"without": [], "with": []},
                                               "64-byte UDP packets/s": {"without": [], "with": []}}  # fmt: skip
    with lab(f"egbg{os.getpid() % 10000}") as lb:
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        lb.spawn("inet", ["iperf3", "-s", "-B", TARGET, "-p", str(PORT)], **quiet)
        time.sleep(0.5)
        (dev,) = netfilter.uplinks(netns=lb.node)
        for _ in range(a.rounds):
            for side in ("without", "with"):
                if side == "with":
                    netfilter.install_guard([dev], netns=lb.node)
                rows["bulk TCP Gbit/s"][side].append(_iperf(lb, a.seconds, udp=False))
                rows["64-byte UDP packets/s"][side].append(_iperf(lb, a.seconds, udp=True))
                if side == "with":
                    drops = lb.run_node(["nft", "list", "chain", "netdev", "egressd", "guard"]).stdout
                    netfilter.remove_guard(netns=lb.node)
                    if "counter packets 0 " not in drops:
                        raise SystemExit(f"the guard dropped traffic of the IP layer:\n{drops}")
    print(f"link guard on {dev}: {a.rounds} rounds of {a.seconds:g} s, A/B interleaved")
    print(f"{'metric':24} {'without':>12} {'with':>12} {'ratio':>7} {'spread':>13}")
    for name, r in rows.items():
        ratios = [w / o for o, w in zip(r["without"], r["with"], strict=True)]
        print(
            f"{name:24} {statistics.median(r['without']):12.2f} {statistics.median(r['with']):12.2f} "
            f"{statistics.median(ratios):7.2f} {min(ratios):6.2f}..{max(ratios):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
