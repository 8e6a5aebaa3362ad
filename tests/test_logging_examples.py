"""deploy/logging: the Vector and Fluent Bit examples read what the DaemonSet and the systemd
unit really write (the pods' labels, namespace and container name; the unit's event file).

Checked here: they parse, and each selector/path matches the deployment it claims to read.
Not checked: Vector and Fluent Bit themselves (neither is packaged for Debian 12).
"""

from __future__ import annotations

import fnmatch
import shlex
from pathlib import Path
from typing import Any

import yaml

from tests.test_kubernetes_manifests import render

REPO = Path(__file__).resolve().parents[1]
LOGGING = REPO / "deploy" / "logging"


def _daemonset() -> dict[str, Any]:
    (ds,) = [o for o in render(REPO / "deploy" / "kubernetes") if o["kind"] == "DaemonSet"]
    return ds


def _unit_events_path() -> str:
    unit = (REPO / "systemd" / "egressd.service").read_text()
    (start,) = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(start.split("=", 1)[1])
    return argv[argv.index("--events") + 1]


def test_the_daemonset_writes_events_to_stdout() -> None:
    (c,) = _daemonset()["spec"]["template"]["spec"]["containers"]
    assert "--events-stdout" in c["args"]
    assert not any(a.startswith("--events=") or a == "--events" for a in c["args"])


def test_vector_selects_the_egressd_pods_and_the_unit_file() -> None:
    v = yaml.safe_load((LOGGING / "vector.yaml").read_text())
    ds = _daemonset()
    labels = ds["spec"]["template"]["metadata"]["labels"]
    pods = v["sources"]["egressd_pods"]
    key, _, value = pods["extra_label_selector"].partition("=")
    assert labels[key] == value
    assert pods["extra_namespace_label_selector"] == f"kubernetes.io/metadata.name={ds['metadata']['namespace']}"
    assert v["sources"]["egressd_file"]["include"] == [_unit_events_path()]
    remap = v["transforms"]["egressd_eve"]
    assert set(remap["inputs"]) == set(v["sources"])
    assert '.stream != "stdout"' in remap["source"] and "parse_json" in remap["source"]
    assert v["sinks"]["siem"]["inputs"] == ["egressd_eve"]


def test_fluent_bit_tails_the_egressd_container_logs_and_the_unit_file() -> None:
    fb = yaml.safe_load((LOGGING / "fluent-bit.yaml").read_text())
    ds = _daemonset()
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    pod, ns = f"{ds['metadata']['name']}-x7k2p", ds["metadata"]["namespace"]
    kubelet_name = f"/var/log/containers/{pod}_{ns}_{c['name']}-{'ab' * 32}.log"
    inputs = {i["tag"]: i for i in fb["pipeline"]["inputs"]}
    assert fnmatch.fnmatch(kubelet_name, inputs["egressd.pod"]["path"])
    # another namespace's container of the same name is not read
    assert not fnmatch.fnmatch(kubelet_name.replace(f"_{ns}_", "_default_"), inputs["egressd.pod"]["path"])
    assert inputs["egressd.pod"]["multiline.parser"] == "cri"
    assert inputs["egressd.file"]["path"] == _unit_events_path()
    filters = fb["pipeline"]["filters"]
    assert {"name": "grep", "match": "egressd.pod", "regex": "stream ^stdout$"} in filters
    assert any(f["name"] == "parser" and f["key_name"] == "log" and f["parser"] == "json" for f in filters)
