"""Scoring egressd against ../shared/corpus (real captures from other projects, labelled).

Used by tests/test_corpus.py (which asserts) and bench/replay.py (which measures). The
labels are fixed: when egressd disagrees, the detector is what gets fixed.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from egressd.detect.base import kind_matches
from egressd.events import Event
from egressd.paths import default_policy
from egressd.policy import load_policy
from egressd.replay import replay


def _norm(proto: str, a: str, ap: int, b: str, bp: int) -> tuple[str, frozenset[tuple[str, int]]]:
    p = proto.upper().replace("IPV6-ICMP", "ICMPV6")
    return (p, frozenset({(str(ipaddress.ip_address(a)), int(ap)), (str(ipaddress.ip_address(b)), int(bp))}))


def expectation(label: str) -> str | None:
    """'mining' / 'ssh' (must be detected), 'clean' (must not be), or None (not scored)."""
    if "(inner flow)" in label:
        return None
    if label.startswith("mining:"):
        return None if label.startswith("mining:pool-connect-attempt") else "mining"
    if label == "ssh" or label.startswith("ssh:"):
        return "ssh"
    if label.startswith(("benign", "crypto-p2p", "crypto-node-rpc", "scan:")):
        return "clean"
    if label.startswith("tunnel:"):
        return "tunnel"  # measured and shown, not asserted: only VPN handshakes are detected
    return None


def group_of(label: str) -> str:
    return label.split(":", 1)[0].split("(", 1)[0]


@dataclass
class Outcome:
    capture: str
    label: str
    want: str
    got: list[str]
    ok: bool
    ndpi: str
    flow: str
    # What a user sees for this flow: every event that alerted or dropped it, "rule:verdict".
    # On a clean flow any of them is a false positive, policy alerts included (a port-only
    # rule is as much a claim to the person reading the alert as a detection is).
    alerts: list[str] = field(default_factory=list)


@dataclass
class Score:
    outcomes: list[Outcome] = field(default_factory=list)
    packets: int = 0
    unmatched: list[str] = field(default_factory=list)

    def misses(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.want in ("mining", "ssh") and not o.ok]

    def tunnel_false_positives(self) -> list[Outcome]:
        """Clean flows that a tunnel detector flagged (asserted: the VPN detectors must be exact)."""
        return [o for o in self.outcomes if o.want == "clean" and any(k.startswith("tunnel") for k in o.got)]

    def false_positives(self) -> list[Outcome]:
        """Clean flows a detector flagged as mining or SSH."""
        return [o for o in self.outcomes if o.want == "clean" and not o.ok]

    def user_false_positives(self) -> list[Outcome]:
        """Clean flows with any alert or drop, as a user sees them (policy alerts included)."""
        return [o for o in self.outcomes if o.want == "clean" and o.alerts]

    def table(self) -> str:
        per: dict[str, Counter[str]] = defaultdict(Counter)
        for o in self.outcomes:
            g = group_of(o.label)
            c = per[g]
            c["flows"] += 1
            if o.want in ("mining", "ssh", "tunnel"):
                c["hit" if o.ok else "miss"] += 1
                c["ndpi_hit" if o.ndpi == "hit" else "ndpi_miss"] += 1
            else:
                c["ok" if o.ok and not o.alerts else "fp"] += 1
                c["ndpi_fp" if o.ndpi in ("false-positive", "flagged-crypto-p2p") else "ndpi_ok"] += 1
        # FP: clean flows with any alert or drop (egressd: detections and policy alerts alike).
        lines = ["group        flows  egressd recall / FP     ndpiReader 4.2 recall / FP"]
        for g, c in sorted(per.items()):
            if c["hit"] + c["miss"]:
                ours = f"recall {c['hit']}/{c['hit'] + c['miss']}"
                theirs = f"recall {c['ndpi_hit']}/{c['ndpi_hit'] + c['ndpi_miss']}"
            else:
                ours = f"FP {c['fp']}/{c['ok'] + c['fp']}"
                theirs = f"FP {c['ndpi_fp']}/{c['ndpi_ok'] + c['ndpi_fp']}"
            lines.append(f"{g:<12} {c['flows']:>5}  {ours:<22}  {theirs}")
        return "\n".join(lines)


def _detected(want: str, kinds: list[str]) -> bool:
    return any(kind_matches(want, k) for k in kinds)


def evaluate(root: Path) -> Score:
    labels = json.loads((root / "LABELS.json").read_text())
    policy = load_policy(default_policy())
    score = Score()
    for cap in labels:
        res = replay(root / cap["file"], policy)
        if res.error is not None:
            raise AssertionError(f"{cap['file']}: {res.error}")
        score.packets += res.packets
        by_key: dict[tuple[str, frozenset[tuple[str, int]]], list[Event]] = defaultdict(list)
        for e in res.final_events():
            by_key[_norm(e.proto, e.src_ip, e.src_port, e.dest_ip, e.dest_port)].append(e)
        for f in cap["flows"]:
            want = expectation(f["label"])
            if want is None:
                continue
            key = _norm(f["proto"], f["src"], f["sport"], f["dst"], f["dport"])
            evs = by_key.get(key, [])
            desc = f"{f['proto']} {f['src']}:{f['sport']} -> {f['dst']}:{f['dport']}"
            if not evs and want in ("mining", "ssh"):
                score.unmatched.append(f"{cap['file']}: {desc} ({f['label']})")
            kinds = sorted({k for e in evs for k in e.detections})
            if want == "clean":
                ok = not (_detected("mining", kinds) or _detected("ssh", kinds))
            else:
                ok = _detected(want, kinds)
            alerts = sorted({f"{e.rule}:{e.verdict}" for e in evs if e.verdict != "accept" or e.event_type == "alert"})
            out = Outcome(cap["file"], f["label"], want, kinds, ok, f.get("ndpi42_outcome", ""), desc, alerts)
            score.outcomes.append(out)
    return score
