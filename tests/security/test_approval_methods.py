"""Threat 17, widening a grant through a method override: an approval of a request rule is about the
method the server acts on. A request that overrides its method (``X-HTTP-Method-Override``, a
``_method`` parameter) is judged as every method it names, so its approval must name them too: a
person who approved one write for the session has not approved another, and a write sent as a read is
shown as the write it is. A real ``egress serve`` and real curl, every refusal counted upstream."""

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
  - name: ask-writes
    action: ask
    hosts: [repo.test]
    ports: [{port}]
    methods: [POST, PATCH, DELETE]
"""


@pytest.fixture
def gate(tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream) -> Iterator[ApprovalGate]:
    yield from serving(repo_gate(tmp_path, fake_dns, http_upstream, POLICY))


def test_a_session_grant_for_one_method_does_not_cover_an_override_to_another(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    edit = fetch(url(http_upstream, "/repos/org/repo"), gate.proxy, "-X", "PATCH")
    [pending] = gate.wait_pending()
    assert (pending["method"], pending["path"]) == ("PATCH", "/repos/org/repo")
    assert gate.egress("approve", pending["id"], "--session").returncode == 0
    assert edit.result().status == 200
    assert curl(url(http_upstream, "/repos/org/repo"), gate.proxy, "-X", "PATCH").status == 200
    before = http_upstream.accepted

    # The same method and path, but the server would delete the repository: a new question.
    for how in (("-H", "X-HTTP-Method-Override: DELETE"), ("--url-query", "_method=DELETE")):
        held = fetch(url(http_upstream, "/repos/org/repo"), gate.proxy, "-X", "PATCH", *how)
        [second] = gate.wait_pending()
        assert second["method"] != "PATCH" and "DELETE" in second["method"], second
        assert "DELETE" in second["what"]
        time.sleep(0.3)
        assert not held.done and http_upstream.accepted == before
        assert gate.egress("deny", second["id"]).returncode == 0
        refused = held.result()
        assert refused.status == 403, refused
        assert refused.headers["x-egress-reason"] == "approval-denied"
        assert http_upstream.accepted == before


def test_a_write_sent_as_a_read_is_asked_about_as_the_write(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    held = fetch(
        url(http_upstream, "/repos/org/repo"), gate.proxy, "-H", "X-HTTP-Method-Override: DELETE"
    )
    [pending] = gate.wait_pending()
    assert pending["method"] != "GET" and pending["method"].startswith("DELETE"), pending
    assert pending["what"].startswith("DELETE")
    assert gate.egress("approve", pending["id"], "--session").returncode == 0
    assert held.result().status == 200
    before = http_upstream.accepted
    # the grant answered the overridden request; a plain DELETE is still its own question
    plain = fetch(url(http_upstream, "/repos/org/repo"), gate.proxy, "-X", "DELETE")
    [second] = gate.wait_pending()
    assert second["method"] == "DELETE"
    assert gate.egress("deny", second["id"]).returncode == 0
    assert plain.result().status == 403
    assert http_upstream.accepted == before
