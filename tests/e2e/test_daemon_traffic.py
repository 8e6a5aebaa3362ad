"""The live daemon leaves ordinary egress alone: DNS, HTTPS, a bulk download, and IPv6.

The other half of the job: what the default policy does not forbid must work exactly as
without egressd (same bytes, no stall), and after its head a flow must be the kernel's
alone (pinned), so Python sees a few dozen packets of a 20 MB download, not thousands.
"""

from __future__ import annotations

import json

from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event, wait_pool_open

from egressd_lab import peers
from egressd_lab.netns import SERVICES
from egressd_lab.peers import PY

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

TLS4, TLS6 = SERVICES["tls"]
BULK4 = SERVICES["bulk"][0]
DNS = SERVICES["dns"][0]

# HTTP/1.0 GET over a plain socket; prints the body's size and sha256 and, from TCP_INFO,
# how many TCP segments the socket received (tcpi_segs_in counts MSS segments, not the
# GRO-merged buffers the node's counters see). Bounded by a 20 s socket timeout.
BULK_GET = r"""
import hashlib, json, socket, struct, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = time.monotonic()
c = socket.create_connection((host, port), timeout=20)
c.sendall(f"GET {path} HTTP/1.0\r\nHost: bulk.example.net\r\n\r\n".encode())
buf, head, h, size = b"", None, hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if head is None:
        buf += b
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            continue
        head, b = buf[:end].decode("latin-1"), buf[end + 4:]
    h.update(b)
    size += len(b)
segs_in = struct.unpack_from("<I", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 140)[0]
print(json.dumps({"status": (head or "").split("\r\n")[0], "size": size, "sha256": h.hexdigest(),
                  "segs_in": segs_in, "seconds": time.monotonic() - t}))
"""


def test_dns_lookup_of_an_ordinary_name_is_answered(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    p, _ = dlab.dig("tls.example.net")
    assert p.returncode == 0 and f"tls.example.net.\t0\tIN\tA\t{TLS4}" in p.stdout.replace(" ", "\t"), p.stdout
    ev = one_event(daemon, DNS, 53)
    assert (ev["action"], ev["rule"], ev["detection"]["kind"]) == ("allowed", "default", "dns")
    assert ev["domain"] == "tls.example.net"


def test_https_to_an_ordinary_name_works(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    p, _ = dlab.curl_tls("tls.example.net", TLS4)
    assert (p.returncode, p.stdout) == (0, "200"), p.stderr
    ev = one_event(daemon, TLS4, 443)
    assert (ev["action"], ev["detection"]["kind"], ev["domain"]) == ("allowed", "tls", "tls.example.net")
    assert ev["detection"]["info"]["sni"] == "tls.example.net"


def test_bulk_download_arrives_intact_and_python_sees_only_its_head(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    bulk = dlab.peers.bulk
    before = daemon.status()["engine"]["packets"]
    p, _ = dlab.run([PY, "-c", BULK_GET, BULK4, str(peers.BULK_PORT), "/" + bulk.path.name], timeout=40)
    got = json.loads(p.stdout)
    judged = daemon.status()["engine"]["packets"] - before
    assert got["status"].endswith("200 OK") and got["size"] == bulk.size, got
    assert got["sha256"] == bulk.sha256
    assert got["segs_in"] >= bulk.size // 65536  # sanity: the counter counted
    assert judged * 50 < got["segs_in"], f"Python judged {judged} packets of a {got['segs_in']}-segment transfer"
    ev = one_event(daemon, BULK4, peers.BULK_PORT)
    assert (ev["action"], ev["rule"]) == ("allowed", "default")


def test_ipv6_https_works(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    p, _ = dlab.curl_tls("tls.example.net", TLS6)
    assert (p.returncode, p.stdout) == (0, "200"), p.stderr
    ev = one_event(daemon, TLS6, 443)
    assert (ev["action"], ev["detection"]["kind"], ev["src_ip"]) == ("allowed", "tls", "2001:db8:1::2")


def test_ipv6_stratum_is_cut_before_the_pool_reads_subscribe(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    pool6 = SERVICES["pool"][1]
    pool = dlab.peers.pool("v1", 3333, v6=True)
    mark = pool.mark()
    rc, rep = dlab.stratum(f"[{pool6}]:3333", "v1")
    assert rc == 1 and rep["connected"] and rep["steps"] == [], rep
    assert any(e["event"] == "open" for e in wait_pool_open(pool, mark))
    assert pool.requests(mark) == []
    ev = one_event(daemon, pool6, 3333)
    assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == ("drop-mining", "blocked", "mining.stratum")
