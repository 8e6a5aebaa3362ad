"""Port-only alerts name what was seen: the default policy's ``alert-mining-ports``.

A pool port is weak evidence. The shipped rule alerts only on payload that no detector
recognised, judged once inspection of the flow has ended: never on a SYN scan (nothing was
seen), never on Bitcoin P2P on 8333 (a node's port, not a pool's), never on JSON-RPC on 4444
that egressd read and found not to be mining.
"""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import IP, TCP

from egressd.engine import Engine
from egressd.events import Event
from egressd.paths import default_policy
from egressd.policy import Policy, load_policy

NODE = "198.51.100.2"
DST = "203.0.113.60"

# Bitcoin P2P "version" message header (magic f9beb4d9, command "version").
BITCOIN_VERSION = bytes.fromhex("f9beb4d976657273696f6e000000000066000000") + bytes(102)
ETH_RPC_REQ = json.dumps({"jsonrpc": "2.0", "method": "eth_blockNumber", "params": [], "id": 83}).encode() + b"\n"
ETH_RPC_RESP = b'{"jsonrpc": "2.0", "id": 83, "result": "0x4b7"}\n'
SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'


@pytest.fixture(scope="module")
def default() -> Policy:
    return load_policy(default_policy())


def _conn(dport: int, client: bytes = b"", server: bytes = b"", close: bool = True) -> list[bytes]:
    """SYN, SYN-ACK, the client's and the server's data, and both FINs (or a bare SYN)."""
    c, s = 1000, 5000
    pkts = [bytes(IP(src=NODE, dst=DST) / TCP(sport=40000, dport=dport, flags="S", seq=c - 1))]
    if not close:
        return pkts
    pkts.append(bytes(IP(src=DST, dst=NODE) / TCP(sport=dport, dport=40000, flags="SA", seq=s - 1, ack=c)))
    if client:
        pkts.append(bytes(IP(src=NODE, dst=DST) / TCP(sport=40000, dport=dport, flags="PA", seq=c, ack=s) / client))
        c += len(client)
    if server:
        pkts.append(bytes(IP(src=DST, dst=NODE) / TCP(sport=dport, dport=40000, flags="PA", seq=s, ack=c) / server))
        s += len(server)
    pkts.append(bytes(IP(src=NODE, dst=DST) / TCP(sport=40000, dport=dport, flags="FA", seq=c, ack=s)))
    pkts.append(bytes(IP(src=DST, dst=NODE) / TCP(sport=dport, dport=40000, flags="FA", seq=s, ack=c + 1)))
    return pkts


def _events(policy: Policy, pkts: list[bytes]) -> list[Event]:
    eng = Engine(policy)
    for i, p in enumerate(pkts):
        eng.feed(p, 1000.0 + i * 0.01)
    eng.finish(2000.0)
    return list(eng.events)


def _alerts_or_drops(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.rule, e.verdict, e.event_type) for e in events if e.verdict != "accept" or e.event_type == "alert"]


def test_syn_only_scan_of_a_pool_port_is_not_a_mining_alert(default: Policy) -> None:
    events = _events(default, _conn(3333, close=False))
    assert not _alerts_or_drops(events)
    assert [(e.rule, e.event_type) for e in events] == [("note-mining-ports-without-payload", "flow")]


def test_refused_or_dataless_connection_to_a_pool_port_is_only_a_record(default: Policy) -> None:
    events = _events(default, _conn(4444))
    assert [(e.rule, e.verdict, e.event_type) for e in events] == [
        ("note-mining-ports-without-payload", "accept", "flow")
    ]


def test_bitcoin_p2p_on_8333_is_not_a_mining_alert(default: Policy) -> None:
    events = _events(default, _conn(8333, BITCOIN_VERSION, BITCOIN_VERSION))
    assert not _alerts_or_drops(events)


def test_json_rpc_on_4444_that_is_not_mining_is_classified_and_not_alerted(default: Policy) -> None:
    events = _events(default, _conn(4444, ETH_RPC_REQ, ETH_RPC_RESP))
    assert not _alerts_or_drops(events)
    assert [e.detections for e in events] == [["rpc.jsonrpc"]]


def test_unrecognised_payload_on_a_pool_port_is_still_alerted_after_inspection(default: Policy) -> None:
    events = _events(default, _conn(3333, b"\x8a\x11\x02binary-blob\x00\x01", b"\x00\x07ok"))
    assert [(e.rule, e.verdict, e.event_type) for e in events] == [("alert-mining-ports", "alert", "alert")]


def test_stratum_on_a_pool_port_is_still_dropped_as_mining(default: Policy) -> None:
    events = _events(default, _conn(3333, SUBSCRIBE))
    assert [(e.rule, e.verdict) for e in events] == [("drop-mining", "drop")]
