"""egressd vs nDPI 4.2 on pcaps/tunnels/: one table row per flow an expectation file names.

For each capture: ``egressd test --json`` (the shipped default policy) and ``ndpiReader -i
FILE -v 2`` (Debian 12's libndpi-bin, nDPI 4.2) are run on the same file, their flows are
joined by address/port pair, and the rows are printed as the Markdown table the README
carries. nDPI's column is its protocol (and the risks it raises that are about tunnels,
DGA names or DNS); "-" means nDPI saw no flow there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DIR = HERE / "tunnels"
_FLOW = re.compile(r"^\s+\d+\s+(\w+)\s+(\S+?):(\d+)\s+<?->\s+(\S+?):(\d+)\s+\[proto: ([^\]]+)\]")
_RISK = re.compile(r"\[Risk: ([^\]]+)\]")


def ndpi_flows(pcap: Path) -> dict[tuple[str, frozenset[tuple[str, int]]], str]:
    out = subprocess.run(["ndpiReader", "-i", str(pcap), "-v", "2"], capture_output=True, text=True, timeout=60)
    flows: dict[tuple[str, frozenset[tuple[str, int]]], str] = {}
    for line in out.stdout.splitlines():
        m = _FLOW.match(line)
        if not m:
            continue
        proto, a, ap, b, bp, app = m.groups()
        risks = _RISK.search(line)
        keep = []
        if risks:
            keep = [r.strip() for r in risks.group(1).split("**") if r.strip()]
            keep = [r for r in keep if any(w in r for w in ("DGA", "DNS", "Tunnel", "VPN", "Obfuscated", "Entropy"))]
        app = app.split("/", 1)[1] if "/" in app else app
        flows[(proto, frozenset({(a.strip("[]"), int(ap)), (b.strip("[]"), int(bp))}))] = app + (
            f" ({'; '.join(keep)})" if keep else ""
        )
    return flows


def main() -> int:
    print("| capture (real program) | flow | egressd (default policy) | nDPI 4.2 |")
    print("| --- | --- | --- | --- |")
    for pcap in sorted(DIR.glob("*.pcap")):
        spec = yaml.safe_load(pcap.with_suffix(".expect.yaml").read_text())
        ev = subprocess.run([sys.executable, "-m", "egressd.cli", "test", str(pcap), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=str(HERE.parent))  # fmt: skip
        last: dict[int, dict[str, object]] = {}
        for x in ev.stdout.splitlines():  # a flow's last event carries its final verdict
            e = json.loads(x)
            last[e["flow_id"]] = e
        events = list(last.values())
        nd = ndpi_flows(pcap)
        shown: set[object] = set()
        for item in spec["flows"]:
            m = item["match"]
            hits = [e for e in events if str(m.get("dst", e["dest_ip"])) == e["dest_ip"]
                    and m.get("dst_port", e["dest_port"]) == e["dest_port"] and e["flow_id"] not in shown]  # fmt: skip
            shown.update(e["flow_id"] for e in hits)
            for e in hits[:3]:
                kind = ", ".join(e.get("detections") or ["none"])
                key = (e["proto"].replace("IPv6-ICMP", "ICMPV6"),
                       frozenset({(e["src_ip"], e["src_port"]), (e["dest_ip"], e["dest_port"])}))  # fmt: skip
                n = nd.get(key, "-")
                if n == "-" and e["proto"] in ("ICMP", "IPv6-ICMP"):
                    n = next((v for k, v in nd.items() if k[0].startswith("ICMP") and (e["dest_ip"], 0) in k[1]), "-")
                flow = f"{e['proto']} :{e['dest_port']}" if e["dest_port"] else e["proto"]
                print(f"| {pcap.stem} | {flow} | {e['verdict']}, {kind} | {n} |")
            if len(hits) > 3:
                print(f"| {pcap.stem} | ... {len(hits) - 3} more like these | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
