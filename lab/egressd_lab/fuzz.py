#!/usr/bin/env python3
"""Fuzz and property harness over every parser egressd has: hostile input in, only the
documented outcomes out, within bounded memory.

Why our own harness and not only hypothesis: a firewall parser is attacked by inputs that
are *almost* valid (a length field that lies by one, a compression pointer that jumps
forward, a fragment that overlaps with different bytes), and those are reached by mutating
real protocol messages, not by random bytes. Each target below builds valid messages from
a grammar of its protocol (or takes packets built with scapy once at start-up), then
mutates them struct-aware (lengths, offsets, counts, flags) and byte-wise (bit flips,
truncation at every offset, splices). A million inputs must run in minutes on two cores,
so generation is plain ``random.Random(seed)``: every failure is reproducible from the
printed seed, and is printed with its input (hex) and traceback.

What counts as a failure, per target (the contract of the code under test):

* any exception from a function documented never to raise, or any exception other than
  the documented one (``PolicyError``, ``CaptureError``, ``ExpectError``);
* ``Engine.counters.errors`` growing (``feed`` swallows exceptions: each one is a bug);
* a bound broken: stream head and held bytes, reassembly datagrams and bytes, flow table,
  DNS cache; or an internal count that no longer matches what it counts;
* a property broken: a detector result outside NEED_MORE / NOT_THIS / Detection, evidence
  or info that is not short printable text, a stream head whose bytes differ from what a
  consistent sender sent, a pinned flow whose verdict changes, a YAML bomb not refused
  fast;
* one input using more than ``--guard`` seconds of CPU (a hang is a denial of service).

Usage: python -m egressd_lab.fuzz [--count N] [--seconds S] [--seed N] [--target NAME]... [--jobs J]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Generic, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd import defrag, expect
from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, StreamContext
from egressd.detect.dns import (
    MAX_TCP_MESSAGES,
    answers_by_ip,
    detect_dns_datagram,
    detect_dns_stream,
    iter_tcp_messages,
    parse_message,
)
from egressd.detect.proxy import detect_proxy
from egressd.detect.ssh import detect_ssh
from egressd.detect.stratum import detect_stratum
from egressd.detect.tls import ClientHello, detect_tls, parse_client_hello
from egressd.engine import (
    DIR_ORIGINAL,
    DIR_REPLY,
    DIR_UNKNOWN,
    DROP_PACKET,
    PASS,
    PASS_MARK_SEEN,
    PIN_ALLOW,
    PIN_DENY,
    Engine,
)
from egressd.flow import PENDING, PINNED_ACCEPT, PINNED_DROP, SETTLED, make_key
from egressd.packet import Malformed, Packet, decode
from egressd.pcapio import MAX_CAPLEN, CaptureError, Reader
from egressd.policy import ACTIONS, FlowFacts, Policy, PolicyError, load_policy, load_policy_text
from egressd.policy import validate as validate_policy
from egressd.stream import GREW, HELD, NOTHING, StreamHead

REPO: Final = Path(__file__).resolve().parents[2]  # the checkout: <checkout>/lab/egressd_lab/fuzz.py

T = TypeVar("T")

DEFAULT_COUNT: Final = 1_000_000
DEFAULT_GUARD: Final = 20.0  # CPU seconds one input may take before it counts as a hang
MAX_SHOWN: Final = 32768  # hex characters of a failing input printed
MAX_KEPT_FAILURES: Final = 8  # distinct failures (by exception and site) kept in full per target
EVIDENCE_MAX: Final = 4096  # "short" evidence/info text, generously

RULES: Final = REPO / "rules"
POLICY_FLOWS: Final = 16  # the engine target's flow table: small, so the bound is hit constantly
POLICY_DNS_CACHE: Final = 64
POLICY_IDLE: Final = 2  # seconds: flows go idle often, so the table churns through eviction and overload


class Violation(Exception):
    """A contract, bound or property the target broke (not an exception it raised)."""


class InputTimeout(BaseException):
    """One input ran past the CPU guard. A BaseException, so that the code under test
    (whose ``except Exception`` would swallow it, e.g. ``Engine.feed``) cannot hide it."""


# ================================================================================= mutation

_I8: Final = (0, 1, 2, 3, 4, 5, 0x0F, 0x10, 0x20, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
_I16: Final = (0, 1, 2, 3, 4, 5, 7, 8, 12, 20, 40, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_I32: Final = (0, 1, 4, 5, 6, 0xFF, 0xFFFF, 0x10000, 0x40000, 0x40001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "big") if n > 0 else b""


def rand_text(rng: random.Random, n: int, alphabet: bytes = b"abcdefghijklmnopqrstuvwxyz0123456789-._ ") -> bytes:
    return bytes(rng.choice(alphabet) for _ in range(n))


def mutate(rng: random.Random, data: bytes, rounds: int = 0, tokens: Sequence[bytes] = ()) -> bytes:
    """Byte-level mutations (AFL's havoc, in small): flips, interesting values at any
    width and byte order, inserts, deletes, duplicated ranges, truncation, splices."""
    buf = bytearray(data)
    for _ in range(rounds or rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(buf)
        op = rng.randrange(13)
        i = rng.randrange(n) if n else 0
        if op == 0 and n:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[i] = rng.choice(_I8)
        elif op == 2 and n:
            buf[i] = rng.randrange(256)
        elif op == 3 and n >= 2:
            struct.pack_into(rng.choice("<>") + "H", buf, rng.randrange(n - 1), rng.choice(_I16))
        elif op == 4 and n >= 4:
            struct.pack_into(rng.choice("<>") + "I", buf, rng.randrange(n - 3), rng.choice(_I32))
        elif op == 5:
            buf[i:i] = rand_bytes(rng, rng.randint(1, 16))
        elif op == 6 and n:
            del buf[i : i + rng.randint(1, 16)]
        elif op == 7 and n:
            chunk = buf[i : i + rng.randint(1, 64)]
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = chunk
        elif op == 8 and n:
            del buf[i:]
        elif op == 9:
            buf += rand_bytes(rng, rng.randint(1, 64))
        elif op == 10 and tokens:
            buf[i:i] = rng.choice(tokens)
        elif op == 11 and n:
            buf[i] = (buf[i] + rng.choice((-2, -1, 1, 2, 16, -16))) & 0xFF
        elif op == 12 and n >= 2:
            j = rng.randrange(n)
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf)


def cut(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


# ================================================================================ IP builders
# Packets for long engine sessions are assembled here with struct (templates of the headers
# scapy builds for the seeds), because scapy costs ~200 us a packet and the engine target
# feeds hundreds of thousands. Checksums are left 0: nothing in egressd reads them.

_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6: Final = struct.Struct("!IHBB16s16s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_UDP: Final = struct.Struct("!HHHH")

CLIENTS4: Final = tuple(bytes([198, 51, 100, n]) for n in (2, 3, 7, 250))
SERVERS4: Final = tuple(bytes([203, 0, 113, n]) for n in (5, 10, 20, 30, 53, 99))
CLIENTS6: Final = tuple(bytes.fromhex("20010db8000100000000000000000000")[:-1] + bytes([n]) for n in (2, 3))
SERVERS6: Final = tuple(bytes.fromhex("20010db8001000000000000000000000")[:-1] + bytes([n]) for n in (5, 10, 53))
SERVER_PORTS: Final = (22, 443, 3333, 53, 80, 8080, 1080, 4444, 5353, 14444, 2222, 0, 65535, 25)


def ip4(
    src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0, frag: int = 0, total: int | None = None
) -> bytes:
    length = 20 + len(payload) if total is None else total
    return _IPV4.pack(0x45, 0, length & 0xFFFF, ident & 0xFFFF, frag & 0xFFFF, 64, proto, 0, src, dst) + payload


def ip6(src: bytes, dst: bytes, nxt: int, payload: bytes, plen: int | None = None) -> bytes:
    length = len(payload) if plen is None else plen
    return _IPV6.pack(0x60000000, length & 0xFFFF, nxt, 64, src, dst) + payload


def tcp(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes, options: bytes = b"") -> bytes:
    options += b"\x00" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    head = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4, flags, 65535, 0, 0)
    return head + options + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return _UDP.pack(sport, dport, (8 + len(payload)) & 0xFFFF, 0) + payload


def ip_packet(v6: bool, src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    return ip6(src, dst, proto, payload) if v6 else ip4(src, dst, proto, payload)


def fragment_ip(rng: random.Random, raw: bytes, ident: int, sizes: Sequence[int] = ()) -> list[bytes]:
    """Split an IPv4 or IPv6 packet (no extension headers) into fragments at 8-byte
    multiples; ``sizes`` (rounded down to 8, at least 8) sets the piece lengths."""
    if not raw:
        return [raw]
    v6 = raw[0] >> 4 == 6
    hl = 40 if v6 else (raw[0] & 0x0F) * 4
    if len(raw) <= max(hl, 20) + 8 or (len(raw) < 40 and v6):
        return [raw]
    body = raw[hl:]
    proto = raw[6] if v6 else raw[9]
    out: list[bytes] = []
    off = 0
    k = 0
    while off < len(body):
        want = sizes[k] if k < len(sizes) else rng.choice((8, 16, 24, 64, 512, 1280, 1480))
        k += 1
        size = max(8, want - want % 8)
        piece = body[off : off + size]
        more = off + len(piece) < len(body)
        if v6:
            fh = struct.pack("!BBHI", proto, 0, off | (1 if more else 0), ident & 0xFFFFFFFF)
            out.append(ip6(raw[8:24], raw[24:40], 44, fh + piece))
        else:
            frag = (off // 8) | (0x2000 if more else 0)
            out.append(
                _IPV4.pack(0x45, 0, 20 + len(piece), ident & 0xFFFF, frag, 64, proto, 0, raw[12:16], raw[16:20]) + piece
            )
        off += len(piece)
    return out


def lie_ip(rng: random.Random, raw: bytes) -> bytes:
    """One struct-aware lie in an IP packet: a length, IHL, offset, flag or protocol field
    of the IP, TCP or UDP header set to a value that does not fit the bytes."""
    if len(raw) < 20:
        return mutate(rng, raw, 1)
    b = bytearray(raw)
    v6 = b[0] >> 4 == 6
    hl = 40 if v6 else (b[0] & 0x0F) * 4
    choice = rng.randrange(10)
    if v6 and len(b) >= 40:
        if choice < 3:
            struct.pack_into("!H", b, 4, rng.choice((0, 1, 7, len(b) - 40 - 1, len(b) - 40 + 1, 0xFFFF)) & 0xFFFF)
        elif choice < 5:
            b[6] = rng.choice((0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 139, 140, 255))
        elif choice < 6 and len(b) > 41:
            b[41] = rng.choice(_I8)  # the first extension header's length, if there is one
        else:
            return _lie_transport(rng, b, 40)
    elif not v6:
        if choice < 2:
            struct.pack_into("!H", b, 2, rng.choice((0, 1, 19, 20, len(b) - 1, len(b) + 1, 0xFFFF)) & 0xFFFF)
        elif choice < 4:
            b[0] = 0x40 | rng.randrange(16)
        elif choice < 6:
            struct.pack_into("!H", b, 6, rng.choice((0x2000, 0x0001, 0x1FFF, 0x3FFF, 0x4000, 0x2001)))
        elif choice < 7:
            b[9] = rng.choice((0, 1, 4, 6, 17, 41, 47, 50, 51, 58, 255))
        else:
            return _lie_transport(rng, b, hl)
    return bytes(b)


def _lie_transport(rng: random.Random, b: bytearray, off: int) -> bytes:
    proto = b[6] if b[0] >> 4 == 6 else b[9]
    if proto == 6 and len(b) >= off + 14:
        b[off + 12] = rng.randrange(16) << 4
    elif proto == 6 and len(b) >= off + 14:
        b[off + 13] = rng.randrange(256)
    elif proto == 17 and len(b) >= off + 6:
        struct.pack_into("!H", b, off + 4, rng.choice((0, 1, 7, 8, 9, 0xFFFF)))
    elif len(b) > off:
        b[rng.randrange(off, len(b))] = rng.randrange(256)
    return bytes(b)


# ============================================================================= scapy seeds


@dataclass
class Seeds:
    """Real packets built with scapy once, then only ever mutated."""

    packets: list[bytes]
    fragments: list[list[bytes]]  # each: the fragments of one datagram, in order


def build_seeds() -> Seeds:
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, fragment
    from scapy.layers.inet6 import (
        ICMPv6EchoRequest,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        fragment6,
    )
    from scapy.layers.l2 import GRE
    from scapy.packet import Raw

    c4, s4 = "198.51.100.2", "203.0.113.30"
    c6, s6 = "2001:db8:1::2", "2001:db8:10::5"
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
    subscribe = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
    hello = tls_client_hello(random.Random(1))
    built: list[Any] = [
        IP(src=c4, dst=s4) / TCP(sport=40000, dport=3333, flags="S", seq=999, options=opts),
        IP(src=s4, dst=c4) / TCP(sport=3333, dport=40000, flags="SA", seq=4999, ack=1000, options=opts),
        IP(src=c4, dst=s4) / TCP(sport=40000, dport=3333, flags="PA", seq=1000, ack=5000) / Raw(subscribe),
        IP(src=c4, dst=s4) / TCP(sport=40001, dport=22, flags="PA", seq=1, ack=1) / Raw(banner),
        IP(src=c4, dst=s4) / TCP(sport=40002, dport=443, flags="PA", seq=7, ack=9) / Raw(hello),
        IP(src=c4, dst=s4) / TCP(sport=40002, dport=443, flags="FA", seq=7, ack=9),
        IP(src=c4, dst=s4) / TCP(sport=40002, dport=443, flags="R", seq=7),
        IP(src=c4, dst=s4, options=[IPOption_NOP(), IPOption_RR()]) / TCP(sport=40003, dport=80, flags="S"),
        IP(src=c4, dst="203.0.113.53") / UDP(sport=5353, dport=53) / DNS(rd=1, qd=DNSQR(qname="pool.minexmr.com")),
        IP(src="203.0.113.53", dst=c4)
        / UDP(sport=53, dport=5353)
        / DNS(
            qr=1,
            qd=DNSQR(qname="a.example.com"),
            an=DNSRR(rrname="a.example.com", type="CNAME", rdata="b.example.com")
            / DNSRR(rrname="b.example.com", rdata="203.0.113.9"),
        ),
        IP(src=c4, dst=s4) / ICMP(type=8, id=77) / Raw(b"ping"),
        IP(src=c4, dst=s4) / ICMP(type=3, code=3) / IP(src=s4, dst=c4) / UDP(sport=1, dport=2),
        IP(src=c4, dst=s4) / GRE() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(),
        IP(src=c4, dst=s4, proto=50) / Raw(b"\x00\x00\x10\x00" + b"\x00" * 20),
        IP(src=c4, dst=s4, proto=4) / IP(src=c4, dst=s4) / UDP(),
        IPv6(src=c6, dst=s6) / TCP(sport=40000, dport=3333, flags="PA", seq=1000) / Raw(subscribe),
        IPv6(src=c6, dst=s6) / TCP(sport=40000, dport=22, flags="S", options=opts),
        IPv6(src=c6, dst=s6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / UDP(dport=53),
        IPv6(src=c6, dst=s6) / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=2, flags="PA") / Raw(banner),
        IPv6(src=c6, dst=s6) / ICMPv6EchoRequest(id=5, data=b"abc"),
        IPv6(src=c6, dst=s6, nh=59),
        IPv6(src=c6, dst=s6, nh=51) / Raw(b"\x06\x04\x00\x00" + b"\x00" * 20),
    ]
    packets = [bytes(p) for p in built]
    frags: list[list[bytes]] = []
    for size in (8, 24, 520):
        big = IP(src=c4, dst=s4, id=4242) / TCP(sport=40010, dport=3333, flags="PA") / Raw(subscribe * 6)
        frags.append([bytes(f) for f in fragment(big, fragsize=size)])  # type: ignore[no-untyped-call]
    big6 = IPv6(src=c6, dst=s6) / IPv6ExtHdrFragment(id=77) / TCP(sport=40011, dport=22, flags="PA") / Raw(banner * 60)
    frags.append([bytes(f) for f in fragment6(big6, 1280)])  # type: ignore[no-untyped-call]
    for group in frags:
        packets.extend(group)
    return Seeds(packets, frags)


# ======================================================================= protocol grammars

# --- SSH ---------------------------------------------------------------------------------

_SSH_SOFT: Final = (
    b"OpenSSH_9.2p1 Debian-2+deb12u3",
    b"OpenSSH_8.9p1 Ubuntu-3ubuntu0.6",
    b"dropbear_2022.83",
    b"Go",
    b"paramiko_3.4.0",
    b"libssh_0.10.6",
    b"PuTTY_Release_0.80",
    b"",
)
_SSH_VERSIONS: Final = (
    b"2.0", b"2.0", b"2.0", b"1.99", b"1.5", b"3.0", b"2", b"2.", b".0", b"-1.0", b"+2.0", b" 2.0",
    b"99999999999.0", b"2.0\x00", b"x.y", b"1.99 ", b"0.0",
)  # fmt: skip
_KEX_NAMES: Final = (
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"diffie-hellman-group14-sha256",
    b"diffie-hellman-group-exchange-sha256",
    b"sntrup761x25519-sha512@openssh.com",
    b"mlkem768x25519-sha256",
    b"rsa2048-sha256",
    b"gss-gex-sha1-toWM5Slw5Ew8Mqkay+al2g==",
    b"ext-info-c",
    b"ext-info-s",
    b"kex-strict-c-v00@openssh.com",
    b"kex-strict-s-v00@openssh.com",
    b"kexguess2@matt.ucc.asn.au",
    b"unknown-kex@example.org",
)
_ALG_NAMES: Final = (
    b"aes128-ctr",
    b"chacha20-poly1305@openssh.com",
    b"aes256-gcm@openssh.com",
    b"hmac-sha2-256",
    b"umac-64-etm@openssh.com",
    b"none",
    b"zlib@openssh.com",
    b"ssh-ed25519",
    b"rsa-sha2-512",
)


def _name_list(rng: random.Random, pool: Sequence[bytes]) -> bytes:
    r = rng.random()
    if r < 0.05:
        return b""
    if r < 0.08:
        return b"," * rng.randint(1, 4)
    if r < 0.1:
        return rand_text(rng, rng.choice((300, 1000)))
    return b",".join(rng.sample(list(pool), rng.randint(1, min(6, len(pool)))))


def _ssh_string(rng: random.Random, data: bytes) -> bytes:
    n = len(data)
    if rng.random() < 0.03:
        n = rng.choice((n + 1, n - 1 if n else 0, 0xFFFFFFFF, 0x7FFFFFFF))
    return struct.pack("!I", n & 0xFFFFFFFF) + data


def ssh_packet(rng: random.Random, payload: bytes) -> bytes:
    pad = 8 - (5 + len(payload)) % 8
    if pad < 4:
        pad += 8
    plen = 1 + len(payload) + pad
    if rng.random() < 0.04:
        plen = rng.choice((0, 1, 4, 5, plen - 1, plen + 1, 256 * 1024, 256 * 1024 + 1, 0xFFFFFFFF))
    if rng.random() < 0.03:
        pad = rng.choice((0, 255, plen & 0xFF))
    return struct.pack("!IB", plen & 0xFFFFFFFF, pad & 0xFF) + payload + rand_bytes(rng, pad)


def ssh_kexinit(rng: random.Random) -> bytes:
    lists = [_name_list(rng, _KEX_NAMES)] + [_name_list(rng, _ALG_NAMES) for _ in range(9)]
    if rng.random() < 0.05:
        lists = lists[: rng.randrange(10)]
    body = b"".join(_ssh_string(rng, x) for x in lists)
    return b"\x14" + rand_bytes(rng, 16) + body + bytes([rng.randrange(2)]) + b"\x00" * 4


def ssh_banner(rng: random.Random) -> bytes:
    line = b"SSH-" + rng.choice(_SSH_VERSIONS) + b"-" + rng.choice(_SSH_SOFT)
    r = rng.random()
    if r < 0.1:
        line += b" " + rand_text(rng, rng.randint(1, 40))
    elif r < 0.15:
        line += b"A" * rng.choice((200, 250, 256, 300, 8000, 8200))
    elif r < 0.22:
        line = mutate(rng, line, 1, (b"\r", b"\x00", b"\n", b"SSH-", b" "))
    return line + rng.choice((b"\r\n", b"\r\n", b"\n", b"\r\r\n", b"", b"\r", b"\n\r"))


def ssh_pre_lines(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.7:
        return b""
    if r < 0.92:
        return b"".join(
            rand_text(rng, rng.randint(0, 40)) + rng.choice((b"\r\n", b"\n")) for _ in range(rng.randint(1, 5))
        )
    if r < 0.96:
        return b"x\r\n" * rng.choice((1023, 1024, 1025))
    return rng.choice((b"SSH-\r\n", b"SSH-1\n", b"a\rb\r\n", b"\x00\n"))


def ssh_side(rng: random.Random, server: bool) -> bytes:
    out = ssh_pre_lines(rng) if server or rng.random() < 0.1 else b""
    banner = ssh_banner(rng)
    out += banner
    if banner.startswith(b"SSH-1.") and not banner.startswith(b"SSH-1.99") and rng.random() < 0.7:
        body = bytes([2 if server else 3]) + rand_bytes(rng, rng.randint(0, 40))
        n = len(body) + 4
        return out + struct.pack("!I", n) + rand_bytes(rng, 8 - n % 8) + body + rand_bytes(rng, 4)
    if rng.random() < 0.15:
        out += ssh_packet(rng, bytes([rng.choice((2, 3, 4))]) + rand_bytes(rng, rng.randint(0, 20)))
    if rng.random() < 0.9:
        out += ssh_packet(rng, ssh_kexinit(rng))
    if rng.random() < 0.7:
        msg = rng.choice((31, 33, 32) if server else (30, 32, 34)) if rng.random() < 0.8 else rng.randrange(256)
        out += ssh_packet(rng, bytes([msg]) + rand_bytes(rng, rng.randint(0, 64)))
    return out


def ssh_pair(rng: random.Random) -> tuple[bytes, bytes]:
    scenario = rng.randrange(7)
    if scenario == 0:
        return ssh_side(rng, False), ssh_side(rng, True)
    if scenario == 1:
        return ssh_side(rng, True), ssh_side(rng, False)  # reverse tunnel: the originator serves
    if scenario == 2:
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ssh_side(rng, True)
    if scenario == 3:
        return (ssh_side(rng, False), b"") if rng.random() < 0.5 else (b"", ssh_side(rng, True))
    if scenario == 4:
        return ssh_pre_lines(rng) + rand_text(rng, 30), ssh_pre_lines(rng)
    return mutate(rng, ssh_side(rng, False)), mutate(rng, ssh_side(rng, True))


# --- JSON-RPC / Stratum / HTTP ------------------------------------------------------------

_METHODS: Final = (
    "mining.subscribe", "mining.authorize", "mining.configure", "mining.extranonce.subscribe",
    "mining.suggest_target", "mining.suggest_difficulty", "mining.submit", "mining.get_transactions",
    "mining.multi_version", "mining.capabilities", "mining.hello", "mining.notify", "mining.set_difficulty",
    "mining.set_target", "mining.set_extranonce", "mining.set_version_mask", "mining.set_goal", "mining.foo",
    "eth_submitLogin", "eth_getWork", "eth_submitWork", "eth_submitHashrate", "eth_blockNumber", "login",
    "submit", "keepalived", "getjob", "job", "getwork", "getblocktemplate", "textDocument/didOpen",
    "MINING.SUBSCRIBE", "", "mining.", "ｍining.subscribe",
)  # fmt: skip
_WEIRD_STRINGS: Final = (
    "", "\u0000", "\ud800", "\U0001f600", "\u202e", "a" * 300, "EthereumStratum/1.0.0", "0x" + "0" * 64,
    "0x0000" + "f" * 60, "\\", '"', "\n",
)  # fmt: skip
_NUMBERS: Final = (0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**400, 1.5, -0.0, 1e308)


def json_value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 4 or r < 0.35:
        pick = rng.randrange(5)
        if pick == 0:
            return rng.choice(_WEIRD_STRINGS + _METHODS)
        if pick == 1:
            return rng.choice(_NUMBERS)
        if pick == 2:
            return rng.choice((True, False, None))
        if pick == 3:
            return rand_text(rng, rng.randint(0, 20)).decode()
        return "0x" + rand_bytes(rng, 32).hex()
    if r < 0.7:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ("id", "method", "params", "result", "error", "login", "pass", "agent", "job", "blob", "target",
            "job_id", "nonce", "midstate", "data", "previousblockhash", "coinbasevalue", "worker", "x")  # fmt: skip
    return {rng.choice(keys): json_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def stratum_object(rng: random.Random) -> object:
    method = rng.choice(_METHODS)
    r = rng.random()
    if r < 0.1:
        return json_value(rng)
    msg: dict[str, object] = {"id": rng.choice((1, 2, "a", None, 10**30))}
    if r < 0.55:
        msg["method"] = method if rng.random() < 0.95 else rng.choice((1, None, ["mining.subscribe"], {}))
        if method in ("login", "submit") and rng.random() < 0.7:
            msg["params"] = {
                "login": rng.choice(("4AdUndXHHZ6c" + "x" * 80, 5, "")),
                "pass": "x",
                "agent": "XMRig/6.21.0",
                "job_id": "1",
                "nonce": "00",
                "result": "ff",
            }
        else:
            msg["params"] = [json_value(rng) for _ in range(rng.randint(0, 4))]
            if method == "mining.subscribe" and rng.random() < 0.4:
                msg["params"] = ["miner/1.0", "EthereumStratum/1.0.0"]
        if rng.random() < 0.2:
            msg["worker"] = rng.choice(("rig1", "", 5))
    else:
        results: tuple[object, ...] = (
            [[["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"], ["mining.set_difficulty", "b4"]], "08000002", 4],
            [["mining.notify", "1"], "08000002", 4],
            {"job": {"blob": "0707" + "00" * 70, "target": "b88d0600", "job_id": "1"}, "status": "OK"},
            {"blob": "00", "target": "ff"},
            {"midstate": "00" * 32, "data": "00" * 128},
            {"previousblockhash": "00" * 32, "coinbasevalue": 625000000},
            ["0x" + "ab" * 32, "0x" + "cd" * 32, "0x0000" + "ff" * 30],
            True,
            json_value(rng),
        )
        msg["result"] = rng.choice(results)
        msg["error"] = None
    if rng.random() < 0.1:
        msg["jsonrpc"] = "2.0"
    items = list(msg.items())
    rng.shuffle(items)
    return dict(items)


def json_text(rng: random.Random, obj: object) -> str:
    try:
        text = json.dumps(
            obj,
            indent=rng.choice((None, None, None, 0, 2, "\t")),
            ensure_ascii=rng.random() < 0.5,
            separators=rng.choice(((",", ":"), (", ", ": "), (" , ", " : "))),
        )
    except (ValueError, OverflowError):
        text = "{}"
    if rng.random() < 0.2 and '"mining.' in text:
        # "m\u0069ning.subscribe": what a miner writes to slip past a byte-pattern filter.
        text = text.replace('"mining.', '"m\\u0069ning.', 1)
    return text


def stratum_stream(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.04:
        depth = rng.choice((50, 999, 1000, 5000, 20000))
        return (rng.choice(("[", '{"a":')) * depth).encode()[:8300]
    if r < 0.07:
        return rand_bytes(rng, rng.randint(0, 64))
    parts = [json_text(rng, stratum_object(rng)) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.1:
        parts = ["[" + ",".join(parts) + "]"]
    sep = rng.choice(("\n", "\n", "\r\n", "", " ", "\n\n"))
    text = sep.join(parts) + rng.choice(("\n", "\n", "", " "))
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.05:
        data = b" \t\r\n" * rng.randint(1, 3000) + data
    return data


_HTTP_NUMBERS: Final = (b"0", b"5", b"17", b"-1", b"+5", b"0x10", b"99999999999999999999", b"1 2", b"", b" 7")


def http_wrap(rng: random.Random, body: bytes, request: bool) -> bytes:
    if request:
        start = rng.choice((b"POST / HTTP/1.1", b"GET /work HTTP/1.0", b"PUT / HTTP/1.1", b"POST /", b"POST  HTTP/1.1"))
    else:
        start = rng.choice((b"HTTP/1.1 200 OK", b"HTTP/1.0 500 Error", b"HTTP/2 200", b"HTTP/1.1"))
    headers = [b"Host: 203.0.113.30:8332", b"Content-Type: application/json"]
    r = rng.random()
    if r < 0.5:
        headers.append(b"Content-Length: " + str(len(body)).encode())
    elif r < 0.6:
        size = rng.choice((*_HTTP_NUMBERS, b"9" * rng.choice((4300, 4301, 5000))))
        headers.append(b"Content-Length: " + size)
    elif r < 0.8:
        headers.append(b"Transfer-Encoding: chunked")
        body = (b"%x" % len(body)) + rng.choice((b"\r\n", b";ext=1\r\n", b"\n")) + body + b"\r\n0\r\n\r\n"
        if rng.random() < 0.2:
            body = rng.choice((b"zz\r\n", b"f" * 40 + b"\r\n", b"\r\n", b"-5\r\n")) + body
    extra = (
        b"X-Mining-Extensions: midstate rollntime",
        b"X-Mining-Hashrate: 1000",
        b"X-Stratum: stratum+tcp://x:3333",
        b"X-Long-Polling: /lp",
        b"X-Roll-NTime: expire=120",
        b"X-Is-P2pool: true",
        b"Broken header",
        b": empty",
    )
    for _ in range(rng.randint(0, 3)):
        headers.append(rng.choice(extra))
    rng.shuffle(headers)
    eol = rng.choice((b"\r\n", b"\r\n", b"\n"))
    return start + eol + eol.join(headers) + eol + eol + body


def stratum_pair(rng: random.Random) -> tuple[bytes, bytes]:
    fwd, rev = stratum_stream(rng), stratum_stream(rng)
    r = rng.random()
    if r < 0.25:
        fwd = http_wrap(rng, fwd, True)
        rev = http_wrap(rng, rev, False) if rng.random() < 0.7 else b""
    elif r < 0.35:
        fwd, rev = b"", rev
    if rng.random() < 0.3:
        fwd = mutate(rng, fwd, 0, (b"{", b"}", b"[", b"]", b'"', b"\\u", b"\n", b"\r\n\r\n", b":"))
    return fwd, rev


# --- proxies ------------------------------------------------------------------------------

_CONNECT_TARGETS: Final = (
    b"pool.example.org:3333", b"203.0.113.30:443", b"[2001:db8::1]:22", b"http://user@host.example:80/x",
    b"https://h.example/", b"host.example", b"[::1", b"[2001:db8::1]x", b":", b"host:99999999", b"host:-1",
    b"host:0", b"h\x00st:1", b"host:", b"[]:80", b"a:b:c", b"ftp://x:1/", b"%41:1", b"host:0065535",
)  # fmt: skip


def connect_request(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.6:
        target = rng.choice(_CONNECT_TARGETS[:6])  # well-formed ones
    else:
        target = rng.choice(_CONNECT_TARGETS) if r < 0.9 else rand_text(rng, rng.randint(0, 30))
    version = rng.choice((b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 extra", b""))
    middle = rng.choice((b" ", b" ", b"  ", b" junk "))
    line = b"CONNECT " + target + middle + version
    headers = [b"Host: " + target, b"User-Agent: curl/7.88.1"]
    if rng.random() < 0.3:
        headers.append(rng.choice((b"Proxy-Authorization: Basic dXNlcjpwYXNz", b"Proxy-Authorization:", b"nocolon")))
    eol = rng.choice((b"\r\n", b"\r\n", b"\n"))
    return line + eol + eol.join(headers) + eol + eol


def connect_reply(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.choice((0, 0, 0, 1, 2, 5))):
        out += b"HTTP/1.1 100 Continue\r\n\r\n"
    status = rng.choice((b"200", b"200", b"407", b"503", b"2x0", b"199", b"299", b"000"))
    out += b"HTTP/1.1 " + status + rng.choice((b" Connection established\r\n\r\n", b"\r\n\r\n", b"\n\n", b""))
    return out


def _socks_addr(rng: random.Random) -> bytes:
    atyp = rng.choice((1, 3, 4, 0, 2, 255)) if rng.random() < 0.2 else rng.choice((1, 3, 4))
    if atyp == 1:
        addr = bytes([203, 0, 113, 30])
    elif atyp == 4:
        addr = bytes.fromhex("20010db8000000000000000000000001")
    elif atyp == 3:
        name = rng.choice((b"pool.example.org", b"", b"a b", b"x" * 255, b"\x00"))
        n = len(name) if rng.random() < 0.9 else rng.randrange(256)
        addr = bytes([n & 0xFF]) + name
    else:
        addr = rand_bytes(rng, rng.randint(0, 6))
    return bytes([atyp]) + addr + struct.pack("!H", rng.choice((3333, 22, 443, 0)))


def socks5_pair(rng: random.Random) -> tuple[bytes, bytes]:
    methods = rng.choice((b"\x00", b"\x02", b"\x00\x02", b"\x01", b"\x00\x01\x02", b"\xff", b""))
    count = len(methods) if rng.random() < 0.9 else rng.randrange(256)
    fwd = b"\x05" + bytes([count]) + methods
    userpass = rng.random() < 0.4
    if userpass:
        user, pw = rand_text(rng, rng.randint(0, 10)), rand_text(rng, rng.randint(0, 10))
        fwd += b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw
    cmd = rng.choice((1, 1, 1, 2, 3, 0, 9))
    fwd += b"\x05" + bytes([cmd, rng.choice((0, 0, 0, 1))]) + _socks_addr(rng)
    rev = b"\x05" + (b"\x02" if userpass else rng.choice((b"\x00", b"\x00", b"\xff", b"\x01", b"\x07")))
    if userpass:
        rev += b"\x01" + rng.choice((b"\x00", b"\x00", b"\x01"))
    rev += b"\x05" + bytes([rng.choice((0, 0, 0, 1, 5))]) + b"\x00" + _socks_addr(rng)
    return fwd, rev


def socks4_pair(rng: random.Random) -> tuple[bytes, bytes]:
    ip = rng.choice((bytes([203, 0, 113, 30]), b"\x00\x00\x00\x01", b"\x00\x00\x00\x00"))
    user = rng.choice((b"", b"user", b"\x01bad", b"u" * 300))
    fwd = (
        b"\x04" + bytes([rng.choice((1, 1, 2, 3))]) + struct.pack("!H", rng.choice((3333, 0, 22))) + ip + user + b"\x00"
    )
    if ip[:3] == b"\x00\x00\x00":
        fwd += rng.choice((b"pool.example.org\x00", b"\x00", b"a b\x00", b"x" * 300 + b"\x00", b"nonul"))
    rev = rng.choice((b"\x00\x5a", b"\x00\x5b", b"\x04\x5a", b"\x01\x5a", b"\x00")) + rand_bytes(
        rng, rng.choice((0, 6, 6))
    )
    return fwd, rev


def proxy_pair(rng: random.Random) -> tuple[bytes, bytes]:
    kind = rng.randrange(3)
    if kind == 0:
        fwd, rev = connect_request(rng), connect_reply(rng)
    elif kind == 1:
        fwd, rev = socks5_pair(rng)
    else:
        fwd, rev = socks4_pair(rng)
    if rng.random() < 0.6:  # something tunnelled inside
        inner_f, inner_r = ssh_pair(rng) if rng.random() < 0.5 else stratum_pair(rng)
        fwd, rev = fwd + inner_f, rev + inner_r
    if rng.random() < 0.3:
        fwd = mutate(rng, fwd)
    if rng.random() < 0.2:
        rev = mutate(rng, rev)
    return fwd, rev


# --- TLS ClientHello ----------------------------------------------------------------------

_HOSTNAMES: Final = (
    b"pool.supportxmr.com", b"www.example.com", b"example.com.", b"EXAMPLE.COM", b"a" * 63 + b".com",
    b"a" * 64 + b".com", b"x." * 130, b"", b"*.example.com", b"exa mple.com", b"ex\x00ample.com",
    "bücher.example".encode(), b"a..b", b".", b"_srv.example.com", b"-a.example",
)  # fmt: skip


_TLS_LIES = [0.03]  # chance of each length lie; tls_client_hello sets it per message


def _lie(rng: random.Random, scale: float = 1.0) -> bool:
    return rng.random() < _TLS_LIES[0] * scale


def _tls_ext(rng: random.Random, etype: int, body: bytes) -> bytes:
    n = len(body) if not _lie(rng) else rng.choice((0, len(body) + 1, max(0, len(body) - 1), 0xFFFF))
    return struct.pack("!HH", etype, n & 0xFFFF) + body


def _u16_vec(rng: random.Random, body: bytes) -> bytes:
    n = len(body) if not _lie(rng) else rng.choice((len(body) + 1, max(0, len(body) - 1), 0xFFFF, 0))
    return struct.pack("!H", n & 0xFFFF) + body


def tls_extensions(rng: random.Random) -> bytes:
    exts: list[bytes] = []
    grease = rng.choice((0x0A0A, 0x1A1A, 0xFAFA))
    if rng.random() < 0.4:
        exts.append(_tls_ext(rng, grease, b""))
    if rng.random() < 0.85:
        entries = b""
        for _ in range(rng.choice((1, 1, 1, 2, 0))):
            name = rng.choice(_HOSTNAMES) if rng.random() < 0.9 else rand_bytes(rng, rng.randint(1, 40))
            entries += bytes([rng.choice((0, 0, 0, 1, 255))]) + _u16_vec(rng, name)
        exts.append(_tls_ext(rng, 0, _u16_vec(rng, entries)))
    if rng.random() < 0.6:
        protos = b"".join(bytes([len(p)]) + p for p in rng.sample([b"h2", b"http/1.1", b"\x00\xff", b"x" * 255], 2))
        if _lie(rng):
            protos += b"\x00"
        exts.append(_tls_ext(rng, 16, _u16_vec(rng, protos)))
    if rng.random() < 0.6:
        vers = b"".join(
            struct.pack("!H", v) for v in rng.sample([grease, 0x0304, 0x0303, 0x7F1C, 0xFB17, 0x0200, 0xFFFF], 3)
        )
        n = len(vers) if not _lie(rng) else rng.randrange(256)
        exts.append(_tls_ext(rng, 43, bytes([n]) + vers))
    if rng.random() < 0.5:
        exts.append(_tls_ext(rng, 10, _u16_vec(rng, struct.pack("!HHH", grease, 29, 23))))
    if rng.random() < 0.4:
        exts.append(_tls_ext(rng, 11, rng.choice((b"\x01\x00", b"\x03\x00\x01\x02", b"\x05\x00", b""))))
    if rng.random() < 0.2:
        exts.append(_tls_ext(rng, 0xFE0D, rand_bytes(rng, rng.randint(0, 40))))
    for _ in range(rng.randint(0, 3)):
        exts.append(_tls_ext(rng, rng.randrange(65536), rand_bytes(rng, rng.randint(0, 20))))
    if rng.random() < 0.1:
        exts.append(_tls_ext(rng, 21, b"\x00" * rng.choice((10, 500, 9000, 17000))))  # padding
    rng.shuffle(exts)
    return b"".join(exts)


def tls_client_hello(rng: random.Random) -> bytes:
    """A TLS record stream carrying one ClientHello (or the SSLv2-compatible form); half
    of them tell no lie at all, so that the parser's happy path is exercised in depth."""
    _TLS_LIES[0] = 0.0 if rng.random() < 0.5 else rng.choice((0.01, 0.03, 0.1))
    if rng.random() < 0.05:
        specs = rand_bytes(rng, 3 * rng.randint(0, 5))
        challenge = rand_bytes(rng, rng.choice((16, 32, 15, 33)))
        sid = rng.choice((b"", b"s" * 16, b"s"))
        body = b"\x01\x03" + bytes([rng.choice((1, 3, 4))]) + struct.pack("!HHH", len(specs), len(sid), len(challenge))
        body += specs + sid + challenge
        n = len(body) if rng.random() < 0.9 else rng.randrange(0x8000)
        return struct.pack("!H", 0x8000 | n) + body
    legacy = rng.choice((0x0303, 0x0303, 0x0301, 0x0300, 0x0304)) if not _lie(rng, 3) else rng.choice((0x0200, 0x0305))
    sid = rand_bytes(rng, rng.choice((0, 32, 32, 33) if _lie(rng, 3) else (0, 32)))
    ciphers = b"".join(
        struct.pack("!H", c) for c in rng.sample([0x1301, 0x1302, 0xC02F, 0x0A0A, 0x009C, 0x00FF], rng.randint(1, 6))
    )
    if _lie(rng):
        ciphers += b"\x01"
    comp = rng.choice((b"\x01\x00", b"\x00", b"\x02\x00\x01") if _lie(rng, 3) else (b"\x01\x00", b"\x02\x00\x01"))
    body = struct.pack("!H", legacy) + rand_bytes(rng, 32) + bytes([len(sid)]) + sid + _u16_vec(rng, ciphers) + comp
    if rng.random() < 0.95:
        body += _u16_vec(rng, tls_extensions(rng))
    n = len(body) if not _lie(rng) else rng.choice((0, len(body) + 1, len(body) - 1, 0xFFFFFF, 41))
    msg = bytes([1 if not _lie(rng) else rng.choice((2, 0))]) + (n & 0xFFFFFF).to_bytes(3, "big") + body
    # The handshake message in 1..4 records (a ClientHello may span records).
    pieces: list[bytes] = []
    rest = msg
    while rest:
        size = len(rest) if rng.random() < 0.7 else rng.randint(1, max(1, len(rest)))
        pieces.append(rest[:size])
        rest = rest[size:]
    out = b""
    for piece in pieces[:8]:
        ctype = 22 if not _lie(rng) else rng.choice((20, 21, 23, 0))
        minor = rng.choice((1, 1, 3, 3, 0, 4)) if not _lie(rng) else rng.choice((5, 0xFF))
        rlen = len(piece) if not _lie(rng) else rng.choice((0, len(piece) + 1, 16385, 0xFFFF))
        out += struct.pack("!BBBH", ctype, 3, minor, rlen) + piece
    return out


# --- DNS ----------------------------------------------------------------------------------


class _DnsWriter:
    """Builds a DNS message with names that point at earlier ones (and hostile pointers)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.buf = bytearray()
        self.names: list[int] = []  # offsets where a name was written

    def name(self, labels: Sequence[bytes]) -> None:
        rng = self.rng
        start = len(self.buf)
        for i, label in enumerate(labels):
            if self.names and rng.random() < 0.15:
                target = rng.choice(self.names) + (rng.randint(-2, 2) if rng.random() < 0.1 else 0)
                if rng.random() < 0.03:
                    target = rng.choice((len(self.buf), len(self.buf) + 2, 0x3FFF, 0))  # self/forward/header
                self.buf += struct.pack("!H", 0xC000 | (max(0, target) & 0x3FFF))
                if i == 0:
                    return
                self.names.append(start)
                return
            n = len(label)
            if rng.random() < 0.02:
                n = rng.choice((0x40 | 1, 0x80 | 1, 63, 64, 255))
            self.buf += bytes([n & 0xFF]) + label
        self.buf += b"\x00"
        self.names.append(start)

    def u16(self, *values: int) -> None:
        for v in values:
            self.buf += struct.pack("!H", v & 0xFFFF)


_DNS_LABELS: Final = (
    b"pool", b"minexmr", b"com", b"example", b"www", b"a", b"b", b"xn--bcher-kva", b"x" * 63, b"\x00\xff",
    b"a.b", b"A", b"_tcp", b"\\", b"aGVsbG8gd29ybGQgdGhpcyBpcyBhIHR1bm5lbA", b"local",
)  # fmt: skip


def dns_labels(rng: random.Random) -> list[bytes]:
    r = rng.random()
    if r < 0.05:
        return [b"x" * 63] * rng.choice((3, 4, 5))  # past 255 bytes
    if r < 0.08:
        return [b"a"] * rng.choice((127, 128))
    return [rng.choice(_DNS_LABELS) for _ in range(rng.randint(0, 5))]


def dns_message(rng: random.Random) -> bytes:
    w = _DnsWriter(rng)
    qr = rng.random() < 0.5
    opcode = rng.choice((0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 15))
    flags = (
        (0x8000 if qr else 0) | (opcode << 11) | rng.choice((0, 0x0100, 0x0200, 0x0180)) | rng.choice((0, 0, 3, 2, 15))
    )
    nq = rng.choice((1, 1, 1, 0, 2))
    records: list[tuple[int, int]] = []
    n_rr = rng.choice((0, 1, 2, 3, 6)) if qr else rng.choice((0, 0, 1))
    for _ in range(n_rr):
        records.append(
            (rng.choice((1, 1, 28, 5, 5, 2, 12, 39, 16, 41, 6, 10, 255, 99)), rng.choice((1, 1, 1, 0x8001, 3, 255)))
        )
    counts = [nq, len(records), 0, 0]
    if rng.random() < 0.2 and records:
        counts[1], counts[2], counts[3] = max(0, len(records) - 2), min(1, len(records)), 1
    lie = rng.random() < 0.05
    header_counts = [c if not lie else rng.choice((c, c + 1, 0xFFFF, 0)) for c in counts]
    w.u16(rng.randrange(65536), flags, *header_counts)
    qnames: list[list[bytes]] = []
    for _ in range(nq):
        labels = dns_labels(rng)
        qnames.append(labels)
        w.name(labels)
        w.u16(rng.choice((1, 28, 5, 16, 10, 255, 65, 0)), rng.choice((1, 1, 0x8001, 3)))
    chain = list(qnames[0]) if qnames else [b"a"]
    for rtype, rclass in records:
        w.name(chain if rng.random() < 0.8 else dns_labels(rng))
        w.u16(rtype, rclass)
        w.buf += struct.pack("!I", rng.choice((300, 0, 0x80000000, 0xFFFFFFFF, 60)))
        if rtype in (5, 2, 12, 39):
            target = dns_labels(rng)
            inner = _DnsWriter(rng)
            inner.buf = bytearray(w.buf) + b"\x00\x00"
            inner.names = list(w.names)
            inner.name(target)
            rdata = bytes(inner.buf[len(w.buf) + 2 :])
            w.names = inner.names
            if rtype == 5:
                chain = target if rng.random() < 0.8 else qnames[0] if qnames else target  # chains and cycles
        elif rtype == 1:
            rdata = bytes([203, 0, 113, rng.randrange(256)]) if rng.random() < 0.9 else b"\x01\x02\x03"
        elif rtype == 28:
            rdata = bytes.fromhex("20010db8000000000000000000000009") if rng.random() < 0.9 else b"\x00" * 4
        else:
            rdata = rand_bytes(rng, rng.randint(0, 30))
        n = len(rdata) if rng.random() < 0.95 else rng.choice((0, len(rdata) + 1, 0xFFFF))
        w.u16(n)
        w.buf += rdata
    out = bytes(w.buf)
    if rng.random() < 0.1:
        out += rand_bytes(rng, rng.randint(1, 10))  # trailing padding some stacks add
    return out


def dns_bomb(rng: random.Random) -> bytes:
    """The decompression bomb: thousands of records pointing at one long name."""
    w = _DnsWriter(rng)
    n = rng.choice((500, 2000, 5000))
    w.u16(1, 0x8180, 1, n, 0, 0)
    w.buf += b"\x01a" * 127 + b"\x00"
    w.u16(16, 1)
    for _ in range(n):
        w.buf += b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 60, 0)
    return bytes(w.buf)


def dns_tcp_stream(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.choice((1, 1, 2, 3, 70))):
        msg = dns_message(rng)
        n = len(msg) if rng.random() < 0.93 else rng.choice((0, len(msg) + 1, max(0, len(msg) - 1), 11, 0xFFFF))
        out += struct.pack("!H", n & 0xFFFF) + msg
    return out


# ================================================================================ the targets


def _log_safe(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise Violation(f"{what} is {type(text).__name__}, not str")
    if len(text) > EVIDENCE_MAX or not text.isascii() or not text.isprintable():
        raise Violation(f"{what} is not short printable ASCII: {text[:200]!r} ({len(text)} chars)")


def check_result(r: object, fwd: bytes, rev: bytes) -> None:
    """The detector contract: NEED_MORE, NOT_THIS or a Detection that is safe to log."""
    if r is NEED_MORE or r is NOT_THIS:
        return
    if not isinstance(r, Detection):
        raise Violation(f"detector returned {r!r}")
    _log_safe(r.kind, "kind")
    _log_safe(r.evidence, "evidence")
    if not isinstance(r.info, dict):
        raise Violation(f"info is {type(r.info).__name__}")
    for k, v in r.info.items():
        _log_safe(k, "info key")
        _log_safe(v, f"info[{k!r}]")
    if not -1 <= r.inner_fwd <= len(fwd) or not -1 <= r.inner_rev <= len(rev):
        raise Violation(f"inner offsets ({r.inner_fwd}, {r.inner_rev}) outside the heads ({len(fwd)}, {len(rev)})")


def _ctx(rng: random.Random, final: bool = False) -> StreamContext:
    def flag() -> bool:
        return final or rng.random() < 0.1

    return StreamContext(
        rng.choice((*SERVER_PORTS, 40000, 51234)), rng.choice(SERVER_PORTS), flag(), flag(), flag(), flag()
    )


class Target(ABC, Generic[T]):
    """One parser under test. ``generate`` makes the next input, ``check`` runs it and
    raises on any broken contract, ``show`` renders an input for a failure report."""

    name: str = ""
    weight: float = 1.0

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        self.seeds = seeds
        self.rng = rng

    @abstractmethod
    def generate(self, rng: random.Random) -> T: ...

    @abstractmethod
    def check(self, x: T) -> None: ...

    def show(self, x: T) -> str:
        return repr(x)

    def bounds(self) -> str:
        return ""

    def measures(self) -> dict[str, float]:
        """Numbers the run reached (bounds hit, detections made), for tests to assert on."""
        return {}


def _hex(data: bytes) -> str:
    h = data.hex()
    return h if len(h) <= MAX_SHOWN else h[:MAX_SHOWN] + f"... ({len(data)} bytes)"


# --- packet.decode ------------------------------------------------------------------------


class PacketTarget(Target[bytes]):
    """``decode`` never raises; a Packet's fields are within what the bytes can say."""

    name = "packet"
    weight = 16.0

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        # Truncation of every seed at every offset, interleaved with the random inputs.
        self.sweep: Iterator[bytes] = (p[:i] for p in seeds.packets for i in range(len(p) + 1))
        self.decoded = 0
        self.malformed = 0

    def generate(self, rng: random.Random) -> bytes:
        if rng.random() < 0.25:
            nxt = next(self.sweep, None)
            if nxt is not None:
                return nxt
        seed = rng.choice(self.seeds.packets)
        r = rng.random()
        if r < 0.45:
            return lie_ip(rng, seed)
        if r < 0.85:
            return mutate(rng, seed)
        if r < 0.95:
            return mutate(rng, lie_ip(rng, seed)) + (rng.choice(self.seeds.packets) if rng.random() < 0.2 else b"")
        return bytes([rng.choice((0x45, 0x46, 0x4F, 0x60, 0x00))]) + rand_bytes(rng, rng.randint(0, 80))

    def check(self, x: bytes) -> None:
        p = decode(x)
        if type(p) is Malformed:
            if not isinstance(p.reason, str) or not p.reason:
                raise Violation("Malformed without a reason")
            self.malformed += 1
            return
        if type(p) is not Packet:
            raise Violation(f"decode returned {type(p).__name__}")
        alen = 4 if p.version == 4 else 16 if p.version == 6 else -1
        if len(p.src) != alen or len(p.dst) != alen:
            raise Violation(f"address lengths {len(p.src)}/{len(p.dst)} for IPv{p.version}")
        if not isinstance(p.payload, bytes) or len(p.payload) > len(x):
            raise Violation("payload longer than the packet")
        if not (0 <= p.sport <= 0xFFFF and 0 <= p.dport <= 0xFFFF and 0 <= p.proto <= 0xFF):
            raise Violation("port or protocol out of range")
        if p.frag_offset < 0 or p.frag_offset % 8:
            raise Violation(f"fragment offset {p.frag_offset}")
        self.decoded += 1

    def show(self, x: bytes) -> str:
        return _hex(x)

    def bounds(self) -> str:
        return f"{self.decoded} decoded, {self.malformed} malformed"

    def measures(self) -> dict[str, float]:
        return {"decoded": self.decoded, "malformed": self.malformed}


# --- stream.StreamHead --------------------------------------------------------------------


@dataclass
class _StreamCase:
    """One ``add`` on the current head, with the head's history for the failure report."""

    seq: int
    payload: bytes
    truncated: bool
    consistent: bool  # the payload is the sender's true bytes at its offset
    history: list[tuple[int, bytes, bool]]


class StreamTarget(Target[_StreamCase]):
    """Bounded memory and first-copy-wins, whatever order, overlap or sequence wrap."""

    name = "stream"
    weight = 12.0

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        self.head = StreamHead(64)
        self.left = 0
        self.true = b""
        self.pre = 0  # bytes of ``true`` before the ISN
        self.isn = 0
        self.origin: int | None = 0  # stream offset of the head's byte 0 (None: set by the first add)
        self.clean = True  # only consistent segments so far
        self.history: list[tuple[int, bytes, bool]] = []
        self.started: int | None = None
        self.max_data = 0
        self.max_pending = 0

    def _new_head(self, rng: random.Random) -> None:
        limit = rng.choice((64, 100, 1024, 8192, rng.randint(1, 9000)))
        self.head = StreamHead(limit)
        self.left = rng.choice((1, 4, 16, 64, 200))
        self.pre = rng.choice((0, 16, 3000))
        self.true = rand_bytes(rng, self.pre + limit + rng.choice((0, 10, limit)))
        self.isn = rng.choice((rng.getrandbits(32), 0xFFFFFFFF - rng.randrange(64), 0, 1 << 31))
        self.history = []
        self.clean = True
        if rng.random() < 0.7:
            self.head.start(self.isn)
            self.started = self.isn
            self.origin = 0
        else:
            self.started = None
            self.origin = None

    def generate(self, rng: random.Random) -> _StreamCase:
        if self.left <= 0:
            self._new_head(rng)
        self.left -= 1
        limit = self.head.limit
        span = len(self.true) - self.pre
        r = rng.random()
        if r < 0.05:
            off = rng.choice((-(1 << 31), 1 << 31, (1 << 31) - 1, span + 1, -self.pre - 5))
        elif r < 0.15:
            off = rng.randint(-self.pre, 0)
        else:
            off = rng.randint(0, max(0, span - 1)) if rng.random() < 0.6 else rng.randint(0, min(span, limit) // 2)
        size = rng.choice((1, 2, 7, 100, 536, 1460, 9000, rng.randint(1, max(1, limit))))
        lo = self.pre + off
        payload = self.true[lo : lo + size] if 0 <= lo < len(self.true) else b""
        consistent = bool(payload) and lo >= 0
        if not payload or rng.random() < 0.08:
            payload = rand_bytes(rng, rng.randint(0, 40)) if not payload else mutate(rng, payload, 1)
            consistent = False
        truncated = rng.random() < 0.05
        seq = (self.isn + off) % (1 << 32) if rng.random() < 0.98 else rng.getrandbits(32)
        if seq != (self.isn + off) % (1 << 32):
            consistent = False
        return _StreamCase(seq, payload, truncated, consistent, self.history)

    def check(self, x: _StreamCase) -> None:
        h = self.head
        if self.origin is None and h.isn < 0 and x.consistent:
            self.origin = (x.seq - self.isn) % (1 << 32)
            if self.origin >= 1 << 31:
                self.origin -= 1 << 32
        elif self.origin is None and h.isn < 0:
            self.clean = False
        self.history.append((x.seq, x.payload, x.truncated))
        self.clean = self.clean and x.consistent
        stream_step(h, x.seq, x.payload, x.truncated)
        if self.clean and self.origin is not None:
            lo = self.pre + self.origin
            want = self.true[lo : lo + len(h.data)]
            if h.data != want:
                raise Violation("a consistent sender's bytes were reassembled wrongly")
            if h.inconsistent:
                raise Violation("inconsistent raised for consistent retransmissions")
        self.max_data = max(self.max_data, len(h.data))
        self.max_pending = max(self.max_pending, h.pending_bytes)

    def show(self, x: _StreamCase) -> str:
        start = self.started
        calls = minimize_stream(self.head.limit, start, x.history)
        note = "minimal reproduction" if calls != x.history else "history"
        lines = [f"{note}: h = StreamHead({self.head.limit})"]
        if start is not None:
            lines.append(f"h.start({start})")
        lines += [f"h.add({s}, bytes.fromhex({p.hex()!r}), {t})" for s, p, t in calls[-64:]]
        return "\n".join(lines)

    def bounds(self) -> str:
        return f"max head {self.max_data} B, max held {self.max_pending} B"

    def measures(self) -> dict[str, float]:
        return {"max_data": self.max_data, "max_pending": self.max_pending}


def stream_step(h: StreamHead, seq: int, payload: bytes, truncated: bool) -> None:
    """One ``add`` and the invariants that hold after any add, whatever was sent."""
    before, was_full = h.data, h.full
    got = h.add(seq, payload, truncated)
    if got not in (NOTHING, HELD, GREW):
        raise Violation(f"add returned {got!r}")
    if len(h.data) > h.limit:
        raise Violation(f"head holds {len(h.data)} bytes, limit {h.limit}")
    held = sum(len(seg) for seg, _ in h.pending.values())
    if held != h.pending_bytes:
        raise Violation(f"pending_bytes says {h.pending_bytes}, held segments are {held} bytes")
    if held > h.limit:
        raise Violation(f"{held} bytes held out of order, limit {h.limit}")
    if not h.data.startswith(before):
        raise Violation("bytes already in the head changed (first copy must win)")
    if was_full and h.data != before:
        raise Violation("a full head grew")
    if (got == GREW) != (len(h.data) > len(before)):
        raise Violation(f"add said {got} but the head went {len(before)} -> {len(h.data)} bytes")


def _stream_fails(limit: int, start: int | None, calls: Sequence[tuple[int, bytes, bool]]) -> str | None:
    h = StreamHead(limit)
    if start is not None:
        h.start(start)
    try:
        for seq, payload, truncated in calls:
            stream_step(h, seq, payload, truncated)
    except Violation as v:
        return re.sub(r"\d+", "N", str(v))
    return None


def minimize_stream(
    limit: int, start: int | None, calls: list[tuple[int, bytes, bool]]
) -> list[tuple[int, bytes, bool]]:
    """Delta debugging (ddmin) over the adds: the shortest sequence that still breaks the
    same invariant, so the report is a few lines a person can turn into a unit test."""
    want = _stream_fails(limit, start, calls)
    if want is None:
        return calls
    n = 2
    while len(calls) >= 2:
        chunk = max(1, len(calls) // n)
        for i in range(0, len(calls), chunk):
            rest = calls[:i] + calls[i + chunk :]
            if _stream_fails(limit, start, rest) == want:
                calls = rest
                n = max(n - 1, 2)
                break
        else:
            if chunk == 1:
                break
            n = min(len(calls), n * 2)
    return calls


# --- defrag.Reassembler -------------------------------------------------------------------


@dataclass
class _FragCase:
    raw: bytes
    ts: float
    clean_key: tuple[bytes, bytes, int, int] | None  # set for fragments of a clean datagram
    original: bytes  # the clean datagram's transport bytes


class DefragTarget(Target[_FragCase]):
    """Bounded datagrams and bytes; a clean datagram comes back byte for byte."""

    name = "defrag"
    weight = 8.0

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        self.re = defrag.Reassembler()
        self.queue: list[_FragCase] = []
        self.ts = 1000.0
        self.clean_id = 0
        self.max_dgrams = 0
        self.max_bytes = 0
        self.completed = 0

    def _datagram(self, rng: random.Random, size: int = 0) -> tuple[bytes, bool]:
        v6 = rng.random() < 0.3
        src = rng.choice(CLIENTS6 if v6 else CLIENTS4)
        dst = rng.choice(SERVERS6 if v6 else SERVERS4)
        size = size or rng.choice((30, 200, 1400, 4000, 9000, 30000, 65000 - 60))
        if rng.random() < 0.5:
            payload = tcp(rng.randrange(65536), rng.choice(SERVER_PORTS), 1, 1, 0x18, rand_bytes(rng, size))
            proto = 6
        else:
            payload = udp(rng.randrange(65536), 53, rand_bytes(rng, size))
            proto = 17
        return ip_packet(v6, src, dst, proto, payload), v6

    def _refill(self, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.04:
            # Hoarding: first fragments of many large datagrams that never complete, until
            # the datagram and byte bounds must evict.
            self.queue = []
            for _ in range(rng.choice((100, 300, 1100))):
                raw, _v6 = self._datagram(rng, 9000)
                first = fragment_ip(rng, raw, 40000 + rng.randrange(1 << 15), [rng.choice((1480, 4000, 8000))])[0]
                self.queue.append(_FragCase(first, 0.0, None, b""))
            return
        if r < 0.1:  # a seed datagram's real fragments, mutated
            group = [mutate(rng, f) if rng.random() < 0.3 else f for f in rng.choice(self.seeds.fragments)]
            rng.shuffle(group)
            self.queue = [_FragCase(f, 0.0, None, b"") for f in group]
            return
        raw, v6 = self._datagram(rng)
        clean = r < 0.45
        if clean:
            self.clean_id += 1
            ident = self.clean_id % 32768 if not v6 else self.clean_id
        else:
            ident = 32768 + rng.randrange(64)
        sizes = [rng.choice((8, 16, 64, 1280, 1480, 8000))] * 100 if rng.random() < 0.5 else []
        frags = fragment_ip(rng, raw, ident, sizes)
        if len(frags) > 120:  # stay under MAX_FRAGS when clean; the bound itself is fuzzed below
            frags = fragment_ip(rng, raw, ident, [8000] * 100)
        if clean:
            if rng.random() < 0.5:
                rng.shuffle(frags)
            if rng.random() < 0.2:
                frags.append(rng.choice(frags))  # an identical duplicate changes nothing
        else:
            op = rng.randrange(6)
            if op == 0:
                frags = frags[:-1] if len(frags) > 1 else frags  # never completes: held until evicted
            elif op == 1 and len(frags) > 1:
                i = rng.randrange(len(frags))
                frags.insert(i, mutate(rng, frags[i], 1))  # overlap with different bytes
            elif op == 2:
                frags = [lie_ip(rng, f) if rng.random() < 0.3 else f for f in frags]
            elif op == 3:
                frags = [mutate(rng, f) if rng.random() < 0.2 else f for f in frags]
            elif op == 4:
                frags = frags * 2
            else:
                rng.shuffle(frags)
        key: tuple[bytes, bytes, int, int] | None = None
        original = b""
        if clean:
            p = decode(frags[0])
            if type(p) is Packet:
                key = (p.src, p.dst, p.frag_id, p.proto)
                original = raw[40:] if v6 else raw[20:]
        self.queue = [_FragCase(f, 0.0, key, original) for f in frags]

    def generate(self, rng: random.Random) -> _FragCase:
        if not self.queue:
            self._refill(rng)
            self.queue.reverse()
        case = self.queue.pop()
        self.ts += rng.choice((0.0, 0.0001, 0.001)) if rng.random() < 0.999 else defrag.TIMEOUT + 1
        case.ts = self.ts
        return case

    def check(self, x: _FragCase) -> None:
        p = decode(x.raw)
        if type(p) is not Packet or not (p.frag_offset or p.more_frags):
            return  # the engine only hands fragments to the reassembler
        got = self.re.add(x.raw, p, x.ts)
        ra = self.re
        if len(ra.dgrams) > defrag.MAX_DATAGRAMS or ra.bytes > defrag.MAX_BYTES:
            raise Violation(f"{len(ra.dgrams)} datagrams / {ra.bytes} bytes held")
        sizes = 0
        for dg in ra.dgrams.values():
            n = sum(len(f) for f in dg.frags.values())
            if n != dg.size or len(dg.frags) > defrag.MAX_FRAGS:
                raise Violation(f"a datagram says {dg.size} bytes in {len(dg.frags)} fragments, holds {n}")
            sizes += n
        if sizes != ra.bytes:
            raise Violation(f"Reassembler.bytes says {ra.bytes}, datagrams hold {sizes}")
        self.max_dgrams = max(self.max_dgrams, len(ra.dgrams))
        self.max_bytes = max(self.max_bytes, ra.bytes)
        if got is None:
            return
        whole, overlap = got
        if not isinstance(whole, bytes) or not isinstance(overlap, bool):
            raise Violation(f"add returned {got!r:.80}")
        self.completed += 1
        key = (p.src, p.dst, p.frag_id, p.proto)
        if x.clean_key == key:
            q = decode(whole)
            if type(q) is not Packet or q.frag_offset or q.more_frags:
                raise Violation(f"a clean datagram reassembled to {q!r:.200}")
            hl = 40 if whole[0] >> 4 == 6 else (whole[0] & 0x0F) * 4
            if whole[hl:] != x.original or overlap:
                raise Violation("a clean datagram came back with different bytes")

    def show(self, x: _FragCase) -> str:
        return f"ts={x.ts} fragment {_hex(x.raw)}"

    def bounds(self) -> str:
        return (
            f"max {self.max_dgrams}/{defrag.MAX_DATAGRAMS} datagrams, max {self.max_bytes}/{defrag.MAX_BYTES} B, "
            f"{self.completed} completed, {self.re.evicted} evicted"
        )

    def measures(self) -> dict[str, float]:
        return {
            "max_datagrams": self.max_dgrams,
            "max_bytes": self.max_bytes,
            "completed": self.completed,
            "evicted": self.re.evicted,
        }


# --- stream detectors ---------------------------------------------------------------------


@dataclass
class _DetCase:
    fwd: bytes
    rev: bytes
    ctx: StreamContext


class DetectorTarget(Target[_DetCase]):
    """A stream detector fed growing prefixes of generated conversations, mutated ones, and
    every truncation of some: it must answer NEED_MORE / NOT_THIS / a log-safe Detection."""

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        self.queue: list[_DetCase] = []
        self.detections = 0

    def _refill(self, rng: random.Random) -> None:
        fwd, rev = self.pair(rng)
        r = rng.random()
        cases: list[_DetCase] = []
        if r < 0.03 and len(fwd) + len(rev) < 4000:
            step = max(1, len(fwd) // 600)
            cases = [_DetCase(fwd[:i], rev, _ctx(rng)) for i in range(0, len(fwd) + 1, step)]
            step = max(1, len(rev) // 300)
            cases += [_DetCase(fwd, rev[:i], _ctx(rng)) for i in range(0, len(rev) + 1, step)]
        elif r < 0.6:
            i = j = 0
            for _ in range(rng.randint(1, 5)):
                i = min(len(fwd), i + rng.randint(1, max(1, len(fwd) // 2)))
                j = min(len(rev), j + rng.randint(0, max(1, len(rev) // 2)))
                cases.append(_DetCase(fwd[:i], rev[:j], _ctx(rng)))
            cases.append(_DetCase(fwd, rev, _ctx(rng, final=rng.random() < 0.5)))
        else:
            cases.append(_DetCase(mutate(rng, fwd) if rng.random() < 0.5 else fwd, mutate(rng, rev), _ctx(rng)))
        self.queue = cases[::-1]

    def generate(self, rng: random.Random) -> _DetCase:
        if not self.queue:
            self._refill(rng)
        return self.queue.pop()

    def check(self, x: _DetCase) -> None:
        r = self.detect(x.fwd, x.rev, x.ctx)
        check_result(r, x.fwd, x.rev)
        if isinstance(r, Detection):
            self.detections += 1

    @abstractmethod
    def pair(self, rng: random.Random) -> tuple[bytes, bytes]: ...

    @abstractmethod
    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object: ...

    def show(self, x: _DetCase) -> str:
        return f"ctx={x.ctx}\nfwd={_hex(x.fwd)}\nrev={_hex(x.rev)}"

    def bounds(self) -> str:
        return f"{self.detections} detections"

    def measures(self) -> dict[str, float]:
        return {"detections": self.detections}


class SshTarget(DetectorTarget):
    name = "ssh"
    weight = 10.0

    def pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        return ssh_pair(rng)

    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object:
        return detect_ssh(fwd, rev, ctx)


class StratumTarget(DetectorTarget):
    name = "stratum"
    weight = 10.0

    def pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        return stratum_pair(rng)

    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object:
        return detect_stratum(fwd, rev, ctx)


class ProxyTarget(DetectorTarget):
    name = "proxy"
    weight = 8.0

    def pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        return proxy_pair(rng)

    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object:
        return detect_proxy(fwd, rev, ctx)


def _tls_pair(rng: random.Random) -> tuple[bytes, bytes]:
    hello = tls_client_hello(rng)
    if rng.random() < 0.3:
        hello = mutate(rng, hello)
    rev = b"" if rng.random() < 0.8 else rand_bytes(rng, rng.randint(1, 10))
    return hello, rev


class TlsTarget(DetectorTarget):
    name = "tls"
    weight = 10.0

    def pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        return _tls_pair(rng)

    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object:
        return detect_tls(fwd, rev, ctx)

    def check(self, x: _DetCase) -> None:
        hello = parse_client_hello(x.fwd)
        if not (hello is NEED_MORE or hello is NOT_THIS or isinstance(hello, ClientHello)):
            raise Violation(f"parse_client_hello returned {hello!r}")
        if isinstance(hello, ClientHello):
            if hello.sni is not None:
                _log_safe(hello.sni, "sni")
            _log_safe(hello.ja3, "ja3")
            _log_safe(hello.ja3_hash, "ja3_hash")
        super().check(x)


def _dns_pair(rng: random.Random) -> tuple[bytes, bytes]:
    r = rng.random()
    if r < 0.02:
        msg = dns_bomb(rng)
        return struct.pack("!H", len(msg) & 0xFFFF) + msg, b""
    if r < 0.6:
        return dns_tcp_stream(rng), dns_tcp_stream(rng) if rng.random() < 0.5 else b""
    return dns_message(rng), b""  # a datagram (and, unframed, a stream head that lies)


class DnsTarget(DetectorTarget):
    """Every DNS entry point: datagram and stream detectors, the parser, the TCP framing,
    the answer-to-address walk and the tunnel score."""

    name = "dns"
    weight = 10.0

    def pair(self, rng: random.Random) -> tuple[bytes, bytes]:
        return _dns_pair(rng)

    def detect(self, fwd: bytes, rev: bytes, ctx: StreamContext) -> object:
        return detect_dns_stream(fwd, rev, ctx)

    def check(self, x: _DetCase) -> None:
        for data in (x.fwd, x.fwd[2:]):
            m = parse_message(data)
            if m is not None:
                for ip, name, ttl in answers_by_ip(m):
                    if len(ip) not in (4, 16) or not isinstance(name, str) or not isinstance(ttl, int):
                        raise Violation(f"answers_by_ip gave ({ip!r}, {name!r}, {ttl!r})")
                for q in m.questions:
                    _log_safe(q.name, "question name")
            check_result(detect_dns_datagram(data, bool(len(data) & 1)), data, b"")
        msgs = iter_tcp_messages(x.fwd)
        if len(msgs) > MAX_TCP_MESSAGES or any(not m for m in msgs):
            raise Violation(f"iter_tcp_messages gave {len(msgs)} messages")
        super().check(x)


# --- engine -------------------------------------------------------------------------------


class _TracingEngine(Engine):
    """The engine with a memory for the traceback its ``feed`` swallows, so that an
    internal error can be reported with where it happened."""

    last_trace: str = ""

    def _packet(self, p: Packet, ts: float, direction: int) -> int:
        try:
            return super()._packet(p, ts, direction)
        except Exception:
            self.last_trace = self.last_trace or traceback.format_exc()
            raise

    def _fragment(self, data: bytes, p: Packet, ts: float, direction: int) -> int:
        try:
            return super()._fragment(data, p, ts, direction)
        except Exception:
            self.last_trace = self.last_trace or traceback.format_exc()
            raise


@dataclass
class _EngineCase:
    raw: bytes
    ts: float
    direction: int
    session: list[bytes]  # the packets of this session fed so far (for the report)


def fuzz_policy(text: str, head_bytes: int = 8192) -> Policy:
    """A shipped policy with a small flow table and DNS cache, so both bounds are hit."""
    settings = (
        f"settings:\n  max_flows: {POLICY_FLOWS}\n  dns_cache: {POLICY_DNS_CACHE}\n  head_bytes: {head_bytes}\n"
        f"  tcp_idle: {POLICY_IDLE}\n  udp_idle: {POLICY_IDLE}\n"
    )
    if "\nsettings:\n" in text:
        text = text.replace("\nsettings:\n", "\n" + settings, 1)
    else:
        text += "\n" + settings
    return load_policy_text(text, RULES / "default.yaml")


class EngineTarget(Target[_EngineCase]):
    """One long-lived Engine with a 16-flow table fed sessions of every protocol, cut,
    reordered, retransmitted, fragmented, mutated and interleaved."""

    name = "engine"
    weight = 14.0
    VERDICTS: Final = frozenset({PASS_MARK_SEEN, PIN_ALLOW, PIN_DENY, PASS, DROP_PACKET})

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        self.policies = [
            fuzz_policy((RULES / "default.yaml").read_text()),
            fuzz_policy((RULES / "allowlist.yaml").read_text(), head_bytes=256),
        ]
        self.engine = _TracingEngine(self.policies[0])
        self.queue: list[tuple[bytes, int]] = []
        self.session: list[bytes] = []
        self.ts = 1_000_000.0
        self.fed = 0
        self.events = 0
        self.max_flows = 0
        self.max_head = 0
        self.verdicts = {PASS_MARK_SEEN: 0, PIN_ALLOW: 0, PIN_DENY: 0, PASS: 0, DROP_PACKET: 0}

    # -- sessions
    def _tcp_session(self, rng: random.Random) -> list[tuple[bytes, int]]:
        kind = rng.randrange(7)
        pair: tuple[bytes, bytes]
        if kind == 0:
            pair = ssh_pair(rng)
        elif kind == 1:
            pair = stratum_pair(rng)
        elif kind == 2:
            pair = proxy_pair(rng)
        elif kind == 3:
            pair = (tls_client_hello(rng), rand_bytes(rng, rng.randint(0, 200)))
        elif kind == 4:
            pair = (dns_tcp_stream(rng), dns_tcp_stream(rng))
        elif kind == 5:
            pair = (http_wrap(rng, b"", True), http_wrap(rng, b"hello", False))
        else:
            pair = (rand_bytes(rng, rng.randint(0, 3000)), rand_bytes(rng, rng.randint(0, 300)))
        fwd, rev = pair
        v6 = rng.random() < 0.2
        c = rng.choice(CLIENTS6 if v6 else CLIENTS4)
        s = rng.choice(SERVERS6 if v6 else SERVERS4)
        cp = rng.choice((40000, 40001, 40002, 51000, 33333)) if rng.random() < 0.5 else rng.randrange(1024, 65536)
        sp = 53 if kind == 4 and rng.random() < 0.8 else rng.choice(SERVER_PORTS)
        ci = rng.choice((rng.getrandbits(32), 0xFFFFFFFF - rng.randrange(100)))
        si = rng.getrandbits(32)

        def seg(orig: bool, seq: int, ack: int, flags: int, data: bytes) -> tuple[bytes, int]:
            t = tcp(cp, sp, seq, ack, flags, data) if orig else tcp(sp, cp, seq, ack, flags, data)
            raw = ip_packet(v6, c, s, 6, t) if orig else ip_packet(v6, s, c, 6, t)
            hint = DIR_ORIGINAL if orig else DIR_REPLY
            if rng.random() < 0.8:
                hint = DIR_UNKNOWN
            elif rng.random() < 0.05:
                hint = DIR_REPLY if orig else DIR_ORIGINAL  # a wrong hint
            return raw, hint

        out: list[tuple[bytes, int]] = []
        midstream = rng.random() < 0.1
        if not midstream:
            tfo = fwd[: rng.randint(1, 100)] if rng.random() < 0.05 else b""
            out.append(seg(True, ci, 0, 0x02, tfo))
            out.append(seg(False, si, ci + 1, 0x12, b""))
            out.append(seg(True, ci + 1, si + 1, 0x10, b""))
        segs: list[tuple[bool, int, bytes]] = []
        for orig, data, isn in ((True, fwd, ci + 1), (False, rev, si + 1)):
            off = 0
            while off < len(data):
                size = rng.choice((1, 2, 10, 100, 536, 1460)) if rng.random() < 0.5 else len(data)
                segs.append((orig, isn + off, data[off : off + size]))
                off += size
        order = rng.random()
        if order < 0.1:
            rng.shuffle(segs)  # wildly out of order
        elif order < 0.6:  # each direction in order, the two interleaved at random
            a = [t for t in segs if t[0]][::-1]
            b = [t for t in segs if not t[0]][::-1]
            segs = []
            while a or b:
                segs.append((a if a and (not b or rng.random() < 0.5) else b).pop())
        for orig, seq, data in segs:
            out.append(seg(orig, seq, 0, 0x18, data))
            if rng.random() < 0.3:
                out.append(seg(not orig, 0, seq, 0x10, b""))  # the ACK it elicits
        if rng.random() < 0.5:
            out.append(seg(rng.random() < 0.5, ci + 1 + len(fwd), 0, rng.choice((0x11, 0x04, 0x14)), b""))
        return self._chaos(rng, out)

    def _chaos(self, rng: random.Random, pkts: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        if not pkts or rng.random() < 0.4:
            return pkts
        out = list(pkts)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(out))
            raw, hint = out[i]
            op = rng.randrange(8)
            if op == 0 and i + 1 < len(out):
                out[i], out[i + 1] = out[i + 1], out[i]
            elif op == 1:
                out.insert(i, (raw, hint))  # retransmission
            elif op == 2:
                out.insert(i, (mutate(rng, raw, 1), hint))  # retransmission with other bytes (or garbage)
            elif op == 3:
                del out[i]
                if not out:
                    return out
            elif op == 4:
                out[i] = (lie_ip(rng, raw), hint)
            elif op == 5:
                out[i : i + 1] = [(f, hint) for f in fragment_ip(rng, raw, rng.randrange(65536))]
            elif op == 6 and len(raw) > 60:
                out[i] = (raw[: rng.randrange(40, len(raw))], hint)  # capture shorter than the IP length
            else:
                out[i] = (mutate(rng, raw), hint)
        return out

    def _udp_session(self, rng: random.Random) -> list[tuple[bytes, int]]:
        v6 = rng.random() < 0.2
        c = rng.choice(CLIENTS6 if v6 else CLIENTS4)
        s = rng.choice(SERVERS6 if v6 else SERVERS4)
        cp, sp = rng.randrange(1024, 65536), rng.choice((53, 53, 5353, 123, 443))
        out: list[tuple[bytes, int]] = []
        for _ in range(rng.randint(1, 3)):
            out.append((ip_packet(v6, c, s, 17, udp(cp, sp, dns_message(rng))), DIR_UNKNOWN))
            if rng.random() < 0.8:
                out.append((ip_packet(v6, s, c, 17, udp(sp, cp, dns_message(rng))), DIR_UNKNOWN))
        return self._chaos(rng, out)

    def _refill(self, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.65:
            pkts = self._tcp_session(rng)
        elif r < 0.85:
            pkts = self._udp_session(rng)
        else:
            pkts = [
                (mutate(rng, p) if rng.random() < 0.5 else p, DIR_UNKNOWN) for p in rng.sample(self.seeds.packets, 4)
            ]
        if self.queue and rng.random() < 0.5:  # two sessions interleaved
            merged = self.queue + pkts[::-1]
            rng.shuffle(merged)
            self.queue = merged
        else:
            self.queue = pkts[::-1]
        self.session = []

    def generate(self, rng: random.Random) -> _EngineCase:
        while not self.queue:
            self._refill(rng)
        raw, hint = self.queue.pop()
        r = rng.random()
        if r < 0.01:
            self.ts += POLICY_IDLE + 0.5  # past the idle timeouts: idle flows may be evicted
        elif r < 0.011:
            self.ts -= 5.0  # a capture whose clock steps back
        else:
            self.ts += rng.choice((0.0, 0.0001, 0.001, 0.05))
        self.session.append(raw)
        return _EngineCase(raw, self.ts, hint, self.session)

    def check(self, x: _EngineCase) -> None:
        eng = self.engine
        errors = eng.counters.errors
        eng.last_trace = ""
        v = eng.feed(x.raw, x.ts, x.direction)
        self.fed += 1
        if eng.counters.errors != errors:
            trace = eng.last_trace
            if not trace:
                try:
                    decode(x.raw)
                except Exception:
                    trace = traceback.format_exc()
            raise Violation(f"Engine.feed swallowed an exception:\n{trace or '(no traceback captured)'}")
        if v not in self.VERDICTS:
            raise Violation(f"feed returned {v!r}")
        self.verdicts[v] += 1
        table = eng.table
        if len(table) > table.max_flows:
            raise Violation(f"flow table holds {len(table)} flows, max_flows {table.max_flows}")
        for f in table.active.values():
            for head in (f.fwd, f.rev):
                if head is not None:
                    if len(head.data) > head.limit or head.pending_bytes > head.limit:
                        raise Violation(
                            f"a stream head holds {len(head.data)}+{head.pending_bytes} B, limit {head.limit}"
                        )
                    self.max_head = max(self.max_head, len(head.data))
        if len(eng.dns) > POLICY_DNS_CACHE:
            raise Violation(f"DNS cache holds {len(eng.dns)} entries, cap {POLICY_DNS_CACHE}")
        ra = eng._defrag
        if len(ra.dgrams) > defrag.MAX_DATAGRAMS or ra.bytes > defrag.MAX_BYTES:
            raise Violation("fragment reassembly past its bounds")
        self.max_flows = max(self.max_flows, len(table))
        p = decode(x.raw)
        if type(p) is Packet and not (p.frag_offset or p.more_frags):
            key = make_key(p.proto, p.src, p.sport, p.dst, p.dport)
            flow = table.active.get(key) or table.done.get(key)
            if flow is not None and flow.last_ts == x.ts:
                want = {
                    PINNED_DROP: (PIN_DENY,),
                    PINNED_ACCEPT: (PIN_ALLOW,),
                    PENDING: (PASS_MARK_SEEN, PASS),
                    SETTLED: (PASS_MARK_SEEN, PASS),  # answered DNS: reported, still judged
                }
                if v not in want[flow.state]:
                    raise Violation(f"verdict {v} for a flow in state {flow.state}")
        self.events += len(eng.events)
        eng.events.clear()  # the shell drains them
        if self.fed % 256 == 0:
            eng.sweep(x.ts)
        if self.fed % 20000 == 0:
            eng.reload(self.policies[(self.fed // 20000) % 2])

    def show(self, x: _EngineCase) -> str:
        lines = [f"ts={x.ts} direction={x.direction} packet {_hex(x.raw)}", "session so far (oldest first):"]
        lines += [f"  {_hex(p)}" for p in x.session[-40:]]
        return "\n".join(lines)

    def bounds(self) -> str:
        c = self.engine.counters
        v = self.verdicts
        return (
            f"max {self.max_flows}/{self.engine.table.max_flows} flows, max head {self.max_head} B, "
            f"flows {c.flows}, evicted {c.evicted}, overload {c.overload}, malformed {c.malformed}, "
            f"fragments {c.fragments}, verdicts pass-mark-seen {v[PASS_MARK_SEEN]} pin-allow {v[PIN_ALLOW]} "
            f"pin-deny {v[PIN_DENY]} pass {v[PASS]} drop-packet {v[DROP_PACKET]}, {self.events} events"
        )

    def measures(self) -> dict[str, float]:
        c = self.engine.counters
        return {
            "max_flows": self.max_flows,
            "flows": c.flows,
            "evicted": c.evicted,
            "overload": c.overload,
            "fragments": c.fragments,
            "detections": sum(c.detections.values()),
            "drops": self.verdicts[PIN_DENY],
        }


# --- YAML documents: node-level mutation --------------------------------------------------

_SCALARS: Final = (
    "", "~", "null", "0", "-1", "16", "15", "65536", "99999999999999999999999", "1e309", ".nan", "-.inf",
    "0x10", "0o17", "1_000", "yes", "no", "true", "*.example.com", "$", "$nope", "$mining_pool_domains",
    "$ssh_allowed", "$mining_pool_ports", "a" * 300, "é", "\u202e", "203.0.113.10/33", "2001:db8::/129",
    "::/0", "0.0.0.0/0", "1.2.3.4/24", "10-5", "0-65535", "22-", "-22", "tcp", "gre", "256", "mining", "ssh.",
    ".", "..", "*", "*.", "*.*.com", "a..b", "-a.com", "a" * 64 + ".com", "accept", "drop", "alert", "monitor",
    "enforce", "open", "closed", "lists/mining-pools.yaml", "default.yaml", "../rules/default.yaml",
    "/nonexistent/x.yaml", "lists", "203.0.113.300", "1.2.3.4", "::ffff:1.2.3.4", "fe80::1%eth0", "3333",
    "2001:db8:1::", "9" * 5000,
)  # fmt: skip
_KEYS: Final = (
    "mode", "default", "fail", "on_overload", "on_error", "include", "settings", "lists", "rules", "name",
    "description", "match", "action", "proto", "src", "dst", "src_port", "dst_port", "dst_domain", "detection",
    "not", "type", "items", "head_bytes", "max_packets", "max_flows", "tcp_idle", "udp_idle", "dns_cache",
    "queue_num", "queue_len", "pool_domains", "flows", "verdict", "count", "rule", "domain", "policy", "bogus",
)  # fmt: skip
_TAGS: Final = (
    "tag:yaml.org,2002:python/object:os.system", "!custom", "tag:yaml.org,2002:binary", "tag:yaml.org,2002:set",
    "tag:yaml.org,2002:omap", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge",
    "tag:yaml.org,2002:value", "tag:yaml.org,2002:pairs",
)  # fmt: skip
_STR: Final = "tag:yaml.org,2002:str"
_RESOLVER: Final = yaml.resolver.Resolver()  # plain scalars get the tag YAML would give them


def _nodes(root: Node) -> list[Node]:
    out: list[Node] = []
    stack = [root]
    while stack and len(out) < 50_000:
        n = stack.pop()
        out.append(n)
        if isinstance(n, SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
    return out


def _scalar(rng: random.Random, value: str | None = None) -> ScalarNode:
    v = value if value is not None else rng.choice(_SCALARS)
    if rng.random() < 0.05:
        return ScalarNode(rng.choice(_TAGS), v)
    tag = _STR if rng.random() < 0.3 else _RESOLVER.resolve(ScalarNode, v, (True, False))  # type: ignore[no-untyped-call]
    return ScalarNode(tag, v)


def _random_node(rng: random.Random, depth: int = 0) -> Node:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return _scalar(rng)
    if r < 0.75:
        return SequenceNode("tag:yaml.org,2002:seq", [_random_node(rng, depth + 1) for _ in range(rng.randint(0, 3))])
    pairs = [(_scalar(rng, rng.choice(_KEYS)), _random_node(rng, depth + 1)) for _ in range(rng.randint(0, 3))]
    return MappingNode("tag:yaml.org,2002:map", pairs)


def mutate_tree(rng: random.Random, root: Node) -> Node:
    """Node-level mutations: values, kinds, keys, duplicates, tags, aliases, deep nesting."""
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        nodes = _nodes(root)
        target = rng.choice(nodes)
        op = rng.randrange(10)
        if op <= 2 and isinstance(target, ScalarNode):
            target.value = rng.choice(_SCALARS)
            target.tag = _scalar(rng, target.value).tag
            target.style = rng.choice((None, None, "'", '"', "|"))
        elif op == 3 and isinstance(target, MappingNode) and target.value:
            del target.value[rng.randrange(len(target.value))]
        elif op == 4 and isinstance(target, MappingNode) and target.value:
            k, v = rng.choice(target.value)
            target.value.append((ScalarNode(k.tag, k.value), v if rng.random() < 0.3 else _random_node(rng)))
        elif op == 5 and isinstance(target, MappingNode):
            target.value.insert(rng.randint(0, len(target.value)), (_scalar(rng, rng.choice(_KEYS)), _random_node(rng)))
        elif op == 6 and isinstance(target, SequenceNode):
            if target.value and rng.random() < 0.5:
                del target.value[rng.randrange(len(target.value))]
            else:
                target.value.append(rng.choice(nodes) if rng.random() < 0.2 else _random_node(rng))
        elif op == 7:
            # Replace a value by a node of another kind (or the same node elsewhere: an alias).
            parent = rng.choice([n for n in nodes if isinstance(n, MappingNode) and n.value] or [None])
            if isinstance(parent, MappingNode):
                i = rng.randrange(len(parent.value))
                k, _ = parent.value[i]
                repl = rng.choice(nodes) if rng.random() < 0.2 else _random_node(rng)
                parent.value[i] = (k, repl)
        elif op == 8:
            target.tag = rng.choice(_TAGS)
        else:
            parent = rng.choice([n for n in nodes if isinstance(n, MappingNode) and n.value] or [None])
            if isinstance(parent, MappingNode):
                i = rng.randrange(len(parent.value))
                k, v = parent.value[i]
                for _ in range(rng.choice((1, 3, 63, 64, 65, 200))):
                    v = SequenceNode("tag:yaml.org,2002:seq", [v])
                parent.value[i] = (k, v)
    return root


def mutate_text(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        i = rng.randrange(len(lines)) if lines else 0
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[i])
        elif op == 2 and lines:
            lines[i] = rng.choice(("\t", "  ", " ")) + lines[i]
        elif op == 3:
            lines.insert(
                i, rng.choice(("---", "...", "%YAML 1.1", "%TAG ! tag:x,2000:", "? complex", "<<: *x", "&a", "!!"))
            )
        elif op == 4 and lines:
            lines[i] = lines[i] + rng.choice(
                (" #", ": :", " &x", " *x", " !x", "\x00", "\x85", "\ufeff", "\x1b", "'", '"')
            )
        elif op == 5 and lines:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 6:
            return mutate(rng, text.encode()).decode("utf-8", "replace")
        else:
            lines = lines[: rng.randrange(len(lines) + 1)]
    return "\n".join(lines)


def serialize(root: Node) -> str:
    try:
        return yaml.serialize(root, allow_unicode=True)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError, AttributeError):
        return "{}"  # a tree the emitter itself cannot write is not an input


@dataclass
class _DocCase:
    kind: str  # "text" (load_policy_text) or "file" (load_policy / validate / expect.load)
    data: bytes
    path: str
    budget: float = 0.0  # > 0: a bomb that must be refused within this many seconds


class _DocTarget(Target[_DocCase]):
    """Shared by the policy and expectation targets: seeds, tree and text mutations, bombs."""

    BOMBS: tuple[tuple[str, str, float], ...] = ()

    def __init__(self, seeds: Seeds, rng: random.Random, bases: list[tuple[str, str]]) -> None:
        super().__init__(seeds, rng)
        self.bases = bases  # (text, path for includes)
        self.tmp = tempfile.mkdtemp(prefix="egressd-fuzz-")
        self.bombs = [_DocCase("file", text.encode(), "bomb-" + name, budget) for name, text, budget in self.BOMBS]
        self.bombs.reverse()
        self.slowest_bomb = ("", 0.0)

    def generate(self, rng: random.Random) -> _DocCase:
        if self.bombs:
            return self.bombs.pop()
        text, path = rng.choice(self.bases)
        r = rng.random()
        if r < 0.65:
            try:
                root = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                root = None
            if root is not None:
                text = serialize(mutate_tree(rng, root))
            if rng.random() < 0.2:
                text = mutate_text(rng, text)
        else:
            text = mutate_text(rng, text)
        data = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.1:
            data = mutate(rng, data)
        if rng.random() < 0.03:
            data = b"\xef\xbb\xbf" + data
        return _DocCase("file" if rng.random() < 0.5 else "text", data, path)

    def write(self, data: bytes, name: str = "doc.yaml") -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def show(self, x: _DocCase) -> str:
        shown = x.data if len(x.data) <= 4096 else x.data[:4096] + b"..."
        text = shown.decode("utf-8", "replace")
        return f"{x.kind} (includes relative to {x.path}), {len(x.data)} bytes:\n{text}\nhex: {_hex(x.data)}"

    def timed(self, x: _DocCase, run: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        run()
        took = time.perf_counter() - t0
        if x.budget:
            if took > self.slowest_bomb[1]:
                self.slowest_bomb = (x.path, took)
            if took > x.budget:
                raise Violation(f"{x.path}: refused in {took:.2f} s, budget {x.budget} s")

    def bounds(self) -> str:
        name, took = self.slowest_bomb
        return f"slowest bomb {name} {took:.3f} s" if name else ""


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


BOMB_BYTES: Final = 1 << 20
BOMB_BUDGET: Final = 2.0  # seconds to deal with a 1 MiB bomb (the policy loader reads files up to 8 MiB)


def _fill(head: str, unit: str, tail: str, size: int = BOMB_BYTES) -> str:
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


POLICY_BOMBS: Final = (
    # name, text, seconds allowed to refuse it
    (
        "billion-laughs",
        "default: accept\nlists:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(
            f"  l{i}: &l{i} [{', '.join([f'*{p}'] * 9)}]\n" for i, p in enumerate(["a"] + [f"l{j}" for j in range(7)])
        )
        + "rules: [*l7]\n",
        BOMB_BUDGET,
    ),
    ("deep-flow-nesting", _fill("default: accept\nrules: ", "[", "]" * 10 + "\n"), BOMB_BUDGET),
    (
        "deep-block-nesting",
        "default: accept\nrules:\n" + "".join("  " * i + "-\n" for i in range(1, 1000)),
        BOMB_BUDGET,
    ),
    ("deep-mapping-nesting", _fill("default: accept\nx: ", "{a: ", ""), BOMB_BUDGET),
    (
        "huge-plain-scalar",
        _fill("default: accept\nrules:\n- name: a\n  description: ", "a", "\n  action: drop\n"),
        BOMB_BUDGET,
    ),
    ("huge-quoted-scalar", _fill('default: accept\nx: "', "\\x41", '"\n'), BOMB_BUDGET),
    ("oversized-file", "default: accept\n#" + "x" * (8 << 20) + "\n", BOMB_BUDGET),
    ("many-aliases", _fill("default: accept\nrules: [", "*a, ", "]\n"), BOMB_BUDGET),
    ("many-anchors", _fill("default: accept\nrules: [", "&a x, ", "]\n"), BOMB_BUDGET),
    ("many-tags", _fill("default: accept\nrules: [", "!x a, ", "]\n"), BOMB_BUDGET),
    ("many-bad-rules", _fill("default: accept\nrules: [", "{}, ", "]\n"), BOMB_BUDGET),
)


class PolicyTarget(_DocTarget):
    """``load_policy_text``/``load_policy``/``validate``: a Policy or PolicyError, never an
    internal error; a loaded policy judges any flow; bombs refused fast."""

    name = "policy"
    weight = 0.25
    BOMBS = POLICY_BOMBS

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        compact = (
            "mode: monitor\ndefault: drop\nfail: closed\non_overload: accept\non_error: drop\n"
            "include: lists/mining-pools.yaml\nsettings: {pool_domains: mining_pool_domains, head_bytes: 64,"
            " max_packets: 1, max_flows: 16, tcp_idle: 1, udp_idle: 86400, dns_cache: 0, queue_num: 65535,"
            " queue_len: 1}\nlists:\n  nets: {type: cidr, items: [203.0.113.0/24, '2001:db8::/32']}\n"
            "  ports: {type: port, items: [22, 14444-14446]}\n"
            "  names: {type: domain, items: [a.example, '*.b.example']}\n"
            "rules:\n- name: r1\n  description: d\n  match: {proto: [tcp, 6], dst: $nets, dst_port: [$ports, '1-2'],"
            " dst_domain: [$names, c.example], detection: mining, not: [{src: 198.51.100.0/24}, {detection: ssh}]}\n"
            "  action: alert\n- name: r2\n  match: {src_port: 53, proto: udp}\n  action: accept\n"
        )
        bases = [
            ((RULES / "default.yaml").read_text(), str(RULES / "default.yaml")),
            ((RULES / "allowlist.yaml").read_text(), str(RULES / "allowlist.yaml")),
            (compact, str(RULES / "compact.yaml")),
            (compact, str(RULES / "compact.yaml")),
        ]
        super().__init__(seeds, rng, bases)
        self.loaded = 0
        lists = Path(self.tmp) / "lists"
        lists.mkdir()
        for name in ("mining-pools.yaml", "tunnel-services.yaml"):
            (lists / name).write_text((RULES / "lists" / name).read_text())

    def check(self, x: _DocCase) -> None:
        def run() -> None:
            policy: Policy | None = None
            try:
                if x.kind == "text":
                    policy = load_policy_text(x.data.decode("utf-8", "replace"), x.path)
                else:
                    path = self.write(x.data)
                    if not x.budget:  # a bomb is timed on load_policy alone
                        for d in validate_policy(path):
                            _no_internal_error(d.message)
                    policy = load_policy(path)
            except PolicyError as e:
                for d in e.diagnostics:
                    _no_internal_error(d.message)
                return
            self.loaded += 1
            _judge_some(self.rng, policy)

        self.timed(x, run)

    def bounds(self) -> str:
        return f"{self.loaded} mutated policies loaded and judged; " + super().bounds()

    def measures(self) -> dict[str, float]:
        return {"loaded": self.loaded}


def _no_internal_error(message: str) -> None:
    if "internal error" in message:
        raise Violation(f"the loader hid an exception: {message}")


def _judge_some(rng: random.Random, policy: Policy) -> None:
    for _ in range(4):
        v6 = rng.random() < 0.3
        facts = FlowFacts(
            rng.choice((6, 17, 1, 58, 47, 0, 255)),
            6 if v6 else 4,
            rng.choice(CLIENTS6 if v6 else CLIENTS4),
            rng.choice(SERVERS6 if v6 else SERVERS4),
            rng.randrange(65536),
            rng.choice(SERVER_PORTS),
            tuple(rng.sample(("pool.minexmr.com", "a.example", "x.b.example", "git.example.org", "", "."), 2)),
            tuple(rng.sample(("mining.stratum", "ssh", "ssh.reverse", "tls", "dns", "mining.pool-domain"), 2)),
        )
        d = policy.judge(facts)
        if d.action not in ACTIONS or not isinstance(d.rule, str):
            raise Violation(f"judge returned {d!r}")


EXPECT_BOMBS: Final = (
    (
        # Nine levels: 10**9 strings if anything expands it (str() of a match value does).
        "billion-laughs",
        "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(
            f"l{i}: &l{i} [{', '.join([f'*{p}'] * 10)}]\n" for i, p in enumerate(["a"] + [f"l{j}" for j in range(7)])
        )
        + "flows:\n  - match: {src: *l7}\n",
        BOMB_BUDGET,
    ),
    ("deep-flow-nesting", "flows: " + _nest(5000) + "\n", BOMB_BUDGET),
    ("deep-mapping-nesting", "flows: [" + "{a: " * 5000 + "}" * 5000 + "]\n", BOMB_BUDGET),
    ("huge-scalar", _fill("flows:\n  - rule: ", "a", "\n"), BOMB_BUDGET),
)


class ExpectTarget(_DocTarget):
    """``expect.load``: an ExpectFile or ExpectError, nothing else."""

    name = "expect"
    weight = 0.25
    BOMBS = EXPECT_BOMBS

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        bases = [(p.read_text(), str(p)) for p in sorted((REPO / "pcaps").glob("*.expect.yaml"))]
        if not bases:
            text = (
                "policy: ../rules/default.yaml\nflows:\n  - match: {proto: tcp, dst: 203.0.113.20, dst_port: 22}\n"
                "    verdict: drop\n    detection: ssh\n    count: 1\n"
            )
            bases = [(text, str(REPO / "pcaps" / "x.expect.yaml"))]
        super().__init__(seeds, rng, bases)
        self.loaded = 0

    def check(self, x: _DocCase) -> None:
        def run() -> None:
            path = self.write(x.data, "x.expect.yaml")
            try:
                got = expect.load(path)
            except expect.ExpectError:
                return
            if not isinstance(got, expect.ExpectFile):
                raise Violation(f"load returned {got!r:.200}")
            self.loaded += 1

        self.timed(x, run)

    def bounds(self) -> str:
        return f"{self.loaded} mutated files loaded; " + super().bounds()

    def measures(self) -> dict[str, float]:
        return {"loaded": self.loaded}


# --- capture files ------------------------------------------------------------------------


def _frame(rng: random.Random, lt: int, ip: bytes, big: bool) -> bytes:
    """``ip`` wrapped in link type ``lt`` (the variants each handler walks)."""
    e = ">" if big else "<"
    et = 0x86DD if ip[:1] and ip[0] >> 4 == 6 else 0x0800
    if lt == 1:
        tags = b""
        for _ in range(rng.choice((0, 0, 0, 1, 2, 9))):
            tags += struct.pack("!HH", rng.choice((0x8100, 0x88A8, 0x9100)), rng.randrange(4096))
        mac = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
        r = rng.random()
        if r < 0.1:
            return mac + tags + b"\x88\x47" + b"\x00\x01\x01\x40" + ip  # MPLS, bottom of stack
        if r < 0.15:
            return mac + tags + b"\x88\x64" + b"\x11\x00\x00\x01" + struct.pack("!H", len(ip) + 2) + b"\x00\x21" + ip
        if r < 0.2:
            return mac + struct.pack("!H", len(ip) + 8) + b"\xaa\xaa\x03\x00\x00\x00" + struct.pack("!H", et) + ip
        if r < 0.25:
            return mac + b"\x08\x06" + rand_bytes(rng, 28)  # ARP
        if tags:
            return mac + tags[:2] + tags[2:] + struct.pack("!H", et) + ip
        return mac + struct.pack("!H", et) + ip
    if lt == 113:
        return struct.pack("!HHH", 0, rng.choice((1, 1, 824)), 6) + b"\x00" * 8 + struct.pack("!H", et) + ip
    if lt == 276:
        return struct.pack("!HHIHBB", et, 0, 1, rng.choice((1, 824)), 0, 6) + b"\x00" * 8 + ip
    if lt == 0:
        af = 2 if et == 0x0800 else rng.choice((10, 24, 28, 30))
        return struct.pack(rng.choice("<>") + "I", af) + ip
    if lt == 108:
        return struct.pack("!I", 2 if et == 0x0800 else 24) + ip
    if lt in (9, 50):
        proto = b"\x00\x21" if et == 0x0800 else b"\x00\x57"
        return (
            rng.choice(
                (b"\xff\x03" + proto, proto, b"\x21" if et == 0x0800 else b"\x57", b"\x0f\x00" + struct.pack("!H", et))
            )
            + ip
        )
    if lt == 104:
        return b"\x0f\x00" + struct.pack("!H", et) + ip
    if lt == 239:
        tlv = b""
        if rng.random() < 0.5:
            tlv += struct.pack(e + "HH", 8, 1) + b"\x00\x00\x00\x00"
        n = 4 + len(ip)
        tlv += struct.pack(e + "HH", n if rng.random() < 0.95 else rng.choice((0, 3, 0xFFFF)), 9) + ip
        return bytes([2 if et == 0x0800 else 10, 0]) + b"\x00\x00" + tlv + b"\x00" * (-len(tlv) % 4)
    if lt == 51:
        return b"\x11\x00\x00\x01" + struct.pack("!H", len(ip) + 2) + b"\x00\x21" + ip
    return ip  # raw IP link types


_LINKTYPES: Final = (1, 1, 1, 101, 113, 276, 0, 108, 9, 50, 51, 104, 239, 228, 229, 12, 14, 105, 0xFFFF)


@dataclass
class _Capture:
    data: bytes
    fields: list[tuple[int, int, str]]  # (offset, size, byte order) of each length/type field


def pcap_file(rng: random.Random, frames_ip: list[bytes]) -> _Capture:
    big = rng.random() < 0.3
    e = ">" if big else "<"
    magic = rng.choice((0xA1B2C3D4, 0xA1B2C3D4, 0xA1B23C4D, 0xA1B2CD34))
    lt = rng.choice(_LINKTYPES)
    lt_field = lt | (rng.choice((0, 0, 0x10000000)) if rng.random() < 0.1 else 0)
    out = bytearray(struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, rng.choice((65535, 0, 262144, 0x7FFFFFFF)), lt_field))
    fields = [(16, 4, e), (20, 4, e)]
    for ip in frames_ip:
        frame = _frame(rng, lt, ip, big)
        fields.append((len(out) + 8, 4, e))
        out += struct.pack(e + "IIII", rng.randrange(1 << 31), rng.randrange(1_000_000), len(frame), len(frame))
        if magic == 0xA1B2CD34:
            out += b"\x00" * 8
        out += frame
    return _Capture(bytes(out), fields)


def pcapng_file(rng: random.Random, frames_ip: list[bytes]) -> _Capture:
    out = bytearray()
    fields: list[tuple[int, int, str]] = []

    def block(e: str, btype: int, body: bytes) -> None:
        body += b"\x00" * (-len(body) % 4)
        n = 12 + len(body)
        fields.append((len(out) + 4, 4, e))
        out.extend(struct.pack(e + "II", btype, n) + body)
        fields.append((len(out), 4, e))
        out.extend(struct.pack(e + "I", n))

    frames = list(frames_ip)
    for _section in range(rng.choice((1, 1, 2))):
        e = rng.choice("<<>")
        opts = b""
        if rng.random() < 0.3:
            opts = struct.pack(e + "HH", 4, 5) + b"Linux\x00\x00\x00" + struct.pack(e + "HH", 0, 0)
        block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1 if rng.random() < 0.97 else 2, 0, -1) + opts)
        n_if = rng.choice((1, 1, 2))
        lts = []
        for _ in range(n_if):
            lt = rng.choice(_LINKTYPES)
            lts.append(lt)
            iopts = b""
            if rng.random() < 0.4:
                resol = rng.choice((6, 9, 0x80 | 20, 0)) if rng.random() < 0.9 else rng.choice((0x80 | 64, 19))
                iopts += struct.pack(e + "HH", 9, 1) + bytes([resol]) + b"\x00" * 3
            if rng.random() < 0.2:
                iopts += struct.pack(e + "HHq", 14, 8, rng.choice((0, 1, -(1 << 40))))
            if rng.random() < 0.2:
                iopts += struct.pack(e + "HH", 2, 4) + b"eth0"
            if iopts:
                iopts += struct.pack(e + "HH", 0, 0)
            fields.append((len(out) + 8, 2, e))
            block(e, 1, struct.pack(e + "HHI", lt, 0, rng.choice((0, 65535, 16))) + iopts)
        for _ in range(rng.randint(0, max(1, len(frames)))):
            if not frames:
                break
            ip = frames.pop()
            iid = rng.randrange(n_if)
            frame = _frame(rng, lts[iid], ip, e == ">")
            kind = rng.random()
            if kind < 0.7:
                fields.append((len(out) + 8, 4, e))
                fields.append((len(out) + 20, 4, e))
                block(
                    e,
                    6,
                    struct.pack(e + "IIIII", iid, rng.randrange(1 << 20), rng.getrandbits(32), len(frame), len(frame))
                    + frame,
                )
            elif kind < 0.8:
                fields.append((len(out) + 8, 4, e))
                block(e, 3, struct.pack(e + "I", len(frame)) + frame)
            elif kind < 0.85:
                block(e, 2, struct.pack(e + "HHIIII", iid, 0, 0, 0, len(frame), len(frame)) + frame)
            else:
                block(e, rng.choice((4, 5, 0xA, 0xBAD, 0x40000BAD, 0x12345678)), rand_bytes(rng, rng.randint(0, 20)))
    return _Capture(bytes(out), fields)


class PcapTarget(Target[bytes]):
    """``Reader``: packets or CaptureError, nothing else; a packet is never longer than
    MAX_CAPLEN and the stats count what was yielded."""

    name = "pcap"
    weight = 2.0

    def __init__(self, seeds: Seeds, rng: random.Random) -> None:
        super().__init__(seeds, rng)
        self.tmp = tempfile.mkdtemp(prefix="egressd-fuzz-")
        self.path = os.path.join(self.tmp, "x.pcap")
        self.queue: list[bytes] = []
        self.packets = 0
        self.errors = 0

    def generate(self, rng: random.Random) -> bytes:
        if self.queue:
            return self.queue.pop()
        ips = [rng.choice(self.seeds.packets) for _ in range(rng.randint(0, 5))]
        cap = pcapng_file(rng, ips) if rng.random() < 0.5 else pcap_file(rng, ips)
        r = rng.random()
        data = cap.data
        if r < 0.03:
            step = max(1, len(data) // 300)
            self.queue = [data[:i] for i in range(0, len(data), step)]  # truncation at every offset
            return data
        if r < 0.3:
            return data
        if r < 0.65 and cap.fields:
            b = bytearray(data)
            for _ in range(rng.randint(1, 2)):
                off, size, e = rng.choice(cap.fields)
                value = rng.choice(_I32) if size == 4 else rng.choice(_I16)
                if rng.random() < 0.5:
                    cur = int.from_bytes(b[off : off + size], "big" if e == ">" else "little")
                    value = cur + rng.choice((-4, -1, 1, 4, 8))
                struct.pack_into(e + ("I" if size == 4 else "H"), b, off, value % (1 << (8 * size)))
            return bytes(b)
        if r < 0.9:
            return mutate(rng, data)
        return cut(rng, data)

    def check(self, x: bytes) -> None:
        with open(self.path, "wb") as fh:
            fh.write(x)
        count = 0
        try:
            r = Reader(self.path)
        except CaptureError:
            self.errors += 1
            return
        try:
            for ts, pkt in r:
                if not isinstance(ts, float) or not isinstance(pkt, bytes) or len(pkt) > MAX_CAPLEN:
                    raise Violation(f"Reader yielded ({ts!r}, {type(pkt).__name__} of {len(pkt)})")
                count += 1
        except CaptureError:
            self.errors += 1
        finally:
            r.close()
        if r.stats.packets != count:
            raise Violation(f"stats.packets {r.stats.packets}, yielded {count}")
        self.packets += count

    def show(self, x: bytes) -> str:
        return _hex(x)

    def bounds(self) -> str:
        return f"{self.packets} packets read, {self.errors} CaptureErrors"

    def measures(self) -> dict[str, float]:
        return {"packets": self.packets, "errors": self.errors}


# ================================================================================== runner

TARGETS: Final[dict[str, type[Target[Any]]]] = {
    t.name: t
    for t in (
        PacketTarget,
        StreamTarget,
        DefragTarget,
        SshTarget,
        StratumTarget,
        ProxyTarget,
        TlsTarget,
        DnsTarget,
        EngineTarget,
        PolicyTarget,
        ExpectTarget,
        PcapTarget,
    )
}


@dataclass
class Failure:
    target: str
    index: int  # which input of the target (0-based), with the seed enough to reproduce it
    error: str
    shown: str
    trace: str


@dataclass
class Stats:
    name: str
    seed: int
    inputs: int = 0
    exceptions: int = 0
    elapsed: float = 0.0
    slowest: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    bounds: str = ""
    failures: list[Failure] = field(default_factory=list)
    sites: dict[str, int] = field(default_factory=dict)  # distinct failure -> how many inputs hit it
    measures: dict[str, float] = field(default_factory=dict)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_SEEDS: Seeds | None = None


def seeds() -> Seeds:
    global _SEEDS
    if _SEEDS is None:
        _SEEDS = build_seeds()
    return _SEEDS


def _on_guard(signum: int, frame: FrameType | None) -> None:
    raise InputTimeout()


def _site(tb: str) -> str:
    """Where an exception was raised (its last frame and type), to tell failures apart."""
    lines = tb.strip().splitlines()
    frames = [ln.strip() for ln in lines if ln.startswith('  File "')]
    kind = lines[-1].split(":", 1)[0] if lines else ""
    return f"{kind} at {frames[-1] if frames else '?'}"


def run_target(
    name: str,
    count: int,
    seed: int,
    seconds: float | None = None,
    guard: float = DEFAULT_GUARD,
    bombs: bool = True,
) -> Stats:
    """Run ``count`` inputs of one target (or until ``seconds`` pass); never raises for a
    failure of the code under test: those are counted and kept in the returned Stats.
    ``bombs=False`` leaves out the fixed YAML bombs the document targets start with."""
    rng = random.Random(f"{seed}:{name}")
    stats = Stats(name, seed, rss_start=rss_bytes())
    stats.rss_peak = stats.rss_start
    target = TARGETS[name](seeds(), random.Random(f"{seed}:{name}:aux"))
    if not bombs and isinstance(target, _DocTarget):
        target.bombs.clear()
    use_guard = guard > 0 and hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGPROF, _on_guard) if use_guard else None
    start = time.perf_counter()
    deadline = start + seconds if seconds else None
    try:
        for i in range(count):
            if deadline is not None and i % 64 == 0 and time.perf_counter() > deadline:
                break
            x = target.generate(rng)
            t0 = time.perf_counter()
            try:
                if use_guard:
                    budget = getattr(x, "budget", 0.0)
                    signal.setitimer(signal.ITIMER_PROF, max(15.0, 15 * budget) if budget else guard)
                try:
                    target.check(x)
                finally:
                    if use_guard:
                        signal.setitimer(signal.ITIMER_PROF, 0)
            except (Exception, InputTimeout) as exc:
                stats.exceptions += 1
                tb = traceback.format_exc()
                err = f"{type(exc).__name__}: {exc}"[:2000]
                if isinstance(exc, InputTimeout):
                    err = "InputTimeout: the input used more CPU time than the guard allows"
                site = _site(tb) if not isinstance(exc, Violation) else re.sub(r"\d+", "N", err)[:100]
                if site not in stats.sites and len(stats.failures) < MAX_KEPT_FAILURES:
                    stats.failures.append(Failure(name, i, err, target.show(x), tb))
                stats.sites[site] = stats.sites.get(site, 0) + 1
            dt = time.perf_counter() - t0
            stats.slowest = max(stats.slowest, dt)
            stats.inputs += 1
            if i % 256 == 0:
                stats.rss_peak = max(stats.rss_peak, rss_bytes())
    finally:
        if use_guard:
            signal.signal(signal.SIGPROF, old)
    stats.elapsed = time.perf_counter() - start
    stats.rss_peak = max(stats.rss_peak, rss_bytes())
    stats.bounds = target.bounds()
    stats.measures = target.measures()
    for attr in ("tmp",):
        tmp = getattr(target, attr, None)
        if isinstance(tmp, str):
            _rmtree(tmp)
    return stats


def _rmtree(path: str) -> None:
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, f))
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, d))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def plan(total: int, names: Sequence[str]) -> dict[str, int]:
    """Inputs per target: ``total`` split by weight (every target gets at least one)."""
    weights = {n: TARGETS[n].weight for n in names}
    s = sum(weights.values())
    return {n: max(1, round(total * w / s)) for n, w in weights.items()}


def _worker(job: tuple[str, int, int, float | None, float, int]) -> Stats:
    name, count, seed, seconds, guard, mem_limit = job
    if mem_limit > 0:
        # A memory bomb that got through becomes a MemoryError failure, not a dead machine.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, resource.RLIM_INFINITY))
    return run_target(name, count, seed, seconds, guard)


def format_report(results: Sequence[Stats], wall: float) -> str:
    mb = 1 << 20
    head = (
        f"{'target':<8} {'inputs':>9} {'exceptions':>10} {'elapsed s':>9} {'inputs/s':>9} {'max ms':>8} "
        f"{'peak RSS MB':>11}"
    )
    lines = [head, "-" * len(head)]
    for s in results:
        rate = s.inputs / s.elapsed if s.elapsed else 0.0
        lines.append(
            f"{s.name:<8} {s.inputs:>9} {s.exceptions:>10} {s.elapsed:>9.1f} {rate:>9.0f} "
            f"{s.slowest * 1000:>8.1f} {s.rss_peak / mb:>11.1f}"
        )
    total_in = sum(s.inputs for s in results)
    total_ex = sum(s.exceptions for s in results)
    busy = sum(s.elapsed for s in results)
    peak = max((s.rss_peak for s in results), default=0)
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<8} {total_in:>9} {total_ex:>10} {busy:>9.1f} {total_in / wall if wall else 0:>9.0f} "
        f"{max((s.slowest for s in results), default=0) * 1000:>8.1f} {peak / mb:>11.1f}"
    )
    lines.append(f"wall {wall:.1f} s (elapsed is per target, summed over workers)")
    lines.append("bounds reached:")
    for s in results:
        if s.bounds:
            lines.append(f"  {s.name}: {s.bounds}; RSS {s.rss_start / mb:.0f} -> peak {s.rss_peak / mb:.0f} MB")
    return "\n".join(lines)


def format_failures(results: Sequence[Stats]) -> str:
    out: list[str] = []
    for s in results:
        if s.sites:
            out.append(f"{s.name}: {len(s.sites)} distinct failure(s):")
            out += [f"  {n:>7} x {site}" for site, n in sorted(s.sites.items(), key=lambda kv: -kv[1])]
    for s in results:
        for f in s.failures:
            out.append(f"=== FAIL {f.target} input #{f.index} (seed {s.seed}): {f.error}")
            out.append("input:")
            out.append(f.shown)
            out.append("traceback:")
            out.append(f.trace.rstrip())
    return "\n".join(out)


# Rough microseconds per input: slow targets start first in parallel runs, and a time cap
# is shared out by these.
_COST: Final = {"policy": 4000.0, "expect": 1000.0, "pcap": 150.0, "engine": 60.0, "stratum": 60.0}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="inputs in all, split by target weight")
    ap.add_argument("--seconds", type=float, default=None, help="time cap for the whole run")
    ap.add_argument("--seed", type=int, default=None, help="reproduce a run (default: random, printed)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--guard", type=float, default=DEFAULT_GUARD, help="CPU seconds one input may use")
    ap.add_argument("--mem-limit-mb", type=int, default=4096, help="address-space cap per worker (0: none)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    names = args.target or list(TARGETS)
    counts = plan(args.count, names)
    print(f"fuzz seed {seed}: {sum(counts.values())} inputs over {len(names)} targets, {args.jobs} jobs", flush=True)
    seeds()  # once, before the workers fork
    # A time cap is shared out by each target's expected cost, so every target runs its share.
    cost = {n: counts[n] * _COST.get(n, 30.0) for n in names}
    jobs: list[tuple[str, int, int, float | None, float, int]] = []
    for n in names:
        secs = args.seconds * args.jobs * cost[n] / sum(cost.values()) if args.seconds else None
        jobs.append((n, counts[n], seed, secs, args.guard, args.mem_limit_mb << 20))
    t0 = time.perf_counter()
    results: list[Stats]
    if args.jobs <= 1:
        results = [_worker(j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("fork")
        order = sorted(jobs, key=lambda j: -j[1] * _COST.get(j[0], 1.0))
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            by_name = {s.name: s for s in pool.imap_unordered(_worker, order)}
        results = [by_name[n] for n in names]
    wall = time.perf_counter() - t0
    print(format_report(results, wall))
    failures = format_failures(results)
    if failures:
        print(failures)
    bad = sum(s.exceptions for s in results)
    print(f"fuzz seed {seed}: {'FAILED, ' + str(bad) + ' exceptions' if bad else 'no exceptions'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
