#!/usr/bin/env python3
"""What one node's egressd costs and writes: the figures behind the DaemonSet's resources and
the fleet's event volume (docs/kubernetes.md).

* **memory**: the daemon's RSS idle on the shipped default policy, and its peak while the flow
  table fills to its default cap (``max_flows`` 65,536) with unique UDP flows — the bound a
  memory limit must hold, whatever the node's traffic;
* **CPU**: the daemon's CPU seconds (utime + stime) for those flows, per 1,000 new flows;
* **events**: a mixed workload through the lab's real peers (DNS lookups, HTTPS, HTTP
  downloads, SSH to an allowed host, Stratum attempts): events per flow and bytes per event
  as written to the event log (EVE JSON lines).

Needs root (namespaces, iptables, NFQUEUE). Runs in namespaces named ``egfp<pid>-*`` on
documentation addresses; every generator is bounded in count and time and stopped by pid.

Usage: bench/footprint.py [--flows 70000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from egressd_lab import peers
from egressd_lab.harness import SINK_V4, UDP_PORTS_BURST, WHY, adv_lab, finish, rss_kb, spawn_node_py, stratum
from egressd_lab.netns import SERVICES

PREFIX = f"egfp{os.getpid() % 100000}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def memory_and_cpu(flows: int, tmp: Path) -> None:
    with adv_lab(PREFIX + "m") as lb:
        d = peers.start_egressd(lb, tmp, name="fp-mem")
        time.sleep(2.0)
        idle = rss_kb(d.proc.pid)
        c0 = cpu_seconds(d.proc.pid)
        t0 = time.monotonic()
        gen = spawn_node_py(lb, UDP_PORTS_BURST, SINK_V4, "20000", str(flows), "120")
        sent = int(finish(lb, gen, timeout=150).strip() or 0)
        # let the daemon drain its queue before reading its counters
        deadline = time.monotonic() + 30
        st = d.status()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            nxt = d.status()
            if nxt["engine"]["packets"] == st["engine"]["packets"]:
                break
            st = nxt
        wall = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - c0
        eng = st["engine"]
        judged = eng["flows"] + eng["overload"]
        print("memory and CPU (shipped default policy, max_flows 65536)")
        print(f"  RSS idle                         {idle:>9,} kB")
        print(f"  RSS after the burst / peak (HWM) {rss_kb(d.proc.pid):>9,} kB / {peak_rss_kb(d.proc.pid):,} kB")
        print(f"  datagrams sent (each a new flow) {sent:>9,}")
        print(f"  flows judged / tracked / overload {eng['flows']:>8,} / {st['flows_tracked']:,} / {eng['overload']:,}")
        print(f"  daemon CPU                       {cpu:>9.2f} s over {wall:.1f} s wall")
        if judged:
            print(f"  CPU per 1,000 new flows          {1000 * cpu / judged:>9.3f} s")
        d.stop()  # flushes the events of flows still open
        evs = d.events()
        if evs:
            size = d.events_path.stat().st_size
            print(f"  events / bytes per event         {len(evs):>9,} / {size / len(evs):.0f} (one-datagram UDP flows)")


def events(rounds: int, tmp: Path) -> None:
    with adv_lab(PREFIX + "e") as lb:
        lab_peers = peers.start_lab_peers(lb, tmp, bulk_bytes=256 * 1024)
        d = peers.start_egressd(lb, tmp, name="fp-ev")
        tls, bulk, dns = SERVICES["tls"][0], SERVICES["bulk"][0], SERVICES["dns"][0]
        allowed = SERVICES["ssh_allowed"][0]
        t0 = time.monotonic()
        for _ in range(rounds):
            lb.run_node(["dig", f"@{dns}", "pypi.org", "A", "+time=1", "+tries=1"], timeout=10)
            lb.run_node(
                ["curl", "-sSk", "--noproxy", "*", "--max-time", "5", "--resolve", f"tls.example.net:443:{tls}",
                 "-o", "/dev/null", "https://tls.example.net/"],
                timeout=15,
            )  # fmt: skip
            lb.run_node(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", f"http://{bulk}/blob.bin"], timeout=15)
            lb.run_node(lab_peers.ssh(allowed, "true"), timeout=15)
            stratum(lb, SERVICES["pool"][0], 3333)
        time.sleep(1.5)
        d.stop()
        wall = time.monotonic() - t0
        lines = [ln for ln in d.events_path.read_bytes().splitlines() if ln.strip()]
        evs = d.events()
        size = sum(len(ln) + 1 for ln in lines)
        flows = len({e["flow_id"] for e in evs})
        kinds: dict[str, list[int]] = {}
        for ln, e in zip(lines, evs, strict=True):
            kinds.setdefault(e["event_type"], []).append(len(ln) + 1)
        print(f"events (mixed workload: {rounds} rounds of DNS, HTTPS, HTTP, SSH, Stratum; {wall:.1f} s)")
        print(f"  flows with events                {flows:>9,}")
        print(f"  events written                   {len(evs):>9,}")
        print(f"  events per flow                  {len(evs) / max(flows, 1):>9.2f}")
        print(f"  bytes per event (mean)           {size / max(len(evs), 1):>9.0f}")
        for kind, sizes in sorted(kinds.items()):
            print(f"    {kind + ' events':<30} {len(sizes):>9,}  mean {sum(sizes) / len(sizes):.0f} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=70000, help="unique UDP flows for the memory run (max 640000)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the mixed workload")
    args = ap.parse_args()
    if WHY is not None:
        print(f"footprint: cannot run here: {WHY}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="egressd-footprint-"))
    try:
        memory_and_cpu(args.flows, tmp)
        events(args.rounds, tmp)
    except (subprocess.SubprocessError, RuntimeError) as e:
        print(f"footprint: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
