"""Threats 17 and 20: an answer to one ``ask`` rule is no answer to another on the same request line.

Two ask rules can match one method and path: one the automated reviewer may answer (a query it can
judge), one for people only (the rest). A session grant the reviewer gave to the first, or a pending
approval of the first that a second request would join, must never answer the second: the
people-only request stays held, and nothing of it reaches the upstream, until a person answers.
Real ``egress serve``, a real reviewer command, real curl and a counting upstream.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.approvals_harness import ApprovalGate, fetch
from tests.dnsfake import FakeDns
from tests.harness import WAIT, Upstream, curl, waited_for

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: public-search
    action: ask
    review: auto
    hosts: [repo.test]
    ports: [{port}]
    methods: [GET]
    paths: ["/search"]
    query: {{scope: [public]}}
  - name: people-only-search
    action: ask
    hosts: [repo.test]
    ports: [{port}]
    methods: [GET]
    paths: ["/search"]
"""

REVIEWER = """
import json, sys, time
json.load(sys.stdin)
time.sleep({delay})
print(json.dumps({{"decision": "allow", "reason": "a public search", "scope": "{scope}"}}))
"""


def _gate(
    tmp_path: Path, fake_dns: FakeDns, up: Upstream, scope: str, delay: float
) -> ApprovalGate:
    fake_dns.set("repo.test", "A", ["127.0.0.1"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=up.port))
    script = tmp_path / "reviewer.py"
    script.write_text(REVIEWER.format(scope=scope, delay=delay))
    directory = tmp_path / "gate"
    directory.mkdir()
    return ApprovalGate(
        policy, fake_dns.nameserver, directory,
        "--reviewer", f"{sys.executable} {script}", "--reviewer-timeout", "20",
    )  # fmt: skip


def _held_for_people(gate: ApprovalGate) -> str:
    """The id of the pending approval the people-only rule opened (waits for it)."""

    def found() -> list[dict[str, object]]:
        return [a for a in gate.pending() if a["rule"] == "people-only-search"]

    [approval] = waited_for(found, "the people-only request held for a person", WAIT, interval=0.1)
    assert approval["review"] == "human"
    return str(approval["id"])


@pytest.mark.timeout(120)
def test_a_reviewers_session_grant_never_answers_a_people_only_rule(
    tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream
) -> None:
    gate = _gate(tmp_path, fake_dns, http_upstream, "session", 0)
    try:
        base = f"http://repo.test:{http_upstream.port}/search"
        first = curl(base + "?scope=public", gate.proxy, timeout=30)
        assert first.status == 200  # the reviewer answered its own rule, for the session
        before = http_upstream.accepted
        second = fetch(base + "?scope=private", gate.proxy)
        approval = _held_for_people(gate)
        assert http_upstream.accepted == before
        denied = gate.egress("deny", approval, "--reason", "not public")
        assert denied.returncode == 0, denied.stderr
        assert second.result().status == 403
        assert http_upstream.accepted == before
        last = gate.decisions()[-1]
        assert (last["rule"], last["decided_by"]) == ("people-only-search", "alice")
    finally:
        gate.stop()


@pytest.mark.timeout(120)
def test_a_people_only_request_never_joins_the_reviewers_pending_approval(
    tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream
) -> None:
    gate = _gate(tmp_path, fake_dns, http_upstream, "once", 2)
    try:
        base = f"http://repo.test:{http_upstream.port}/search"
        first = fetch(base + "?scope=public", gate.proxy)
        [pending] = gate.wait_pending()
        assert (pending["rule"], pending["review"]) == ("public-search", "auto")
        second = fetch(base + "?scope=private", gate.proxy)
        approval = _held_for_people(gate)
        assert approval != pending["id"]
        assert first.result().status == 200  # the reviewer's answer released its own request only
        assert not second.done
        assert [target for _, target, _ in http_upstream.requests] == ["/search?scope=public"]
        assert gate.egress("deny", approval).returncode == 0
        assert second.result().status == 403
        assert len(http_upstream.requests) == 1
    finally:
        gate.stop()
