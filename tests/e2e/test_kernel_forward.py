"""Traffic forwarded for a container behind the node: judged like the node's own, both families."""

from __future__ import annotations

import ipaddress
import time

import pytest
from conftest import (
    ALLOW,
    CTR_V4,
    CTR_V6,
    DENY,
    PY,
    SEEN,
    TCP_SERVER,
    Container,
    consumer,
    start_tcp_server,
    svc,
)
from test_kernel_verdicts import CONNECT, TRANSFER

from egressd import netfilter
from egressd_lab.netns import NODE_V4, NODE_V6, Lab

Q = 13
NF_INET_FORWARD = 2


@pytest.fixture
def rules(klab: Lab) -> None:
    netfilter.install(Q, fail_open=True, max_packets=8, netns=klab.node)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_container_connection_denied_at_syn_fails_fast(klab: Lab, container: Container, rules: None, v6: bool) -> None:
    host = svc("ssh_evil", v6)
    start_tcp_server(klab, "inet", host, 2222)
    with consumer(klab.node, Q, lambda s: DENY) as c:
        r = container.run([PY, "-c", CONNECT, host, "2222"])
    res, secs = r.stdout.split()
    assert res == "ECONNREFUSED" and float(secs) < 1.0, r.stdout + r.stderr
    assert [p.hook for p in c.packets] == [NF_INET_FORWARD]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_container_flow_pinned_allow_after_head_both_directions_tagged(
    klab: Lab, container: Container, rules: None, v6: bool
) -> None:
    host = svc("bulk", v6)
    start_tcp_server(klab, "inet", host, 5001, send=1_000_000)
    with consumer(klab.node, Q, lambda s: ALLOW if s.n >= 4 else SEEN, gso=True) as c:
        r = container.run([PY, "-c", TRANSFER, host, "5001", "0"])
    assert int(r.stdout.split()[0]) == 1_000_000 + len("0\n"), r.stderr
    assert 4 <= len(c.packets) <= 8
    assert all(p.hook == NF_INET_FORWARD for p in c.packets)
    # The SYN (original) first, then the server's data (reply) and the client's FIN (original)
    # in whatever order they came: the rules told us which is which.
    assert not netfilter.is_reply(c.packets[0].mark)
    from_server = [_src(p.payload) == ipaddress.ip_address(host) for p in c.packets]
    assert [netfilter.is_reply(p.mark) for p in c.packets] == from_server
    assert True in from_server


def _src(ip: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(ip[12:16] if ip[0] >> 4 == 4 else ip[8:24])


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_inbound_connection_published_to_a_container_is_not_queued(
    klab: Lab, container: Container, rules: None, v6: bool
) -> None:
    # A port published the Docker way: DNAT on the node to the container.
    tool, ctr, node = ("ip6tables", CTR_V6, NODE_V6) if v6 else ("iptables", CTR_V4, NODE_V4)
    dest = f"[{ctr}]:80" if v6 else f"{ctr}:80"
    klab.run_node(
        [
            tool,
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            dest,
        ],
        check=True,
    )
    container.spawn([PY, "-c", TCP_SERVER, ctr, "80", "100000", "1", "15"])
    _wait(container, 80)
    with consumer(klab.node, Q, lambda s: SEEN) as c:
        r = klab.run_inet([PY, "-c", TRANSFER, node, "8080", "50000"], timeout=30)
    assert int(r.stdout.split()[0]) == 100_000 + len("50000\n"), r.stdout + r.stderr
    assert c.packets == []


def _wait(container: Container, port: int) -> None:
    for _ in range(100):
        if f":{port} " in container.run(["ss", "-tln"]).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError("container server did not start")
