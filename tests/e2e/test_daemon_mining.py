"""The live daemon against a miner: the pool never receives a complete request line.

A real pool (``egressd_lab.stratum pool``) logs every connection it accepts and every
complete request it reads; "blocked" here means the miner's handshake failed, the pool's log
shows the connection opened and *no* request, and the daemon's event names drop-mining (or
the pool-domain rules) with the detection that triggered it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, one_event, wait_pool_close, wait_pool_open

from egressd_lab import peers
from egressd_lab.netns import SERVICES
from egressd_lab.peers import PY

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

POOL = SERVICES["pool"][0]
PROXY = SERVICES["proxy"][0]
DNS = SERVICES["dns"][0]


def _assert_pool_got_no_request(pool: peers.Pool, since: int) -> None:
    evs = wait_pool_open(pool, since)
    assert any(e["event"] == "open" for e in evs), f"the client never reached the pool: {evs}"
    assert pool.requests(since) == [], "the pool received a complete request line"


def _assert_mining_blocked(
    dlab: DaemonLab, d: peers.Egressd, pool: peers.Pool, variant: str, port: int, *extra: str
) -> dict[str, Any]:
    mark = pool.mark()
    rc, rep = dlab.stratum(f"{POOL}:{port}", variant, *extra)
    assert rc == 1 and rep["connected"] and not rep["handshake_complete"], rep
    assert rep["steps"] == [], rep  # not even the first reply came back
    _assert_pool_got_no_request(pool, mark)
    ev = one_event(d, POOL, port)
    assert (ev["rule"], ev["action"]) == ("drop-mining", "blocked")
    return ev


@pytest.mark.parametrize("port", [3333, 443])
def test_stratum_v1_handshake_is_cut_before_the_pool_reads_subscribe(
    dlab: DaemonLab, daemon: peers.Egressd, port: int
) -> None:
    pool = dlab.peers.pool("v1", port)
    mark = pool.mark()
    ev = _assert_mining_blocked(dlab, daemon, pool, "v1", port)
    assert ev["detection"]["kind"] == "mining.stratum"
    assert "mining.subscribe" in ev["detection"]["evidence"]
    (close,) = wait_pool_close(pool, mark)
    assert close["bytes_in"] == 0, close  # the packet carrying subscribe never left the node


def test_xmrig_login_is_cut_before_the_pool_reads_it(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    ev = _assert_mining_blocked(dlab, daemon, dlab.peers.pool("xmr", 14444), "xmr", 14444)
    assert (ev["detection"]["kind"], ev["detection"]["info"]["method"]) == ("mining.xmr", "login")


def test_ethereum_stratum_subscribe_is_cut_before_the_pool_reads_it(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    ev = _assert_mining_blocked(dlab, daemon, dlab.peers.pool("eth", 4444), "eth", 4444)
    assert ev["detection"]["kind"] == "mining.eth-stratum"


def test_subscribe_sent_in_one_byte_segments_is_still_cut(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    pool = dlab.peers.pool("v1", 3333)
    mark = pool.mark()
    ev = _assert_mining_blocked(dlab, daemon, pool, "v1", 3333, "--split", "1", "--split-delay", "0.005")
    assert ev["detection"]["kind"] == "mining.stratum"
    # The bytes before the verdict did reach the pool, one per segment: never the whole line.
    (close,) = wait_pool_close(pool, mark)
    assert close["requests"] == 0 and close["partial_bytes"] == close["bytes_in"], close
    assert close["bytes_in"] < len(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
    assert "\n" not in close["partial"]


def test_stratum_through_an_http_connect_proxy_is_cut(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    pool = dlab.peers.pool("v1", 3333)
    mark = pool.mark()
    rc, rep = dlab.stratum(f"{POOL}:3333", "v1", "--via-connect", f"{PROXY}:{peers.PROXY_PORT}")
    assert rc == 1 and not rep["handshake_complete"] and rep["steps"] == [], rep
    _assert_pool_got_no_request(pool, mark)  # the proxy did connect to the pool for us
    ev = one_event(daemon, PROXY, peers.PROXY_PORT)
    assert (ev["rule"], ev["action"], ev["detection"]["kind"]) == ("drop-mining", "blocked", "mining.stratum")
    assert "proxy.http-connect" in ev["detections"]


def test_tls_with_a_pool_sni_fails_and_names_the_pool_domain(dlab: DaemonLab, daemon: peers.Egressd) -> None:
    addr = SERVICES["tls_pool"][0]
    p, took = dlab.curl_tls("xmr-eu1.nanopool.org", addr)
    assert p.returncode != 0 and p.stdout != "200", p.stdout + p.stderr
    assert took < 5.0
    ev = one_event(daemon, addr, 443)
    assert ev["action"] == "blocked" and ev["rule"] == "drop-mining-pool-names"
    assert (ev["detection"]["kind"], ev["domain"]) == ("mining.pool-domain", "xmr-eu1.nanopool.org")


def test_dns_lookup_of_a_pool_name_gets_no_answer_and_never_reaches_the_resolver(
    dlab: DaemonLab, daemon: peers.Egressd
) -> None:
    before = dlab.peers.dns.log_text().count("xmr.nanopool.org")
    p, took = dlab.dig("xmr.nanopool.org")
    assert p.returncode != 0 and "ANSWER SECTION" not in p.stdout, p.stdout
    assert took < 5.0
    ev = one_event(daemon, DNS, 53)
    assert (ev["rule"], ev["action"], ev["proto"]) == ("drop-mining-pool-lookups", "blocked", "UDP")
    assert (ev["detection"]["kind"], ev["domain"]) == ("mining.pool-domain", "xmr.nanopool.org")
    assert dlab.peers.dns.log_text().count("xmr.nanopool.org") == before, "the query left the node"


# A miner that connected before egressd started and speaks only later: it connects, says
# "connected <port>", waits for a line on stdin, then sends mining.subscribe and prints what
# happened as JSON. Bounded: 20 s for the go signal, 3 s for the reply.
LATE_SUBSCRIBE = r"""
import json, select, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", c.getsockname()[1], flush=True)
if not select.select([sys.stdin], [], [], 20)[0]:
    print(json.dumps({"error": "no go signal"})); sys.exit(2)
sys.stdin.readline()
out = {}
try:
    c.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
    c.settimeout(3)
    out["reply"] = c.recv(4096).decode(errors="replace")
except OSError as e:
    out["error"] = str(e)
print(json.dumps(out), flush=True)
"""


def test_connection_opened_before_the_daemon_started_is_judged_when_it_speaks(
    dlab: DaemonLab, start_daemon: Any
) -> None:
    pool = dlab.peers.pool("v1", 3333)
    mark = pool.mark()
    miner = dlab.lab.spawn(
        "node", [PY, "-c", LATE_SUBSCRIBE, POOL, "3333"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        hello = peers.read_until(miner, b"\n", 10).decode()
        assert hello.startswith("connected"), hello
        sport = int(hello.split()[1])
        d: peers.Egressd = start_daemon()
        out, _ = miner.communicate(b"go\n", timeout=15)
    finally:
        dlab.lab.stop(miner)
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert "reply" not in res, res
    _assert_pool_got_no_request(pool, mark)
    ev = one_event(d, POOL, 3333)
    assert (ev["src_port"], ev["rule"], ev["action"]) == (sport, "drop-mining", "blocked")
    assert ev["midstream"] is True and ev["detection"]["kind"] == "mining.stratum"
