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
    p.add_argument("--policy", metavar="FILE", help="policy YAML (default: the shipped rules/default.yaml)")
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
    try:
        from egressd import cli_daemon
    except ImportError:  # the daemon's dependencies are optional for `egressd test`
        pass
    else:
        cli_daemon.add_commands(sub)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from egressd.policy import PolicyError, load_policy, validate

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
            pol = load_policy(path)
        except PolicyError:
            # validate() accepts a file of lists only (rules/lists/*.yaml); it is not a policy.
            print(f"{path}: ok (a list file, for policies to include)")
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
