"""Who was behind an event, as one line for people (``egressd status``, the demo)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape


def who_line(e: dict[str, Any]) -> str:
    """Who was behind the flow (issue 8), as a second line: process, user, container, GPU."""
    p = e.get("process")
    if not isinstance(p, dict):
        return ""
    if "pid" in p:
        who = f"pid {p['pid']} {p.get('name', '?')} (user {p.get('user', p.get('uid', '?'))})"
    else:
        who = f"process unknown: {p.get('unknown', '?')}"
    c = e.get("container")
    if isinstance(c, dict):
        who += f", {c.get('runtime')} container {str(c.get('id', ''))[:12]}"
        if c.get("pod_uid"):
            who += f" of pod {c['pod_uid']}"
    elif p.get("unit"):
        who += f", unit {p['unit']}"
    g = e.get("gpu")
    if isinstance(g, dict):
        who += f", holds GPU {' '.join(g.get('devices', []))}"
    return f"\n    [dim]who:[/dim] {escape(who)}"
