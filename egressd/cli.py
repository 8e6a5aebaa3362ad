"""The ``egressd`` command. Each subcommand is a thin front on a module that does the work.

Exit codes are part of the interface (CI pipelines branch on them): 0 = all as expected,
1 = a check failed (an expectation mismatch, a policy that does not validate), 2 = the input
itself is unusable (unreadable capture, bad policy, bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from egressd import __version__
from egressd.paths import add_policy_argument

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_UNUSABLE = 2

_EPILOG = """\
exit codes: 0 all as expected, 1 a check failed, 2 unusable input (bad file, bad policy).
The shipped default policy is searched in: <source checkout>/rules, <prefix>/share/egressd/rules,
/etc/egressd (first default.yaml found).
"""


def _add_test(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "test",
        help="replay captures through the engine and the policy; show what egressd would do to each flow",
        description=(
            "Replay pcap/pcapng captures through the same engine the daemon runs and print, flow by flow, "
            "the verdict, the rule that decided it and the evidence. With --expect, compare against an "
            "expectation file and exit 1 on any mismatch (for CI before a policy change ships)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng file(s)")
    add_policy_argument(p)
    p.add_argument(
        "--expect",
        metavar="FILE",
        help="expectation YAML (flows -> verdict/detection/rule); with several captures, applied to each",
    )
    p.add_argument("--json", action="store_true", help="one EVE-style JSON event per line on stdout")
    p.add_argument("--only-flagged", action="store_true", help="show only flows with a detection or not accepted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def _add_validate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check policy files; print file:line:col for every problem",
        description="Load each policy file (and its includes) exactly as the daemon would and report every problem.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("policies", nargs="+", metavar="POLICY", help="policy YAML file(s), e.g. rules/default.yaml")
    p.add_argument(
        "--print-merged",
        action="store_true",
        help="print each valid policy as one merged file (extends/includes/overrides applied), "
        "every list item and rule annotated with the file:line it came from",
    )


def _add_review(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """diff, explain, learn, report: the deny-by-default workflow (docs/deny-by-default.md)."""
    d = sub.add_parser(
        "diff",
        help="replay captures under two policies; list the flows whose verdict or deciding rule changes",
        description=(
            "Replay each capture under OLD and under NEW and list every flow whose verdict or deciding rule "
            "differs (before -> after, with the names and detections behind it), so that a change to a policy "
            "shows which recorded flows it opens or closes."
        ),
        epilog="exit codes: 0 no flow changes, 1 some flow changes, 2 unusable input (bad policy or capture).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("old", metavar="OLD", help="the policy before the change")
    d.add_argument("new", metavar="NEW", help="the policy after the change")
    d.add_argument(
        "captures",
        nargs="+",
        metavar="CAPTURE",
        help="pcap or pcapng file(s), replayed; or event logs of `egressd run`, each flow judged on its recorded facts",
    )
    d.add_argument("--json", action="store_true", help="one JSON document on stdout")
    d.set_defaults(handler=cmd_diff)

    e = sub.add_parser(
        "explain",
        help="why one flow got its verdict: every rule in order, the condition and list item that decided",
        description=(
            "Explain the decision for flows of a capture (replayed under --policy) or of an event log "
            "(judged again under --policy): every rule in policy order, whether it matched and why not, and "
            "for the first that matched, which condition and which list item (with its file:line) decided."
        ),
        epilog="exit codes: 0 explained, 2 no flow selected or unusable input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("input", metavar="INPUT", help="a capture (pcap/pcapng) or an event log (JSON lines)")
    add_policy_argument(e)
    e.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="select flows like --expect's match: proto, src, src_port, dst, dst_port (repeatable)",
    )
    e.add_argument("--line", type=int, metavar="N", help="the event on line N of an event log")
    e.add_argument("--json", action="store_true", help="the explanation as JSON")
    e.add_argument("--max", type=int, default=10, metavar="N", help="explain at most N flows (default 10)")
    e.set_defaults(handler=cmd_explain)

    learn = sub.add_parser(
        "learn",
        help="draft a default-drop policy that accepts what captures or event logs recorded",
        description=(
            "Read captures (replayed through the engine under --base) and/or event logs of `egressd run` "
            "(typically a node in mode: monitor) and write a complete default-drop policy: the base's lists and "
            "detection rules first, then accept rules for the names (addresses only where no name was seen) "
            "each annotated with counts, first/last seen and processes/containers. Flows with a mining, "
            "reverse-SSH, tunnel or evasion detection, or that a kept rule drops, are never learned: they are "
            "listed as 'would still be dropped'."
        ),
        epilog="exit codes: 0 written, 1 the draft would not accept some learned flow (a bug), 2 unusable input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    learn.add_argument("inputs", nargs="+", metavar="INPUT", help="captures (pcap/pcapng) and event logs (JSON lines)")
    learn.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the proposed policy")
    learn.add_argument("--base", metavar="FILE", help="the policy whose detection rules are kept (default: shipped)")
    learn.add_argument(
        "--wildcard-min",
        type=int,
        default=3,
        metavar="N",
        help="propose *.parent only for N or more distinct names below parent (default 3; 0: never)",
    )
    learn.add_argument(
        "--learn-uninspected",
        action="store_true",
        help="also learn flows the default dropped at their first packet when recorded (no detector saw them)",
    )
    learn.set_defaults(handler=cmd_learn)

    rep = sub.add_parser(
        "report",
        help="one self-contained HTML page for review: decisions over time, destinations, drops by rule, "
        "who, and what learn would propose",
        description=(
            "Read event logs of `egressd run` (captures are replayed too) and write one HTML page with no "
            "script and nothing fetched from the network: a plot of decisions over time, top destinations by "
            "name, drops and alerts by rule, processes/containers when the events carry them, and the policy "
            "`egressd learn` would propose from the same inputs."
        ),
        epilog="exit codes: 0 written, 2 unusable input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("inputs", nargs="+", metavar="EVENTS", help="event logs (JSON lines) and/or captures")
    rep.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    rep.add_argument("--base", metavar="FILE", help="base policy for the learn section (default: shipped)")
    rep.add_argument("--title", default="egressd review report", help="page title")
    rep.set_defaults(handler=cmd_report)


def _load_for(cmd: str, path: str) -> object:
    """A policy, or the exit code 2 after saying why it does not load."""
    from egressd.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as e:
        print(f"egressd {cmd}: {path} does not load:\n{e}", file=sys.stderr)
    except OSError as e:
        print(f"egressd {cmd}: {e}", file=sys.stderr)
    return EXIT_UNUSABLE


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from egressd.policy import Policy
    from egressd.policydiff import diff_capture, render_text
    from egressd.recorded import InputError

    old, new = _load_for("diff", args.old), _load_for("diff", args.new)
    if not isinstance(old, Policy) or not isinstance(new, Policy):
        return EXIT_UNUSABLE
    changes = []
    flows = 0
    for cap in args.captures:
        try:
            got, n = diff_capture(cap, old, new)
        except InputError as e:
            print(f"egressd diff: {e}", file=sys.stderr)
            return EXIT_UNUSABLE
        changes.extend(got)
        flows += n
    if args.json:
        doc = {"old": args.old, "new": args.new, "captures": args.captures, "flows": flows}
        doc["changed"] = [c.as_dict() for c in changes]
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(render_text(changes, flows, len(args.captures)))
    return EXIT_FAIL if changes else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from egressd import explain, recorded
    from egressd.paths import default_policy
    from egressd.policy import PolicyError
    from egressd.policy.loader import load_with_sources

    try:
        policy, sources = load_with_sources(args.policy or default_policy())
        match = explain.parse_match(args.match)
        if recorded.is_event_log(args.input):
            if args.line is not None:
                got = [(n, d) for n, d in recorded.iter_events(args.input) if n == args.line]
                if not got:
                    raise recorded.InputError(f"{args.input}:{args.line}: no egressd event on that line")
                flows = [recorded.event_record(got[0][1], f"{args.input}:{args.line}")]
            else:
                flows = recorded.from_events(args.input)
        else:
            flows = recorded.from_capture(args.input, policy)
    except PolicyError as e:
        print(f"egressd explain: the policy does not load:\n{e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (ValueError, OSError, recorded.InputError) as e:
        print(f"egressd explain: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    chosen = explain.select(flows, match)
    if not chosen:
        print(f"egressd explain: no flow in {args.input} matches {match or 'anything'}", file=sys.stderr)
        return EXIT_UNUSABLE
    docs = []
    for fl in chosen[: max(1, args.max)]:
        facts = fl.facts()
        results, action, rule = explain.explain(policy, sources, facts)
        if args.json:
            docs.append(
                {"flow": fl.label(), "source": fl.source, "names": list(facts.domains),
                 "detections": list(facts.detections), "decision": {"action": action, "rule": rule},
                 "recorded": {"verdict": fl.verdict, "rule": fl.rule}, "rules": [r.as_dict() for r in results]}
            )  # fmt: skip
        else:
            off = [r for r in sources.rules if not r.enabled]
            sys.stdout.write(explain.render(fl, facts, policy, results, action, rule, off))
            print()
    if args.json:
        print(json.dumps(docs, indent=2))
    if len(chosen) > args.max:
        print(f"egressd explain: {len(chosen) - args.max} more flow(s) match; narrow --match", file=sys.stderr)
    return EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    from egressd import recorded
    from egressd.learn import learn
    from egressd.paths import default_policy
    from egressd.policy import PolicyError
    from egressd.policy.loader import load_with_sources

    try:
        base, sources = load_with_sources(args.base or default_policy())
    except PolicyError as e:
        print(f"egressd learn: the base policy does not load:\n{e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as e:
        print(f"egressd learn: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        flows = recorded.load_inputs(args.inputs, base)
    except recorded.InputError as e:
        print(f"egressd learn: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        prop = learn(flows, base, sources, args.inputs, args.output, args.wildcard_min, args.learn_uninspected)
    except PolicyError as e:  # the draft is generated; one that does not load is an egressd bug
        print(f"egressd learn: the draft does not load (please report this egressd bug):\n{e}", file=sys.stderr)
        return EXIT_FAIL
    try:
        Path(args.output).write_text(prop.text, encoding="utf-8")
    except OSError as e:
        print(f"egressd learn: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return EXIT_UNUSABLE
    items = sum(len(s.names) + len(s.wildcards) + len(s.addresses) for s in prop.services)
    rules = sum(bool(s.names or s.wildcards) + bool(s.addresses) for s in prop.services)
    print(
        f"egressd learn: {args.output}: {items} item(s) in {rules} accept rule(s) from {len(prop.learned)} "
        f"of {len(flows)} flow(s); {len(prop.would_drop)} would still be dropped",
        file=sys.stderr,
    )
    for f, why in prop.would_drop:
        print(f"  would still be dropped: {f.label()} {','.join(f.domains)} - {why} ({f.source})", file=sys.stderr)
    for f, why in prop.not_accepted:
        print(f"  NOT ACCEPTED by the draft (egressd bug): {f.label()} - {why}", file=sys.stderr)
    return EXIT_FAIL if prop.not_accepted else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from egressd import recorded, review_report
    from egressd.learn import learn
    from egressd.paths import default_policy
    from egressd.policy import PolicyError
    from egressd.policy.loader import load_with_sources

    try:
        base, sources = load_with_sources(args.base or default_policy())
        flows = recorded.load_inputs(args.inputs, base)
        decisions = []
        for path in args.inputs:
            if recorded.is_event_log(path):
                for _, d in recorded.iter_events(path):
                    rec = recorded.event_record(d, path)
                    decisions.append(review_report.Decision(rec.last_ts, review_report.fate(rec.verdict)))
        decisions += [review_report.Decision(f.last_ts, review_report.fate(f.verdict)) for f in flows if f.complete]
    except PolicyError as e:
        print(f"egressd report: the base policy does not load:\n{e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (recorded.InputError, ValueError, OSError) as e:
        print(f"egressd report: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        proposal = learn(flows, base, sources, args.inputs, "<proposed by egressd report>")
    except PolicyError as e:  # shown on the page instead of the proposal; an egressd bug
        print(f"egressd report: the learn section failed (please report this egressd bug):\n{e}", file=sys.stderr)
        proposal = None
    page = review_report.build(decisions, flows, args.inputs, proposal, args.title)
    try:
        Path(args.output).write_text(page, encoding="utf-8")
    except OSError as e:
        print(f"egressd report: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"egressd report: {args.output}: {len(flows)} flows, {len(decisions)} decisions", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressd",
        description="Egress firewall and tunnel detector for GPU training nodes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"egressd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_test(sub)
    _add_validate(sub)
    _add_review(sub)
    try:
        from egressd import cli_daemon
    except ImportError:  # the daemon's dependencies are optional for `egressd test`
        pass
    else:
        cli_daemon.add_commands(sub)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from egressd.policy import PolicyError, validate
    from egressd.policy.loader import load_with_sources
    from egressd.policy.merged import render

    bad = 0
    for path in args.policies:
        if not Path(path).is_file():
            bad += 1
            print(f"{path}: no such file", file=sys.stderr)
            continue
        problems = validate(path)
        if problems:
            bad += 1
            for d in problems:
                print(str(d), file=sys.stderr)
            continue
        try:
            pol, sources = load_with_sources(path)
        except PolicyError:
            # validate() accepts a file of lists only (rules/lists/*.yaml); it is not a policy.
            print(f"{path}: ok (a list file, for policies to include)")
            continue
        if args.print_merged:
            sys.stdout.write(render(pol, sources))
            continue
        n = len(pol.rules) + len(pol.who_rules)
        print(f"{path}: ok ({n} rules, mode {pol.mode}, default {pol.default}, {len(pol.files)} file(s))")
    return EXIT_FAIL if bad else EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    from egressd import report
    from egressd.expect import ExpectError, check, load
    from egressd.paths import default_policy
    from egressd.policy import PolicyError, load_policy
    from egressd.replay import replay

    expect = None
    if args.expect:
        try:
            expect = load(args.expect)
        except ExpectError as e:
            print(f"egressd test: {e}", file=sys.stderr)
            return EXIT_UNUSABLE
    try:
        if args.policy:
            policy_path = Path(args.policy)
        elif expect is not None and expect.policy is not None:
            policy_path = expect.policy
        else:
            policy_path = default_policy()
        policy = load_policy(policy_path)
    except PolicyError as e:
        print(f"egressd test: the policy does not load:\n{e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as e:
        print(f"egressd test: {e}", file=sys.stderr)
        return EXIT_UNUSABLE

    out = report.Output(json_lines=args.json, only_flagged=args.only_flagged, progress=not args.no_progress)
    status = EXIT_OK
    for cap in args.captures:
        with out.progress_for(cap) as progress:
            res = replay(cap, policy, progress)
        out.show(res, policy)
        if res.error is not None:
            out.error(f"egressd test: {res.error}")
            status = EXIT_UNUSABLE
            continue
        if expect is not None:
            problems = check(expect, res.final_events())
            out.expectations(cap, expect.path, problems)
            if problems and status == EXIT_OK:
                status = EXIT_FAIL
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_UNUSABLE
    try:
        if args.command == "test":
            return cmd_test(args)
        if args.command == "validate":
            return cmd_validate(args)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    parser.print_help()
    return EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
