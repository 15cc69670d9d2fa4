"""``egress learn`` (observed traffic -> proposed allowlist) and ``egress policy diff`` (what a change
opens and closes). Only argparse is imported at registration, so ``egress --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.app.exits import EXIT_DENY, EXIT_OK, fail

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_commands(sub: Any) -> None:
    learn = sub.add_parser(
        "learn",
        help="propose an allowlist from audit journals and decision logs",
        description="Read audit journals (verifying their hash chain) and JSON decision logs, and "
        "print the smallest reviewable policy covering the traffic that flowed (allowed or "
        "reported). See docs/lifecycle.md.",
    )
    learn.add_argument("inputs", nargs="+", metavar="JOURNAL", help="journal or decision-log files")
    learn.add_argument(
        "--since",
        metavar="T",
        default=None,
        help="only decisions at or after T: ISO 8601 (2026-01-31T12:00Z), epoch seconds, or a "
        "duration back from now (90m, 24h, 7d)",
    )
    learn.add_argument("--sandbox", metavar="ID", default=None, help="only this sandbox's traffic")
    learn.add_argument(
        "--min-count",
        metavar="N",
        type=int,
        default=1,
        help="leave out what was seen fewer than N times (listed as a comment)",
    )
    learn.add_argument(
        "--base",
        metavar="POLICY",
        default=None,
        help="propose only what this policy does not already allow (rules to add to it)",
    )
    learn.add_argument(
        "--group-at",
        metavar="N",
        type=int,
        default=4,
        help="group a registrable domain's hosts into a wildcard once N subdomains were seen "
        "(default 4)",
    )
    learn.add_argument(
        "-o", "--output", metavar="FILE", default=None, help="write here, not stdout"
    )
    learn.set_defaults(func=_cmd_learn)

    policy = sub.add_parser("policy", help="policy review tools")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    diff = policy_sub.add_parser(
        "diff",
        help="what a policy change opens and closes",
        description="Compare two policies: hosts, networks, ports and requests the new one opens "
        "(allows and the old did not) and closes; deny rules, mode and allow_internal changes.",
    )
    diff.add_argument("old", metavar="OLD")
    diff.add_argument("new", metavar="NEW")
    diff.set_defaults(func=_cmd_diff)


def parse_since(text: str, now: float | None = None) -> float:
    import datetime

    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    value = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected ISO 8601, epoch seconds or a duration like 24h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line or not line.startswith(b"{"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value


def _is_journal(path: Path) -> bool:
    for record in _records(path):
        return "hash" in record and "seq" in record
    return False


def _chains(journals: list[Path]) -> list[list[Path]]:
    """Journal files grouped by chain: an active file with its rotated files (``FILE.000001``...)."""
    from proxy.evidence.journal.files import rotation_index

    groups: dict[Path, list[Path]] = {}
    for path in journals:
        base = path.with_suffix("") if rotation_index(path) is not None else path
        groups.setdefault(base, []).append(path)
    return list(groups.values())


def _cmd_learn(args: argparse.Namespace) -> int:
    from proxy.evidence.journal.verify import verify
    from proxy.policy.learn import observe, propose, render
    from proxy.policy.loader import load_policy, load_policy_file
    from proxy.policy.model import PolicyError

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        return fail(str(exc))
    paths = [Path(p) for p in args.inputs]
    for path in paths:
        if not path.is_file():
            return fail(f"{path}: no such file")
    base = None
    if args.base:
        try:
            base = load_policy_file(args.base)
        except PolicyError as exc:
            return fail(*exc.lines())
    header = ["Proposed by `egress learn`: review every entry before enforcing it."]
    journals = [p for p in paths if _is_journal(p)]
    broken = False
    for chain in _chains(journals):  # each journal (a worker's, a replica's) is its own chain
        report = verify(chain, require_genesis=False)
        if report.problems:
            broken = True
            header.append(
                f"WARNING: the audit journal {chain[-1]}: hash chain is BROKEN; records may be "
                "forged:"
            )
            header += [f"  {p}" for p in report.problems[:20]]
            for problem in report.problems:
                print(f"egress learn: journal chain broken: {problem}", file=sys.stderr)
        else:
            header.append(
                f"Journal hash chain verified: {report.records} records, seq "
                f"{report.first_seq}..{report.last_seq} in {len(report.files)} file(s)."
            )
    logs = [p for p in paths if p not in journals]
    if logs:
        header.append(f"Decision logs read (no hash chain): {', '.join(str(p) for p in logs)}")
    if since is not None:
        header.append(f"Since {args.since}.")
    if args.sandbox:
        header.append(f"Sandbox {args.sandbox} only.")
    if base is not None:
        header.append(f"Only what {args.base} does not already allow: rules to add to it.")

    def every() -> Iterator[dict[str, Any]]:
        for path in paths:
            yield from _records(path)

    seen = observe(every(), since=since, sandbox=args.sandbox)
    header.append(f"{seen.decisions} decision(s) considered.")
    proposal = propose(seen, min_count=max(1, args.min_count), base=base, group_at=args.group_at)
    text = render(proposal, header)
    # The proposal must load: check it with the real loader before anyone reads it.
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        check = Path(scratch) / "proposal.yaml"
        check.write_text(text, encoding="utf-8")
        try:
            load_policy(check)
        except PolicyError as exc:  # a bug in the proposer: say so rather than print a bad file
            return fail("the proposal does not load (please report):", *exc.lines())
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"egress learn: {proposal.rules} rule(s) written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_DENY if broken else EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from proxy.policy.diff import diff_policies
    from proxy.policy.loader import load_policy_file
    from proxy.policy.model import PolicyError

    try:
        old = load_policy_file(args.old)
        new = load_policy_file(args.new)
    except PolicyError as exc:
        return fail(*exc.lines())
    lines = diff_policies(old, new)
    for line in lines:
        print(line)
    if not lines:
        print("no change in what the policy allows", file=sys.stderr)
    return EXIT_OK
