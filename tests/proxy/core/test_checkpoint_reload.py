"""A policy reloaded while a request is held for an approval: the answer was given under the old
policy, and is enforced only where the policy now in force allows the request or asks the same
question (the same rule, answerable by the same reviewers)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from tests.proxy.core.test_checkpoint import ASK_POLICY, Approver, Lookups

GIT = "/usr/bin/git"


class Reloading(Approver):
    """Grants the request, after the policy was replaced while it was held."""

    def __init__(self, holder: dict[str, Policy], new: Policy) -> None:
        super().__init__()
        self.holder, self.new = holder, new

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
        self.holder["policy"] = self.new  # what a live reload does while a person decides
        return await super().answer(decision, rule, record)


def load(tmp_path: Path, name: str, text: str) -> Policy:
    path = tmp_path / name
    path.write_text(text)
    return load_policy(path)


def held(old: Policy, new: Policy) -> tuple[Decision, Checkpoint, Connection, MemorySink]:
    holder = {"policy": old}
    memory = MemorySink()
    lookups = Lookups(answers={"api.test": "203.0.113.20"})
    checkpoint = Checkpoint(
        lambda: holder["policy"], Emitter([memory]), lookups, approvals=Reloading(holder, new)
    )
    conn = Connection(peer="127.0.0.1:5000", sandbox_id="sbx")
    request = Request(Kind.CONNECT, "api.test", 443, "CONNECT")
    return asyncio.run(checkpoint.admit(conn, request)), checkpoint, conn, memory


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        ("version: 1\nrules: []\n", Reason.NO_MATCHING_RULE),
        (
            "version: 1\nrules:\n  - {name: api, hosts: [api.test]}\n"
            "  - {name: no-api, action: deny, hosts: [api.test]}\n",
            Reason.DENIED_BY_RULE,
        ),
        (
            f"version: 1\nrules:\n  - {{name: ask-api, action: ask, hosts: [api.test], "
            f"executables: [{GIT}]}}\n",
            Reason.PROCESS_UNATTRIBUTED,
        ),
        (
            "version: 1\nrules:\n  - {name: ask-people, action: ask, hosts: [api.test]}\n",
            Reason.APPROVAL_UNAVAILABLE,
        ),
        (
            "version: 1\nrules:\n  - {name: ask-api, action: ask, review: auto, "
            "hosts: [api.test]}\n",
            Reason.APPROVAL_UNAVAILABLE,
        ),
    ],
    ids=["rule-removed", "denied", "bound-to-executables", "another-rule-asks", "review-changed"],
)
def test_an_approval_given_across_a_reload_that_refuses_the_request_dials_nothing(
    tmp_path: Path, new: str, reason: Reason
) -> None:
    old = load(tmp_path, "old.yaml", ASK_POLICY)
    decision, checkpoint, conn, memory = held(old, load(tmp_path, "new.yaml", new))
    assert (decision.decision, decision.reason) == (Verdict.DENY, reason)
    assert decision.approval == "a1" and decision.decided_by == "alice"
    assert "reloaded while this request was held" in (decision.detail or "")
    assert memory.decisions[-1] == decision
    assert checkpoint.dial_target(conn, "api.test", 443) is None
    assert conn.tunnel is None


@pytest.mark.parametrize(
    "new",
    [
        ASK_POLICY + "  - {name: more, hosts: [more.test]}\n",
        "version: 1\nrules:\n  - {name: a, hosts: [api.test]}\n",
    ],
    ids=["still-asks", "now-allows"],
)
def test_control_an_approval_across_a_reload_that_still_covers_it_stands(
    tmp_path: Path, new: str
) -> None:
    old = load(tmp_path, "old.yaml", ASK_POLICY)
    decision, checkpoint, conn, _ = held(old, load(tmp_path, "new.yaml", new))
    assert (decision.decision, decision.reason) == (Verdict.ALLOW, Reason.APPROVAL_GRANTED)
    assert checkpoint.dial_target(conn, "api.test", 443) == "203.0.113.20"


@dataclass
class Across:
    """A CONNECT admitted across a reload: where it stands, and what a reload's recheck saw."""

    checkpoint: Checkpoint
    conn: Connection
    decision: Decision
    memory: MemorySink
    rechecked: list[list[Decision]]


