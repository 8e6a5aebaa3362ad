"""The lab's Stratum pool and client: real processes on ephemeral ports, in a network namespace of the test's own.

The pool log is what end-to-end tests use to prove what a pool did or did not receive, so
its contents are specified here as carefully as the handshakes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egressd_lab.stratum import (
    ETH_PROTOCOL,
    EthSession,
    GetworkRpc,
    V1Session,
    XmrSession,
    format_hostport,
    parse_hostport,
)

CMD = [sys.executable, "-m", "egressd_lab.stratum"]


# The pools and clients run in a network namespace of the test's own (tests/conftest.py
# own_netns), on the documentation addresses it puts on that namespace's loopback.
V4 = "198.51.100.7"
V6 = "2001:db8::7"
live = pytest.mark.usefixtures("own_netns")


@dataclass
class RunningPool:
    proc: subprocess.Popen[str]
    host: str
    port: int
    log: Path

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()]

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "request"]

    def wait_event(self, kind: str, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [e for e in self.events() if e["event"] == kind]
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError(f"no {n} {kind!r} events in {self.events()}")


@contextlib.contextmanager
def pool(tmp_path: Path, variant: str, host: str = V4, *extra: str) -> Iterator[RunningPool]:
    log = tmp_path / f"pool-{variant}.log"
    argv = [
        *CMD,
        "pool",
        "--listen",
        format_hostport(host, 0),
        "--variant",
        variant,
        "--log",
        str(log),
        *extra,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the pool prints where it listens, then nothing more
        assert line, f"pool exited: {proc.wait(5)}"
        h, port = parse_hostport(json.loads(line)["listening"])
        yield RunningPool(proc, h, port, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


def client(target: str, variant: str, *extra: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    argv = [*CMD, "client", "--connect", target, "--variant", variant, "--timeout", str(timeout), *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, (p.stdout, p.stderr)
    return p.returncode, json.loads(lines[0])


EXPECTED_METHODS = {
    "v1": ["mining.subscribe", "mining.authorize", "mining.submit"],
    "eth": ["mining.subscribe", "mining.extranonce.subscribe", "mining.authorize", "mining.submit"],
    "ethproxy": ["eth_submitLogin", "eth_getWork", "eth_submitHashrate", "eth_submitWork"],
    "xmr": ["login", "submit", "keepalived"],
    "getwork": ["getwork", "getwork"],
    "gbt": ["getblocktemplate", "submitblock"],
}


# ---------------------------------------------------------------------------------------------
@live
@pytest.mark.parametrize("variant", list(EXPECTED_METHODS))
def test_handshake_completes_and_pool_logs_each_request(tmp_path: Path, variant: str) -> None:
    with pool(tmp_path, variant) as pl:
        rc, rep = client(f"{V4}:{pl.port}", variant)
        assert rc == 0 and rep["connected"] and rep["handshake_complete"] and rep["error"] is None
        closes = pl.wait_event("close")
        assert [r["method"] for r in pl.requests()] == EXPECTED_METHODS[variant]
        assert closes[0]["partial_bytes"] == 0 and closes[0]["requests"] == len(EXPECTED_METHODS[variant])
        assert [e["event"] for e in pl.events()][:2] == ["listening", "open"]


@live
def test_logged_request_line_is_the_raw_line_the_client_sent(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl:
        client(f"{V4}:{pl.port}", "v1")
        first = pl.wait_event("request")[0]
        assert first["line"] == '{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}'


@live
def test_v1_configure_is_sent_first_when_asked(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl:
        rc, rep = client(f"{V4}:{pl.port}", "v1", "--configure")
        assert rc == 0 and rep["steps"][0] == "configure"
        assert pl.requests()[0]["method"] == "mining.configure"


@live
def test_gbt_client_talks_to_the_getwork_pool(tmp_path: Path) -> None:
    with pool(tmp_path, "getwork") as pl:
        rc, _ = client(f"{V4}:{pl.port}", "gbt")
        assert rc == 0
        assert [r["method"] for r in pl.wait_event("request", 2)] == ["getblocktemplate", "submitblock"]


@live
def test_getwork_requests_are_logged_with_the_http_request_line(tmp_path: Path) -> None:
    with pool(tmp_path, "getwork") as pl:
        client(f"{V4}:{pl.port}", "getwork")
        r = pl.wait_event("request")[0]
        assert r["http"] == "POST / HTTP/1.1" and r["agent"].startswith("cgminer/")


@live
def test_split_first_message_still_completes_and_is_logged_once(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl:
        rc, rep = client(f"{V4}:{pl.port}", "v1", "--split", "7", "--split-delay", "0.005")
        assert rc == 0, rep
        assert [r["method"] for r in pl.requests()].count("mining.subscribe") == 1


@live
def test_eth_client_refuses_a_v1_pool(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl:
        rc, rep = client(f"{V4}:{pl.port}", "eth")
        assert rc == 1 and rep["connected"] and not rep["handshake_complete"]
        assert ETH_PROTOCOL in rep["error"]


@live
def test_nothing_listening_is_a_failed_connect(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((V4, 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        rc, rep = client(f"{V4}:{port}", "v1", timeout=2)
    assert rc == 1 and rep["connected"] is False and "cannot connect" in rep["error"]


@live
def test_silent_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((V4, 0))
        s.listen(1)
        rc, rep = client(f"{V4}:{s.getsockname()[1]}", "xmr", timeout=0.5)
    assert rc == 1 and rep["connected"] and "timed out" in rep["error"]


@live
def test_ipv6_pool_and_client(tmp_path: Path) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6")
    with pool(tmp_path, "xmr", V6) as pl:
        assert pl.host == V6
        rc, rep = client(f"[{V6}]:{pl.port}", "xmr")
        assert rc == 0, rep
        assert pl.wait_event("open")[0]["peer"].startswith(f"[{V6}]:")


HALF_SUBSCRIBE = b'{"id": 1, "method": "mining.subscr'


@live
def test_incomplete_line_is_never_logged_as_a_request(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl:
        with socket.create_connection((V4, pl.port), timeout=5) as s:
            s.sendall(HALF_SUBSCRIBE)
            time.sleep(0.1)
        close = pl.wait_event("close")[0]
        assert pl.requests() == []
        assert close["partial_bytes"] == len(HALF_SUBSCRIBE) and close["partial"].endswith("mining.subscr")


@live
def test_overlong_line_closes_the_connection(tmp_path: Path) -> None:
    with pool(tmp_path, "v1", V4, "--max-line", "100") as pl:
        with socket.create_connection((V4, pl.port), timeout=5) as s:
            s.sendall(b"x" * 500)
            s.settimeout(5)
            assert s.recv(100) == b""  # the pool hung up
        assert "longer than 100" in pl.wait_event("close")[0]["reason"]


@live
def test_bad_json_closes_the_connection(tmp_path: Path) -> None:
    with pool(tmp_path, "xmr") as pl:
        with socket.create_connection((V4, pl.port), timeout=5) as s:
            s.sendall(b"hello pool\n")
            s.settimeout(5)
            assert s.recv(100) == b""
        assert pl.wait_event("close")[0]["reason"] == "bad JSON"
        assert "bad JSON" in pl.requests()[0]["error"]


@live
def test_oddly_shaped_request_gets_an_error_and_the_session_goes_on(tmp_path: Path) -> None:
    with pool(tmp_path, "v1") as pl, socket.create_connection((V4, pl.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(b'{"id": 1, "method": "mining.submit", "params": [[1], {"a": 2}]}\n')
        assert json.loads(f.readline())["error"][0] in (20, 24, 25)
        s.sendall(b'{"id": 2, "method": "mining.subscribe", "params": ["x/1"]}\n')
        assert json.loads(f.readline())["result"][2] == 4


@live
def test_connections_beyond_the_maximum_are_refused(tmp_path: Path) -> None:
    with (
        pool(tmp_path, "v1", V4, "--max-conns", "1") as pl,
        socket.create_connection((V4, pl.port)),
    ):
        pl.wait_event("open")
        rc, _ = client(f"{V4}:{pl.port}", "v1", timeout=2)
        assert rc == 1
        assert len(pl.wait_event("refused")) == 1


@live
def test_sigterm_ends_the_pool_cleanly(tmp_path: Path) -> None:
    with pool(tmp_path, "eth") as pl:
        os.killpg(pl.proc.pid, signal.SIGTERM)
        assert pl.proc.wait(5) == 0
        assert pl.events()[-1]["event"] == "exit" and pl.events()[-1]["reason"] == "SIGTERM"


@live
def test_lifetime_bounds_the_pool(tmp_path: Path) -> None:
    with pool(tmp_path, "v1", V4, "--lifetime", "0.3") as pl:
        assert pl.proc.wait(5) == 0
        assert "lifetime" in pl.events()[-1]["reason"]


@pytest.mark.skipif(shutil.which("ncat") is None, reason="ncat (apt ncat) not installed")
@live
def test_client_through_an_http_connect_proxy(tmp_path: Path) -> None:
    with (
        pool(tmp_path, "v1") as pl,
        _proxy(["ncat", "-l", V4, "{port}", "--proxy-type", "http"]) as pport,
    ):
        rc, rep = client(f"{V4}:{pl.port}", "v1", "--via-connect", f"{V4}:{pport}")
        assert rc == 0, rep
        assert [r["method"] for r in pl.requests()] == EXPECTED_METHODS["v1"]


@pytest.mark.skipif(shutil.which("microsocks") is None, reason="microsocks (apt microsocks) not installed")
@live
def test_client_through_a_socks5_proxy(tmp_path: Path) -> None:
    with pool(tmp_path, "xmr") as pl, _proxy(["microsocks", "-i", V4, "-p", "{port}"]) as pport:
        rc, rep = client(f"{V4}:{pl.port}", "xmr", "--via-socks5", f"{V4}:{pport}")
        assert rc == 0, rep
        assert pl.requests()[0]["method"] == "login"


@contextlib.contextmanager
def _proxy(argv: list[str]) -> Iterator[int]:
    with socket.socket() as s:
        s.bind((V4, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [a.replace("{port}", str(port)) for a in argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((V4, port), timeout=1):
                break
            time.sleep(0.05)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)


# -- sans-IO sessions --------------------------------------------------------------------------
def test_v1_submit_for_an_unknown_job_is_error_21() -> None:
    s = V1Session(1)
    s.handle({"id": 1, "method": "mining.subscribe", "params": []})
    s.handle({"id": 2, "method": "mining.authorize", "params": ["w", "x"]})
    (r,) = s.handle({"id": 3, "method": "mining.submit", "params": ["w", "nope", "00", "00", "00"]})
    assert r["error"][0] == 21


def test_v1_authorize_after_subscribe_pushes_difficulty_then_job() -> None:
    s = V1Session(1)
    s.handle({"id": 1, "method": "mining.subscribe", "params": []})
    out = s.handle({"id": 2, "method": "mining.authorize", "params": ["w", "x"]})
    assert [m.get("method") for m in out] == [None, "mining.set_difficulty", "mining.notify"]
    assert len(out[2]["params"]) == 9


def test_unhashable_worker_name_is_an_error_reply_not_an_exception() -> None:
    s = V1Session(1)
    s.handle({"id": 1, "method": "mining.subscribe", "params": []})
    (r,), problem = s.safe_handle({"id": 2, "method": "mining.submit", "params": [["w"], "j", "0", "0", "0"]})
    assert r["error"][0] == 20 and problem is not None


def test_eth_subscribe_without_the_protocol_name_is_refused() -> None:
    (r,) = EthSession(1).handle({"id": 1, "method": "mining.subscribe", "params": ["miner/1"]})
    assert r["error"] and ETH_PROTOCOL in r["error"][1]


def test_xmr_submit_before_login_is_unauthenticated() -> None:
    (r,) = XmrSession(1).handle({"id": 1, "method": "submit", "params": {"id": "x", "job_id": "y"}})
    assert r["error"]["message"] == "Unauthenticated"


def test_getwork_accepts_only_data_it_handed_out() -> None:
    g = GetworkRpc(1)
    (w,) = g.handle({"id": 0, "method": "getwork", "params": []})
    data = w["result"]["data"]
    assert len(data) == 256
    assert g.handle({"id": 1, "method": "getwork", "params": [data]})[0]["result"] is True
    assert g.handle({"id": 2, "method": "getwork", "params": ["00" * 128]})[0]["result"] is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.30:3333", ("203.0.113.30", 3333)),
        ("[2001:db8:2::30]:443", ("2001:db8:2::30", 443)),
        ("pool.example.net:4444", ("pool.example.net", 4444)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected
    assert parse_hostport(format_hostport(*expected)) == expected


@pytest.mark.parametrize("text", ["2001:db8::1:3333", "[2001:db8::1", "host:99999", "host"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)
