"""detect_stratum: pool mining JSON-RPC in either direction, and no false positives.

Messages are written from the protocol descriptions: Stratum v1 (slush pool / BIP 310
``mining.configure``), EthereumStratum/1.0.0 (NiceHash) and eth-proxy, the CryptoNote pool
protocol as XMRig speaks it, and getwork / getblocktemplate (BIP 22) over HTTP.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.detect.base import (
    MINING_ETH,
    MINING_GETWORK,
    MINING_POOL,
    MINING_STRATUM,
    MINING_XMR,
    NEED_MORE,
    NOT_THIS,
    Detection,
    Result,
    StreamContext,
)
from egressd.detect.stratum import detect_stratum

CTX = StreamContext(sport=40000, dport=3333)
CLOSED = StreamContext(sport=40000, dport=3333, fwd_closed=True, rev_closed=True)
FWD_FULL = StreamContext(sport=40000, dport=3333, fwd_full=True, rev_closed=True)

SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.12.1"]}\n'
AUTHORIZE = b'{"id": 2, "method": "mining.authorize", "params": ["wallet.rig1", "x"]}\n'
SUBSCRIBE_RESULT = (
    b'{"id":1,"result":[[["mining.set_difficulty","b4b6693b72a50c7116db18d6497cac52"],'
    b'["mining.notify","ae6812eb4cd7735a302a8a9dd95cf71f"]],"08000002",4],"error":null}\n'
)
XMR_LOGIN = (
    b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetW'
    b'zYGzKt52XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD","pass":"x","agent":"XMRig/6.21.0 '
    b'(Linux x86_64) libuv/1.44.2 gcc/12.2.0","algo":["rx/0","cn/r"]}}\n'
)
XMR_LOGIN_RESULT = (
    b'{"id":1,"jsonrpc":"2.0","error":null,"result":{"id":"1be0b7b6","job":{"blob":"0e0ef4d8a8a3","job_id":'
    b'"58","target":"b88d0600","algo":"rx/0","seed_hash":"a5e1"},'
    b'"extensions":["algo","keepalive"],"status":"OK"}}\n'
)


def detection(result: Result) -> Detection:
    assert isinstance(result, Detection), result
    return result


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def http_post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: 198.51.100.9:8332\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"
        b"Content-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


# --- client side ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "mining.subscribe",
        "mining.authorize",
        "mining.configure",
        "mining.extranonce.subscribe",
        "mining.suggest_target",
        "mining.suggest_difficulty",
        "mining.capabilities",
        "mining.submit",
        "mining.get_transactions",
    ],
)
def test_stratum_v1_client_methods_are_mining_stratum(method: str) -> None:
    found = detection(detect_stratum(line({"id": 7, "method": method, "params": []}), b"", CTX))
    assert found.kind == MINING_STRATUM
    assert found.info["method"] == method


@pytest.mark.parametrize("method", ["eth_submitLogin", "eth_getWork", "eth_submitWork", "eth_submitHashrate"])
def test_eth_proxy_methods_are_eth_stratum(method: str) -> None:
    msg = line(
        {
            "worker": "rig1",
            "jsonrpc": "2.0",
            "params": ["0xb85150eb365e7df0941f0cf08235f987ba91506a"],
            "id": 2,
            "method": method,
        }
    )
    found = detection(detect_stratum(msg, b"", CTX))
    assert found.kind == MINING_ETH


def test_ethereum_stratum_subscribe_is_eth_stratum() -> None:
    msg = line({"id": 1, "method": "mining.subscribe", "params": ["ethminer/0.19.0", "EthereumStratum/1.0.0"]})
    found = detection(detect_stratum(msg, b"", CTX))
    assert found.kind == MINING_ETH
    assert found.info["agent"] == "ethminer/0.19.0"


def test_ethereum_stratum_2_hello_is_eth_stratum() -> None:
    msg = line({"id": 0, "method": "mining.hello", "params": {"agent": "ethminer", "proto": "EthereumStratum/2.0.0"}})
    assert detection(detect_stratum(msg, b"", CTX)).kind == MINING_ETH


def test_xmrig_login_is_xmr_with_wallet_and_agent() -> None:
    found = detection(detect_stratum(XMR_LOGIN, b"", CTX))
    assert found.kind == MINING_XMR
    assert found.info["login"].startswith("48edfHu7V9Z84")
    assert found.info["agent"].startswith("XMRig/6.21.0")


def test_xmr_submit_and_keepalived_are_xmr() -> None:
    submit = line(
        {
            "id": 3,
            "method": "submit",
            "params": {"id": "1be0", "job_id": "58", "nonce": "8a010000", "result": "ab" * 32},
        }
    )
    keepalive = line({"id": 4, "method": "keepalived", "params": {"id": "1be0"}})
    assert detection(detect_stratum(submit, b"", CTX)).kind == MINING_XMR
    assert detection(detect_stratum(keepalive, b"", CTX)).kind == MINING_XMR


def test_generic_login_without_pool_fields_is_not_xmr() -> None:
    msg = line({"id": 1, "method": "login", "params": {"user": "alice", "password": "pw"}})
    assert detect_stratum(msg, b'{"id":1,"result":"ok"}\n', CTX) is NOT_THIS


def test_authorize_after_subscribe_adds_the_worker_name() -> None:
    found = detection(detect_stratum(SUBSCRIBE + AUTHORIZE, b"", CTX))
    assert found.info["method"] == "mining.subscribe"
    assert found.info["agent"] == "cgminer/4.12.1"
    assert found.info["user"] == "wallet.rig1"
    assert found.evidence.startswith('{"id": 1, "method": "mining.subscribe"')


# --- getwork / getblocktemplate over HTTP -------------------------------------------------------


def test_getblocktemplate_post_is_getwork_mining() -> None:
    body = b'{"id": 0, "method": "getblocktemplate", "params": [{"capabilities": ["coinbasetxn", "workid"]}]}'
    found = detection(detect_stratum(http_post(body), b"", CTX))
    assert found.kind == MINING_GETWORK
    assert found.info["method"] == "getblocktemplate"
    assert found.evidence.startswith('{"id": 0, "method": "getblocktemplate"')


def test_getwork_post_with_mining_extensions_header_is_getwork_mining() -> None:
    body = b'{"method": "getwork", "params": [], "id":0}\n'
    found = detection(
        detect_stratum(http_post(body, b"X-Mining-Extensions: longpoll midstate rollntime\r\n"), b"", CTX)
    )
    assert found.kind == MINING_GETWORK
    assert found.info["header"] == "x-mining-extensions"


def test_mining_extensions_header_alone_is_getwork_mining() -> None:
    req = b"GET /LP HTTP/1.1\r\nHost: pool\r\nX-Mining-Extensions: longpoll\r\n\r\n"
    assert detection(detect_stratum(req, b"", CTX)).kind == MINING_GETWORK


def test_eth_getwork_over_http_is_eth_mining() -> None:
    body = b'{"jsonrpc":"2.0","method":"eth_getWork","params":[],"id":73}'
    assert detection(detect_stratum(http_post(body), b"", CTX)).kind == MINING_ETH


def test_post_body_split_from_its_head_waits_for_content_length() -> None:
    full = http_post(b'{"id":1,"method":"getwork","params":[]}')
    head_end = full.index(b"\r\n\r\n") + 4
    assert detect_stratum(full[:head_end], b"", CTX) is NEED_MORE
    assert detect_stratum(full[: head_end + 10], b"", CTX) is NEED_MORE
    assert detection(detect_stratum(full, b"", CTX)).kind == MINING_GETWORK


def test_pool_http_headers_mark_the_pool_side() -> None:
    rev = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Long-Polling: /long-polling\r\n\r\n{}"
    found = detection(detect_stratum(b"", rev, CTX))
    assert found.kind == MINING_POOL


# --- pool side ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["mining.notify", "mining.set_difficulty", "mining.set_target", "mining.set_extranonce"]
)
def test_pool_notifications_are_mining_pool(method: str) -> None:
    msg = line({"id": None, "method": method, "params": ["00ff"]})
    assert detection(detect_stratum(b"", msg, CTX)).kind == MINING_POOL


def test_subscribe_result_listing_mining_subscriptions_is_pool() -> None:
    assert detection(detect_stratum(b"", SUBSCRIBE_RESULT, CTX)).kind == MINING_POOL


def test_xmr_login_result_with_job_is_pool() -> None:
    assert detection(detect_stratum(b"", XMR_LOGIN_RESULT, CTX)).kind == MINING_POOL


def test_xmr_job_notification_is_pool() -> None:
    msg = line({"jsonrpc": "2.0", "method": "job", "params": {"blob": "0e0e", "job_id": "59", "target": "b88d0600"}})
    assert detection(detect_stratum(b"", msg, CTX)).kind == MINING_POOL


def test_client_side_wins_over_pool_side_and_names_the_pool_message() -> None:
    found = detection(detect_stratum(SUBSCRIBE, SUBSCRIBE_RESULT, CTX))
    assert found.kind == MINING_STRATUM
    assert found.info["pool_method"] == "(subscribe result)"


def test_first_pool_message_generic_then_notify_is_pool() -> None:
    rev = b'{"id":1,"result":[null,"e66c0000"],"error":null}\n{"id":0,"params":["0004"],"method":"mining.set_target"}\n'
    assert detection(detect_stratum(b"", rev, CTX)).kind == MINING_POOL


# --- robustness -----------------------------------------------------------------------------------


def test_escaped_method_value_is_decoded() -> None:
    msg = b'{"id":1,"method":"m\\u0069ning.subscribe","params":[]}\n'
    assert detection(detect_stratum(msg, b"", CTX)).info["method"] == "mining.subscribe"


def test_escaped_method_key_is_decoded() -> None:
    msg = b'{"id":1,"\\u006dethod":"mining.authorize","params":["w","x"]}\n'
    assert detection(detect_stratum(msg, b"", CTX)).info["user"] == "w"


def test_bom_blank_lines_and_pretty_printing_are_tolerated() -> None:
    pretty = json.dumps({"params": ["a", "b"], "id": "x", "method": "mining.authorize"}, indent=4).encode()
    found = detection(detect_stratum(b"\xef\xbb\xbf\r\n\r\n  " + pretty + b"\n", b"", CTX))
    assert found.kind == MINING_STRATUM


@pytest.mark.parametrize("msg_id", [None, "abc", 1.5, {"n": 1}, [1, 2], True, -3])
def test_any_json_type_is_accepted_as_id(msg_id: object) -> None:
    assert isinstance(
        detect_stratum(line({"id": msg_id, "method": "mining.subscribe", "params": []}), b"", CTX), Detection
    )


def test_method_after_a_long_params_array_is_found() -> None:
    msg = line({"id": 1, "params": ["p" * 40] * 80, "method": "mining.subscribe"})
    assert len(msg) > 3000
    assert detection(detect_stratum(msg, b"", CTX)).kind == MINING_STRATUM


def test_method_name_case_is_folded() -> None:
    assert detection(detect_stratum(b'{"id":1,"method":"Mining.Subscribe"}\n', b"", CTX)).kind == MINING_STRATUM


def test_batch_request_is_looked_into() -> None:
    batch = b'[{"id":1,"method":"server.version","params":[]},{"id":2,"method":"mining.subscribe","params":[]}]\n'
    assert detection(detect_stratum(batch, b"", CTX)).kind == MINING_STRATUM


@pytest.mark.parametrize("method", [1, None, ["mining.subscribe"], {"name": "mining.subscribe"}])
def test_method_that_is_not_a_string_matches_nothing(method: object) -> None:
    msg = line({"id": 1, "method": method, "params": [], "result": [["mining.notify", "x"]]})
    assert detect_stratum(msg, msg, CTX) is NOT_THIS


def test_every_prefix_of_a_message_is_need_more_then_detection() -> None:
    for cut in range(len(SUBSCRIBE) - 2):  # the closing brace makes it complete
        assert detect_stratum(SUBSCRIBE[:cut], b"", CTX) is NEED_MORE, cut
    assert isinstance(detect_stratum(SUBSCRIBE, b"", CTX), Detection)


@pytest.mark.parametrize("seed", range(5))
def test_random_segmentation_of_a_session_never_gives_a_wrong_answer(seed: int) -> None:
    rng = random.Random(seed)
    fwd = XMR_LOGIN + b'{"id":2,"method":"keepalived","params":{"id":"1be0"}}\n'
    i = 0
    seen: list[Result] = []
    while i < len(fwd):
        i = min(len(fwd), i + rng.randint(1, 40))
        seen.append(detect_stratum(fwd[:i], XMR_LOGIN_RESULT if i > 200 else b"", CTX))
    assert NOT_THIS not in seen
    assert detection(seen[-1]).kind == MINING_XMR


def test_message_without_newline_in_a_full_head_is_decided() -> None:
    unfinished = b'{"id":1,"params":["' + b"a" * 9000
    assert detect_stratum(unfinished, b"", FWD_FULL) is NOT_THIS
    assert detect_stratum(unfinished[:4000], b"", CTX) is NEED_MORE


def test_complete_message_without_newline_is_decided_at_once() -> None:
    assert isinstance(detect_stratum(SUBSCRIBE.rstrip(b"\n"), b"", CTX), Detection)


# --- no false positives -----------------------------------------------------------------------

LSP_INIT = b'Content-Length: 75\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"processId":null}}'
LSP_DID_OPEN = b'{"jsonrpc":"2.0","method":"textDocument/didOpen","params":{"textDocument":{"uri":"file:///a"}}}\n'
TLS_CLIENT_HELLO = bytes.fromhex("160301002f0100002b0303") + bytes(32) + bytes.fromhex("000002c02f01000000")
BITCOIN_VERSION = bytes.fromhex("f9beb4d976657273696f6e000000000055000000") + bytes(85)


@pytest.mark.parametrize(
    ("fwd", "rev"),
    [
        (LSP_INIT, b'Content-Length: 40\r\n\r\n{"jsonrpc":"2.0","id":1,"result":{}}'),
        (LSP_DID_OPEN, b""),
        (
            line({"jsonrpc": "2.0", "method": "eth_blockNumber", "params": [], "id": 83}),
            line({"jsonrpc": "2.0", "id": 83, "result": "0x4b7"}),
        ),
        (
            http_post(b'{"jsonrpc":"2.0","method":"web3_clientVersion","params":[],"id":67}'),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ),
        (
            http_post(b'{"jsonrpc":"2.0","method":"eth_call","params":[{"to":"0x0"},"latest"],"id":1}'),
            b"HTTP/1.1 200 OK\r\n\r\n",
        ),
        (
            http_post(b'{"jsonrpc":"1.0","id":"curl","method":"getblockchaininfo","params":[]}'),
            b"HTTP/1.1 200 OK\r\n\r\n",
        ),
        (BITCOIN_VERSION, BITCOIN_VERSION),
        (TLS_CLIENT_HELLO, bytes.fromhex("160303007a0200007603")),
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", b"SSH-2.0-OpenSSH_9.2\r\n"),
        (
            line({"jsonrpc": "2.0", "id": 4, "method": "eth_getFilterChanges", "params": ["0x16"]}),
            line({"jsonrpc": "2.0", "id": 4, "result": ["0x" + "ab" * 32] * 3}),
        ),
    ],
)
def test_other_json_rpc_and_protocols_are_not_mining(fwd: bytes, rev: bytes) -> None:
    assert detect_stratum(fwd, rev, CLOSED) is NOT_THIS


def test_solo_mining_getblocktemplate_to_bitcoind_is_mining() -> None:
    body = b'{"jsonrpc":"1.0","id":"gbt","method":"getblocktemplate","params":[{"rules":["segwit"]}]}'
    assert detection(detect_stratum(http_post(body), b"", CTX)).kind == MINING_GETWORK


def test_undecided_while_one_side_may_still_speak() -> None:
    assert detect_stratum(b"GET / HTTP/1.1\r\n\r\n", b"", CTX) is NEED_MORE
    assert detect_stratum(b"", b"", CTX) is NEED_MORE
    assert detect_stratum(b"", b"", CLOSED) is NOT_THIS


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 5000,
        b"{" * 5000 + b"}" * 5000,
        b'{"a":' * 3000,
        b"\x00" * 100,
        b"{\xff\xfe\n",
        b'{"method":"\\ud800"}\n',
    ],
)
def test_hostile_json_never_raises(data: bytes) -> None:
    for ctx in (CTX, CLOSED):
        result = detect_stratum(data, data, ctx)
        assert result is NEED_MORE or result is NOT_THIS


_CTXS = st.builds(
    StreamContext,
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    fwd_closed=st.booleans(),
    rev_closed=st.booleans(),
    fwd_full=st.booleans(),
    rev_full=st.booleans(),
)
_JSONISH = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda t: b'{"id":1,"method":' + t, st.binary(max_size=200)),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(["method", "params", "result", "job", "login"]), children, max_size=4)
        ),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode() + b"\n"),
    st.builds(lambda t: b"POST / HTTP/1.1\r\n" + t, st.binary(max_size=300)),
)


@settings(max_examples=300, deadline=None)
@given(fwd=_JSONISH, rev=_JSONISH, ctx=_CTXS)
def test_arbitrary_input_never_raises(fwd: bytes, rev: bytes, ctx: StreamContext) -> None:
    result = detect_stratum(fwd, rev, ctx)
    assert result is NEED_MORE or result is NOT_THIS or isinstance(result, Detection)
