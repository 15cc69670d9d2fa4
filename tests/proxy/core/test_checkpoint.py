"""The admission order, step by step, with in-memory stand-ins for the resolver and the journal.

Each test pins one property of the order: a step that refuses stops every later step (no lookup for a
refused name, no dial for a refused tunnel), and only what the audit step returns is enforced.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection, Connections
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.destination import Destination, DestinationRefused
from proxy.core.firstbytes import HTTP, SSH, FirstBytes, Protocol
from proxy.core.limits import Limits
from proxy.destinations.local import OwnEndpoints
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

POLICY = """
version: 1
rules:
  - name: pypi
    hosts: [pypi.test]
  - name: gate-port
    hosts: [self.test]
    ports: [3128]
"""


@dataclass
class Lookups:
    """Destinations that resolve every name to one address and remember what was asked."""

    answers: dict[str, str] = field(default_factory=lambda: {"pypi.test": "203.0.113.10"})
    asked: list[str] = field(default_factory=list)

    async def destination(self, host: Any, port: int, allow_internal: Sequence[Any]) -> Destination:
        self.asked.append(str(host))
        address = self.answers.get(str(host))
        if address is None:
            raise DestinationRefused(Reason.DNS_FAILURE, f"{host} does not exist (NXDOMAIN)")
        return Destination(str(host), port, address, (address,))


@dataclass(frozen=True)
class Sandbox:
    id: str


class Tokens:
    def authenticate(self, header: str | None) -> Sandbox | None:
        return {"good-a": Sandbox("a"), "good-b": Sandbox("b")}.get(header or "")


class FailingJournal:
    """A write-ahead sink that can never record (a full disk)."""

    def record(self, decision: Decision) -> None:
        from proxy.evidence.emit import AuditUnavailable

        raise AuditUnavailable("disk full")

    def close(self) -> None:
        pass


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    return load_policy(path)


def make(policy: Policy, **kwargs: Any) -> tuple[Checkpoint, Lookups, MemorySink]:
    lookups = Lookups()
    memory = MemorySink()
    emitter = kwargs.pop("emitter", None) or Emitter([memory])
    return Checkpoint(lambda: policy, emitter, lookups, **kwargs), lookups, memory


def admit(checkpoint: Checkpoint, conn: Connection, request: Request, **kwargs: Any) -> Decision:
    return asyncio.run(checkpoint.admit(conn, request, **kwargs))


CONNECT = Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")


def test_allowed_connect_is_resolved_pinned_and_recorded(policy: Policy) -> None:
    checkpoint, _, memory = make(policy)
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    decision = admit(checkpoint, conn, CONNECT)
    assert (decision.decision, decision.address) == (Verdict.ALLOW, "203.0.113.10")
    assert (decision.client, decision.sandbox_id) == ("127.0.0.1:5000", "sbx")
    assert list(memory.decisions) == [decision]
    assert conn.tunnel == decision
    assert checkpoint.dial_target(conn, "PyPI.test.", 443) == "203.0.113.10"
    assert checkpoint.dial_target(conn, "203.0.113.10", 443) == "203.0.113.10"
    assert checkpoint.dial_target(conn, "pypi.test", 8443) is None
    assert checkpoint.dial_target(conn, "other.test", 443) is None


def test_a_refused_name_is_never_looked_up(policy: Policy) -> None:
    checkpoint, lookups, _ = make(policy)
    conn = Connection(peer=None, sandbox_id=None)
    decision = admit(checkpoint, conn, Request(Kind.CONNECT, "evil.test", 443))
    assert decision.reason is Reason.NO_MATCHING_RULE
    assert lookups.asked == []
    assert checkpoint.dial_target(conn, "evil.test", 443) is None


def test_identity_comes_before_policy(policy: Policy) -> None:
    checkpoint, lookups, _ = make(policy, identities=Tokens())
    conn = Connection(peer=None, sandbox_id=None)
    decision = admit(checkpoint, conn, CONNECT, credential=None)
    assert decision.reason is Reason.PROXY_AUTH_REQUIRED
    assert lookups.asked == []
    decision = admit(checkpoint, conn, CONNECT, credential="forged")
    assert decision.reason is Reason.PROXY_AUTH_REQUIRED


def test_one_connection_never_switches_identity(policy: Policy) -> None:
    checkpoint, _, _ = make(policy, identities=Tokens())
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, CONNECT, credential="good-a").allowed
    assert conn.sandbox_id == "a"
    switched = admit(checkpoint, conn, CONNECT, credential="good-b")
    assert switched.reason is Reason.PROXY_AUTH_REQUIRED and switched.sandbox_id == "a"


def test_requests_inside_a_proven_tunnel_inherit_its_identity(policy: Policy) -> None:
    checkpoint, _, _ = make(policy, identities=Tokens())
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, CONNECT, credential="good-a").allowed
    inner = admit(checkpoint, conn, Request(Kind.HTTP, "pypi.test", 443, "GET", "/"))
    assert inner.sandbox_id == "a" and inner.reason is not Reason.PROXY_AUTH_REQUIRED


def test_a_framing_problem_is_refused_before_policy(policy: Policy) -> None:
    checkpoint, lookups, _ = make(policy)
    conn = Connection(peer=None, sandbox_id=None)
    request = Request(Kind.HTTP, "pypi.test", 443, "GET", "/")
    decision = admit(checkpoint, conn, request, problem=(Reason.HOST_MISMATCH, "Host says evil"))
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.HOST_MISMATCH)
    assert lookups.asked == []


def test_a_refused_destination_is_denied_with_its_reason(policy: Policy) -> None:
    checkpoint, lookups, _ = make(policy)
    lookups.answers.clear()
    conn = Connection(peer=None, sandbox_id=None)
    decision = admit(checkpoint, conn, CONNECT)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.DNS_FAILURE)
    assert conn.pinned == {} and conn.tunnel is None


def test_the_gates_own_listener_is_never_admitted(policy: Policy) -> None:
    own = OwnEndpoints(
        [("0.0.0.0", 3128)], addresses=lambda: {ipaddress.ip_address("198.51.100.9")}
    )
    checkpoint, lookups, _ = make(policy, own=own)
    lookups.answers["self.test"] = "198.51.100.9"
    conn = Connection(peer=None, sandbox_id=None)
    decision = admit(checkpoint, conn, Request(Kind.CONNECT, "self.test", 3128))
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.INTERNAL_ADDRESS)
    assert decision.detail is not None and "own listener" in decision.detail
    assert checkpoint.dial_target(conn, "self.test", 3128) is None


def test_only_what_the_audit_step_returns_is_enforced(policy: Policy) -> None:
    emitter = Emitter(write_ahead=[FailingJournal()], audit_required=True)
    checkpoint, _, _ = make(policy, emitter=emitter)
    conn = Connection(peer=None, sandbox_id=None)
    decision = admit(checkpoint, conn, CONNECT)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    assert checkpoint.dial_target(conn, "pypi.test", 443) is None


def admitted_tunnel(policy: Policy) -> tuple[Checkpoint, Connection, MemorySink]:
    checkpoint, _, memory = make(policy)
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, CONNECT).allowed
    return checkpoint, conn, memory


def test_a_tunnel_whose_hello_names_another_host_forgets_its_destination(policy: Policy) -> None:
    checkpoint, conn, _ = admitted_tunnel(policy)
    decision = checkpoint.admit_tunnel(conn, FirstBytes(Protocol.TLS, sni="evil.test"))
    assert decision is not None and decision.reason is Reason.SNI_MISMATCH
    assert checkpoint.dial_target(conn, "pypi.test", 443) is None and conn.tunnel is None


def test_a_tunnel_whose_hello_names_its_host_keeps_the_pinned_address(policy: Policy) -> None:
    checkpoint, conn, _ = admitted_tunnel(policy)
    decision = checkpoint.admit_tunnel(conn, FirstBytes(Protocol.TLS, sni="pypi.test"))
    assert decision is not None and decision.allowed and decision.address == "203.0.113.10"
    assert checkpoint.dial_target(conn, "pypi.test", 443) == "203.0.113.10"


def test_a_refused_classification_is_recorded_with_the_tunnels_rule(policy: Policy) -> None:
    checkpoint, conn, memory = admitted_tunnel(policy)
    first = FirstBytes(Protocol.REFUSE, reason=Reason.NOT_TLS, detail="plain bytes")
    decision = checkpoint.admit_tunnel(conn, first)
    assert decision is not None and (decision.reason, decision.rule) == (Reason.NOT_TLS, "pypi")
    assert memory.decisions[-1] == decision


@pytest.mark.parametrize("first", [SSH, HTTP])
def test_ssh_and_http_tunnels_need_no_further_decision(policy: Policy, first: FirstBytes) -> None:
    checkpoint, conn, memory = admitted_tunnel(policy)
    assert checkpoint.admit_tunnel(conn, first) is None
    assert len(memory.decisions) == 1


def test_the_connection_cap_is_per_client(policy: Policy) -> None:
    checkpoint, _, memory = make(
        policy, connections=Connections(limits=Limits(max_connections_per_client=2))
    )
    results = [checkpoint.connected(f"c{i}", "10.0.0.1:1000", None)[1] for i in range(3)]
    assert results[:2] == [None, None]
    refused = results[2]
    assert refused is not None and refused.reason is Reason.CONNECTION_LIMIT
    assert checkpoint.connected("other", "10.0.0.2:1000", None)[1] is None
    checkpoint.disconnected("c2")  # the refused one is closed by the adapter
    checkpoint.disconnected("c0")
    assert checkpoint.connected("c3", "10.0.0.1:1001", None)[1] is None
    assert [d.reason for d in memory.decisions] == [Reason.CONNECTION_LIMIT]


# -- requests inside inspected tunnels ------------------------------------------------------------

INSPECTING = """
version: 1
rules:
  - name: read
    hosts: [pypi.test]
    methods: [GET]
  - name: lfs
    hosts: [pypi.test]
    methods: [POST]
    paths: [/batch]
    json_body: {operation: download}
  - name: plain
    hosts: [plain.test]
  - name: ssh-too
    hosts: [pypi.test]
    ports: [22]
