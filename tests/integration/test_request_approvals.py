"""``action: ask`` on a request rule: reading a host is allowed, one kind of request is held for an
approval, and an approval covers that method and path only (a real ``egress serve``, real curl)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.approvals_harness import ApprovalGate, fetch, repo_gate
from tests.approvals_harness import repo_url as url
from tests.dnsfake import FakeDns
from tests.harness import Upstream, curl, serving

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: read
    hosts: [repo.test]
    ports: [{port}]
    methods: [GET, HEAD]
  - name: ask-push
    action: ask
    hosts: [repo.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/*/*/git-receive-pack"]
"""


@pytest.fixture
def gate(tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream) -> Iterator[ApprovalGate]:
    yield from serving(repo_gate(tmp_path, fake_dns, http_upstream, POLICY))


def test_reads_pass_a_push_waits_and_a_grant_covers_only_that_request(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    assert curl(url(http_upstream, "/org/repo/info/refs"), gate.proxy).status == 200
    assert gate.pending() == []

    push = fetch(url(http_upstream, "/org/repo/git-receive-pack"), gate.proxy, "-X", "POST")
    [pending] = gate.wait_pending()
    assert (pending["method"], pending["path"], pending["rule"]) == (
        "POST",
        "/org/repo/git-receive-pack",
        "ask-push",
    )
    time.sleep(0.3)
    assert not push.done and http_upstream.accepted == 1  # only the read reached it
    assert gate.egress("approve", pending["id"], "--session").returncode == 0
    assert push.result().status == 200
    assert http_upstream.accepted >= 1

    # The session grant covers this method and path: no new question.
    again = curl(url(http_upstream, "/org/repo/git-receive-pack"), gate.proxy, "-X", "POST")
    assert again.status == 200 and gate.pending() == []

    # Another repository's push is another question; so is another method (not allowed at all).
    other = fetch(url(http_upstream, "/org/other/git-receive-pack"), gate.proxy, "-X", "POST")
    [second] = gate.wait_pending()
    assert second["path"] == "/org/other/git-receive-pack"
    assert gate.egress("deny", second["id"]).returncode == 0
    refused = other.result()
    assert refused.status == 403 and refused.headers["x-egress-reason"] == "approval-denied"
    put = curl(url(http_upstream, "/org/repo/git-receive-pack"), gate.proxy, "-X", "PUT")
    assert put.status == 403 and put.headers["x-egress-reason"] == "request-not-allowed"


def test_an_overridden_method_that_needs_an_approval_is_asked_for(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    """A GET claiming to be a POST (method override) must not slip past the ask rule."""
    held = fetch(
        url(http_upstream, "/org/repo/git-receive-pack"),
        gate.proxy,
        "-H",
        "X-HTTP-Method-Override: POST",
    )
    [pending] = gate.wait_pending()
    assert pending["rule"] == "ask-push"
    before = http_upstream.accepted
    assert gate.egress("deny", pending["id"]).returncode == 0
    assert held.result().status == 403
    assert http_upstream.accepted == before
