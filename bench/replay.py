#!/usr/bin/env python3
"""Replay throughput: `egressd test` vs ndpiReader on the same capture files, in one run.

Prints packets/s for each tool and their ratio, measured side by side (interleaved rounds,
best of N per tool) because these machines are shared and noisy: only the ratio is
meaningful, never an absolute figure remembered from another run.

What is timed for egressd is exactly the `egressd test` path minus rendering: the pcap
reader, the engine and the policy on every packet (replay.replay). ndpiReader is timed as a
whole process (`ndpiReader -i FILE -q`). So that neither tool's start-up dominates, both
read ONE large capture made from the corpus: every corpus packet, as raw IP, repeated
--copies times with the addresses of each copy shifted (so each copy's flows are new flows
to both tools, not repeats of known ones) and timestamps continuing. Start-up is also
measured on a one-packet capture and reported.

Usage: bench/replay.py [--corpus DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from egressd.paths import default_policy
from egressd.pcapio import Reader
from egressd.policy import load_policy
from egressd.replay import replay
from egressd_lab.corpus import corpus_dir


def time_egressd(files: list[Path]) -> float:
    pol = load_policy(default_policy())
    t0 = time.perf_counter()
    for f in files:
        res = replay(f, pol)
        if res.error is not None:
            raise SystemExit(f"egressd could not read {f}: {res.error}")
    return time.perf_counter() - t0


def time_ndpi(ndpi: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        subprocess.run([ndpi, "-i", str(f), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def ndpi_startup(ndpi: str, rounds: int) -> float:
    """ndpiReader's fixed cost per file (process start, protocol tables), from a 1-packet capture."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "one.pcap"
        wrpcap(str(p), [IP(src="198.51.100.1", dst="203.0.113.1") / UDP(sport=1, dport=2)])
        best = min(time_ndpi(ndpi, [p]) for _ in range(rounds))
    return best


def build_merged(files: list[Path], copies: int, out: Path) -> int:
    """One raw-IP pcap (LINKTYPE_RAW) of every corpus packet, ``copies`` times, flows made distinct."""
    import struct

    pkts: list[tuple[float, bytes]] = []
    for f in files:
        pkts.extend((ts, bytes(data)) for ts, data in Reader(f))
    n = 0
    with open(out, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        t = 1_600_000_000.0
        for k in range(copies):
            for i, (_ts, data) in enumerate(pkts):
                b = bytearray(data)
                if b and b[0] >> 4 == 4 and len(b) >= 20:
                    b[15] ^= k  # last byte of the source address
                    b[19] ^= k  # and of the destination
                elif b and b[0] >> 4 == 6 and len(b) >= 40:
                    b[23] ^= k
                    b[39] ^= k
                ts = t + i * 1e-4
                sec = int(ts)
                fh.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(b), len(b)))
                fh.write(b)
                n += 1
            t += len(pkts) * 1e-4 + 3600.0
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None, help="capture folder (default ../shared/corpus)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per tool (best is kept)")
    ap.add_argument("--copies", type=int, default=20, help="copies of the corpus in the merged capture")
    args = ap.parse_args()
    root = args.corpus or corpus_dir()
    if root is None:
        print("no corpus found (../shared/corpus or EGRESSD_CORPUS); nothing to measure", file=sys.stderr)
        return 2
    files = sorted(p for p in root.rglob("*") if p.suffix in (".pcap", ".pcapng"))
    ndpi = shutil.which("ndpiReader")
    with tempfile.TemporaryDirectory() as d:
        merged = Path(d) / "corpus-merged.pcap"
        packets = build_merged(files, args.copies, merged)
        mb = merged.stat().st_size / 1e6
        print(
            f"capture: {len(files)} corpus files x {args.copies} copies = {packets} packets, {mb:.1f} MB "
            f"(raw IP); rounds: {args.rounds}, best kept"
        )
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            ours.append(time_egressd([merged]))
            if ndpi:
                theirs.append(time_ndpi(ndpi, [merged]))
        e = min(ours)
        print(f"egressd test : {e:7.3f} s  {packets / e:10.0f} packets/s")
        if not ndpi:
            print("ndpiReader not installed (apt-get install libndpi-bin): no ratio")
            return 0
        n = min(theirs)
        start = ndpi_startup(ndpi, args.rounds)
        print(
            f"ndpiReader   : {n:7.3f} s  {packets / n:10.0f} packets/s (includes its start-up of {start * 1000:.0f} ms)"
        )
        print(f"ratio egressd/ndpiReader (packets/s): {n / e:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
