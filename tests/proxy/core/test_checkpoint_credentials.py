"""Step 3b of the admission order: where the credential step sits and what it overrides."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.credentials import Binding, Carried, Credentials, Delivery
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.requests import HttpHead
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from tests.proxy.core.test_checkpoint import Lookups

PH = "ghp_" + "p" * 36
GL = "glpat-" + "Q1" * 10  # a name's characters only
POLICY = """
version: 1
mode: {mode}
rules:
  - name: api
    hosts: [api.test]
    inspect: true
  - name: other
    hosts: [other.test, "*.other.test"]
    inspect: true
"""


def setup(tmp_path: Path, mode: str = "enforce") -> tuple[Checkpoint, Lookups, MemorySink]:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode=mode))
    policy: Policy = load_policy(path)
    binding = Binding("gh", frozenset({("api.test", 443)}), Delivery(header="authorization"))
    gitlab = Binding("gl", frozenset({("api.test", 443)}), Delivery(header="private-token"))
    credentials = Credentials({"gh": binding, "gl": gitlab})
    credentials.issue("gh", "sbx", PH)
    credentials.issue("gl", "sbx", GL)
    lookups = Lookups(answers={"api.test": "203.0.113.1", "other.test": "203.0.113.2"})
    memory = MemorySink()
    checkpoint = Checkpoint(
        lambda: policy, Emitter([memory]), lookups, credentials=lambda: credentials
    )
    return checkpoint, lookups, memory


def tunnel(checkpoint: Checkpoint, host: str) -> Connection:
    conn = Connection(peer="127.0.0.1:9", sandbox_id="sbx")
    assert asyncio.run(checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT"))).allowed
    return conn


def request(checkpoint: Checkpoint, conn: Connection, host: str, value: str) -> object:
    carried = Carried((("Authorization", value),), "/x")
    req = Request(Kind.REQUEST, host, 443, "GET", "/x")
    return asyncio.run(checkpoint.admit(conn, req, carried=carried))


def test_a_use_names_the_credential(tmp_path: Path) -> None:
    checkpoint, _, memory = setup(tmp_path)
    decision = request(checkpoint, tunnel(checkpoint, "api.test"), "api.test", f"Bearer {PH}")
    assert decision.allowed and decision.credential == "gh"  # type: ignore[attr-defined]
    assert memory.decisions[-1] is decision


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_misuse_refuses_in_every_mode(tmp_path: Path, mode: str) -> None:
    checkpoint, _, memory = setup(tmp_path, mode)
    decision = request(checkpoint, tunnel(checkpoint, "other.test"), "other.test", f"Bearer {PH}")
    assert decision.decision is Verdict.DENY  # type: ignore[attr-defined]
    assert decision.reason is Reason.CREDENTIAL_MISUSE  # type: ignore[attr-defined]
    assert memory.decisions[-1] is decision


def test_a_misused_connect_is_never_looked_up(tmp_path: Path) -> None:
    checkpoint, lookups, _ = setup(tmp_path)
    conn = Connection(peer=None, sandbox_id="sbx")
    host = f"{GL}.other.test"  # canonical: lower case
    decision = asyncio.run(checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT")))
    assert decision.reason is Reason.CREDENTIAL_MISUSE and decision.credential == "gl"
    assert not lookups.asked


def test_a_buffered_body_is_checked_after_the_head(tmp_path: Path) -> None:
    checkpoint, _, memory = setup(tmp_path)
    conn = tunnel(checkpoint, "api.test")
    admitted = request(checkpoint, conn, "api.test", f"Bearer {PH}")
    assert checkpoint.credential_body(conn, admitted, b"nothing here") is None  # type: ignore[arg-type]
    refusal = checkpoint.credential_body(conn, admitted, f"x={PH}".encode())  # type: ignore[arg-type]
    assert refusal is not None and refusal.reason is Reason.CREDENTIAL_MISUSE
    assert refusal.id != admitted.id and memory.decisions[-1] is refusal  # type: ignore[attr-defined]


def test_a_request_that_is_only_reported_never_gets_the_real_value(tmp_path: Path) -> None:
    """Report mode lets a request the policy does not allow proceed, for the trial; the credential
    is added only to what the policy allows, so report mode never lends a token's authority."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nmode: report\nrules:\n"
        "  - name: api-reads\n    hosts: [api.test]\n    methods: [GET]\n"
    )
    policy: Policy = load_policy(path)
    credentials = Credentials(
        {"gh": Binding("gh", frozenset({("api.test", 443)}), Delivery(header="authorization"))}
    )
    credentials.issue("gh", "sbx", PH)
    lookups = Lookups(answers={"api.test": "203.0.113.1"})
    checkpoint = Checkpoint(
        lambda: policy, Emitter([MemorySink()]), lookups, credentials=lambda: credentials
    )
    conn = tunnel(checkpoint, "api.test")
    carried = Carried((("Authorization", f"Bearer {PH}"),), "/x")

    def head(method: str) -> Request:
        return Request(Kind.REQUEST, "api.test", 443, method, "/x", http=HttpHead(method, "/x"))

    read = asyncio.run(checkpoint.admit(conn, head("GET"), carried=carried))
    assert read.decision is Verdict.ALLOW and read.credential == "gh"
    write = asyncio.run(checkpoint.admit(conn, head("POST"), carried=carried))
    assert write.decision is Verdict.REPORT
    assert write.credential is None  # nothing to swap in: the placeholder goes as it is
    assert "not added" in write.detail