"""


@pytest.fixture
def inspecting(tmp_path: Path) -> Policy:
    path = tmp_path / "inspecting.yaml"
    path.write_text(INSPECTING)
    return load_policy(path)


def inside(method: str, target: str, **head: Any) -> Request:
    from proxy.core.requests import HttpHead

    http = HttpHead(method, target, **head)
    return Request(Kind.REQUEST, "pypi.test", 443, method, target, http=http)


def test_a_connect_is_marked_inspected_once_from_the_policy(inspecting: Policy) -> None:
    checkpoint, _, _ = make(inspecting)
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, CONNECT).allowed and conn.inspected
    other = Connection(peer=None, sandbox_id=None)
    checkpoint_plain, lookups, _ = make(inspecting)
    lookups.answers["plain.test"] = "203.0.113.11"
    assert admit(checkpoint_plain, other, Request(Kind.CONNECT, "plain.test", 443)).allowed
    assert not other.inspected
    refused = Connection(peer=None, sandbox_id=None)
    assert not admit(checkpoint, refused, Request(Kind.CONNECT, "evil.test", 443)).allowed
    assert not refused.inspected and refused.tunnel is None


def test_requests_inside_go_to_the_tunnels_address_without_a_new_lookup(
    inspecting: Policy,
) -> None:
    checkpoint, lookups, memory = make(inspecting)
    conn = Connection(peer="127.0.0.1:1", sandbox_id="sbx")
    admit(checkpoint, conn, CONNECT)
    asked = list(lookups.asked)
    lookups.answers["pypi.test"] = "203.0.113.99"  # a rebinding answer must not matter
    decision = asyncio.run(checkpoint.admit_request(conn, inside("GET", "/simple/")))
    assert isinstance(decision, Decision)
    assert (decision.kind, decision.rule, decision.address) == (
        Kind.REQUEST,
        "read",
        "203.0.113.10",
    )
    assert (decision.client, decision.sandbox_id) == ("127.0.0.1:1", "sbx")
    assert lookups.asked == asked and memory.decisions[-1] == decision
    refused = asyncio.run(checkpoint.admit_request(conn, inside("DELETE", "/x")))
    assert isinstance(refused, Decision) and refused.reason is Reason.REQUEST_NOT_ALLOWED


def test_a_request_outside_an_inspected_tunnel_is_refused(inspecting: Policy) -> None:
    checkpoint, _, _ = make(inspecting)
    conn = Connection(peer=None, sandbox_id=None)
    decision = asyncio.run(checkpoint.admit_request(conn, inside("GET", "/")))
    assert isinstance(decision, Decision) and decision.reason is Reason.UNSUPPORTED


def test_framing_is_checked_before_the_request_rules(inspecting: Policy) -> None:
    checkpoint, _, _ = make(inspecting)
    conn = Connection(peer=None, sandbox_id=None)
    admit(checkpoint, conn, CONNECT)
    problem = (Reason.HOST_MISMATCH, "the :authority names evil.test")
    decision = asyncio.run(checkpoint.admit_request(conn, inside("GET", "/"), problem=problem))
    assert isinstance(decision, Decision) and decision.reason is Reason.HOST_MISMATCH


def test_a_body_rule_records_nothing_until_the_body_is_held(inspecting: Policy) -> None:
    from proxy.core.engine import BODY_NEEDED

    checkpoint, _, memory = make(inspecting)
    conn = Connection(peer=None, sandbox_id=None)
    admit(checkpoint, conn, CONNECT)
    before = len(memory.decisions)
    request = inside("POST", "/batch", body_size=30, content_type="application/json")
    assert asyncio.run(checkpoint.admit_request(conn, request)) is BODY_NEEDED
    assert len(memory.decisions) == before
    assert request.http is not None
    upload = request.http.with_body(b'{"operation": "upload"}')
    refused = asyncio.run(checkpoint.admit_body(conn, replace(request, http=upload)))
    assert refused.reason is Reason.REQUEST_NOT_ALLOWED and memory.decisions[-1] == refused
    download = request.http.with_body(b'{"operation": "download"}')
    allowed = asyncio.run(checkpoint.admit_body(conn, replace(request, http=download)))
    assert allowed.rule == "lfs" and allowed.address == "203.0.113.10"
    # admit() cannot hold bodies: it refuses what needs one
    assert admit(checkpoint, conn, request).reason is Reason.REQUEST_NOT_ALLOWED


def test_ssh_in_an_inspected_tunnel_is_refused(tmp_path: Path) -> None:
    from proxy.core.firstbytes import SSH

    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: any-port\n    hosts: [pypi.test]\n    ports: [443, 2222]\n"
        "    methods: [GET]\n"
    )
    checkpoint, _, _ = make(load_policy(path))
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, Request(Kind.CONNECT, "pypi.test", 2222)).allowed
    assert conn.inspected
    decision = checkpoint.admit_tunnel(conn, SSH)
    assert decision is not None and decision.reason is Reason.NOT_TLS
    assert conn.tunnel is None and checkpoint.dial_target(conn, "pypi.test", 2222) is None


def test_an_upstream_that_fails_tls_is_refused_and_nothing_more_is_dialled(
    inspecting: Policy,
) -> None:
    checkpoint, _, memory = make(inspecting)
    conn = Connection(peer=None, sandbox_id=None)
    admit(checkpoint, conn, CONNECT)
    decision = checkpoint.refuse_upstream(conn, "certificate verify failed")
    assert (decision.kind, decision.reason, decision.rule) == (
        Kind.TLS,
        Reason.UPSTREAM_TLS_FAILED,
        "read",
    )
    assert memory.decisions[-1] == decision
    assert checkpoint.dial_target(conn, "pypi.test", 443) is None
    refused = asyncio.run(checkpoint.admit_request(conn, inside("GET", "/")))
    assert isinstance(refused, Decision) and not refused.allowed


def test_requests_in_an_inspected_tunnel_inherit_its_identity(inspecting: Policy) -> None:
    checkpoint, _, _ = make(inspecting, identities=Tokens())
    conn = Connection(peer=None, sandbox_id=None)
    assert admit(checkpoint, conn, CONNECT, credential="good-a").allowed
    decision = asyncio.run(checkpoint.admit_request(conn, inside("GET", "/")))
    assert isinstance(decision, Decision) and decision.allowed and decision.sandbox_id == "a"


# -- (6) ask ------------------------------------------------------------------------------------

ASK_POLICY = """
version: 1
rules:
  - name: ask-api
    action: ask
    hosts: [api.test, inside.test]
  - name: ask-self
    action: ask
    hosts: [self.test]
    ports: [3128]
