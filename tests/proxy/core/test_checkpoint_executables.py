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
from proxy.policy.managed import load_with_ceiling
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

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Facts | None:
        self.asked.append(peer + (" every owner" if every_owner else ""))
        if self.answer is None:
            return None
        return Facts(self.answer.exes, self.answer.exe_ids, every_owner)

    def attribute_now(self, peer: str, *, identity: bool = True) -> Facts | None:
        raise BlockingIOError  # the walk is left to a worker thread

    def remember(self, peer: str, found: Facts | None, owner: object = None) -> None:
        pass

    def forget(self, peer: str | None, owner: object = None) -> None:
        self.forgotten.append(peer)


def _run(tmp_path: Path, answer: Facts | None, host: str = "pypi.test") -> tuple[object, ...]:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    policy = load_policy(path)
    lookups, memory, processes = Lookups(), MemorySink(), Processes(answer)
    checkpoint = Checkpoint(lambda: policy, Emitter([memory]), lookups, processes=processes)
    conn, _ = checkpoint.connected("c1", "127.0.0.1:5000", "sbx")
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


@dataclass
class HandedOver(Processes):
    """The socket's owner as the connection opened was python; by the request, python had handed
    it to git and closed its own copy (its request held back in the kernel by TCP_CORK)."""

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Facts | None:
        self.asked.append(peer + (" every owner" if every_owner else ""))
        if every_owner:
            return Facts(frozenset({GIT}), frozenset({GIT_ID}), True)
        return Facts(frozenset({"/usr/bin/python3"}), frozenset({(1, 2)}), False)


def test_an_owner_seen_as_the_connection_opened_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    policy = load_policy(path)
    processes = HandedOver(None)
    checkpoint = Checkpoint(lambda: policy, Emitter([MemorySink()]), Lookups(), processes=processes)
    conn, _ = checkpoint.connected("c1", "127.0.0.1:5000", "sbx")
    request = Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")
    decision = asyncio.run(checkpoint.admit(conn, request))
    assert processes.asked == ["127.0.0.1:5000", "127.0.0.1:5000 every owner"]
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED
    assert "/usr/bin/python3" in (decision.detail or "")
    # and on every later request of the connection (keep-alive, pipelined), not only the first
    again = asyncio.run(checkpoint.admit(conn, request))
    assert again.reason is Reason.EXECUTABLE_NOT_ALLOWED


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


def _under_ceiling(tmp_path: Path, answer: Facts | None, host: str) -> tuple[object, Lookups]:
    managed = tmp_path / "managed.yaml"
    managed.write_text(
        f"version: 1\nrules:\n  - {{name: org-git, hosts: [pypi.test], executables: [{GIT}]}}\n"
        "  - {name: org-open, hosts: [other.test]}\n"
    )
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nrules: []\n")
    policy = load_with_ceiling(local, managed)
    lookups = Lookups(answers={"pypi.test": "203.0.113.10", "other.test": "203.0.113.11"})
    checkpoint = Checkpoint(
        lambda: policy, Emitter([MemorySink()]), lookups, processes=Processes(answer)
    )
    conn, _ = checkpoint.connected("c1", "127.0.0.1:5000", "sbx")
    decision = asyncio.run(checkpoint.admit(conn, Request(Kind.CONNECT, host, 443, "CONNECT")))
    return decision, lookups


def test_report_mode_under_a_ceiling_bound_to_executables_holds_other_processes(
    tmp_path: Path,
) -> None:
    """Report mode learns inside the managed policy: a gap it lets through to a host the managed
    policy allows only for git is refused to curl, before anything is resolved."""
    curl = Facts(frozenset({"/usr/bin/curl"}), frozenset({(1, 2)}))
    decision, lookups = _under_ceiling(tmp_path, curl, "pypi.test")
    assert decision.decision is Verdict.DENY  # type: ignore[attr-defined]
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED  # type: ignore[attr-defined]
    assert "managed policy's rule 'org-git'" in decision.detail  # type: ignore[attr-defined]
    assert lookups.asked == []
    decision, lookups = _under_ceiling(tmp_path, None, "pypi.test")
    assert decision.reason is Reason.PROCESS_UNATTRIBUTED  # type: ignore[attr-defined]
    assert lookups.asked == []


def test_control_report_mode_under_a_ceiling_lets_the_bound_executable_and_open_hosts(
    tmp_path: Path,
) -> None:
    git = Facts(frozenset({GIT}), frozenset({GIT_ID}))
    decision, lookups = _under_ceiling(tmp_path, git, "pypi.test")
    assert decision.decision is Verdict.REPORT  # type: ignore[attr-defined]
    assert lookups.asked == ["pypi.test"]
    decision, _ = _under_ceiling(tmp_path, None, "other.test")
    assert decision.decision is Verdict.REPORT  # type: ignore[attr-defined]


def test_an_executable_named_with_control_characters_is_escaped_in_the_refusal(
    tmp_path: Path,
) -> None:
    """The sandbox names its own files: the path it runs is shown escaped."""
    hostile = "/tmp/x\n\x1b[2Jforged: allow"
    decision, *_ = _run(tmp_path, Facts(frozenset({hostile}), frozenset({(1, 2)})))
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED  # type: ignore[attr-defined]
    assert "\n" not in decision.detail and "\x1b" not in decision.detail  # type: ignore[attr-defined]
    assert "/tmp/x\\x0a\\x1b[2Jforged: allow" in decision.detail  # type: ignore[attr-defined]


def test_a_report_is_held_to_its_own_rule_and_to_the_managed_rule_that_allows_it(
    tmp_path: Path,
) -> None:
    """A port gap of a local rule bound to git, on a port the managed policy opens only to curl:
    git passes its own rule's binding, not the managed one."""
    managed = tmp_path / "managed.yaml"
    managed.write_text(
        f"version: 1\nrules:\n  - {{name: org-git, hosts: [pypi.test], executables: [{GIT}]}}\n"
        "  - {name: org-curl, hosts: [pypi.test], ports: [8443], executables: [/usr/bin/curl]}\n"
    )
    local = tmp_path / "local.yaml"
    local.write_text(
        f"version: 1\nmode: report\nrules:\n  - {{name: g, hosts: [pypi.test], executables: [{GIT}]}}\n"
    )
    policy = load_with_ceiling(local, managed)
    lookups = Lookups()
    git = Facts(frozenset({GIT}), frozenset({GIT_ID}))
    checkpoint = Checkpoint(
        lambda: policy, Emitter([MemorySink()]), lookups, processes=Processes(git)
    )
    conn, _ = checkpoint.connected("c1", "127.0.0.1:5000", "sbx")
    request = Request(Kind.CONNECT, "pypi.test", 8443, "CONNECT")
    decision = asyncio.run(checkpoint.admit(conn, request))
    assert decision.reason is Reason.EXECUTABLE_NOT_ALLOWED
    assert "managed policy's rule 'org-curl'" in (decision.detail or "")
    assert lookups.asked == []
    allowed = asyncio.run(
        checkpoint.admit(conn, Request(Kind.CONNECT, "pypi.test", 443, "CONNECT"))
    )
    assert allowed.decision is Verdict.ALLOW  # control: its own port
