"""The container image's own file system, run for real (no container runtime, no registry).

deploy/container/build_image.py builds the OCI image archive from Debian packages
(mmdebstrap) and this checkout's wheel; this test unpacks the archive layer by layer (digests
checked) and runs the image's own entrypoint with the DaemonSet's args, chrooted into it, in
the node namespace of a lab it creates: the image's Python, iptables and entrypoint, nothing of
the host. It starts the way Kubernetes starts the DaemonSet's container (``in_image``): uid 0
holding only the capabilities deploy/kubernetes/base/daemonset.yaml adds, the root file system
read-only, the pod's volumes where the pod mounts them (the ConfigMap laid out as the kubelet
lays it out), /proc/sys read-only. It must come up as the egressd user with exactly the three
measured capabilities, block a Stratum handshake to the lab's pool, answer the probe command,
reload on a kubelet-style ConfigMap swap, remove its rules when stopped, and still run when the
pod leaves out the two attribution capabilities.

Time (measured on 2 shared vCPUs): a cold build (mmdebstrap + wheels) 92-104 s, of which the
Debian layer 37 s; after a change to egressd's sources ~25 s (the
Debian layer is cached under build/image, keyed by its inputs); nothing changed ~1 s. The
module itself then takes ~15 s. Build times and the image size are printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.harness import POOL_V4, adv_lab, live, proc_status, stratum
from egressd_lab.netns import Lab

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "container" / "build_image.py"
sys.path[:0] = [str(BUILD.parent), str(REPO)]
import build_image  # noqa: E402

from tests.test_kubernetes_manifests import render  # noqa: E402

pytestmark = [
    *live,
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap missing (make deps installs it)"),
    pytest.mark.timeout(900),  # a cold build; a warm one is seconds
]

UID = build_image.UID
CAP = {"net_admin": 12, "sys_ptrace": 19, "dac_read_search": 2}
DAEMON_CAPS = sum(1 << n for n in CAP.values())
KDIR = REPO / "deploy" / "kubernetes"


def daemonset() -> dict[str, Any]:
    (ds,) = [o for o in render(KDIR) if o["kind"] == "DaemonSet"]
    return ds


def container() -> dict[str, Any]:
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    return c


def pod_caps() -> list[str]:
    """The capabilities the DaemonSet adds, as setpriv names them."""
    return [c.lower() for c in container()["securityContext"]["capabilities"]["add"]]


def kubelet_configmap_volume(directory: Path, data: dict[str, str], items: list[dict[str, str]], stamp: str) -> None:
    """Lay out (or atomically swap) a ConfigMap volume as the kubelet does: the files in a
    timestamped directory, ``..data`` a symlink to it replaced by rename, and each visible
    name a symlink through ``..data`` that never changes itself."""
    ts = directory / f"..{stamp}"
    for item in items:
        f = ts / item["path"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(data[item["key"]])
    for p in (ts, *ts.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, directory / "..data")
    for top in {Path(i["path"]).parts[0] for i in items}:
        link = directory / top
        if not link.is_symlink():
            link.symlink_to(f"..data/{top}")


@dataclass
class Image:
    root: Path
    config: dict[str, Any]
    info: dict[str, Any]


@dataclass
class Running:
    lab: Lab
    image: Image
    proc: subprocess.Popen[bytes]
    pool: peers.Pool
    stdout: Path
    stderr: Path
    run_dir: Path
    policy_dir: Path

    def events(self) -> list[dict[str, Any]]:
        """The EVE lines the daemon wrote to stdout (--events-stdout, as in the DaemonSet)."""
        out = []
        for line in self.stdout.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def in_image(self, argv: list[str]) -> list[str]:
        return in_image(self.image.root, argv, self.run_dir, self.policy_dir)


def in_image(
    root: Path, argv: list[str], run_dir: Path, policy_dir: Path, caps_added: list[str] | None = None
) -> list[str]:
    """``argv`` in the image as Kubernetes starts the DaemonSet's container: a private mount
    namespace; the image's root read-only (readOnlyRootFilesystem) with the pod's volumes on
    it (the emptyDir at /run/egressd, the ConfigMap read-only at /etc/egressd, the node's
    cgroup-v2 tree read-only at /sys/fs/cgroup, mounted afresh: ``ip netns exec`` hides the
    host's); its own /proc
    with /proc/sys read-only as runtimes mount it; chrooted, as uid 0 whose bounding set is the
    capabilities the DaemonSet adds (what a runtime gives a container: nothing else)."""
    r = str(root)
    caps = ",".join("+" + c for c in (pod_caps() if caps_added is None else caps_added))
    script = f"""set -e
mount --bind "{r}" "{r}"
mount -t proc proc "{r}/proc"
mount --bind "{r}/proc/sys" "{r}/proc/sys"; mount -o remount,bind,ro "{r}/proc/sys"
mount -t sysfs -o ro sysfs "{r}/sys"
mount -t cgroup2 -o ro cgroup2 "{r}/sys/fs/cgroup"
mount --bind "{run_dir}" "{r}/run/egressd"
mount --bind "{policy_dir}" "{r}/etc/egressd"; mount -o remount,bind,ro "{r}/etc/egressd"
mount -o remount,bind,ro "{r}"
exec chroot "{r}" setpriv --bounding-set=-all,{caps} -- "$@"
"""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "in-image", *argv]


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    out = REPO / "build" / "image"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(BUILD), "--json", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout)
    print(
        f"\nimage build: {time.monotonic() - t0:.1f} s (Debian layer {'cached' if info['base_cached'] else 'built'}); "
        f"archive {info['archive_bytes']} bytes, layers {info['layers_compressed_bytes']} bytes compressed, "
        f"{info['layers_unpacked_tar_bytes']} bytes unpacked"
    )
    root = Path(tempfile.mkdtemp(prefix="egressd-image-", dir="/tmp"))
    try:
        config = build_image.unpack(Path(info["archive"]), root)
        yield Image(root, config, info)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def running(image: Image) -> Iterator[Running]:
    """The image's entrypoint with the DaemonSet's args, in a lab's node namespace."""
    site_packages = next((image.root / "opt/egressd/lib").glob("python3*/site-packages"))
    if not (site_packages / "egressd" / "watch.py").exists():
        pytest.skip("the DaemonSet runs `egressd run --watch` on a layered site policy (issue 11), not in this tree")
    work = Path(tempfile.mkdtemp(prefix="egressd-pod-", dir="/tmp"))
    run_dir, policy_dir = work / "run", work / "policy"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)  # an emptyDir: root-owned, world-writable
    policy_dir.mkdir(mode=0o755)
    cm = next(o for o in render(KDIR) if o["kind"] == "ConfigMap")
    vol = next(v for v in daemonset()["spec"]["template"]["spec"]["volumes"] if v["name"] == "policy")
    kubelet_configmap_volume(policy_dir, cm["data"], vol["configMap"]["items"], "2026_12_05_08_00_00.000000001")
    try:
        with adv_lab() as lb:
            pool = peers.start_pool(lb, work, "v1", POOL_V4, 3333, idle_timeout=3.0)
            # A node where nothing turned conntrack accounting on: the pod cannot write /proc/sys,
            # so it is egressd's connbytes rule that must turn it on (checked below).
            lb.run_node(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0"], check=True)
            out, err = work / "stdout", work / "stderr"
            argv = in_image(
                image.root, [*image.config["config"]["Entrypoint"], *container()["args"]], run_dir, policy_dir
            )
            t0 = time.monotonic()
            with out.open("wb") as fo, err.open("wb") as fe:
                proc = lb.spawn("node", argv, stdout=fo, stderr=fe)
            sock = run_dir / "status.sock"
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, f"no status socket: {err.read_text()}"
                time.sleep(0.05)
            print(f"\nimage's egressd up (status socket) {time.monotonic() - t0:.2f} s after exec")
            yield Running(lb, image, proc, pool, out, err, run_dir, policy_dir)
            if proc.poll() is None:
                lb.stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_image_config_runs_egressd(image: Image) -> None:
    c = image.config["config"]
    assert c["Entrypoint"] == ["/usr/local/bin/egressd"]
    assert c["Cmd"] == ["run", "--events-stdout"]
    assert (image.root / "opt/egressd/bin/egressd").is_file()
    # no pip, no compiler, no apt in the image: only what packages.txt and the wheel bring
    for absent in ("opt/egressd/bin/pip", "usr/bin/gcc", "usr/bin/apt-get", "usr/share/perl"):
        assert not (image.root / absent).exists(), absent


def test_image_size_is_reported(image: Image) -> None:
    mib = image.info["layers_compressed_bytes"] / 2**20
    print(f"\nimage: {mib:.1f} MiB compressed, {image.info['layers_unpacked_tar_bytes'] / 2**20:.1f} MiB unpacked")
    assert 10 < mib < 100  # measured 43.3; a runaway layer (a compiler, a pip cache) would show here


def test_daemon_runs_as_the_egressd_user_with_exactly_the_measured_capabilities(running: Running) -> None:
    st = proc_status(running.proc.pid)
    assert st["Name"].startswith("egressd") or "python" in st["Name"], st["Name"]
    assert st["Uid"].split() == [str(UID)] * 4
    assert st["Gid"].split() == [str(UID)] * 4
    caps = {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")}
    assert caps == dict.fromkeys(caps, DAEMON_CAPS), {k: hex(v) for k, v in caps.items()}


def test_conntrack_accounting_is_on_although_proc_sys_is_read_only(running: Running) -> None:
    p = running.lab.run_node(["sysctl", "-n", "net.netfilter.nf_conntrack_acct"])
    assert p.stdout.strip() == "1"
    p = running.lab.run_node(running.in_image(["sh", "-c", "echo 1 > /proc/sys/net/netfilter/nf_conntrack_acct"]))
    assert p.returncode != 0  # the pod really cannot write it


def test_the_images_egressd_blocks_a_stratum_handshake(running: Running) -> None:
    mark = running.pool.mark()
    rep = stratum(running.lab, POOL_V4, 3333)
    assert rep["connected"] and not rep["handshake_complete"], rep
    assert running.pool.requests(mark) == []
    deadline = time.monotonic() + 3
    while not any(e.get("rule") == "drop-mining" for e in running.events()) and time.monotonic() < deadline:
        time.sleep(0.05)
    ev = [e for e in running.events() if e.get("rule") == "drop-mining"]
    assert ev and ev[-1]["dest_ip"] == POOL_V4 and ev[-1]["action"] == "blocked", running.events()


def test_the_probe_command_answers(running: Running) -> None:
    """The DaemonSet's readiness/liveness probe: ``egressd status`` through the image's entrypoint."""
    (probe,) = {tuple(container()[k]["exec"]["command"]) for k in ("readinessProbe", "livenessProbe")}
    p = running.lab.run_node(running.in_image(list(probe)))
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["pid"] == running.proc.pid
    assert st["engine"]["dropped"] >= 1


def _swap_policy(running: Running, edit: Callable[[str], str], stamp: str) -> None:
    cm = next(o for o in render(KDIR) if o["kind"] == "ConfigMap")
    vol = next(v for v in daemonset()["spec"]["template"]["spec"]["volumes"] if v["name"] == "policy")
    data = dict(cm["data"], **{"site.yaml": edit(cm["data"]["site.yaml"])})
    kubelet_configmap_volume(running.policy_dir, data, vol["configMap"]["items"], stamp)


def _wait_reloads(running: Running, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while running.stderr.read_text().count("policy reloaded") < count:
        assert time.monotonic() < deadline, running.stderr.read_text()[-2000:]
        time.sleep(0.1)


def test_a_configmap_swap_reloads_the_policy(running: Running) -> None:
    """The kubelet's atomic ..data swap of the policy volume, seen by --watch: the site layer
    switched to monitor lets a Stratum handshake through (recorded, not dropped); swapped
    back, the next one is blocked again. No restart, no signal."""
    assert "--watch" in container()["args"]
    _swap_policy(running, lambda site: site + "\nmode: monitor\n", "2026_12_05_08_10_00.000000001")
    _wait_reloads(running, 1)
    mark = running.pool.mark()
    rep = stratum(running.lab, POOL_V4, 3333)
    assert rep["handshake_complete"], rep
    assert running.pool.requests(mark) != []
    _swap_policy(running, lambda site: site, "2026_12_05_08_20_00.000000001")
    _wait_reloads(running, 2)
    mark = running.pool.mark()
    rep = stratum(running.lab, POOL_V4, 3333)
    assert rep["connected"] and not rep["handshake_complete"], rep
    assert running.pool.requests(mark) == []


def test_stop_removes_the_rules(running: Running) -> None:
    assert netfilter.installed(netns=running.lab.node)
    t0 = time.monotonic()
    os.kill(running.proc.pid, signal.SIGTERM)
    assert running.proc.wait(15) == 0, running.stderr.read_text()
    print(f"\nimage's egressd stopped {time.monotonic() - t0:.2f} s after SIGTERM")
    running.lab.procs.remove(running.proc)
    saves = "".join(running.lab.run_node([t]).stdout for t in ("iptables-save", "ip6tables-save"))
    assert "EGRESSD" not in saves
    assert not netfilter.installed(netns=running.lab.node)


def test_a_pod_without_the_attribution_capabilities_still_runs(running: Running) -> None:
    """A site that removes SYS_PTRACE and DAC_READ_SEARCH from the pod (no process names in
    events, docs/attribution.md) gets a daemon holding NET_ADMIN alone, not a failed start."""
    assert running.proc.poll() is not None  # the module's daemon is stopped: the queue is free
    caps = [c for c in pod_caps() if c not in ("sys_ptrace", "dac_read_search")]
    argv = in_image(
        running.image.root, ["/usr/local/bin/egressd", *container()["args"]], running.run_dir, running.policy_dir, caps
    )
    err = running.stderr.with_suffix(".reduced")
    with err.open("wb") as fe:
        proc = running.lab.spawn("node", argv, stdout=subprocess.DEVNULL, stderr=fe)
    try:
        deadline = time.monotonic() + 20
        while not (running.run_dir / "status.sock").exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        st = proc_status(proc.pid)
        assert st["Uid"].split() == [str(UID)] * 4
        held = {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")}
        assert held == dict.fromkeys(held, 1 << CAP["net_admin"]), {k: hex(v) for k, v in held.items()}
    finally:
        running.lab.stop(proc)
    assert proc.returncode == 0, err.read_text()
