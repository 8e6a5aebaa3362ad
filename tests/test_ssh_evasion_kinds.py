"""SSH parser anomalies are evasion.* findings a policy can match, not free text in info."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import pytest

from egressd.detect.base import Detection, StreamContext
from egressd.detect.ssh import detect_ssh
from egressd.engine import PIN_DENY, Engine
from egressd.policy import load_policy
from tests.test_detect_ssh import CLIENT_BANNER, KEX_PLAIN, SERVER_BANNER, kexinit, msg
from tests.test_engine import Conn, feed_all

CTX = StreamContext(sport=40000, dport=22)


def anomalies(r: object) -> dict[str, Detection]:
    assert isinstance(r, Detection), r
    return {a.kind: a for a in r.anomalies}


def test_padded_banner_is_an_evasion_finding() -> None:
    padded = b"SSH-2.0-OpenSSH_9.6" + b" " * 300 + b"\r\n"
    found = anomalies(detect_ssh(padded, SERVER_BANNER, CTX))
    assert set(found) == {"evasion.ssh-long-banner"}
    assert found["evasion.ssh-long-banner"].info == {"length": str(len(padded))}


@pytest.mark.parametrize("length", [0, 1, 4, 0x7FFFFFFF])
def test_malformed_packet_after_the_banner_is_an_evasion_finding(length: int) -> None:
    fwd = CLIENT_BANNER + struct.pack("!IB", length, 4) + b"\x14" + b"\x00" * 40
    found = anomalies(detect_ssh(fwd, b"", CTX))
    assert set(found) == {"evasion.ssh-malformed-packet"}
    assert found["evasion.ssh-malformed-packet"].info == {"direction": "fwd"}


def test_lines_before_the_clients_banner_are_an_evasion_finding_once_the_kex_names_the_client() -> None:
    fwd = b"GET / HTTP/1.1\r\n\r\n" + CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30)
    rev = SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(31)
    found = anomalies(detect_ssh(fwd, rev, CTX))
    assert set(found) == {"evasion.ssh-client-preamble"}


@pytest.mark.parametrize(
    ("fwd", "rev"),
    [
        (CLIENT_BANNER + kexinit(KEX_PLAIN) + msg(30), SERVER_BANNER + kexinit(KEX_PLAIN, "server") + msg(31)),
        (b"\r\n", b"SSH-2.0-OpenSSH_7.4\nProtocol mismatch.\n"),  # sshd refusing a non-SSH client
        (CLIENT_BANNER, b"Welcome\r\n" + SERVER_BANNER),  # a server's preamble is allowed
    ],
)
def test_standard_peers_raise_no_evasion_finding(fwd: bytes, rev: bytes) -> None:
    assert anomalies(detect_ssh(fwd, rev, CTX)) == {}


def test_policy_can_drop_on_an_ssh_evasion_kind(tmp_path: Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text(
        textwrap.dedent(
            """\
            default: accept
            rules:
              - name: drop-padded-ssh
                description: an SSH banner padded past the RFC limit
                match:
                  detection: evasion.ssh-long-banner
                action: drop
            """
        )
    )
    eng = Engine(load_policy(pol))
    c = Conn("203.0.113.20", 22)
    v = feed_all(eng, [c.syn(), c.synack(), c.c(b"SSH-2.0-x" + b"A" * 300 + b"\r\n")])
    assert v[-1] == PIN_DENY
    ev = eng.events[-1]
    assert (ev.rule, ev.verdict) == ("drop-padded-ssh", "drop")
    assert set(ev.detections) == {"ssh", "evasion.ssh-long-banner"}
