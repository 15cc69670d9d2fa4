"""Threat 17, widening an approval through a query or a body: an approval of a request rule is about
one request, and its query (and, under a rule that reads bodies, its body) is part of it. While a harmless request waits for a person, a second
request to the same method and path with another query (``?leak=<secret>``) must not join it and be
let through by the answer to the first: it is its own question, shown with its query. A real
``egress serve`` and real curl; every request that reaches the upstream is counted by its target."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app.statedir import mitmproxy_confdir
from tests.approvals_harness import ApprovalGate, fetch, repo_gate
from tests.approvals_harness import repo_url as url
from tests.dnsfake import FakeDns
from tests.harness import LocalCA, Upstream, serving

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-uploads
    action: ask
    hosts: [repo.test]
    ports: [{port}]
    methods: [POST]
"""

BENIGN = "/upload?name=notes.txt"
LEAK = "/upload?name=s3cret-token-value"


@pytest.fixture
def gate(tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream) -> Iterator[ApprovalGate]:
    yield from serving(repo_gate(tmp_path, fake_dns, http_upstream, POLICY))


def reached(upstream: Upstream) -> list[str]:
    return [target for _, target, _ in upstream.requests]


def assert_both_joined(gate: ApprovalGate, pending: dict[str, object]) -> None:
    """Two requests are waiting once both ask events are recorded: both on ``pending``."""
    deadline = time.monotonic() + 10
    asks: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        asks = [d for d in gate.decisions() if d.get("decision") == "ask"]
        if len(asks) >= 2:
            break
        time.sleep(0.05)
    assert {d["approval"] for d in asks} == {pending["id"]}, asks


def other_pending(gate: ApprovalGate, first: dict[str, Any]) -> dict[str, Any]:
    """The second pending approval, once there are two: not ``first``."""
    [other] = [p for p in gate.wait_pending(2) if p["id"] != first["id"]]
    return other


def answer_each_apart(
    gate: ApprovalGate,
    upstream: Upstream,
    asked: tuple[dict[str, Any], Any],
    other: tuple[dict[str, Any], Any],
    what: str,
    reached_only: list[str],
) -> Any:
    """Approving the first once lets its request through and leaves the other held, nothing of it
    having reached ``upstream``; denying the other refuses it. Returns the other's refusal."""
    (first, first_request), (second, second_request) = asked, other
    assert gate.egress("approve", first["id"]).returncode == 0  # once
    assert first_request.result().status == 200
    time.sleep(0.3)
    assert not second_request.done, f"{what} was let through by the first's answer"
    assert reached(upstream) == reached_only
    assert gate.egress("deny", second["id"]).returncode == 0
    refused = second_request.result()
    assert refused.status == 403
    assert reached(upstream) == reached_only
    return refused


