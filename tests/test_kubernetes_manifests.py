"""deploy/kubernetes, checked offline: API schemas, security properties, the policy it ships.

Rendering: the kustomizations use a small subset of kustomize (resources, namespace,
configMapGenerator without name hash, images, JSON 6902 patches); ``render`` implements
exactly that subset and refuses any other key, so what is validated is what ``kubectl apply
-k`` applies. Where kubectl is installed, its own ``kubectl kustomize`` output is compared too.

Validation: every rendered object against the Kubernetes 1.31 API schemas of
``kubernetes-validate`` (strict: unknown fields are errors), no cluster needed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from egressd.daemon import parse_metrics_address
from egressd.policy import load_policy

REPO = Path(__file__).resolve().parents[1]
KDIR = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.31.0"  # the oldest minor the manifests claim (DaemonSet maxSurge is GA since 1.25)
KUSTOMIZE_KEYS = {
    "apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions", "images", "patches",
    "nameSuffix", "labels",
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace"}
# What the DaemonSet adds (the image test starts the image's egressd with exactly these).
POD_CAPS = ["NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "SETUID", "SETGID", "SETPCAP"]

Obj = dict[str, Any]


# -- a kustomize subset -------------------------------------------------------------------------
def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 add/replace/remove/test (what the overlays use); a failed test op raises."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if isinstance(node, list):
            i = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(i, op["value"])
            elif kind == "replace":
                node[i] = op["value"]
            elif kind == "remove":
                del node[i]
            elif kind == "test":
                assert node[i] == op["value"], f"patch test failed at {op['path']}: {node[i]!r}"
            else:
                raise AssertionError(f"unsupported op {kind}")
        elif kind in ("add", "replace"):
            node[last] = op["value"]
        elif kind == "remove":
            del node[last]
        elif kind == "test":
            assert node[last] == op["value"], f"patch test failed at {op['path']}: {node.get(last)!r}"
        else:
            raise AssertionError(f"unsupported op {kind}")
    return doc


def render(kdir: Path) -> list[Obj]:
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_KEYS
    assert not unknown, f"{kdir}/kustomization.yaml uses {unknown}: extend render() (and check kustomize does it)"
    objs: list[Obj] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        if path.is_dir():
            objs += render(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        data = {Path(f).name: (kdir / f).read_text() for f in gen["files"]}
        if gen.get("behavior") == "merge":
            (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
            cm["data"].update(data)
            continue
        assert k.get("generatorOptions", {}).get("disableNameSuffixHash") is True
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for p in k.get("patches", []):
        t = p["target"]
        hits = [i for i, o in enumerate(objs) if o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"]]
        assert len(hits) == 1, f"patch target {t} matches {len(hits)} objects"
        objs[hits[0]] = json_patch(objs[hits[0]], yaml.safe_load(p["patch"]))
    if "nameSuffix" in k:
        renamed = {}
        for o in objs:
            renamed[(o["kind"], o["metadata"]["name"])] = o["metadata"]["name"] + k["nameSuffix"]
            o["metadata"]["name"] += k["nameSuffix"]
        for o in objs:  # the references kustomize follows, as far as these manifests have them
            pod = o.get("spec", {}).get("template", {}).get("spec", {})
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    v["configMap"]["name"] = renamed.get(("ConfigMap", v["configMap"]["name"]), v["configMap"]["name"])
            if "serviceAccountName" in pod:
                sa = pod["serviceAccountName"]
                pod["serviceAccountName"] = renamed.get(("ServiceAccount", sa), sa)
    for lab in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(lab["pairs"])
            spec = o.get("spec", {})
            if lab.get("includeSelectors") and "template" in spec:
                spec["selector"].setdefault("matchLabels", {}).update(lab["pairs"])
                spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
    for img in k.get("images", []):
        for o in objs:
            for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"] == img["name"]:
                    c["image"] = f"{img['newName']}:{img['newTag']}"
    return objs


def by_kind(objs: list[Obj], kind: str) -> Obj:
    (o,) = [o for o in objs if o["kind"] == kind]
    return o


VARIANTS = {"default": KDIR, "metrics": KDIR / "metrics", "pool": KDIR / "pools" / "example-gpu-a"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(VARIANTS[request.param])


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(KDIR)


def container(objs: list[Obj]) -> Obj:
    (c,) = by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


# -- schemas ----------------------------------------------------------------------------------
def test_every_object_validates_against_the_kubernetes_schemas(rendered: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds in (
        ["ConfigMap", "DaemonSet", "Namespace", "ResourceQuota", "ServiceAccount"],
        ["ConfigMap", "DaemonSet"],  # a pool: the namespace comes from deploy/kubernetes/namespace
    )
    for o in rendered:
        assert kubernetes_validate.validate(o, K8S_VERSION, strict=True) == "1.31"


def test_the_validator_rejects_what_it_should() -> None:
    """The check can fail: a misspelt field and a wrong type are schema errors."""
    ds = copy.deepcopy(by_kind(render(KDIR), "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(by_kind(render(KDIR), "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "no"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


# -- security properties ---------------------------------------------------------------------
def test_no_privileged_and_only_the_measured_capabilities(rendered: list[Obj]) -> None:
    pod = by_kind(rendered, "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "ephemeralContainers" not in pod
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["privileged"] is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["capabilities"]["add"] == POD_CAPS
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_host_namespaces_and_mounts_are_what_attribution_needs_and_read_only(rendered: list[Obj]) -> None:
    pod = by_kind(rendered, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert "hostIPC" not in pod
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "egressd"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container(rendered)["volumeMounts"]}
    host = {n for n, v in volumes.items() if "hostPath" in v}
    assert {volumes[n]["hostPath"]["path"] for n in host} == {"/sys/fs/cgroup"}
    for n in host:
        assert mounts[n]["readOnly"] is True, n
    assert mounts["policy"]["readOnly"] is True
    assert "subPath" not in mounts["policy"]  # a subPath mount is never updated by the kubelet
    writable = {m["mountPath"] for m in mounts.values() if not m.get("readOnly")}
    assert writable == {"/run/egressd"}
    assert volumes["run"]["emptyDir"]["medium"] == "Memory"


def test_scheduling_priority_tolerations_and_rollout(rendered: list[Obj]) -> None:
    ds = by_kind(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    gpu = {(t["key"], t["operator"], t["effect"]) for t in pod["tolerations"] if t.get("key") == "nvidia.com/gpu"}
    assert gpu == {("nvidia.com/gpu", "Exists", "NoSchedule"), ("nvidia.com/gpu", "Exists", "NoExecute")}
    ru = ds["spec"]["updateStrategy"]
    assert ru["type"] == "RollingUpdate"
    # one node at a time, old pod first: a surge pod could never bind the queue the old one holds
    assert ru["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert ds["spec"]["minReadySeconds"] >= 5
    if any(o["kind"] == "ResourceQuota" for o in rendered):
        quota = by_kind(rendered, "ResourceQuota")["spec"]["scopeSelector"]["matchExpressions"][0]
        assert quota["values"] == ["system-node-critical"]


def test_probes_ask_the_running_daemon(rendered: list[Obj]) -> None:
    c = container(rendered)
    sock = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--status-socket="))
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["/usr/local/bin/egressd", "status"], cmd
        assert f"--socket={sock}" in cmd
    assert sock.startswith("/run/egressd/")


def test_resources_are_set(rendered: list[Obj]) -> None:
    r = container(rendered)["resources"]
    assert set(r["requests"]) == {"cpu", "memory"} and set(r["limits"]) == {"cpu", "memory"}


def test_daemon_args_watch_the_configmap_policy(rendered: list[Obj]) -> None:
    c = container(rendered)
    assert c["args"][0] == "run" and "--watch" in c["args"]
    policy = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--policy="))
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "policy")
    items = next(
        v for v in by_kind(rendered, "DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "policy"
    )
    paths = {i["path"] for i in items["configMap"]["items"]}
    assert policy.startswith(mount + "/") and policy[len(mount) + 1 :] in paths
    cm = by_kind(rendered, "ConfigMap")
    assert items["configMap"]["name"] == cm["metadata"]["name"]
    assert {i["key"] for i in items["configMap"]["items"]} == set(cm["data"])


# -- metrics: loopback unless the overlay opts in ---------------------------------------------------
def _metrics(c: Obj) -> tuple[str, bool]:
    (m,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics=")]
    return m, "--metrics-allow-remote" in c["args"]


def test_base_serves_metrics_on_loopback_only(base: list[Obj]) -> None:
    addr, remote = _metrics(container(base))
    assert not remote
    assert parse_metrics_address(addr)[0] == "127.0.0.1"


def test_metrics_overlay_opts_in_to_the_node_address() -> None:
    c = container(render(KDIR / "metrics"))
    addr, remote = _metrics(c)
    assert remote and addr == "$(NODE_IP):9713"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9713, "protocol": "TCP"}]
    # what the kubelet substitutes for a node address, as the daemon will parse it
    assert parse_metrics_address(addr.replace("$(NODE_IP)", "198.51.100.2"), allow_remote=True) == (
        "198.51.100.2",
        9713,
    )


# -- the policy in the ConfigMap --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("copy_", "source"),
    [
        ("default.yaml", "default.yaml"),
        ("mining-pools.yaml", "lists/mining-pools.yaml"),
        ("tunnel-services.yaml", "lists/tunnel-services.yaml"),
    ],
)
def test_the_configmap_default_is_the_shipped_default(copy_: str, source: str) -> None:
    assert (KDIR / "base" / "policy" / copy_).read_bytes() == (REPO / "rules" / source).read_bytes(), (
        f"deploy/kubernetes/base/policy/{copy_} differs from rules/{source}: run `make k8s-policy`"
    )


def test_the_mounted_policy_loads(rendered: list[Obj], tmp_path: Path) -> None:
    """The ConfigMap laid out as the kubelet mounts it (items -> paths) loads from the path the
    DaemonSet's --policy names: the site layer on top of the shipped default."""
    if importlib.util.find_spec("egressd.watch") is None:
        pytest.skip("the site layer needs layered policies and `run --watch` (issue 11), not in this tree")
    cm = by_kind(rendered, "ConfigMap")
    pod = by_kind(rendered, "DaemonSet")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "policy")
    mount = next(m["mountPath"] for m in container(rendered)["volumeMounts"] if m["name"] == "policy")
    for item in vol["configMap"]["items"]:
        dst = tmp_path / item["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(cm["data"][item["key"]])
    arg = next(a.split("=", 1)[1] for a in container(rendered)["args"] if a.startswith("--policy="))
    policy = load_policy(tmp_path / Path(arg).relative_to(mount))
    assert any(r.name == "drop-mining" for r in policy.rules)  # the default's rules are in force
    assert len(policy.files) >= 3, policy.files  # site layer, default, its included list


# -- kubectl's own kustomize, where installed -------------------------------------------------------
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (render() is checked above)")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kubectl_kustomize_renders_the_same_objects(variant: str) -> None:
    kdir = VARIANTS[variant]
    p = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr

    def key(o: Obj) -> str:
        return json.dumps(o, sort_keys=True)

    assert sorted(map(key, (d for d in yaml.safe_load_all(p.stdout) if d))) == sorted(map(key, render(kdir)))


# -- pools: one DaemonSet and ConfigMap per labelled pool, never two daemons on a node -------------------
def _pool_term(objs: list[Obj]) -> Obj:
    pod = by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expr,) = term["matchExpressions"]
    return dict(expr)


