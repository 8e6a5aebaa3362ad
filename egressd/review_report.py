"""``egressd report EVENTS.jsonl... -o report.html``: one page a security reviewer reads.

Not to be confused with :mod:`egressd.report` (the table ``egressd test`` prints). This is
the review step of moving a node to deny-by-default: what did the node do over the recorded
period, where did it go, what was dropped or alerted and by which rule, who (process,
container) did it when the events say so, and what ``egressd learn`` would propose.

Why one self-contained HTML file: it is attached to a ticket or a pull request and opened
on a reviewer's laptop, often offline, sometimes from a mail client that blocks remote
content. So: inline CSS, the plot as inline SVG, no script at all and no URL to fetch —
nothing on the page can reach the network. Every value from the events is escaped (event
logs are written from traffic, and a hostile SNI must not become markup).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from egressd.learn import Proposal
from egressd.recorded import Flow

TOP: Final = 20
MAX_ROWS: Final = 500  # rows of the "would still be dropped" table; a week of a busy node can have many
BUCKETS: Final = 48
COLOURS: Final = {"accepted": "#2e7d32", "alerted": "#f9a825", "dropped": "#c62828"}


@dataclass(frozen=True, slots=True)
class Decision:
    """One event, reduced to what the plot needs."""

    ts: float
    fate: str  # accepted | alerted | dropped (dropped includes monitor-mode would-drops)


def fate(verdict: str) -> str:
    return {"accept": "accepted", "alert": "alerted"}.get(verdict, "dropped")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _t(ts: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime(fmt)


def _table(head: Iterable[str], rows: Iterable[Iterable[object]], cls: str) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def plot(decisions: list[Decision], width: int = 960, height: int = 260) -> str:
    """Stacked bars of decisions per time bucket, as inline SVG (no script, no fonts fetched)."""
    if not decisions:
        return '<p class="empty">No decisions recorded.</p>'
    t0 = min(d.ts for d in decisions)
    t1 = max(d.ts for d in decisions)
    span = max(t1 - t0, 1.0)
    n = BUCKETS if span > BUCKETS else max(1, math.ceil(span))
    step = span / n
    counts: list[Counter[str]] = [Counter() for _ in range(n)]
    for d in decisions:
        counts[min(n - 1, int((d.ts - t0) / step))][d.fate] += 1
    peak = max(sum(c.values()) for c in counts) or 1
    left, bottom, top = 48, 34, 12
    inner_w, inner_h = width - left - 10, height - bottom - top
    bw = inner_w / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="decisions over time" class="plot">',
        f'<line x1="{left}" y1="{top + inner_h}" x2="{width - 10}" y2="{top + inner_h}" stroke="#555"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_h}" stroke="#555"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" class="axis">{peak}</text>',
        f'<text x="{left - 6}" y="{top + inner_h}" text-anchor="end" class="axis">0</text>',
    ]
    for i, c in enumerate(counts):
        y = float(top + inner_h)
        for key in ("accepted", "alerted", "dropped"):
            v = c.get(key, 0)
            if not v:
                continue
            h = inner_h * v / peak
            y -= h
            parts.append(
                f'<rect x="{left + i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[key]}"><title>{_e(_t(t0 + i * step))}: {v} {key}</title></rect>'
            )
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + inner_w * frac
        parts.append(
            f'<text x="{x:.0f}" y="{height - 12}" text-anchor="{anchor}" class="axis">{_e(_t(t0 + span * frac))}</text>'
        )
    parts.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{COLOURS[k]}"></span>{k}' for k in COLOURS)
    return "".join(parts) + f'<p class="legend">{legend} &#8212; bucket {step:.0f} s, UTC</p>'


def build(
    decisions: list[Decision], flows: list[Flow], inputs: list[str], proposal: Proposal | None, title: str
) -> str:
    fates = Counter(fate(f.verdict) for f in flows)
    would = sum(1 for f in flows if f.verdict == "drop" and f.action == "allowed")
    t0 = min((d.ts for d in decisions), default=0.0)
    t1 = max((d.ts for d in decisions), default=0.0)
    summary = [
        ("flows", len(flows)),
        ("decisions (events)", len(decisions)),
        ("accepted", fates.get("accepted", 0)),
        ("alerted", fates.get("alerted", 0)),
        ("dropped", fates.get("dropped", 0) - would),
        ("would drop (monitor mode)", would),
    ]
    sum_rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="n" id="count-{_e(k.split()[0])}">{v}</td></tr>' for k, v in summary
    )

    # Top destinations, by the name the engine tied to the flow (the address when it had none).
    dest: dict[str, Counter[str]] = defaultdict(Counter)
    ports: dict[str, set[str]] = defaultdict(set)
    for f in flows:
        key = f.domains[0] if f.domains else f.dest_ip
        dest[key][fate(f.verdict)] += 1
        ports[key].add(f"{f.proto.lower()}/{f.dest_port}")
    top = sorted(dest.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:TOP]
    dest_rows = [
        (k, sum(c.values()), c.get("accepted", 0), c.get("alerted", 0), c.get("dropped", 0), " ".join(sorted(ports[k])))
        for k, c in top
    ]

    # Drops and alerts by rule.
    by_rule: dict[tuple[str, str], list[Flow]] = defaultdict(list)
    for f in flows:
        if f.verdict != "accept":
            by_rule[(f.rule, f.verdict)].append(f)
    rule_rows = []
    for (rule, verdict), fl in sorted(by_rule.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        kinds = Counter(k for f in fl for k in f.detections)
        ex = next((f.evidence for f in fl if f.evidence), "")
        rule_rows.append(
            (rule, verdict, len(fl), ", ".join(f"{k} ({n})" for k, n in kinds.most_common(3)) or "-", ex[:90])
        )

    # Who: process and container, when the events carry them.
    who: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for f in flows:
        p = f.process or {}
        c = f.container or {}
        pname = str(p.get("name") or p.get("executable") or "")
        cname = str(c.get("name") or str(c.get("id") or "")[:12])
        if pname or cname:
            who[(pname or "-", cname or "-")][fate(f.verdict)] += 1
    who_html = (
        _table(
            ("process", "container", "flows", "accepted", "dropped"),
            [
                (p, c, sum(n.values()), n.get("accepted", 0), n.get("dropped", 0))
                for (p, c), n in sorted(who.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:TOP]
            ],
            "who",
        )
        if who
        else '<p class="empty" id="who-none">The events carry no process or container fields.</p>'
    )

    learn_html = '<p class="empty">Not computed.</p>'
    if proposal is not None:
        items = []
        for s in proposal.services:
            label = f"{s.proto}/{s.port}" if s.port is not None else s.proto
            items += [(label, w, "wildcard", ws.note()) for w, ws in sorted(s.wildcards.items())]
            items += [(label, n, "name", ns.note()) for n, ns in sorted(s.names.items())]
            items += [(label, a, "address", sa.note()) for a, sa in sorted(s.addresses.items())]
        drops = [(f.label(), ", ".join(f.domains) or "-", why) for f, why in proposal.would_drop]
        shown = drops[:MAX_ROWS]
        more = f'<p class="empty">{len(drops) - MAX_ROWS} more not shown.</p>' if len(drops) > MAX_ROWS else ""
        learn_html = (
            f'<p><span id="learn-items">{len(items)}</span> items learned from {len(proposal.learned)} flows; '
            f'<span id="learn-would-drop">{len(drops)}</span> flows would still be dropped.</p>'
            + _table(("service", "item", "by", "evidence"), items, "learn")
            + "<h3>Would still be dropped</h3>"
            + (_table(("flow", "names", "why"), shown, "would-drop") + more if drops else '<p class="empty">None.</p>')
            + f"<details><summary>The proposed policy (YAML)</summary><pre>{_e(proposal.text)}</pre></details>"
        )

    period = f"{_t(t0)} .. {_t(t1)} UTC" if decisions else "no events"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{_e(title)}</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}}
h1{{font-size:22px}} h2{{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse;margin:8px 0;width:100%}} th,td{{border:1px solid #ddd;padding:3px 6px;text-align:left}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}} table.summary{{width:auto}}
.axis{{font-size:11px;fill:#444}} .legend .key{{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}}
.empty{{color:#777}} pre{{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}}
</style></head><body>
<h1>{_e(title)}</h1>
<p>Inputs: {_e(", ".join(inputs))}<br>Period: {_e(period)}</p>
<h2>Summary</h2><table class="summary">{sum_rows}</table>
<h2>Decisions over time</h2>{plot(decisions)}
<h2>Top destinations</h2>
{_table(("destination", "flows", "accepted", "alerted", "dropped", "ports"), dest_rows, "destinations")}
<h2>Drops and alerts by rule</h2>
{
        _table(("rule", "verdict", "flows", "detections", "example evidence"), rule_rows, "rules")
        if rule_rows
        else '<p class="empty">None.</p>'
    }
<h2>Who</h2>{who_html}
<h2>What <code>egressd learn</code> would propose</h2>{learn_html}
</body></html>
"""
