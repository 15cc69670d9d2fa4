"""Approvals never grant beyond the managed ceiling: a persisted grant in the overlay for a host the
managed policy denies, or that no local ask rule covers, is never consulted; one inside the ceiling is."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.approvals.broker import Broker
from proxy.approvals.model import Subject
from proxy.approvals.overlay import Overlay
from proxy.approvals.sqlitestore import SqliteStore
from proxy.core.checkpoint import Checkpoint
from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.managed import load_with_ceiling
from tests.proxy.core.test_checkpoint import Lookups

MANAGED = """\
version: 1
rules:
  - name: org-example
    hosts: ["**.example.com"]
  - name: org-no-secrets
    action: deny
    hosts: [secrets.example.com]
"""
LOCAL = """\
version: 1
rules:
  - name: ask-example
    action: ask
    hosts: ["**.example.com"]
"""
OVERLAY = """\
version: 1
rules:
  - name: approved-a1
    hosts: [secrets.example.com]
  - name: approved-a2
    hosts: [docs.example.com]
  - name: approved-a3
    hosts: [elsewhere.test]
"""


def test_persisted_grants_answer_only_asks_inside_the_ceiling(tmp_path: Path) -> None:
    (tmp_path / "managed.yaml").write_text(MANAGED)
    (tmp_path / "local.yaml").write_text(LOCAL)
    (tmp_path / "approved.yaml").write_text(OVERLAY)
    policy = load_with_ceiling(tmp_path / "local.yaml", tmp_path / "managed.yaml")
    overlay = Overlay(tmp_path / "approved.yaml")
    # the overlay on its own would cover all three hosts
    for host in ("secrets.example.com", "docs.example.com", "elsewhere.test"):
        assert overlay.covers(Subject("-", host, 443)) is not None

    async def run() -> dict[str, tuple[Verdict, Reason]]:
        store = SqliteStore(tmp_path / "state.sqlite")
        broker = Broker(store, overlay=overlay)
        await broker.start()
        memory = MemorySink()
        lookups = Lookups(
            answers={h: "203.0.113.9" for h in ("secrets.example.com", "docs.example.com")}
        )
        checkpoint = Checkpoint(lambda: policy, Emitter([memory]), lookups, approvals=broker)
        out = {}
        try:
            for i, host in enumerate(("secrets.example.com", "docs.example.com", "elsewhere.test")):
                conn, _ = checkpoint.connected(f"c{i}", "10.0.0.2:1000")
                decision = await checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT"))
                out[host] = (decision.decision, decision.reason)
        finally:
            await broker.close()
        return out

    answers = asyncio.run(run())
    assert answers["secrets.example.com"] == (Verdict.DENY, Reason.DENIED_BY_RULE)
    assert answers["elsewhere.test"] == (Verdict.DENY, Reason.NO_MATCHING_RULE)
    assert answers["docs.example.com"] == (Verdict.ALLOW, Reason.APPROVAL_GRANTED)
