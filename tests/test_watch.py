"""--watch: a change to the policy files is noticed once it holds still, however it was made."""

from __future__ import annotations

import os
from pathlib import Path

from egressd.watch import PolicyWatch
from tests.configmap import ConfigMapVolume


def settle(w: PolicyWatch) -> list[bool]:
    return [w.poll() for _ in range(3)]


def test_nothing_changes_nothing_fires(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("default: accept\n")
    w = PolicyWatch([str(p)])
    assert settle(w) == [False, False, False]


def test_rewrite_in_place_fires_once_after_it_holds_still(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("default: accept\n")
    w = PolicyWatch([str(p)])
    ino = p.stat().st_ino
    with open(p, "w") as fh:  # same inode, new content (an editor, `cat > file`)
        fh.write("default: drop\nmode: monitor\n")
    assert p.stat().st_ino == ino
    assert settle(w) == [False, True, False]


def test_replace_by_rename_fires(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("default: accept\n")
    w = PolicyWatch([str(p)])
    new = tmp_path / ".p.yaml.tmp"
    new.write_text("default: accept\n")  # same size and text: only the inode differs (Ansible's copy)
    os.replace(new, p)
    assert settle(w) == [False, True, False]


def test_kubelet_data_symlink_swap_fires(tmp_path: Path) -> None:
    vol = ConfigMapVolume(tmp_path / "cm")
    vol.write({"default.yaml": "default: accept\n", "lists/x.yaml": "lists: {}\n"})
    visible = tmp_path / "cm" / "default.yaml"
    assert visible.is_symlink() and os.readlink(visible) == "..data/default.yaml"
    w = PolicyWatch([str(visible), str(tmp_path / "cm" / "lists" / "x.yaml")])
    before = os.readlink(tmp_path / "cm" / "..data")
    vol.write({"default.yaml": "default: accept\n", "lists/x.yaml": "lists: {}\n"})
    after = os.readlink(tmp_path / "cm" / "..data")
    assert before != after and after.startswith("..20") and not (tmp_path / "cm" / before).exists()
    assert os.readlink(visible) == "..data/default.yaml"  # the visible link itself never changes
    assert settle(w) == [False, True, False]


def test_a_file_that_keeps_changing_fires_only_once_it_stops(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("default: accept\n")
    w = PolicyWatch([str(p)])
    fired = []
    for i in range(4):
        p.write_text("default: accept\n" + "#" * (i + 1) + "\n")
        fired.append(w.poll())
    assert fired == [False, False, False, False]
    assert settle(w) == [True, False, False]


def test_rearm_with_a_new_include_watches_it(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    inc = tmp_path / "inc.yaml"
    p.write_text("default: accept\n")
    inc.write_text("lists: {}\n")
    w = PolicyWatch([str(p)])
    w.rearm([str(p), str(inc)])
    assert settle(w) == [False, False, False]
    inc.write_text("lists: {a: {type: port, items: [1]}}\n")
    assert settle(w) == [False, True, False]