def test_the_default_and_a_pool_daemonset_select_disjoint_nodes_and_pods() -> None:
    default, pool = render(KDIR), render(VARIANTS["pool"])
    assert _pool_term(default) == {"key": "egressd.io/pool", "operator": "DoesNotExist"}
    assert _pool_term(pool) == {"key": "egressd.io/pool", "operator": "In", "values": ["gpu-a"]}
    d_ds, p_ds = by_kind(default, "DaemonSet"), by_kind(pool, "DaemonSet")
    assert d_ds["metadata"]["name"] != p_ds["metadata"]["name"]
    # the default's selector refuses pods with a pool label; the pool's requires its own
    assert d_ds["spec"]["selector"]["matchExpressions"] == [{"key": "egressd.io/pool", "operator": "DoesNotExist"}]
    assert p_ds["spec"]["selector"]["matchLabels"]["egressd.io/pool"] == "gpu-a"
    assert p_ds["spec"]["template"]["metadata"]["labels"]["egressd.io/pool"] == "gpu-a"


def test_a_pool_has_its_own_configmap_with_the_same_default_and_its_own_site_layer() -> None:
    default, pool = render(KDIR), render(VARIANTS["pool"])
    d_cm, p_cm = by_kind(default, "ConfigMap"), by_kind(pool, "ConfigMap")
    vol = next(v for v in by_kind(pool, "DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "policy")
    assert vol["configMap"]["name"] == p_cm["metadata"]["name"] != d_cm["metadata"]["name"]
    assert p_cm["data"]["default.yaml"] == d_cm["data"]["default.yaml"]
    assert p_cm["data"]["site.yaml"] != d_cm["data"]["site.yaml"]
    assert "\nmode: monitor\n" in p_cm["data"]["site.yaml"]  # the rollout's first step