SOCKETS = """
version: 1
mode: {mode}
rules:
  - name: api-socket
    hosts: [api.test, other.test]
    methods: [GET]
    paths: [/socket]
    websocket: true
  - name: api-pages
    hosts: [api.test, other.test]
    methods: [GET]
    paths: [/socket]
"""


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_no_upgrade_to_a_bound_host_even_without_a_placeholder(tmp_path: Path, mode: str) -> None:
    """A WebSocket's messages are not read: what a bound service sends over one (a value it kept
    from an earlier request) could not be scrubbed as a response is, so a policy's WebSocket rule
    does not open one to a host a credential of this sandbox is bound to. Elsewhere it does."""
    path = tmp_path / "p.yaml"
    path.write_text(SOCKETS.format(mode=mode))
    policy: Policy = load_policy(path)
    credentials = Credentials(
        {"gh": Binding("gh", frozenset({("api.test", 443)}), Delivery(header="authorization"))}
    )
    credentials.issue("gh", "sbx", PH)
    lookups = Lookups(answers={"api.test": "203.0.113.1", "other.test": "203.0.113.2"})
    checkpoint = Checkpoint(
        lambda: policy, Emitter([MemorySink()]), lookups, credentials=lambda: credentials
    )
    upgrade = (("Upgrade", "websocket"), ("Connection", "Upgrade"))

    def ask(host: str, headers: tuple[tuple[str, str], ...], sandbox: str = "sbx") -> Decision:
        conn = Connection(peer="127.0.0.1:9", sandbox_id=sandbox)
        assert asyncio.run(
            checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT"))
        ).allowed
        fields = dict(headers)
        head = HttpHead(
            method="GET",
            target="/socket",
            upgrade=fields.get("Upgrade"),
            handshake="Sec-WebSocket-Version" in fields,
        )
        req = Request(Kind.REQUEST, host, 443, "GET", "/socket", http=head)
        return asyncio.run(checkpoint.admit(conn, req, carried=Carried(headers, "/socket")))

    refused = ask("api.test", upgrade)
    assert refused.decision is Verdict.DENY
    assert refused.reason is Reason.CREDENTIAL_MISUSE
    assert refused.credential == "gh"
    assert "upgrade" in (refused.detail or "") and "api.test:443" in (refused.detail or "")
    assert ask("other.test", upgrade).allowed  # no credential is bound there
    assert ask("api.test", upgrade, sandbox="sbx-2").allowed  # none of that sandbox's is
    assert ask("api.test", ()).allowed  # a plain request
    # a WebSocket handshake without Upgrade: mitmproxy would switch on it all the same
    handshake = ask("api.test", (("Sec-WebSocket-Version", "13"),))
    assert (handshake.decision, handshake.reason) == (Verdict.DENY, Reason.CREDENTIAL_MISUSE)
