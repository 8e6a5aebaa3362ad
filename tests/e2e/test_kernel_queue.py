"""The queue itself: who passes when nobody listens, overflow, queue flags, GSO, bounded batches."""

from __future__ import annotations

import select
import time
from typing import Any

import pytest
from conftest import (
    ACCEPT,
    SEEN,
    consumer,
    in_netns,
    node_python,
    read_proc_queues,
    sink_count,
    start_tcp_server,
    start_udp_sink,
    svc,
    udp_burst,
)
from test_kernel_verdicts import CONNECT, TRANSFER

from egressd import netfilter, nfq, procstats
from egressd_lab.netns import Lab

Q = 11


def _install(lb: Lab, fail_open: bool, max_packets: int = 8) -> None:
    netfilter.install(Q, fail_open=fail_open, max_packets=max_packets, netns=lb.node)


def test_fail_open_traffic_passes_while_nobody_is_bound(klab: Lab) -> None:
    _install(klab, fail_open=True)
    start_tcp_server(klab, "inet", svc("tls"), 8443, send=100_000)
    r = node_python(klab, TRANSFER, svc("tls"), "8443", "0")
    assert int(r.stdout.split()[0]) == 100_000 + len("0\n"), r.stderr
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=2)
    assert udp_burst(klab, svc("dns"), 5353, 20) == 20
    time.sleep(0.3)
    assert sink_count(klab, sink) == 20


def test_fail_closed_nothing_passes_while_nobody_is_bound(klab: Lab) -> None:
    _install(klab, fail_open=False)
    start_tcp_server(klab, "inet", svc("tls"), 8443)
    r = node_python(klab, CONNECT.replace("settimeout(5)", "settimeout(1)"), svc("tls"), "8443")
    assert r.stdout.split()[0] == "timeout", r.stdout + r.stderr
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=2)
    udp_burst(klab, svc("dns"), 5353, 20)
    time.sleep(0.3)
    assert sink_count(klab, sink) == 0


def _overflow(klab: Lab, flag: bool) -> tuple[int, int, procstats.QueueStats]:
    """A slow consumer (50 ms per packet) behind a 4-packet queue, hit by a 300-datagram burst."""
    _install(klab, fail_open=False)  # no bypass: only the queue's FAIL_OPEN flag can let packets by
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=4)
    with consumer(klab.node, Q, lambda s: ACCEPT, fail_open=flag, max_len=4, delay=0.05) as c:
        assert udp_burst(klab, svc("dns"), 5353, 300) == 300
        time.sleep(1.0)
        stats = procstats.find(procstats.parse(read_proc_queues(klab)), Q)
    assert stats is not None
    return sink_count(klab, sink), len(c.packets), stats


def test_fail_open_flag_lets_queue_overflow_through(klab: Lab) -> None:
    delivered, judged, stats = _overflow(klab, flag=True)
    assert judged < 100  # the consumer saw only a few...
    assert delivered >= 250  # ...the rest passed uninspected instead of being dropped
    assert stats.queue_dropped == 0


def test_without_fail_open_flag_queue_overflow_is_dropped(klab: Lab) -> None:
    delivered, judged, stats = _overflow(klab, flag=False)
    assert delivered == judged < 100
    assert stats.queue_dropped >= 300 - judged - 10  # counted as dropped by the kernel


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
def test_gso_flag_delivers_super_packets_truncated_to_the_copy_range(klab: Lab, gso: bool) -> None:
    _install(klab, fail_open=True)
    start_tcp_server(klab, "inet", svc("bulk"), 5001)
    with consumer(klab.node, Q, lambda s: SEEN, gso=gso) as c:
        r = node_python(klab, TRANSFER, svc("bulk"), "5001", "1000000")
    assert r.returncode == 0, r.stderr
    biggest = max(c.packets, key=lambda p: p.ip_len)
    if gso:
        assert biggest.ip_len > 1500  # one callback for a whole super-packet...
        assert biggest.length == nfq.MAX_COPY_RANGE  # ...of which only the copy range is copied
    else:
        assert biggest.ip_len <= 1500 and biggest.length == biggest.ip_len


