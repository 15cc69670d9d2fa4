"""decide() keeps each policy's outcomes: a decision read from the memo is the decision the steps
would have taken, for every kind, port, SNI and HTTP head, under report mode and a managed ceiling."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import textwrap
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.decision import Decision, Kind, Request, Verdict
from proxy.core.engine import BodyNeeded, decide, decide_request
from proxy.core.requests import HttpHead
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

LOCAL = """
version: 1
mode: report
rules:
  - name: names
    hosts: [pypi.test, "*.example.test", "**.tree.test"]
  - name: ssh-only
    hosts: [git.test]
    ports: [22]
    mode: enforce
  - name: fetch
    hosts: [code.test]
    methods: [GET]
    paths: ["/o/*"]
  - name: batch
    hosts: [code.test]
    methods: [POST]
    paths: ["/o/*/batch"]
    json_body: {operation: download}
  - name: push
    action: ask
    hosts: [code.test]
    methods: [POST]
    paths: ["/o/*/push"]
  - name: no-admin
    action: deny
    hosts: [code.test]
    paths: ["/admin/*"]
  - name: held
    action: ask
    hosts: [ask.test]
  - name: trial
    action: deny
    hosts: [pypi.test]
    ports: [8080]
    mode: report
  - name: blocked
    action: deny
    hosts: [bad.tree.test]
  - name: nets
    cidrs: [203.0.113.0/24]
"""

# The organisation's ceiling: report mode may learn about these, nothing else.
CEILING = """
version: 1
rules:
  - name: org
    hosts: [pypi.test, "**.example.test", "**.tree.test", git.test, code.test, ask.test, other.test]
    cidrs: [203.0.113.0/24]
"""


def _load(text: str) -> Policy:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "p.yaml"
        path.write_text(textwrap.dedent(text))
        return load_policy(path)


@functools.cache
def kept() -> Policy:
    """One policy for every example, so its memo fills up across them."""
    return dataclasses.replace(_load(LOCAL), ceiling=_load(CEILING))


def fresh(policy: Policy) -> Policy:
    """The same rules with empty memos (a Policy builds its own index): decisions taken by the steps."""
    assert policy.ceiling is not None
    return dataclasses.replace(policy, ceiling=dataclasses.replace(policy.ceiling))


HOSTS = [
    "pypi.test",
    "PyPI.test.",
    "a.example.test",
    "example.test",
    "x.y.tree.test",
    "tree.test",
    "bad.tree.test",
    "git.test",
    "code.test",
    "ask.test",
    "other.test",
    "elsewhere.invalid",
    "203.0.113.7",
    "198.51.100.1",
    "[2001:db8::1]",
    "bad host",
    "",
]
HEADS = [
    None,
    HttpHead("GET", "/o/r"),
    HttpHead("POST", "/o/r/push"),
    HttpHead("GET", "/admin/x"),
    HttpHead("DELETE", "/o/r"),
    HttpHead("GET", "/o/r", overrides=("POST",)),
    HttpHead("POST", "/o/r/push", body_size=None),
    HttpHead("POST", "/o/r/push", body=b"x"),
    HttpHead("POST", "/o/r/batch", body_size=24, content_type="application/json"),
    HttpHead(
        "POST",
        "/o/r/batch",
        body_size=24,
        content_type="application/json",
        body=b'{"operation":"download"}',
    ),
]
REQUESTS = st.builds(
    Request,
    kind=st.sampled_from(list(Kind)),
    host=st.sampled_from(HOSTS),
    port=st.sampled_from([None, 22, 443, 8080, 8443]),
    sni=st.sampled_from([None, "", "pypi.test", "a.example.test", "other.test", "x"]),
    http=st.sampled_from(HEADS),
    client=st.sampled_from([None, "10.0.0.2"]),
    method=st.sampled_from([None, "GET"]),
)


# Few values of each field, so a list holds requests that differ in one field only.
DENSE = st.builds(
    Request,
    kind=st.sampled_from([Kind.REQUEST, Kind.HTTP, Kind.TLS, Kind.CONNECT]),
    host=st.sampled_from(["code.test", "pypi.test"]),
    port=st.sampled_from([None, 443]),
    sni=st.sampled_from([None, "code.test"]),
    http=st.sampled_from(HEADS),
)


def _fields(decision: Decision | BodyNeeded) -> object:
    if isinstance(decision, BodyNeeded):
        return decision
    values = dataclasses.asdict(decision)
    del values["id"], values["ts"]
    return values


@settings(max_examples=400)
@given(st.lists(REQUESTS, min_size=1, max_size=30))
def test_a_kept_outcome_is_the_outcome_the_steps_take(requests: list[Request]) -> None:
    policy = kept()
    for request in requests:
        assert _fields(decide_request(request, policy)) == _fields(
            decide_request(request, fresh(policy))
        ), request


@settings(max_examples=300)
@given(st.lists(DENSE, min_size=2, max_size=30))
def test_requests_differing_in_one_field_are_kept_apart(requests: list[Request]) -> None:
    policy = fresh(kept())
    for request in requests:
        assert _fields(decide_request(request, policy)) == _fields(
            decide_request(request, fresh(policy))
        ), request


def test_every_decision_is_its_own_record() -> None:
    """A kept outcome builds a new Decision with its own id and time, and the request's own fields."""
    policy = _load(LOCAL)
    first = decide(Request(Kind.CONNECT, "pypi.test", 443, client="10.0.0.2"), policy)
    second = decide(Request(Kind.CONNECT, "pypi.test", 443, client="10.0.0.3"), policy)
    assert len(policy.index.outcomes) == 1
    assert first.id != second.id
    assert (first.client, second.client) == ("10.0.0.2", "10.0.0.3")


