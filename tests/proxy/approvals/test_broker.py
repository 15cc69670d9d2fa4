"""The broker behind the checkpoint's ask step, in process: grants answer only what an ask rule
asked, persisting is checked before it is granted, and every outcome is counted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals.broker import Broker, Unavailable
from proxy.approvals.model import Scope, State
from proxy.approvals.overlay import Overlay
from proxy.approvals.sqlitestore import SqliteStore
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.destination import Destination
from proxy.evidence.emit import Emitter, MemorySink
from proxy.evidence.metrics import Metrics
from proxy.policy.loader import load_policy

POLICY = """
version: 1
rules:
  - name: ask-api
    action: ask
    hosts: [api.test]
    timeout: 5
"""


class Everywhere:
    async def destination(self, host: Any, port: int, allow_internal: Sequence[Any]) -> Destination:
        return Destination(str(host), port, "203.0.113.9", ("203.0.113.9",))


def connect(host: str) -> Request:
    return Request(Kind.CONNECT, host, 443, "CONNECT")


def test_a_persisted_rule_answers_only_where_an_ask_rule_asks(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    overlay = tmp_path / "approved.yaml"
    overlay.write_text(
        "version: 1\nrules:\n"
        "  - name: approved-0123456789abcdef\n    hosts: [api.test, elsewhere.test]\n"
    )
    memory = MemorySink()

    async def main() -> list[Any]:
        broker = Broker(SqliteStore(":memory:"), overlay=Overlay(overlay))
        await broker.start()
        checkpoint = Checkpoint(lambda: policy, Emitter([memory]), Everywhere(), approvals=broker)
        try:
            conn = Connection(peer="127.0.0.1:1", sandbox_id="sbx-1")
            return [
                await checkpoint.admit(conn, connect(h)) for h in ("api.test", "elsewhere.test")
            ]
        finally:
            await broker.close()

    granted, elsewhere = asyncio.run(main())
    assert (granted.decision, granted.reason, granted.grant, granted.approval) == (
        Verdict.ALLOW,
        Reason.APPROVAL_GRANTED,
        "persist",
        "0123456789abcdef",
    )
    # the overlay names elsewhere.test too, but no ask rule covers it: it is not the policy
    assert (elsewhere.decision, elsewhere.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)


def test_persisting_without_an_overlay_grants_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    metrics = Metrics()

    async def main() -> tuple[Any, Any]:
        broker = Broker(SqliteStore(":memory:"), metrics=metrics)
        await broker.start()
        checkpoint = Checkpoint(
            lambda: policy, Emitter([MemorySink()]), Everywhere(), approvals=broker
        )
        conn = Connection(peer="127.0.0.1:1", sandbox_id="sbx-1")
        held = asyncio.create_task(checkpoint.admit(conn, connect("api.test")))
        for _ in range(100):
            pending = await broker.pending()
            if pending:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(Unavailable, match="approved-rules file"):
            await broker.approve(pending[0].id, Scope.PERSIST, "alice")
        assert (await broker.get(pending[0].id)).state is State.PENDING  # type: ignore[union-attr]
        await broker.deny(pending[0].id, "alice", "no")
        decision = await held
        await broker.close()
        return decision, pending[0]

    decision, _ = asyncio.run(main())
    assert decision.reason is Reason.APPROVAL_DENIED
    text = metrics.exposition().decode()
    assert 'egress_approvals_total{decided_by="person",outcome="denied"} 1.0' in text
    assert "egress_approvals_pending 0.0" in text
    assert 'egress_approval_wait_seconds_count{outcome="denied"} 1.0' in text
