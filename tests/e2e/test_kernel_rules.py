"""Installing and removing egressd's rules in a real namespace: exactly ours, no trace after."""

from __future__ import annotations

from egressd import netfilter
from egressd_lab import peers
from egressd_lab.netns import Lab


def _saves(lb: Lab) -> tuple[str, str]:
    def clean(text: str) -> str:  # drop the "# Generated/Completed on <date>" lines
        return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))

    return (
        clean(lb.run_node(["iptables-save"], check=True).stdout),
        clean(lb.run_node(["ip6tables-save"], check=True).stdout),
    )


def test_install_then_remove_leaves_no_trace_in_a_fresh_namespace(klab: Lab) -> None:
    before = _saves(klab)
    netfilter.install(3, fail_open=True, max_packets=16, netns=klab.node)
    during = _saves(klab)
    netfilter.remove(netns=klab.node)
    assert _saves(klab) == before
    assert netfilter.CHAIN_OUT in during[0] and netfilter.CHAIN_OUT in during[1]


def test_remove_keeps_other_software_rules_and_chains(klab: Lab) -> None:
    # Someone else's rules, in the same builtin chains and tables we use, both families.
    for tool in ("iptables", "ip6tables"):
        klab.run_node([tool, "-w", "-N", "OTHER-FW"], check=True)
        klab.run_node([tool, "-w", "-A", "OTHER-FW", "-p", "tcp", "--dport", "9", "-j", "DROP"], check=True)
        klab.run_node([tool, "-w", "-A", "OUTPUT", "-j", "OTHER-FW"], check=True)
        klab.run_node([tool, "-w", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT"], check=True)
        klab.run_node([tool, "-w", "-t", "mangle", "-A", "OUTPUT", "-j", "MARK", "--set-mark", "0x4000"], check=True)
    before = _saves(klab)
    netfilter.install(3, fail_open=False, max_packets=16, netns=klab.node)
    during = _saves(klab)
    netfilter.remove(netns=klab.node)
    assert _saves(klab) == before
    # Our jumps went first, ahead of the other software's rules.
    for text in during:
        filt = netfilter.parse_save(text)["filter"]
        assert [r for c, r in filt.rules if c == "OUTPUT"] == [f"-j {netfilter.CHAIN_OUT}", "-j OTHER-FW"]


def test_install_twice_replaces_instead_of_duplicating(klab: Lab) -> None:
    netfilter.install(3, fail_open=True, max_packets=16, netns=klab.node)
    netfilter.install(4, fail_open=False, max_packets=5, netns=klab.node)
    v4, v6 = _saves(klab)
    for text in (v4, v6):
        assert text.count(f"-j {netfilter.CHAIN_OUT}") == 1
        assert "--queue-num 3" not in text and "--queue-num 4" in text
        assert "--queue-bypass" not in text
        assert "--connbytes 0:5 " in text


def test_ipv4_only_install_leaves_ip6tables_untouched(klab: Lab) -> None:
    before6 = _saves(klab)[1]
    netfilter.install(3, fail_open=True, max_packets=16, ipv6=False, netns=klab.node)
    assert _saves(klab)[1] == before6
    assert netfilter.installed(netns=klab.node)


def test_remove_is_idempotent_and_installed_reports_state(klab: Lab) -> None:
    assert not netfilter.installed(netns=klab.node)
    netfilter.remove(netns=klab.node)  # nothing there: no error
    netfilter.install(3, fail_open=True, max_packets=16, netns=klab.node)
    assert netfilter.installed(netns=klab.node)
    netfilter.remove(netns=klab.node)
    netfilter.remove(netns=klab.node)
    assert not netfilter.installed(netns=klab.node)


def test_install_turns_conntrack_accounting_on(klab: Lab) -> None:
    klab.run_node(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0"], check=True)
    netfilter.install(3, fail_open=True, max_packets=16, netns=klab.node)
    assert klab.run_node(["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]).stdout.strip() == "1"


def test_show_lists_only_our_rules_with_counters(klab: Lab) -> None:
    klab.run_node(["iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"], check=True)
    netfilter.install(3, fail_open=True, max_packets=16, netns=klab.node)
    text = netfilter.show(netns=klab.node)
    assert "--dport 9" not in text
    assert f"[0:0] -A {netfilter.CHAIN_DENY}" in text or f"-A {netfilter.CHAIN_DENY}" in text
    assert "# IPv6" in text and "nf_conntrack_acct = 1" in text


def test_rules_install_backend_nft_is_refused_and_changes_nothing(klab: Lab) -> None:
    before = _saves(klab)
    p = klab.run_node([*peers.egressd_argv(), "rules", "install", "--backend", "nft"], timeout=30)
    assert p.returncode == 2
    assert p.stderr.strip() == f"egressd rules: --backend nft: {netfilter.NFT_REFUSED}"
    assert _saves(klab) == before
