"""The fuzzers on a fixed seed and a CI budget (``make fuzz`` runs them longer, with fresh seeds)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from proxy.destinations.dnsgate import DnsGate
from proxy.destinations.resolver import Resolver
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from tests.dnsfake import FakeDns
from tests.fuzz import dnsgate, frontdoor
from tests.fuzz.conftest import World

SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "40"))

pytestmark = pytest.mark.timeout(int(SECONDS * 3 + 120))


def test_front_door_fuzz_reaches_nothing_the_policy_refuses(world: World) -> None:
    report = frontdoor.run(
        world.target,
        random.Random(SEED),
        seconds=SECONDS,
        max_cases=8000,
        leaks=world.leaks,
    )
    print(f"front door: {report.cases} cases, {report.control_checks} control checks, seed {SEED}")
    assert report.errors == [], f"seed {SEED}: {report.errors}"
    assert report.cases >= 500  # the budget bought a real run, not a handful of cases
    assert world.canary.accepted == 0


def test_the_oracle_notices_a_leak(world: World) -> None:
    """The fuzz oracle must not be blind: a decision allowing another host is reported."""
    from proxy.core.decision import Decision, Kind, Reason, Verdict

    fake = Decision(
        Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "x", Kind.CONNECT, "evil.test", 443, "v", "enforce"
    )
    assert frontdoor.wrongly_allowed([fake], world.target)


def test_dns_gate_fuzz_leaks_nothing_and_never_raises(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        "version: 1\nrules:\n  - name: allowed\n    hosts: [allowed.test]\n"
        "  - name: no-sub\n    action: deny\n    hosts: ['*.allowed.test']\n"
    )
    policy = load_policy(policy_path)
    memory = MemorySink()
    with FakeDns() as upstream:
        upstream.set("allowed.test", "A", ["203.0.113.7"])
        upstream.set("allowed.test", "AAAA", ["2001:db8::7"])
        upstream.set("evil.test", "A", ["203.0.113.66"])
        gate = DnsGate(
            lambda: policy,
            Resolver([upstream.nameserver], timeout=0.5, hosts_file=None),
            Emitter([memory]),
            "sbx-fuzz",
        )
        report = asyncio.run(
            dnsgate.run(gate, upstream, random.Random(SEED), seconds=SECONDS / 2, max_cases=20000)
        )
    print(f"DNS gate: {report.cases} cases, seed {SEED}")
    assert report.errors == [], f"seed {SEED}: {report.errors}"
    assert report.cases >= 1000
    assert dnsgate.wrongly_allowed(list(memory.decisions)) == []
