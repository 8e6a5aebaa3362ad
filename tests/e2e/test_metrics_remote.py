"""--metrics-allow-remote: the explicit opt-in that lets a cluster's Prometheus scrape the node
address (issue 12). Without it a non-loopback --metrics is refused
(tests/e2e/test_adversarial_privilege.py); with it, exactly the address given is bound and
a scraper in another namespace reads the counters."""

from __future__ import annotations

from pathlib import Path

from egressd_lab import peers
from egressd_lab.harness import NODE_V4, PREFIX, PY, adv_lab, live, write_policy

pytestmark = live

PORT = 9714


def test_metrics_bind_the_node_address_only_with_the_opt_in(tmp_path: Path) -> None:
    with adv_lab(PREFIX + "r") as lb:
        pol = write_policy(tmp_path)
        extra = ["--metrics", f"{NODE_V4}:{PORT}", "--metrics-allow-remote"]
        d = peers.start_egressd(lb, tmp_path, pol, extra=extra)
        try:
            listeners = lb.run_node(["ss", "-Hltn", f"sport = :{PORT}"]).stdout
            assert sorted(ln.split()[3] for ln in listeners.splitlines() if ln.strip()) == [f"{NODE_V4}:{PORT}"]
            # the scraper lives in the other namespace, as Prometheus lives off the node
            url = f"http://{NODE_V4}:{PORT}/metrics"
            fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=3).read().decode())"
            p = lb.run_inet([PY, "-c", fetch], timeout=15)
            assert p.returncode == 0, p.stderr
            assert "egressd_packets_total" in p.stdout
            assert "egressd_flows_dropped_total" in p.stdout
        finally:
            assert d.stop() == 0, d.stderr_text()
