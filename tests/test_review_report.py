"""``egressd report``: the review page, rendered by a real headless chromium (Debian's).

The assertions read the *rendered* DOM (``--dump-dom``) as text, the way a reviewer reads the
page, and the test takes a screenshot of it; the counts it checks are computed independently
from the same events.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from egressd.cli import main
from egressd.recorded import from_events

ROOT = Path(__file__).parent.parent
PCAPS = sorted(str(p) for p in (ROOT / "pcaps").glob("*.pcap"))
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make deps installs it)")

HOSTILE = "<script>alert(1)</script>.example.org"


def chromium(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Headless chromium as root with a throw-away profile, no background network activity."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="egressd-chromium-") as profile:
        argv = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class _Text(HTMLParser):
    """The page's visible text, one cell/line per entry, and the tags present."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.tags: Counter[str] = Counter()
        self._skip = 0
        self.ids: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        if tag in ("style", "title"):
            self._skip += 1
        self._id = dict(attrs).get("id")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.chunks.append(data.strip())
            if self._id:
                self.ids[self._id] = data.strip()
                self._id = None


def rendered(page: Path) -> _Text:
    p = chromium("--dump-dom", page.as_uri())
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<h1>" in p.stdout, p.stdout[:500]
    t = _Text()
    t.feed(p.stdout)
    return t


def event(i: int, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "timestamp": f"2026-12-05T06:{i // 60:02d}:{i % 60:02d}.000000+0000",
        "event_type": "flow",
        "flow_id": 1000 + i,
        "src_ip": "198.51.100.2",
        "src_port": 50000 + i,
        "dest_ip": "203.0.113.40",
        "dest_port": 443,
        "proto": "TCP",
        "verdict": "accept",
        "action": "allowed",
        "rule": "default",
        "rule_description": "",
        "reason": "classified",
        "mode": "monitor",
        "domain": "api.example.org",
    }
    e.update(kw)
    return e


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The replayed pcaps' events, plus monitor-mode events with process/container fields."""
    d = tmp_path_factory.mktemp("report")
    log = d / "events.jsonl"
    lines: list[str] = []
    for cap in PCAPS:
        out = d / "one.jsonl"
        with open(out, "w") as fh:
            p = subprocess.run(
                [str(Path(sys.executable).parent / "egressd"), "test", cap, "--json"],
                stdout=fh,
                text=True,
                check=False,
            )
        assert p.returncode == 0
        lines += out.read_text().splitlines()
    proc = {"pid": 7, "ppid": 1, "name": "python3", "executable": "/usr/bin/python3", "uid": 1000, "user": "ml"}
    cont = {"id": "f00dfeedcafe0123456789", "runtime": "containerd", "pod_uid": "p", "name": "trainer"}
    extra = [event(i, process=proc, container=cont) for i in range(6)]
    extra += [event(10 + i, verdict="drop", rule="default", would_drop=True, dest_ip="203.0.113.99",
                    domain="new.example.org", process=proc) for i in range(3)]  # fmt: skip
    extra.append(event(20, domain=HOSTILE, dest_ip="203.0.113.98"))
    lines += [json.dumps(e) for e in extra]
    log.write_text("\n".join(lines) + "\n")
    return log


@pytest.fixture(scope="module")
def page(events: Path) -> Path:
    out = events.parent / "report.html"
    assert main(["report", str(events), "-o", str(out)]) == 0
    return out


def test_page_is_self_contained(page: Path) -> None:
    src = page.read_text()
    low = src.lower()
    for needle in ("<script", "src=", "href=", "url(", "@import", "<link", "<iframe", "<img"):
        assert needle not in low, needle
    assert "default-src 'none'" in src  # and the browser is told to fetch nothing, should anything slip in
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.example.org" in src


@needs_chromium
def test_rendered_counts_match_the_events(page: Path, events: Path) -> None:
    text = rendered(page)
    flows = from_events(events)
    fates = Counter(f.verdict for f in flows)
    would = sum(1 for f in flows if f.verdict == "drop" and f.action == "allowed")
    assert text.ids["count-flows"] == str(len(flows))
    assert text.ids["count-accepted"] == str(fates["accept"])
    assert text.ids["count-dropped"] == str(fates["drop"] - would)
    assert text.ids["count-would"] == str(would) == "3"
    assert text.tags["script"] == 0 and text.tags["svg"] == 1 and text.tags["rect"] >= 3
    chunks = text.chunks
    # drops by rule: the row for drop-mining says how many flows it dropped
    mining = sum(1 for f in flows if f.rule == "drop-mining")
    i = chunks.index("drop-mining")
    assert chunks[i + 1 : i + 3] == ["drop", str(mining)]
    # top destinations: the busiest is the lab's pool address
    dest = Counter(f.domains[0] if f.domains else f.dest_ip for f in flows)
    first = chunks.index("ports") + 1
    name, count = dest.most_common(1)[0]
    assert chunks[first : first + 2] == [name, str(count)]
    # who: the process and container from the events
    j = chunks.index("trainer")
    assert chunks[j - 1] == "python3" and chunks[j + 1] == "6"
    # the hostile name is shown as text, never run
    assert HOSTILE in chunks
    # learn: counts of items and of flows that would still be dropped
    assert int(text.ids["learn-would-drop"]) >= 15
    assert "new.example.org" in chunks and "api.example.org" in chunks


@needs_chromium
def test_screenshot_of_the_rendered_page(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    p = chromium("--window-size=1100,2400", f"--screenshot={shot}", page.as_uri())
    assert p.returncode == 0, p.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1100, 2400)
    assert len(data) > 50_000  # a blank page compresses to a few kB; this one has a plot and tables
    keep = os.environ.get("EGRESSD_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