def test_a_new_policy_decides_afresh() -> None:
    """A reload is a new Policy, so nothing the old one kept can answer for it."""
    allowing = _load(LOCAL)
    request = Request(Kind.CONNECT, "pypi.test", 443)
    assert decide(request, allowing).decision is Verdict.ALLOW
    denying = _load(
        LOCAL.replace(
            "action: deny\n    hosts: [bad.tree.test]", "action: deny\n    hosts: [pypi.test]"
        )
    )
    assert decide(request, denying).decision is Verdict.DENY


def test_the_ceiling_still_refuses_a_kept_report() -> None:
    policy = kept()
    request = Request(Kind.CONNECT, "elsewhere.invalid", 443)
    for _ in range(3):
        decision = decide(request, policy)
        assert decision.decision is Verdict.DENY
        assert "outside the managed policy" in (decision.detail or "")
    inside = Request(Kind.CONNECT, "other.test", 443)
    assert {decide(inside, policy).decision for _ in range(3)} == {Verdict.REPORT}


def test_only_int_ports_are_kept() -> None:
    policy = _load(LOCAL)
    assert (
        decide(Request(Kind.CONNECT, "other.test", True), policy).detail
        != decide(Request(Kind.CONNECT, "other.test", 1), policy).detail
    )
    assert [key[2] for key in policy.index.outcomes] == [1]


def test_bodies_and_long_targets_are_never_kept() -> None:
    policy = _load(LOCAL)
    wanting = HttpHead("POST", "/o/r/batch", body_size=24, content_type="application/json")
    held = wanting.with_body(b'{"operation":"download"}')
    long = HttpHead("GET", "/o/" + "r" * 600)
    for _ in range(2):
        outcome = decide_request(Request(Kind.REQUEST, "code.test", 443, http=wanting), policy)
        assert isinstance(outcome, BodyNeeded)
        allowed = decide(Request(Kind.REQUEST, "code.test", 443, http=held), policy)
        assert (allowed.decision, allowed.rule) == (Verdict.ALLOW, "batch")
        decide(Request(Kind.REQUEST, "code.test", 443, http=long), policy)
    assert policy.index.outcomes == {}


def test_an_unhashable_host_is_decided_not_kept() -> None:
    policy = _load(LOCAL)
    decision = decide(Request(Kind.CONNECT, ["pypi.test"], 443), policy)  # type: ignore[arg-type]
    assert decision.decision is Verdict.DENY
    assert policy.index.outcomes == {}


def test_the_memo_is_bounded() -> None:
    from proxy.core import engine

    policy = _load(LOCAL)
    for n in range(engine._MAX_OUTCOMES + 10):
        decide(Request(Kind.CONNECT, f"h{n}.flood.invalid", 443), policy)
    assert 0 < len(policy.index.outcomes) <= engine._MAX_OUTCOMES


def test_values_of_other_types_are_decided_not_kept() -> None:
    """Requests are untrusted plain values: an SNI of another type is decided as before (refused)
    and never raises on its way past the memo."""
    policy = _load(LOCAL)
    for sni in (123, b"pypi.test"):
        decision = decide(Request(Kind.TLS, "pypi.test", 443, sni=sni), policy)  # type: ignore[arg-type]
        assert decision.decision is Verdict.DENY
    assert policy.index.outcomes == {}
