"""Step 3a: a rule bound to executables, decided with the connection's process looked up first."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from tests.proxy.core.test_checkpoint import Lookups

GIT = "/usr/bin/git"
POLICY = f"""
version: 1
rules:
  - name: git-only
    hosts: [pypi.test]
    executables: [{GIT}]
  - name: open
    hosts: [other.test]
"""
GIT_ID = (os.stat(GIT).st_dev, os.stat(GIT).st_ino)


@dataclass(frozen=True)
class Facts:
    exes: frozenset[str]
    exe_ids: frozenset[tuple[int, int]]
    complete: bool = True


@dataclass
class Processes:
    answer: Facts | None
    asked: list[str] = field(default_factory=list)
    forgotten: list[str | None] = field(default_factory=list)

    def attribute(self, peer: str, *, every_owner: bool = False) -> Facts | None:
        self.asked.append(peer + (" every owner" if every_owner else ""))
        if self.answer is None:
            return None
        return Facts(self.answer.exes, self.answer.exe_ids, every_owner)

    def remember(self, peer: str, found: Facts | None) -> None:
        pass

    def forget(self, peer: str | None) -> None:
        self.forgotten.append(peer)


def _run(tmp_path: Path, answer: Facts | None, host: str = "pypi.test") -> tuple[object, ...]:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    policy = load_policy(path)
    lookups, memory, processes = Lookups(), MemorySink(), Processes(answer)
    checkpoint = Checkpoint(lambda: policy, Emitter([memory]), lookups, processes=processes)
    conn = checkpoint.connections.open("c1", "127.0.0.1:5000", "sbx")
    decision = asyncio.run(checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT")))
    asyncio.run(checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT")))
    checkpoint.disconnected("c1")
    return decision, lookups, processes, conn


def test_the_bound_executable_is_allowed(tmp_path: Path) -> None:
    decision, _, processes, _ = _run(tmp_path, Facts(frozenset({GIT}), frozenset({GIT_ID})))
    assert decision.decision is Verdict.ALLOW  # type: ignore[attr-defined]
    # First the quick lookup (as the connection opened), then once every owner, for the bound rule.
    assert processes.asked == [  # type: ignore[attr-defined]
        "127.0.0.1:5000",
        "127.0.0.1:5000 every owner",
    ]
    assert processes.forgotten == ["127.0.0.1:5000"]  # type: ignore[attr-defined]


def test_another_executable_is_refused_before_any_lookup(tmp_path: Path) -> None:
    facts = Facts(frozenset({"/usr/bin/curl"}), frozenset({(1, 2)}))
    decision, lookups, _, _ = _run(tmp_path, facts)
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED  # type: ignore[attr-defined]
    assert "/usr/bin/curl" in decision.detail  # type: ignore[attr-defined]
    assert lookups.asked == []  # type: ignore[attr-defined]  # nothing resolved for a refusal


def test_the_same_path_with_another_file_is_refused(tmp_path: Path) -> None:
    """A copy put where the sandbox sees /usr/bin/git is another inode."""
    decision, *_ = _run(tmp_path, Facts(frozenset({GIT}), frozenset({(GIT_ID[0], GIT_ID[1] + 1)})))
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED  # type: ignore[attr-defined]


def test_a_shared_socket_needs_every_owner_to_match(tmp_path: Path) -> None:
    facts = Facts(frozenset({GIT, "/usr/bin/curl"}), frozenset({GIT_ID, (1, 2)}))
    decision, *_ = _run(tmp_path, facts)
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED  # type: ignore[attr-defined]


def test_an_unattributed_connection_fails_closed(tmp_path: Path) -> None:
    decision, lookups, _, _ = _run(tmp_path, None)
    assert decision.decision is Verdict.DENY  # type: ignore[attr-defined]
    assert decision.reason is Reason.PROCESS_UNATTRIBUTED  # type: ignore[attr-defined]
    assert lookups.asked == []  # type: ignore[attr-defined]


def test_rules_without_executables_allow_any_process(tmp_path: Path) -> None:
    decision, lookups, _, _ = _run(tmp_path, None, host="other.test")
    assert decision.rule == "open"  # type: ignore[attr-defined]
    assert lookups.asked == ["other.test", "other.test"]  # type: ignore[attr-defined]  # step 4


def test_without_a_process_lookup_a_bound_rule_refuses(tmp_path: Path) -> None:
    """A shared gate cannot see the sandbox's processes: bound rules never allow there."""
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    policy = load_policy(path)
    checkpoint = Checkpoint(lambda: policy, Emitter([MemorySink()]), Lookups())
    conn = Connection(peer="127.0.0.1:1", sandbox_id="sbx")
    decision = asyncio.run(
        checkpoint.admit(conn, Request(Kind.CONNECT, "pypi.test", 443, "CONNECT"))
    )
    assert decision.reason is Reason.PROCESS_UNATTRIBUTED
