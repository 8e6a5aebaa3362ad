"""The live-traffic subcommands: ``run``, ``rules``, ``status`` (and ``demo``, which only says where the demo went).

Kept apart from cli.py so that ``egressd test`` and ``egressd validate`` (which security teams
run in CI, often without root or netfilterqueue) never import the daemon's dependencies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from egressd import netfilter
from egressd.paths import add_policy_argument


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="judge live egress: install the kernel rules, bind the NFQUEUE, serve until SIGTERM",
        description=(
            "Run the daemon: installs egressd's iptables/ip6tables chains (removed again on exit), binds the "
            "NFQUEUE and judges every flow this node or its containers originate. SIGHUP reloads the policy "
            "(a broken one is rejected with file:line and the running one stays); SIGTERM stops cleanly."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 stopped cleanly, 1 kernel/queue error, 2 bad policy or missing privileges.",
    )
    add_policy_argument(p)
    p.add_argument("--queue", type=int, default=None, help="NFQUEUE number (default: the policy's settings.queue_num)")
    p.add_argument("--events", metavar="FILE", help="append decision events (JSON lines) to FILE, flushed per event")
    p.add_argument("--events-stdout", action="store_true", help="also write decision events to stdout")
    p.add_argument(
        "--status-socket",
        default="/run/egressd/status.sock",
        metavar="PATH",
        help="Unix socket (mode 0600) for `egressd status` (default %(default)s; 'none' disables)",
    )
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus text on this (loopback) address")
    # -- issue 12: the explicit opt-in for a cluster's Prometheus (docs/kubernetes.md) --------
    p.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="let --metrics bind a non-loopback address (e.g. the node's own, for a cluster's Prometheus); "
        "whoever reaches it learns the node's policy hits: restrict it with a firewall or NetworkPolicy",
    )
    p.add_argument(
        "--no-rules", action="store_true", help="do not install/remove kernel rules (they are managed elsewhere)"
    )
    p.add_argument(
        "--forward-iface",
        action="append",
        default=[],
        metavar="IFACE",
        help="judge forwarded traffic only from these container-side interfaces (iptables wildcards, e.g. veth+)",
    )
    p.add_argument(
        "--no-attribution",
        action="store_true",
        help="do not name the process, container and GPU behind each event (docs/attribution.md)",
    )
    p.add_argument(
        "--attribution-timeout",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="longest an event waits for its attribution before it is written without (default %(default)s)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="reload the policy when its files change on disk (config management, a Kubernetes ConfigMap "
        "volume's ..data swap), exactly as SIGHUP does: a broken policy is rejected and the running one stays",
    )
    netfilter.add_guard_arguments(p)
    p.set_defaults(handler=cmd_run)

    r = sub.add_parser(
        "rules",
        help="install, remove or show egressd's kernel rules (for operators and ExecStopPost=)",
        description="Manage egressd's own iptables/ip6tables chains and jumps; nothing else is touched.",
    )
    netfilter.add_rules_arguments(r)
    r.set_defaults(handler=netfilter.run_rules)

    s = sub.add_parser("status", help="counters of the running daemon: packets, flows, verdicts by rule, drops")
    s.add_argument(
        "--socket", default="/run/egressd/status.sock", help="the daemon's status socket (default %(default)s)"
    )
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(handler=cmd_status)

    d = sub.add_parser(
        "demo",
        help="not in the installed product: run `make run` from a source checkout",
        description=(
            "The demo needs the development lab (namespaces, real peers, a Stratum miner client), "
            "which a production node does not install; run `make run` from a source checkout."
        ),
    )
    d.set_defaults(handler=cmd_demo)


def _policy_path(arg: str | None) -> Path:
    from egressd.paths import default_policy

    return Path(arg) if arg else default_policy()


def cmd_run(args: argparse.Namespace) -> int:
    from egressd.daemon import Options, run

    try:
        policy = _policy_path(args.policy)
    except FileNotFoundError as e:
        print(f"egressd run: {e}", file=sys.stderr)
        return 2
    opts = Options(
        policy=policy,
        queue_num=args.queue,
        events=args.events,
        events_stdout=args.events_stdout,
        status_socket=None if args.status_socket == "none" else args.status_socket,
        metrics=args.metrics,
        metrics_allow_remote=args.metrics_allow_remote,
        install_rules=not args.no_rules,
        forward_ifaces=tuple(args.forward_iface),
        attribution=not args.no_attribution,
        attribution_timeout=min(max(args.attribution_timeout, 0.01), 10.0),
        watch=args.watch,
        guard=not args.no_guard,
        guard_ifaces=tuple(args.guard_iface),
    )
    return run(opts)


def cmd_status(args: argparse.Namespace) -> int:
    from egressd.daemon import read_status

    try:
        st = read_status(args.socket)
    except (OSError, ValueError) as e:
        print(f"egressd status: no daemon answers on {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False)
    eng = st["engine"]
    con.print(
        f"egressd pid {st['pid']}, up {st['uptime_s']} s, policy {st['policy']} "
        f"(mode {st['mode']}, fail {st['fail']}), queue {st['queue_num']}"
    )
    con.print(
        f"packets {eng['packets']}  flows {eng['flows']} (tracked {st['flows_tracked']})  dropped {eng['dropped']}  "
        f"malformed {eng['malformed']}  errors {eng['errors'] + st['callback_errors']}  overload {eng['overload']}"
    )
    g = st.get("link_guard") or {}
    if g.get("ifaces"):
        con.print(f"link guard on {', '.join(g['ifaces'])}: {g['dropped']} frames from below the IP layer dropped")
    else:
        con.print(f"link guard: off{' (' + g['error'] + ')' if g.get('error') else ''}")
    k = st.get("kernel_queue")
    if k:
        con.print(
            f"kernel queue: waiting now {k['queue_total']}  queue_dropped {k['queue_dropped']}  "
            f"user_dropped {k['user_dropped']}  passed uninspected {k.get('uninspected', 0)}  "
            f"netlink ENOBUFS {st['netlink_enobufs']}"
        )
    lat = st["verdict_latency_us"]
    con.print(f"verdict latency: mean {lat['mean']} µs, max {lat['max']} µs")
    if st.get("reload_failures"):
        con.print(f"[red]last rejected reload:[/red] {st['last_reload_error']}")
    t = Table("rule", "decisions", title="decisions by rule", title_justify="left")
    for rule, n in sorted(eng["rules"].items(), key=lambda kv: -kv[1]):
        t.add_row(rule, str(n))
    con.print(t)
    if eng["detections"]:
        t2 = Table("detection", "flows", title="detections", title_justify="left")
        for kind, n in sorted(eng["detections"].items(), key=lambda kv: -kv[1]):
            t2.add_row(kind, str(n))
        con.print(t2)
    ev = st["events"]
    con.print(f"events written {ev['written']}, write errors {ev['errors']} {ev['last_error']}")
    _print_attribution(con, st.get("attribution"))
    return 0


def _print_attribution(con: Any, a: dict[str, Any] | None) -> None:
    """Who was behind the last alerts (issue 8; docs/attribution.md)."""
    if a is None:
        con.print("attribution: off (--no-attribution)")
        return
    from rich.table import Table

    from egressd.attribution.render import who_line

    con.print(
        f"attribution: {a['attributed']} named, {a['partial']} socket/cgroup only, {a['unknown']} unknown, "
        f"{a['timeouts']} timed out; nvml: {a['nvml']}"
    )
    if a.get("recent_alerts"):
        t = Table("destination", "rule", "action", "who", title="recent alerts", title_justify="left")
        for r in a["recent_alerts"]:
            who = who_line(r).split("who:[/dim] ", 1)[-1]
            t.add_row(r["dest"], r["rule"], r["action"], who)
        con.print(t)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo left the wheel with the lab (a node must not carry a miner client); say where it went."""
    print(
        "egressd demo: the demo is not part of the installed egressd (its lab includes a Stratum miner "
        "client that production nodes must not carry); run `make run` from a source checkout",
        file=sys.stderr,
    )
    return 2