"""


class Approver:
    """Records what it was asked; answers with ``verdict`` (or raises, or leaves the ask open)."""

    def __init__(self, verdict: Verdict | None = Verdict.ALLOW, fail: bool = False) -> None:
        self.verdict = verdict
        self.fail = fail
        self.asked: list[tuple[Decision, str | None]] = []
        self.queries: list[str | None] = []
        self.sent: list[tuple[Any, int | None]] = []  # (fields, unread)

    async def answer(
        self,
        decision: Decision,
        rule: Any,
        record: Any,
        *,
        methods: tuple[str, ...] = (),
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Any = None,
        unread: int | None = 0,
    ) -> Decision:
        self.asked.append((decision, rule.name if rule else None))
        self.queries.append(query)
        self.sent.append((fields, unread))
        record(decision.with_(approval="a1"))
        if self.fail:
            raise RuntimeError("store unreachable")
        if self.verdict is None:
            return decision
        reason = (
            Reason.APPROVAL_GRANTED if self.verdict is Verdict.ALLOW else Reason.APPROVAL_DENIED
        )
        return decision.with_(
            decision=self.verdict, reason=reason, approval="a1", decided_by="alice", grant="once"
        )


@pytest.fixture
def ask_policy(tmp_path: Path) -> Policy:
    path = tmp_path / "ask.yaml"
    path.write_text(ASK_POLICY)
    return load_policy(path)


def test_an_ask_is_held_recorded_then_answered_and_pinned(ask_policy: Policy) -> None:
    approver = Approver()
    checkpoint, lookups, memory = make(ask_policy, approvals=approver)
    lookups.answers["api.test"] = "203.0.113.20"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    decision = admit(checkpoint, conn, Request(Kind.CONNECT, "api.test", 443, "CONNECT"))
    assert (decision.decision, decision.reason, decision.decided_by) == (
        Verdict.ALLOW,
        Reason.APPROVAL_GRANTED,
        "alice",
    )
    [(asked, rule)] = approver.asked
    # asked only after the destination was screened, with the checked address and the rule
    assert (asked.decision, asked.address, rule) == (Verdict.ASK, "203.0.113.20", "ask-api")
    assert [d.decision for d in memory.decisions] == [Verdict.ASK, Verdict.ALLOW]
    assert checkpoint.dial_target(conn, "api.test", 443) == "203.0.113.20"


@pytest.mark.parametrize(
    ("target", "exact"),
    [("/x?token=s3cret&a=1", "token=s3cret&a=1"), ("/x?", ""), ("/x", None)],
)
def test_the_approver_is_given_the_exact_query_not_the_recorded_one(
    ask_policy: Policy, target: str, exact: str | None
) -> None:
    """The record scrubs query values; what an approval covers must still tell two queries
    apart, so the approver gets the query exactly as sent."""
    from proxy.core.requests import HttpHead

    approver = Approver()
    checkpoint, lookups, _ = make(ask_policy, approvals=approver)
    lookups.answers["api.test"] = "203.0.113.20"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    recorded = "token=&a=" if exact else None
    request = Request(
        Kind.HTTP, "api.test", 443, "GET", "/x", http=HttpHead("GET", target), query=recorded
    )
    assert admit(checkpoint, conn, request).allowed
    [(asked, _)] = approver.asked
    assert approver.queries == [exact] and asked.query == recorded


def test_the_approver_is_given_the_fields_as_sent_and_any_body_not_read(
    ask_policy: Policy,
) -> None:
    """What an approval covers: the method as sent and the header fields (from the adapter), and
    whether a body follows that the gate did not hold (its length; None when unknown, as for a
    WebSocket's messages). A request whose adapter stated no fields is given a field of its own."""
    from proxy.core.httpheads import http_request

    def asked(request: Request) -> tuple[Any, int | None]:
        approver = Approver()
        checkpoint, lookups, _ = make(ask_policy, approvals=approver)
        lookups.answers["api.test"] = "203.0.113.20"
        conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
        assert admit(checkpoint, conn, request).allowed
        [sent] = approver.sent
        return sent

    def head(method: str, *fields: tuple[bytes, bytes]) -> Request:
        return http_request(Kind.HTTP, "api.test", 443, method, "/x", fields, query_values=False)

    fields, unread = asked(head("pOsT", (b"Content-Length", b"5"), (b"X-Note", b"1")))
    assert fields == ((b":method", b"pOsT"), (b"Content-Length", b"5"), (b"X-Note", b"1"))
    assert unread == 5
    assert asked(head("GET"))[1] == 0
    websocket = head("GET", (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k"))
    assert asked(websocket)[1] is None
    unstated = Request(Kind.HTTP, "api.test", 443, "GET", "/x", http=http_request(
        Kind.HTTP, "api.test", 443, "GET", "/x", (), query_values=False
    ).http)  # fmt: skip
    first, second = asked(unstated)[0], asked(unstated)[0]
    assert first[0][0] == b":unstated" and first != second


@pytest.mark.parametrize(
    ("approver", "reason"),
    [
        (None, Reason.APPROVAL_UNAVAILABLE),
        (Approver(fail=True), Reason.APPROVAL_UNAVAILABLE),
        (Approver(verdict=None), Reason.APPROVAL_UNAVAILABLE),  # came back unresolved
        (Approver(verdict=Verdict.DENY), Reason.APPROVAL_DENIED),
    ],
)
def test_an_ask_without_an_allow_refuses_and_dials_nothing(
    ask_policy: Policy, approver: Approver | None, reason: Reason
) -> None:
    checkpoint, lookups, memory = make(ask_policy, approvals=approver)
    lookups.answers["api.test"] = "203.0.113.20"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    decision = admit(checkpoint, conn, Request(Kind.CONNECT, "api.test", 443, "CONNECT"))
    assert (decision.decision, decision.reason) == (Verdict.DENY, reason)
    assert memory.decisions[-1] == decision
    assert checkpoint.dial_target(conn, "api.test", 443) is None
    assert conn.tunnel is None


class Elsewhere(Approver):
    """Answers with an allow about something other than what it was asked."""

    def __init__(self, **changes: Any) -> None:
        super().__init__()
        self.changes = changes

    async def answer(
        self,
        decision: Decision,
        rule: Any,
        record: Any,
        *,
        methods: tuple[str, ...] = (),
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Any = None,
        unread: int | None = 0,
    ) -> Decision:
        answer = await super().answer(decision, rule, record)
        return answer.with_(**self.changes)


@pytest.mark.parametrize(
    "changes",
    [{"host": "evil.test"}, {"port": 8443}, {"kind": Kind.HTTP}],
    ids=["host", "port", "kind"],
)
def test_an_allow_about_another_request_is_never_enforced(
    ask_policy: Policy, changes: dict[str, Any]
) -> None:
    checkpoint, lookups, memory = make(ask_policy, approvals=Elsewhere(**changes))
    lookups.answers["api.test"] = "203.0.113.20"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    decision = admit(checkpoint, conn, Request(Kind.CONNECT, "api.test", 443, "CONNECT"))
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.APPROVAL_UNAVAILABLE)
    assert memory.decisions[-1] == decision
    assert checkpoint.dial_target(conn, "api.test", 443) is None
    assert checkpoint.dial_target(conn, "evil.test", 443) is None
    assert checkpoint.dial_target(conn, "api.test", 8443) is None
    assert conn.tunnel is None


def test_no_one_is_asked_about_a_destination_the_gate_refuses(ask_policy: Policy) -> None:
    approver = Approver()
    own = OwnEndpoints([("127.0.0.1", 3128)])
    checkpoint, lookups, memory = make(ask_policy, approvals=approver, own=own)
    lookups.answers["self.test"] = "127.0.0.1"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    refused = [
        admit(checkpoint, conn, Request(Kind.CONNECT, host, port, "CONNECT"))
        for host, port in (("inside.test", 443), ("self.test", 3128), ("api.test\n", 443))
    ]
    assert [d.reason for d in refused] == [
        Reason.DNS_FAILURE,
        Reason.INTERNAL_ADDRESS,
        Reason.INVALID_HOST,
    ]
    assert approver.asked == []
    assert all(d.decision is Verdict.DENY for d in memory.decisions)


def test_an_approved_tunnel_keeps_its_answer_for_its_client_hello(ask_policy: Policy) -> None:
    checkpoint, lookups, _ = make(ask_policy, approvals=Approver())
    lookups.answers["api.test"] = "203.0.113.20"
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    admit(checkpoint, conn, Request(Kind.CONNECT, "api.test", 443, "CONNECT"))
    hello = checkpoint.admit_tunnel(conn, FirstBytes(Protocol.TLS, sni="api.test"))
    assert hello is not None
    assert (hello.decision, hello.reason, hello.approval) == (
        Verdict.ALLOW,
        Reason.APPROVAL_GRANTED,
        "a1",
    )
    fronted = checkpoint.admit_tunnel(conn, FirstBytes(Protocol.TLS, sni="other.test"))
    assert fronted is not None and fronted.reason is Reason.SNI_MISMATCH


def test_a_connection_naming_a_new_host_per_request_holds_a_bounded_number_of_pins(
    tmp_path: Path,
) -> None:
    """A kept-alive connection may name a new host in every request under a wildcard rule: what it
    keeps pinned stays bounded, and the host just admitted is still the one dialled, at its address."""
    from proxy.core.connections import MAX_PINS

    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: any\n    hosts: ['*.many.test']\n")
    checkpoint, lookups, _ = make(load_policy(path))
    conn = Connection(peer=None, sandbox_id=None)

    async def main() -> None:
        for n in range(MAX_PINS + 10):
            host = f"h{n}.many.test"
            lookups.answers[host] = str(ipaddress.ip_address("203.0.113.0") + n % 250)
            request = Request(Kind.CONNECT, host, 443, "CONNECT")
            decision = await checkpoint.admit(conn, request)
            assert decision.allowed
            assert checkpoint.dial_target(conn, host, 443) == lookups.answers[host]
            assert len(conn.pinned) <= MAX_PINS and len(conn.checked) <= MAX_PINS

    asyncio.run(main())
    assert checkpoint.dial_target(conn, "h0.many.test", 443) is None  # forgotten: never dialled


@pytest.mark.parametrize(
    ("content_type", "target", "runs"),
    [
        ("application/json", "/graphql", "mutation deleteRepository"),
        (
            "application/json",
            "/graphql?query=%7Bviewer%7D",
            "mutation deleteRepository; query viewer",
        ),
        # a body of another type may be read as a form carrying a document of its own: not told
        ("application/x-www-form-urlencoded", "/graphql", None),
        (None, "/graphql", None),
    ],
)
def test_what_a_held_graphql_request_runs_is_told_only_as_its_server_reads_it(
    content_type: str | None, target: str, runs: str | None
) -> None:
    from proxy.core.checkpoint import _runs
    from proxy.core.requests import HttpHead

    body = b'{"query": "mutation { deleteRepository }"}'
    head = HttpHead("POST", target, content_type=content_type, body=body, body_size=len(body))
    assert _runs(Request(Kind.REQUEST, "api.test", 443, "POST", "/graphql", http=head)) == runs


@pytest.mark.parametrize(
    ("head", "runs"),
    [
        # a body the gate did not hold may run anything: the URL's document alone is not told
        ({"body_size": 60}, None),
        ({"body_size": None}, None),  # chunked, not read
        ({"body_size": 0, "body_overflow": True}, None),
        ({"body_size": 0}, "query viewer"),  # no body at all: the URL's document is all there is
    ],
)
def test_what_a_request_runs_is_not_told_past_a_body_the_gate_did_not_read(
    head: dict[str, Any], runs: str | None
) -> None:
    from proxy.core.checkpoint import _runs
    from proxy.core.requests import HttpHead

    http = HttpHead("POST", "/graphql?query=%7Bviewer%7D", content_type="application/json", **head)
    assert _runs(Request(Kind.REQUEST, "api.test", 443, "POST", "/graphql", http=http)) == runs


def test_the_lookup_thread_starts_with_the_gate_and_the_warm_up_runs_on_the_loop(
    policy: Policy,
) -> None:
    """A gate that looks up processes starts its lookup thread as it starts, and does what the
    first lookup would do first on its event loop (pure Python in the thread would hold the
    interpreter lock against the loop)."""
    checkpoint, _, _ = make(policy)
    ran: list[int] = []

    async def main() -> int:
        checkpoint.start_lookups(lambda: ran.append(threading.get_ident()))
        assert not ran  # at the loop's next turn, not inside the gate's start
        await asyncio.sleep(0)
        pool = checkpoint._pool()
        assert await asyncio.get_running_loop().run_in_executor(pool, threading.get_ident) != ran[0]
        return threading.get_ident()

    assert asyncio.run(main()) == ran[0] and len(ran) == 1