def test_a_request_with_another_query_does_not_join_the_approval_of_the_first(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    benign = fetch(url(http_upstream, BENIGN), gate.proxy, "-X", "POST")
    [first] = gate.wait_pending()
    leak = fetch(url(http_upstream, LEAK), gate.proxy, "-X", "POST")
    second = other_pending(gate, first)
    # Each is shown with its query (as decisions record it: names only by default, so a value
    # never reaches the approvals' store, stream or webhook).
    for shown in (first, second):
        assert (shown["method"], shown["path"], shown["query"]) == ("POST", "/upload", "name=")
        assert "s3cret" not in str(shown)
    # shown alike but for the size of each query as sent
    fields = f"(header fields of {first['head_bytes']} bytes)"
    assert first["what"].endswith(f"/upload?name= (14 bytes sent) {fields}"), first["what"]
    assert second["what"].endswith(f"/upload?name= (23 bytes sent) {fields}"), second["what"]
    assert first["query_id"] != second["query_id"]

    refused = answer_each_apart(
        gate, http_upstream, (first, benign), (second, leak), "the request with another query",
        [BENIGN],
    )  # fmt: skip
    assert refused.headers["x-egress-reason"] == "approval-denied"


def test_the_same_request_twice_is_one_approval_and_one_answer_releases_both(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    held = [fetch(url(http_upstream, BENIGN), gate.proxy, "-X", "POST") for _ in range(2)]
    [pending] = gate.wait_pending()
    assert_both_joined(gate, pending)
    assert len(gate.pending()) == 1
    assert gate.egress("approve", pending["id"]).returncode == 0
    assert [h.result().status for h in held] == [200, 200]
    assert reached(http_upstream) == [BENIGN, BENIGN]


def test_a_session_grant_covers_the_method_and_path_with_any_query(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    """The documented reach of ``--session`` for a request rule: what a person approves for a while
    is the method and path (paging, searching), not one query."""
    held = fetch(url(http_upstream, BENIGN), gate.proxy, "-X", "POST")
    [pending] = gate.wait_pending()
    assert gate.egress("approve", pending["id"], "--session").returncode == 0
    assert held.result().status == 200
    other = fetch(url(http_upstream, "/upload?name=other.txt"), gate.proxy, "-X", "POST")
    assert other.result().status == 200
    assert gate.pending() == []
    assert reached(http_upstream) == [BENIGN, "/upload?name=other.txt"]


GRAPHQL_POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-mutations
    action: ask
    hosts: [repo.test]
    ports: [{port}]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [mutation]
"""


@pytest.fixture
def graphql_gate(
    tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream
) -> Iterator[ApprovalGate]:
    yield from serving(repo_gate(tmp_path, fake_dns, http_upstream, GRAPHQL_POLICY))


def test_a_mutation_never_joins_the_approval_of_another_mutation(
    graphql_gate: ApprovalGate, http_upstream: Upstream
) -> None:
    """The rule reads the body to decide: a person asked about ``createIssue`` has not been asked
    about ``deleteRepository`` sent to the same path while the first waits."""
    create = '{"query": "mutation { createIssue(title: \\"notes\\") { id } }"}'
    delete = '{"query": "mutation { deleteRepository(id: 1) { id } }"}'
    json_post = ("-X", "POST", "-H", "Content-Type: application/json", "--data-binary")
    gate = graphql_gate
    first = fetch(url(http_upstream, "/graphql"), gate.proxy, *json_post, create)
    [held] = gate.wait_pending()
    second = fetch(url(http_upstream, "/graphql"), gate.proxy, *json_post, delete)
    other = other_pending(gate, held)
    assert held["body_bytes"] == len(create) and other["body_bytes"] == len(delete)
    # told apart by what each asks for (the operation and its root fields), not only by size
    assert held["what"].endswith(
        f"/graphql (header fields of {held['head_bytes']} bytes; a body of {len(create)} bytes; "
        "runs mutation createIssue)"
    )
    assert other["runs"] == "mutation deleteRepository"
    answer_each_apart(
        gate, http_upstream, (held, first), (other, second), "the other mutation", ["/graphql"]
    )


def test_a_request_with_other_header_fields_does_not_join_the_approval_of_the_first(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    """A header field carries data as well as a query does: the same method, path and query with
    ``X-Note: <a secret>`` added is another question, shown with the size of its header fields."""
    benign = fetch(url(http_upstream, BENIGN), gate.proxy, "-X", "POST")
    [first] = gate.wait_pending()
    secret = "s3cret-token-value-" * 4
    leak = fetch(url(http_upstream, BENIGN), gate.proxy, "-X", "POST", "-H", f"X-Note: {secret}")
    second = other_pending(gate, first)
    assert first["head_id"] != second["head_id"]
    assert second["head_bytes"] > first["head_bytes"] + len(secret)
    assert f"(header fields of {second['head_bytes']} bytes)" in second["what"], second["what"]
    assert "s3cret" not in str(second)
    answer_each_apart(
        gate, http_upstream, (first, benign), (second, leak), "the request with another header",
        [BENIGN],
    )  # fmt: skip
    assert [h for _, _, h in http_upstream.requests if secret in str(h)] == []


def test_a_request_with_a_body_the_gate_did_not_read_joins_no_approval(
    gate: ApprovalGate, http_upstream: Upstream
) -> None:
    """The rule reads no body, so the gate does not hold it: two uploads to the same method, path
    and query may carry anything, and neither is let through by the answer to the other. Each is
    shown with the size of its body and that it was not read."""
    upload = ("-X", "POST", "-H", "Content-Type: application/octet-stream", "--data-binary")
    first = fetch(url(http_upstream, BENIGN), gate.proxy, *upload, "notes")
    [held] = gate.wait_pending()
    second = fetch(url(http_upstream, BENIGN), gate.proxy, *upload, "s3cret-token-value")
    other = other_pending(gate, held)
    assert held["what"].endswith("; a body of 5 bytes, not read)"), held["what"]
    assert other["what"].endswith("; a body of 18 bytes, not read)"), other["what"]
    assert held["body_id"] != other["body_id"]
    answer_each_apart(
        gate, http_upstream, (held, first), (other, second), "the other upload", [BENIGN]
    )


H2_POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-reads
    action: ask
    hosts: [allowed.test]
    ports: [{port}]
    methods: [GET]
"""


@pytest.fixture
def h2_gate(
    tmp_path: Path, fake_dns: FakeDns, tls_upstream: Upstream, test_ca: LocalCA
) -> Iterator[ApprovalGate]:
    """A gate that inspects ``allowed.test`` (its rule reads requests), trusting the test CA's
    upstream; clients speak HTTP/2 to it."""
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(H2_POLICY.format(port=tls_upstream.port))
    directory = tmp_path / "gate"
    directory.mkdir()
    yield from serving(
        ApprovalGate(policy, fake_dns.nameserver, directory, "--upstream-ca", str(test_ca.ca_path))
    )


def test_identical_http2_requests_without_a_body_join_one_approval(
    h2_gate: ApprovalGate, tls_upstream: Upstream
) -> None:
    """An HTTP/2 request need not state a length; one whose head ended its stream has no body, and
    is asked about as one: two identical GETs are one approval, shown without a body."""
    gate = h2_gate
    ca = gate.directory / "state" / mitmproxy_confdir(Path()).name / "mitmproxy-ca-cert.pem"
    where = f"https://allowed.test:{tls_upstream.port}/x"
    h2 = ("--http2", "--cacert", str(ca))
    held = [fetch(where, gate.proxy, *h2) for _ in range(2)]
    [pending] = gate.wait_pending()
    assert_both_joined(gate, pending)
    assert pending["body_id"] is None, pending
    assert pending["what"] == (
        f"GET allowed.test:{tls_upstream.port}/x (header fields of {pending['head_bytes']} bytes)"
    )
    assert gate.egress("approve", pending["id"]).returncode == 0
    assert [h.result().status for h in held] == [200, 200]
    assert len(tls_upstream.requests) == 2
