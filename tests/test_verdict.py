"""egressd.verdict: what each verdict does, and the flow and kernel transitions, in one table each."""

from __future__ import annotations

from egressd import netfilter, verdict
from egressd.daemon import _MARK_BITS
from egressd.flow import PENDING, PINNED_ACCEPT, PINNED_DROP, SETTLED

ALL = tuple(verdict.NAMES)
STATES = (PENDING, SETTLED, PINNED_ACCEPT, PINNED_DROP)


def test_every_verdict_is_named_and_says_what_it_writes_to_the_kernel() -> None:
    assert set(verdict.MARK_OF) == set(ALL) == {0, 1, 2, 3, 4}
    assert {verdict.PIN_DENY, verdict.DROP_PACKET} == verdict.PACKET_DROPPED
    # The two per-packet verdicts leave the connection alone; the three others write it.
    assert [v for v in ALL if verdict.MARK_OF[v] is None] == [verdict.PASS, verdict.DROP_PACKET]


def test_the_kernel_table_is_what_the_marks_say_and_allow_and_deny_are_final() -> None:
    for (state, v), after in verdict.KERNEL.items():
        assert after == (verdict.MARK_OF[v] or state), (state, verdict.NAMES[v])
        assert state not in (verdict.ALLOW, verdict.DENY)
    for state in (verdict.UNSEEN, verdict.SEEN):
        assert {v for s, v in verdict.KERNEL if s == state} == set(ALL)


def test_per_packet_drop_is_not_a_connection_drop() -> None:
    assert verdict.ON_ERROR == {"accept": verdict.PASS, "drop": verdict.DROP_PACKET}
    for state in (verdict.UNSEEN, verdict.SEEN):
        assert verdict.KERNEL[(state, verdict.DROP_PACKET)] == state
        assert verdict.KERNEL[(state, verdict.PIN_DENY)] == verdict.DENY


def test_flow_transitions_agree_with_their_verdicts() -> None:
    pinned_by = {PINNED_ACCEPT: verdict.PIN_ALLOW, PINNED_DROP: verdict.PIN_DENY}
    for state, row in verdict.TRANSITIONS.items():
        assert state in STATES
        for event, (after, v) in row.items():
            assert event in verdict.EVENTS
            if after in pinned_by:
                assert v == pinned_by[after], (state, verdict.EVENTS[event])
            else:
                assert v in (verdict.PASS, verdict.PASS_MARK_SEEN), (state, verdict.EVENTS[event])


def test_pinned_flows_never_leave_their_state_and_nothing_leads_from_drop_to_accept() -> None:
    for state in (PINNED_ACCEPT, PINNED_DROP):
        assert verdict.TRANSITIONS[state] == {verdict.LATE: (state, verdict.TRANSITIONS[state][verdict.LATE][1])}
    reachable = {PINNED_DROP}
    frontier = [PINNED_DROP]
    while frontier:
        for after, _ in verdict.TRANSITIONS[frontier.pop()].values():
            if after not in reachable:
                reachable.add(after)
                frontier.append(after)
    assert reachable == {PINNED_DROP}


def test_only_a_fresh_flows_first_packet_marks_it_seen() -> None:
    rows = verdict.TRANSITIONS.items()
    marking = [(s, e) for s, row in rows for e, (_, v) in row.items() if v == verdict.PASS_MARK_SEEN]
    assert marking == [(PENDING, verdict.FIRST_PACKET)]


def test_the_daemon_writes_the_mark_bits_the_table_names() -> None:
    assert _MARK_BITS == {
        verdict.PASS_MARK_SEEN: netfilter.MARK_SEEN,
        verdict.PIN_ALLOW: netfilter.MARK_ALLOW,
        verdict.PIN_DENY: netfilter.MARK_DENY,
    }
