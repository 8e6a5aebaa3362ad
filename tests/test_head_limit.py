"""The detectors' byte limit is the policy's head_bytes, passed in StreamContext.head.

Before, stratum and proxy stopped at 8192 bytes and tls at 16384 whatever the policy said:
with ``head_bytes: 32768`` a Stratum login whose method came after 10 KB of params was held
in the head but never read.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from scapy.layers.inet import IP, TCP

from egressd.detect.base import NOT_THIS, Detection, StreamContext
from egressd.detect.proxy import detect_proxy
from egressd.detect.stratum import detect_stratum
from egressd.detect.tls import detect_tls
from egressd.engine import Engine
from egressd.policy import load_policy
from tests.test_detect_tls import ext, hello_message, records, sni_ext

# A login whose method comes after ~10 KB of params: pools parse it, so must we.
LATE_METHOD = (json.dumps({"id": 1, "params": ["x" * 10_000], "method": "mining.subscribe"}) + "\n").encode()


def test_stratum_reads_as_far_as_the_head_reaches() -> None:
    found = detect_stratum(LATE_METHOD, b"", StreamContext(40000, 3333, head=32768))
    assert isinstance(found, Detection) and found.kind == "mining.stratum"


def test_stratum_gives_up_at_a_smaller_head() -> None:
    head = LATE_METHOD[:8192]
    assert detect_stratum(head, b"", StreamContext(40000, 3333, fwd_full=True, rev_closed=True, head=8192)) is NOT_THIS


def test_tls_client_hello_is_bounded_by_the_head_not_a_constant() -> None:
    big = records(hello_message([sni_ext(b"a.example"), ext(21, bytes(9000))]))
    assert len(big) > 9000
    assert isinstance(detect_tls(big, b"", StreamContext(40000, 443, head=16384)), Detection)
    assert detect_tls(big[:4096], b"", StreamContext(40000, 443, head=4096)) is NOT_THIS


def test_proxy_connect_head_is_bounded_by_the_head() -> None:
    request = b"CONNECT pool.example:3333 HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    found = detect_proxy(request, b"", StreamContext(40000, 3128, head=16384))
    assert isinstance(found, Detection) and found.inner_fwd == len(request)


def test_engine_passes_the_policy_head_to_the_detectors(tmp_path: Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(
        textwrap.dedent(
            """\
            default: accept
            settings:
              head_bytes: 32768
            rules:
              - name: drop-mining
                description: mining
                match:
                  detection: mining
                action: drop
            """
        )
    )
    eng = Engine(load_policy(pol))
    c, s = 1000, 5000
    node, pool = "198.51.100.2", "203.0.113.30"
    eng.feed(bytes(IP(src=node, dst=pool) / TCP(sport=40000, dport=3333, flags="S", seq=c - 1)), 1.0)
    eng.feed(bytes(IP(src=pool, dst=node) / TCP(sport=3333, dport=40000, flags="SA", seq=s - 1, ack=c)), 1.0)
    for i in range(0, len(LATE_METHOD), 1400):
        seg = LATE_METHOD[i : i + 1400]
        eng.feed(bytes(IP(src=node, dst=pool) / TCP(sport=40000, dport=3333, flags="PA", seq=c + i, ack=s) / seg), 2.0)
    assert [(e.rule, e.verdict) for e in eng.events] == [("drop-mining", "drop")]
