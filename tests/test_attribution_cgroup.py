"""Container, pod and unit names from cgroup-v2 paths, for every layout the runtimes document."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egressd.attribution.cgroup import CgroupIndex, Container, container_of, unit_of, v2_mount

CID = "3f4e" * 16
POD = "5e393aad-0b0b-40f0-9ea6-41717ed6062d"
POD_ = POD.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (f"/docker/{CID}", Container(CID, "docker")),
        (f"/system.slice/docker-{CID}.scope", Container(CID, "docker")),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope",
            Container(CID, "containerd", POD),
        ),
        (f"/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{CID}.scope", Container(CID, "containerd", POD)),
        (f"/kubepods/besteffort/pod{POD}/{CID}", Container(CID, "cri", POD)),
        (f"/kubepods/pod{POD}/{CID}", Container(CID, "cri", POD)),
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/crio-{CID}.scope",
         Container(CID, "cri-o", POD)),
        (f"/kubepods/burstable/pod{POD}/crio-{CID}", Container(CID, "cri-o", POD)),
        (f"/machine.slice/libpod-{CID}.scope", Container(CID, "podman")),
        (f"/libpod_parent/libpod-{CID}", Container(CID, "podman")),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container",
         Container(CID, "podman")),
        # A container running its own systemd: the container is still named.
        (f"/system.slice/docker-{CID}.scope/init.scope", Container(CID, "docker")),
    ],
)  # fmt: skip
def test_container_layouts_are_named(path: str, want: Container) -> None:
    assert container_of(path) == want


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/system.slice/ssh.service",
        "/user.slice/user-1000.slice/session-3.scope",
        f"/machine.slice/libpod-conmon-{CID}.scope",  # the container monitor, not the container
        f"/system.slice/{CID}",  # a bare id outside /docker or a pod proves nothing
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice",  # the pod, no container
        "/docker/abc",
    ],
)
def test_host_processes_have_no_container(path: str) -> None:
    assert container_of(path) is None


def test_unit_is_the_deepest_service_or_scope() -> None:
    assert unit_of("/system.slice/ssh.service") == "ssh.service"
    assert unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/job.service") == "job.service"
    assert unit_of(f"/system.slice/docker-{CID}.scope") == f"docker-{CID}.scope"
    assert unit_of("/kubepods.slice") is None
    assert unit_of("/") is None


def test_as_dict_leaves_out_what_is_not_known() -> None:
    assert Container(CID, "docker").as_dict() == {"id": CID, "runtime": "docker"}
    assert Container(CID, "containerd", POD).as_dict() == {"id": CID, "runtime": "containerd", "pod_uid": POD}


def test_v2_mount_found_in_mountinfo_on_a_hybrid_host(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw\n"
    )
    assert v2_mount(str(mi)) == "/sys/fs/cgroup/unified"
    mi.write_text("31 30 0:27 / /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory\n")
    assert v2_mount(str(mi)) is None
    assert v2_mount(str(tmp_path / "missing")) is None


def test_cgroup_index_maps_directory_inodes_to_paths_and_finds_new_ones(tmp_path: Path) -> None:
    (tmp_path / "system.slice" / "a.service").mkdir(parents=True)
    idx = CgroupIndex(str(tmp_path), share=0.0)
    ino = os.stat(tmp_path / "system.slice" / "a.service").st_ino
    assert idx.path(ino) == "/system.slice/a.service"
    assert idx.path(os.stat(tmp_path).st_ino) == "/"
    (tmp_path / "kubepods.slice").mkdir()
    assert idx.path(os.stat(tmp_path / "kubepods.slice").st_ino) == "/kubepods.slice"
    assert idx.path(0) is None
    assert CgroupIndex(None).path(ino) is None
