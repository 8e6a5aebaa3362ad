"""Container, pod and systemd unit from a cgroup-v2 path; cgroup id -> path; a cgroup's processes.

Why the cgroup path and not a runtime API: every runtime names its cgroups after the
container id (and Kubernetes after the pod UID), so the path alone names them — with no
socket to a daemon that may be down, slow or absent. The layouts recognised (deepest match
wins, so a container that runs its own systemd inside still names the container):

===============================  ==========================================================
Docker, cgroupfs driver          ``/docker/<64 hex>``
Docker, systemd driver           ``/system.slice/docker-<64 hex>.scope``
Kubernetes, systemd driver       ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid
                                 with _>.slice/cri-containerd-<64 hex>.scope`` (``crio-`` for
                                 CRI-O, ``docker-`` for dockershim/cri-dockerd)
Kubernetes, cgroupfs driver      ``/kubepods/<qos>/pod<uid>/<64 hex>`` (``crio-<64 hex>`` for
                                 CRI-O); Guaranteed pods have no ``<qos>`` level
CRI-O outside Kubernetes         ``crio-<64 hex>.scope``
Podman                           ``libpod-<64 hex>.scope`` (systemd) or ``/libpod_parent/
                                 libpod-<64 hex>`` (cgroupfs); ``libpod-conmon-*`` is the monitor
systemd                          the deepest ``*.service`` or ``*.scope`` component is the unit
===============================  ==========================================================

On hybrid hosts (v1 controllers, v2 at ``/sys/fs/cgroup/unified``) only the ``0::`` line of
``/proc/PID/cgroup`` is the v2 path; v1 lines carry ids of their own that are not containers.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Final

_HEX64: Final = r"[0-9a-f]{64}"
_UID: Final = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"

# (pattern on one path component, runtime). Order matters only within one component.
_CONTAINER: Final = (
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_HEX64})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^libpod-({_HEX64})(?:\.scope)?$"), "podman"),
)
_BARE_ID: Final = re.compile(rf"^({_HEX64})$")
_POD_SYSTEMD: Final = re.compile(rf"^kubepods(?:-[a-z]+)?-pod({_UID})\.slice$")
_POD_CGROUPFS: Final = re.compile(rf"^pod({_UID})$")

MAX_PROCS: Final = 4096  # pids read from one cgroup.procs (a bound on work per lookup)
MAX_WALK: Final = 100_000  # cgroup directories visited when indexing ids


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    runtime: str
    pod_uid: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        d = {"id": self.id, "runtime": self.runtime}
        if self.pod_uid:
            d["pod_uid"] = self.pod_uid
        if self.name:
            d["name"] = self.name
        return d


def container_of(path: str) -> Container | None:
    """The container a cgroup path belongs to, or None for a host process."""
    parts = [p for p in path.split("/") if p]
    pod: str | None = None
    found: Container | None = None
    in_kube = False
    parent_docker = False
    for comp in parts:
        if comp.startswith("kubepods"):
            in_kube = True
        m = _POD_SYSTEMD.match(comp) or (_POD_CGROUPFS.match(comp) if in_kube else None)
        if m:
            pod = m.group(1).replace("_", "-")
            continue
        hit: Container | None = None
        for rx, runtime in _CONTAINER:
            m = rx.match(comp)
            if m:
                hit = Container(m.group(1), runtime)
                break
        if hit is None:
            m = _BARE_ID.match(comp)
            if m and (parent_docker or pod is not None):
                hit = Container(m.group(1), "docker" if parent_docker else "cri")
        parent_docker = comp == "docker"
        if hit is not None:
            found = hit  # the deepest match wins
    if found is None:
        return None
    if pod is not None:
        return Container(found.id, found.runtime, pod)
    return found


def unit_of(path: str) -> str | None:
    """The systemd unit a cgroup path belongs to: its deepest ``.service``/``.scope`` component."""
    for comp in reversed([p for p in path.split("/") if p]):
        if comp.endswith((".service", ".scope")):
            return comp
    return None


def v2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup-v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``); None when this mount namespace has none."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        return None
    return None


def cgroup_of(pid: int) -> str | None:
    """The v2 path of a process (the ``0::`` line), or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def procs(mount: str, path: str, limit: int = MAX_PROCS) -> list[int]:
    """The pids in one cgroup (not its children), at most ``limit``."""
    out: list[int] = []
    try:
        with open(os.path.join(mount, path.lstrip("/"), "cgroup.procs")) as f:
            for line in f:
                if len(out) >= limit:
                    break
                if line.strip():
                    out.append(int(line))
    except (OSError, ValueError):
        return out
    return out


class CgroupIndex:
    """cgroup id (what sock_diag reports) -> path. On a 64-bit kernel the id is the inode
    number of the cgroup's directory in the v2 hierarchy; the tree is walked once and again
    on a miss (a new container's cgroup appears later) — but a walk starts only when the
    time since the last one is ``share`` times what that walk took, so misses cost the
    worker at most 1/share of its time (a walk of this host's tree: about a millisecond)."""

    def __init__(self, mount: str | None, share: float = 10.0) -> None:
        self.mount = mount
        self.share = share
        self._paths: dict[int, str] = {}
        self._walked = -1e18
        self._took = 0.0

    def path(self, cgroup_id: int) -> str | None:
        if self.mount is None or cgroup_id <= 0:
            return None
        p = self._paths.get(cgroup_id)
        if p is None and time.monotonic() - self._walked >= self.share * self._took:
            self._walk()
            p = self._paths.get(cgroup_id)
        return p

    def refresh(self) -> None:
        if self.mount is not None:
            self._walk()

    def cached(self, cgroup_id: int) -> str | None:
        """The path if already known; never walks (for the daemon's loop thread)."""
        return self._paths.get(cgroup_id)

    def _walk(self) -> None:
        assert self.mount is not None
        self._walked = time.monotonic()
        paths: dict[int, str] = {}
        root = self.mount
        try:
            paths[os.stat(root).st_ino] = "/"
        except OSError:
            return
        stack = [(root, "")]
        seen = 0
        while stack and seen < MAX_WALK:
            d, rel = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            seen += 1
                            child = f"{rel}/{e.name}"
                            paths[e.inode()] = child
                            stack.append((e.path, child))
            except OSError:
                continue
        self._paths = paths
        self._took = time.monotonic() - self._walked