def admitted_across_a_reload(
    old: Policy, new: Policy, host: str, address: str, *, during_lookup: bool
) -> Across:
    """A CONNECT to ``host`` (resolving to ``address``) decided under ``old``; the policy becomes
    ``new`` while the connection's process is looked up (``during_lookup``: a walk in the worker
    thread, before the decision is recorded) or while its tunnel's early 200 is sent, when a
    reload's recheck runs too."""
    from proxy.core.recheck import recheck
    from tests.proxy.core.test_checkpoint_lookup import Processes, Walking

    holder = {"policy": old}
    memory = MemorySink()
    reload = functools.partial(holder.update, policy=new)
    checkpoint = Checkpoint(
        lambda: holder["policy"],
        Emitter([memory]),
        Lookups(answers={host: address}),
        approvals=Approver(),
        processes=Walking(during=reload) if during_lookup else Processes(known=True),
    )
    rechecked: list[list[Decision]] = []

    async def answer() -> None:
        reload()
        rechecked.append(recheck(checkpoint.connections, checkpoint.policy_for, memory.record))

    async def go() -> tuple[Connection, Decision]:
        conn, _ = checkpoint.connected("c1", "127.0.0.1:5000")
        request = Request(Kind.CONNECT, host, 443, "CONNECT")
        # Looked up during admission, the reload comes before the decision's destination step.
        return conn, await checkpoint.admit(conn, request, answer=None if during_lookup else answer)

    conn, decision = asyncio.run(go())
    return Across(checkpoint, conn, decision, memory, rechecked)


def test_an_ask_decided_before_a_reload_is_asked_and_held_under_the_policy_it_was_decided_by(
    tmp_path: Path,
) -> None:
    """The reload lands while the connection's process is looked up, before the question: the
    question is the old policy's, so the answer is checked against the policy now in force, which
    refuses it; nothing is dialled."""
    old = load(tmp_path, "old.yaml", ASK_POLICY)
    new = load(tmp_path, "new.yaml", "version: 1\nrules: []\n")
    across = admitted_across_a_reload(old, new, "api.test", "203.0.113.20", during_lookup=True)
    decision = across.decision
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)
    assert "reloaded while this request was held" in (decision.detail or "")
    assert across.checkpoint.dial_target(across.conn, "api.test", 443) is None


def test_an_address_screened_before_a_reload_is_screened_again_by_the_new_ranges(
    tmp_path: Path,
) -> None:
    """A reload that closes the internal range an admitted request was resolved into refuses it,
    though the new policy still allows the host."""
    rules = "rules:\n  - {name: svc, hosts: [svc.test]}\n"
    old = load(tmp_path, "old.yaml", f"version: 1\nallow_internal: [10.0.0.0/8]\n{rules}")
    new = load(tmp_path, "new.yaml", f"version: 1\n{rules}")
    across = admitted_across_a_reload(old, new, "svc.test", "10.1.2.3", during_lookup=True)
    decision = across.decision
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.INTERNAL_ADDRESS)
    assert "reloaded while this request was admitted" in (decision.detail or "")
    assert across.checkpoint.dial_target(across.conn, "svc.test", 443) is None


@pytest.mark.parametrize("asked", [True, False], ids=["approved", "allowed"])
def test_a_reload_while_an_admitted_tunnel_is_answered_is_met_before_its_record(
    tmp_path: Path, asked: bool
) -> None:
    """The tunnel's 200 goes out before its record (its process is looked up meanwhile); a reload
    that lands while it is sent (a client that does not read can stall that send) is not seen by
    the reload's recheck, which knows only admitted tunnels: the request is decided again under
    the policy now in force, an approved one too, and refused."""
    text = ASK_POLICY if asked else "version: 1\nrules:\n  - {name: open, hosts: [api.test]}\n"
    old = load(tmp_path, "old.yaml", text)
    new = load(tmp_path, "new.yaml", "version: 1\nrules: []\n")
    across = admitted_across_a_reload(old, new, "api.test", "203.0.113.20", during_lookup=False)
    decision = across.decision
    assert across.rechecked == [[]]  # the recheck could not see it
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)
    assert across.checkpoint.dial_target(across.conn, "api.test", 443) is None
    assert across.memory.decisions[-1] == decision
