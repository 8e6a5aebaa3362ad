"""A short, fixed-seed slice of the fuzz harness over every parser: the regression net CI runs.

The harness is ``egressd_lab.fuzz``; the full run (``python -m egressd_lab.fuzz``, a million inputs) is the
search for new bugs; this slice
re-runs the same generators on a fixed seed in seconds, so a change that makes a parser
raise, or lets a bound slip, fails here with the input printed. The tests at the end pin
the bugs the fuzzer found, each as the smallest input that showed it; one still open is
``xfail(strict=True)``: the day it is fixed the test passes and the marker must go.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from egressd import defrag, expect
from egressd.detect.base import NEED_MORE, NOT_THIS, Detection, StreamContext
from egressd.detect.stratum import detect_stratum
from egressd.policy import PolicyError, load_policy
from egressd.policy.source import MAX_DIAGNOSTICS
from egressd.stream import StreamHead
from egressd_lab import fuzz

SEED = 20240611
SLICE = 20_000  # inputs over all targets, split by the harness's weights
MIN_PER_TARGET = 150  # the slow document targets still get a meaningful share
COUNTS = {name: max(n, MIN_PER_TARGET) for name, n in fuzz.plan(SLICE, list(fuzz.TARGETS)).items()}
GUARD = 10.0  # CPU seconds one input may take


@functools.cache
def _stats(name: str) -> Any:
    """One slice per target per test session, shared by the tests that look at it."""
    return fuzz.run_target(name, COUNTS[name], SEED, guard=GUARD, bombs=False)


def _run(name: str) -> Any:
    stats = _stats(name)
    if stats.exceptions:
        pytest.fail(
            f"{stats.exceptions} of {stats.inputs} {name} inputs broke the contract (seed {SEED}):\n"
            + fuzz.format_failures([stats]),
            pytrace=False,
        )
    assert stats.inputs == COUNTS[name]
    return stats


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_slice_breaks_no_contract(name: str) -> None:
    _run(name)


# -- the bounds are not only kept but reached: a slice that never fills them proves nothing


def test_engine_slice_fills_the_flow_table_to_max_flows_and_no_further() -> None:
    stats = _run("engine")
    assert stats.measures["max_flows"] == fuzz.POLICY_FLOWS
    assert stats.measures["evicted"] + stats.measures["overload"] > 0


def test_engine_slice_reaches_the_detectors_through_the_engine() -> None:
    stats = _run("engine")
    assert stats.measures["detections"] > 0
    assert stats.measures["fragments"] > 0


def test_defrag_slice_drives_reassembly_to_its_byte_bound() -> None:
    stats = _run("defrag")
    assert stats.measures["max_bytes"] > defrag.MAX_BYTES // 2
    assert stats.measures["completed"] > 0


def test_stream_slice_fills_heads_and_the_out_of_order_store() -> None:
    stats = _run("stream")
    assert stats.measures["max_data"] >= 8192
    assert stats.measures["max_pending"] > 0


@pytest.mark.parametrize("name", ["ssh", "stratum", "proxy", "tls", "dns"])
def test_detector_slice_produces_detections_not_only_rejections(name: str) -> None:
    stats = _run(name)
    assert stats.measures["detections"] > COUNTS[name] // 50


def test_pcap_slice_reads_packets_from_well_formed_captures() -> None:
    assert _run("pcap").measures["packets"] > 0


def test_policy_slice_loads_some_mutated_policies_and_judges_them() -> None:
    assert _run("policy").measures["loaded"] > 0


# -- YAML bombs: refused without expanding them, with a bounded report. Speed is measured by
# egressd_lab.fuzz; here only a generous hang guard (pytest-timeout) stands between a regression
# and a stuck CI run.


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bomb", [b[0] for b in fuzz.POLICY_BOMBS])
def test_policy_bomb_is_refused_with_a_bounded_report(bomb: str, tmp_path: Path) -> None:
    _name, text, _budget = next(b for b in fuzz.POLICY_BOMBS if b[0] == bomb)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    if bomb == "huge-plain-scalar":  # a 1 MiB description is a valid (if silly) policy
        load_policy(path)
        return
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert 1 <= len(exc.value.diagnostics) <= 101
    assert len(str(exc.value)) < 64 << 10


# -- bugs the fuzzer found (fixed in 0be072f), each pinned by the smallest input that showed it


def test_stream_head_never_holds_more_than_its_limit_out_of_order() -> None:
    data = bytes(range(100))
    h = StreamHead(100)
    h.start(0)
    h.add(10, data[10:40])
    h.add(50, data[50:90])
    h.add(10, data[10:90])  # refused at the bound
    h.add(10, data[10:90])
    held = sum(len(seg) for seg, _ in h.pending.values())
    assert h.pending_bytes == held
    assert held <= h.limit


def test_stratum_survives_a_content_length_longer_than_python_converts() -> None:
    fwd = b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n{}"
    r = detect_stratum(fwd, b"", StreamContext(40000, 8332))
    assert r is NEED_MORE or r is NOT_THIS or isinstance(r, Detection)


@pytest.mark.parametrize("unit", ["*a, ", "&a x, ", "!x a, ", "{}, "])
def test_policy_refusal_holds_a_bounded_number_of_diagnostics(unit: str, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nrules: [" + unit * 4000 + "]\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert len(err.value.diagnostics) <= MAX_DIAGNOSTICS + 1  # the last one says it stopped


def _expect_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "x.expect.yaml"
    path.write_bytes(data)
    return path


def test_expect_load_refuses_a_flow_with_a_non_text_key(tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b"flows:\n  - {1: a, b: c}\n"))


def test_expect_load_refuses_a_verdict_that_is_a_list(tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b"flows:\n  - verdict: [drop]\n"))


def test_expect_load_refuses_a_policy_path_with_a_nul_byte(tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b'policy: "a\\0b"\nflows: []\n'))


def test_expect_load_refuses_deeply_nested_yaml(tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b"flows: " + b"[" * 5000 + b"]" * 5000 + b"\n"))


def test_expect_load_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b"flows: []\n# \xff\n"))


@pytest.mark.parametrize("value", [b"!!timestamp 2020-13-45", b"!!timestamp x", b"!!float x", b"!!int x", b"!!bool x"])
def test_expect_load_refuses_a_value_yaml_cannot_construct(value: bytes, tmp_path: Path) -> None:
    with pytest.raises(expect.ExpectError):
        expect.load(_expect_file(tmp_path, b"flows:\n  - count: " + value + b"\n"))


def test_expect_load_refuses_a_billion_laughs_without_expanding_it(tmp_path: Path) -> None:
    levels = "".join(
        f"l{i}: &l{i} [{', '.join([f'*{p}'] * 10)}]\n" for i, p in enumerate(["a"] + [f"l{j}" for j in range(7)])
    )
    path = _expect_file(
        tmp_path,
        ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + levels).encode()
        + b"flows:\n  - match: {src: *l7}\n",
    )
    # In a child with 384 MiB of address space and a deadline, so that a regression cannot
    # take the test run down with it.
    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (384 << 20, resource.RLIM_INFINITY))
        from egressd import expect
        try:
            expect.load({str(path)!r})
        except expect.ExpectError:
            sys.exit(0)
        sys.exit(3)
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("expect.load still running after 30 s")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]


def test_policy_with_too_many_values_is_refused_before_composing(tmp_path: Path) -> None:
    # The pure-Python composer took ~6 s on 1 MiB of "{}, "; libyaml's event count refuses it first.
    path = tmp_path / "p.yaml"
    path.write_text("default: accept\nrules: [" + "{}, " * (64 << 10) + "]\n")  # 256 KiB
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert [d.message for d in exc.value.diagnostics] == [
        "more than 100000 YAML values in one file; split it or shorten it"
    ]