def test_set_queue_flags_sends_packets_that_arrived_before_the_ack_round_again(klab: Lab) -> None:
    from netfilterqueue import NetfilterQueue

    _install(klab, fail_open=False)
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=4)
    seen: list[int] = []

    def cb(pkt: Any) -> None:
        seen.append(pkt.id)
        pkt.accept()

    def bind() -> Any:
        q = NetfilterQueue()
        q.bind(Q, cb)
        return q

    q = in_netns(klab.node, bind)
    try:
        assert udp_burst(klab, svc("dns"), 5353, 20) == 20
        time.sleep(0.2)  # all 20 now wait in the socket, ahead of anything we send
        nfq.set_queue_flags(q.get_fd(), Q, fail_open=False, gso=True)
        sock = nfq.netlink_socket(q.get_fd())
        sock.setblocking(False)
        deadline = time.monotonic() + 3
        while len(seen) < 20 and time.monotonic() < deadline:
            if select.select([sock], [], [], 0.1)[0]:
                q.run_socket(sock)
        sock.close()
    finally:
        q.unbind()
    time.sleep(0.3)
    assert len(seen) == 20
    assert sink_count(klab, sink) == 20


def test_set_queue_flags_is_refused_for_a_queue_this_socket_does_not_own(klab: Lab) -> None:
    from netfilterqueue import NetfilterQueue

    def bind_other() -> Any:
        q = NetfilterQueue()
        q.bind(Q + 1, lambda p: p.accept())
        return q

    def flags_on_unbound_queue(q: Any) -> None:
        nfq.set_queue_flags(q.get_fd(), Q + 2, fail_open=True, gso=False)

    q = in_netns(klab.node, bind_other)
    try:
        with pytest.raises(nfq.NfqError, match="refused"):
            flags_on_unbound_queue(q)
    finally:
        q.unbind()


def test_process_handles_at_most_the_budget_per_call(klab: Lab) -> None:
    _install(klab, fail_open=False)
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=4)
    seen: list[int] = []

    def cb(pkt: Any) -> None:
        seen.append(1)
        pkt.accept()

    q = in_netns(klab.node, lambda: nfq.Queue(Q, cb, fail_open=False))
    try:
        assert udp_burst(klab, svc("dns"), 5353, 50) == 50
        time.sleep(0.2)
        first = q.process(5)
        after_first = len(seen)
        rest = 0
        for _ in range(20):
            rest += q.process(100)
            if len(seen) >= 50:
                break
            time.sleep(0.02)
    finally:
        q.close()
    time.sleep(0.3)
    assert (first, after_first) == (5, 5)
    assert rest == 45 and len(seen) == 50
    assert sink_count(klab, sink) == 50


def test_an_exception_in_the_callback_still_gives_a_verdict(klab: Lab) -> None:
    _install(klab, fail_open=False)
    sink = start_udp_sink(klab, "inet", svc("dns"), 5353, life=3)
    errors: list[BaseException] = []

    def cb(pkt: Any) -> None:
        raise ValueError("engine bug")

    q = in_netns(klab.node, lambda: nfq.Queue(Q, cb, fail_open=True, on_error=errors.append))
    try:
        assert udp_burst(klab, svc("dns"), 5353, 10) == 10
        deadline = time.monotonic() + 3
        while q.errors < 10 and time.monotonic() < deadline:
            if select.select([q], [], [], 0.1)[0]:
                q.process(64)
        stats = procstats.find(procstats.parse(read_proc_queues(klab)), Q)
    finally:
        q.close()
    time.sleep(0.3)
    assert q.errors == 10 and len(errors) == 10
    assert stats is not None and stats.queue_total == 0  # nothing left waiting for a verdict
    assert sink_count(klab, sink) == 10  # fail-open: the bug let them pass


def test_proc_file_shows_the_bound_queue(klab: Lab) -> None:
    q = in_netns(klab.node, lambda: nfq.Queue(Q, lambda p: p.accept(), fail_open=True, max_len=77))
    try:
        stats = procstats.find(procstats.parse(read_proc_queues(klab)), Q)
        assert q.rcvbuf >= nfq.DEFAULT_RCVBUF
    finally:
        q.close()
    assert stats is not None
    assert stats.copy_mode_name == "packet" and stats.copy_range == nfq.MAX_COPY_RANGE
    assert stats.peer_portid > 0 and stats.queue_total == 0
    assert procstats.find(procstats.parse(read_proc_queues(klab)), Q) is None  # gone once unbound
