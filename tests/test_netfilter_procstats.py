"""Parsing /proc/net/netfilter/nfnetlink_queue: the kernel's fixed format, and nothing else."""

from __future__ import annotations

from pathlib import Path

from egressd import procstats

# Two lines exactly as the kernel prints them ("%5u %6u %5u %1u %5u %5u %5u %8u %2d").
SAMPLE = (
    "    5  13908     3 2  4016     0     0       16  1\n   11 4294967295  1024 1 65531   296    17 4294967295  1\n"
)


def test_parses_every_field_in_kernel_order() -> None:
    a, b = procstats.parse(SAMPLE)
    assert a == procstats.QueueStats(5, 13908, 3, 2, 4016, 0, 0, 16)
    assert (b.peer_portid, b.queue_total, b.queue_dropped, b.user_dropped, b.id_sequence) == (
        4294967295,
        1024,
        296,
        17,
        4294967295,
    )


def test_copy_mode_names() -> None:
    a, b = procstats.parse(SAMPLE)
    assert (a.copy_mode_name, b.copy_mode_name) == ("packet", "meta")


def test_dropped_adds_queue_and_socket_losses() -> None:
    assert procstats.parse(SAMPLE)[1].dropped == 313


def test_malformed_lines_are_skipped_not_raised_on() -> None:
    text = "garbage\n1 2 3\n  1 2 3 4 5 6 7 x 1\n  1 2 3 4 5 -6 7 8 1\n" + SAMPLE.splitlines()[0] + "\n"
    assert [s.queue_num for s in procstats.parse(text)] == [5]


def test_empty_file_means_no_queue_bound() -> None:
    assert procstats.parse("") == []


def test_find_by_queue_number() -> None:
    stats = procstats.parse(SAMPLE)
    found = procstats.find(stats, 11)
    assert found is not None and found.copy_range == 65531
    assert procstats.find(stats, 6) is None


def test_read_a_missing_file_is_an_empty_list(tmp_path: Path) -> None:
    assert procstats.read(tmp_path / "absent") == []


def test_read_a_file(tmp_path: Path) -> None:
    p = tmp_path / "nfnetlink_queue"
    p.write_text(SAMPLE)
    assert len(procstats.read(p)) == 2
