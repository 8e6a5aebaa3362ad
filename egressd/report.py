"""How ``egressd test`` shows its results: a rich table for people, JSON lines for machines.

Kept apart from replay so the engine's events are the single source: the table and the
JSON are two renderings of the same records, never two computations.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from egressd.events import Event

if TYPE_CHECKING:
    from egressd.policy import Policy
    from egressd.replay import ProgressFn, ReplayResult

_PROGRESS_MIN_BYTES = 8 << 20  # smaller files replay in well under a second


def _flagged(e: Event) -> bool:
    return e.verdict != "accept" or any(k not in ("tls", "dns") for k in e.detections)


class Output:
    def __init__(self, *, json_lines: bool, only_flagged: bool, progress: bool) -> None:
        self.json = json_lines
        self.only_flagged = only_flagged
        # A pipe or a CI log has no width of its own: do not squeeze the table into 80 columns.
        self.out = Console(highlight=False, soft_wrap=False)
        if not self.out.is_terminal:
            self.out = Console(highlight=False, soft_wrap=False, width=200)
        self.err = Console(stderr=True, highlight=False)
        self.progress = progress and self.err.is_terminal

    @contextlib.contextmanager
    def progress_for(self, path: str) -> Iterator[ProgressFn | None]:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        if not self.progress or size < _PROGRESS_MIN_BYTES:
            yield None
            return
        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=self.err, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task(os.path.basename(path), total=size)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    def error(self, msg: str) -> None:
        self.err.print(Text(msg, style="bold red"))

    def show(self, res: ReplayResult, policy: Policy) -> None:
        finals = res.final_events()
        shown = [e for e in finals if _flagged(e)] if self.only_flagged else finals
        if self.json:
            w = sys.stdout.write
            for e in res.events if not self.only_flagged else [e for e in res.events if _flagged(e)]:
                w(e.to_json() + "\n")
            sys.stdout.flush()
            return
        table = Table(title=f"{res.path}  (policy {policy.path}, mode {policy.mode})", title_justify="left")
        for col in ("time", "flow", "domain", "detection", "rule", "verdict"):
            table.add_column(col, overflow="fold")
        for e in shown:
            t = _dt.datetime.fromtimestamp(e.timestamp, _dt.UTC).strftime("%H:%M:%S.%f")[:-3]
            flow = f"{e.proto} {_ep(e.src_ip, e.src_port)} → {_ep(e.dest_ip, e.dest_port)}"
            if e.midstream:
                flow += " (mid-stream)"
            det = ""
            if e.detection is not None:
                ev = e.detection["evidence"]
                det = f"{e.detection['kind']}: {ev if len(ev) <= 72 else ev[:69] + '...'}"
                others = [k for k in e.detections if k != e.detection["kind"]]
                if others:
                    det += f" (+{', '.join(others)})"
            style = "bold red" if e.action == "blocked" else ("yellow" if e.verdict != "accept" else "green")
            verdict = e.verdict if e.action != "allowed" or e.verdict != "drop" else "drop (monitor: allowed)"
            table.add_row(t, flow, e.domain or "", det, e.rule, Text(verdict, style=style))
        self.out.print(table)
        by = Counter(e.verdict for e in finals)
        flagged = sum(1 for e in finals if _flagged(e))
        parts = [f"{len(finals)} flows", f"{res.packets} packets"]
        parts += [f"{n} {v}" for v, n in sorted(by.items())]
        parts.append(f"{flagged} flagged")
        if res.counters.get("malformed"):
            parts.append(f"{res.counters['malformed']} malformed packets")
        if res.counters.get("midstream"):
            parts.append(f"{res.counters['midstream']} picked up mid-stream")
        if self.only_flagged:
            parts.append(f"{len(finals) - len(shown)} unflagged not shown")
        self.out.print("summary: " + ", ".join(parts))
        self._unevaluated(finals)

    def _unevaluated(self, finals: list[Event]) -> None:
        """Rules on process facts a capture cannot decide (issue 8): named, never silently false."""
        hits: Counter[str] = Counter()
        for e in finals:
            for name in (e.extra or {}).get("unevaluated_rules", ()):
                hits[name] += 1
        for name, n in sorted(hits.items()):
            self.out.print(
                Text(
                    f"not evaluated: rule {name!r} matches on the process, container or GPU behind a flow, "
                    f"which a capture does not carry; its flow conditions held for {n} flow(s)",
                    style="yellow",
                )
            )

    def expectations(self, capture: str, expect_path: str, problems: list[str]) -> None:
        con = self.err if self.json else self.out
        if not problems:
            con.print(Text(f"{capture}: all expectations in {expect_path} met", style="green"))
            return
        con.print(Text(f"{capture}: {len(problems)} expectation(s) in {expect_path} not met:", style="bold red"))
        for p in problems:
            con.print(f"  - {p}")


def _ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
