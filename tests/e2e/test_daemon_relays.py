"""The live daemon against vtun and Yggdrasil (Debian's packages): named, alerted, not dropped.

The shipped default policy alerts on VPNs (``alert-vpn-tunnels``) and drops the relays that
expose a node's port (frp, bore, rathole, gost; not packaged for Debian, so their evidence is
the byte-exact unit tests in tests/test_detect_relays.py). Here the real vtund and yggdrasil
run between the lab's namespaces with ``egressd run`` in the path: each must still connect
(an alert is not a drop) and the daemon's event must name it and say why.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from daemon_fixtures import NEEDS_KERNEL, DaemonLab, add_inet_addresses, events_to, need_tools, wait_until

from egressd_lab import peers

pytestmark = NEEDS_KERNEL
pytest_plugins = ["conftest_daemon"]

VTUN = "203.0.113.120"
YGG = "203.0.113.121"


@pytest.fixture(scope="module")
def relay_addrs(dlab: DaemonLab) -> None:
    add_inet_addresses(dlab, VTUN, YGG)


def _alert(daemon: peers.Egressd, addr: str, port: int) -> dict[str, object]:
    evs = events_to(daemon, addr, port, timeout=10)
    assert evs, f"no event for {addr}:{port}; events: {daemon.events()}"
    ev = evs[-1]
    assert (ev["rule"], ev["verdict"], ev["action"]) == ("alert-vpn-tunnels", "alert", "allowed"), ev
    return ev


def test_vtun_is_named_and_alerted_and_its_session_still_comes_up(
    dlab: DaemonLab, daemon: peers.Egressd, relay_addrs: None
) -> None:
    need_tools("vtund")
    conf = dlab.tmp / "vtund.conf"
    conf.write_text(
        "options { port 5000; timeout 10; }\n"
        "lab { passwd Xlab0pw; type tun; proto tcp; compress no; encrypt no; keepalive no; device vtlab; }\n"
    )
    srv = dlab.lab.spawn("inet", ["vtund", "-n", "-s", "-f", str(conf), "-L", VTUN],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cli = None
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 5000), 10), "vtund did not start"
        cli = dlab.lab.spawn("node", ["vtund", "-n", "-f", str(conf), "lab", VTUN],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        up = wait_until(lambda: dlab.lab.run_node(["ip", "-o", "link", "show", "vtlab"], timeout=5).returncode == 0, 15)
        assert up, "the vtun session did not come up through the daemon (an alert must not drop it)"
    finally:
        for p in (cli, srv):
            if p is not None:
                dlab.lab.stop(p)
    ev = _alert(daemon, VTUN, 5000)
    det = ev["detection"]
    assert isinstance(det, dict) and det["kind"] == "tunnel.vtun"
    assert "VTUN server ver" in str(det["evidence"])


def test_yggdrasil_peering_is_named_and_alerted_and_still_connects(
    dlab: DaemonLab, daemon: peers.Egressd, relay_addrs: None
) -> None:
    need_tools("yggdrasil")
    confs = {}
    for who in ("srv", "node"):
        p = subprocess.run(["yggdrasil", "-genconf", "-json"], capture_output=True, text=True, timeout=30, check=True)
        conf = json.loads(p.stdout)
        conf.update(IfName="none", AdminListen="none", MulticastInterfaces=[], NodeInfoPrivacy=True)
        conf["Listen" if who == "srv" else "Peers"] = [f"tcp://{YGG}:12345"]
        confs[who] = dlab.tmp / f"ygg-{who}.conf"
        confs[who].write_text(json.dumps(conf))
    srv = dlab.lab.spawn("inet", ["yggdrasil", "-useconffile", str(confs["srv"])],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = dlab.tmp / "ygg-node.out"
    cli = None
    try:
        assert wait_until(lambda: peers.listening(dlab.lab, "inet", 12345), 10), "yggdrasil did not listen"
        with open(log, "wb") as fh:
            cli = dlab.lab.spawn("node", ["yggdrasil", "-useconffile", str(confs["node"])], stdout=fh,
                                 stderr=subprocess.STDOUT)  # fmt: skip
        assert wait_until(lambda: "Connected" in log.read_text(errors="replace"), 20), log.read_text(errors="replace")
    finally:
        for p in (cli, srv):
            if p is not None:
                dlab.lab.stop(p)
    ev = _alert(daemon, YGG, 12345)
    det = ev["detection"]
    assert isinstance(det, dict) and det["kind"] == "tunnel.yggdrasil"
    assert "protocol 0.4" in str(det["evidence"])
