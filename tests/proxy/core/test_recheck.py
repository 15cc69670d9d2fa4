"""``--recheck-on-reload`` decides each open tunnel again as a new CONNECT would be decided: with the
process step (a rule now bound to executables) and without answering an ask for anyone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.core.connections import Connection, Connections
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.core.recheck import recheck
from proxy.policy.loader import load_policy
from proxy.policy.managed import load_with_ceiling
from proxy.policy.model import Policy

GIT = "/usr/bin/git"
GIT_ID = (os.stat(GIT).st_dev, os.stat(GIT).st_ino)
OPEN = "version: 1\nrules:\n  - {name: r, hosts: [h.test]}\n"


@dataclass(frozen=True)
class Facts:
    exes: frozenset[str]
    exe_ids: frozenset[tuple[int, int]]
    complete: bool = True


GIT_PROCESS = Facts(frozenset({GIT}), frozenset({GIT_ID}))
CURL_PROCESS = Facts(frozenset({"/usr/bin/curl"}), frozenset({(1, 2)}))


def policy(tmp_path: Path, text: str, name: str = "p.yaml") -> Policy:
    path = tmp_path / name
    path.write_text(text)
    return load_policy(path)


def tunnel(connections: Connections, closed: list[str], cid: str, admitted: Decision) -> Connection:
    conn = connections.open(cid, f"127.0.0.1:{5000 + int(cid[1:])}", "sbx")
    conn.tunnel = admitted.with_(address="203.0.113.1")
    conn.closer = lambda: closed.append(cid)
    return conn


def connect(old: Policy) -> Decision:
    return decide(Request(Kind.CONNECT, "h.test", 443, "CONNECT"), old)


def test_a_rule_newly_bound_to_executables_keeps_only_its_processes_tunnels(
    tmp_path: Path,
) -> None:
    old = policy(tmp_path, OPEN)
    new = policy(
        tmp_path,
        f"version: 1\nrules:\n  - {{name: r, hosts: [h.test], executables: [{GIT}]}}\n",
        "new.yaml",
    )
    connections, closed, recorded = Connections(), [], []  # type: ignore[var-annotated]
    admitted = connect(old)
    git = tunnel(connections, closed, "c1", admitted)
    git.process, git.attributed = GIT_PROCESS, True
    curl = tunnel(connections, closed, "c2", admitted)
    curl.process, curl.attributed = CURL_PROCESS, True
    tunnel(connections, closed, "c3", admitted)  # a gate that sees no process (egress serve)
    decisions = recheck(connections, lambda _conn: new, lambda d: recorded.append(d) or d)
    assert sorted(closed) == ["c2", "c3"]
    assert sorted(d.reason for d in decisions) == [
        Reason.EXECUTABLE_NOT_ALLOWED,
        Reason.PROCESS_UNATTRIBUTED,
    ]
    assert all(d.decision is Verdict.DENY for d in recorded)
    assert all("closed after a policy reload" in (d.detail or "") for d in recorded)


def test_a_host_that_now_needs_an_approval_keeps_only_approved_tunnels(tmp_path: Path) -> None:
    old = policy(tmp_path, OPEN)
    ask = "version: 1\nrules:\n  - {name: r, action: ask, hosts: [h.test]}\n"
    new = policy(tmp_path, ask, "n.yaml")
    connections, closed = Connections(), []  # type: ignore[var-annotated]
    tunnel(connections, closed, "c1", connect(old))  # allowed by a rule: nobody was asked
    approved = connect(new).with_(
        decision=Verdict.ALLOW, reason=Reason.APPROVAL_GRANTED, approval="a1", decided_by="alice"
    )
    tunnel(connections, closed, "c2", approved)
    decisions = recheck(connections, lambda _conn: new, lambda d: d)
    assert closed == ["c1"]
    assert [(d.decision, d.reason) for d in decisions] == [
        (Verdict.DENY, Reason.APPROVAL_UNAVAILABLE)
    ]


def test_a_report_under_a_ceiling_bound_to_executables_keeps_only_its_processes(
    tmp_path: Path,
) -> None:
    managed = tmp_path / "managed.yaml"
    managed.write_text(
        f"version: 1\nrules:\n  - {{name: org, hosts: [h.test], executables: [{GIT}]}}\n"
    )
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nrules: []\n")
    new = load_with_ceiling(local, managed)
    old = policy(tmp_path, OPEN)
    connections, closed = Connections(), []  # type: ignore[var-annotated]
    git = tunnel(connections, closed, "c1", connect(old))
    git.process, git.attributed = GIT_PROCESS, True
    curl = tunnel(connections, closed, "c2", connect(old))
    curl.process, curl.attributed = CURL_PROCESS, True
    decisions = recheck(connections, lambda _conn: new, lambda d: d)
    assert closed == ["c2"]
    assert [d.reason for d in decisions] == [Reason.EXECUTABLE_NOT_ALLOWED]
    assert "managed policy's rule 'org'" in (decisions[0].detail or "")


@pytest.mark.parametrize(
    ("opened", "closes"), [("[]", True), ("[10.1.0.0/16]", False)], ids=["closed", "kept-open"]
)
def test_a_range_closed_by_the_reload_closes_the_tunnels_pinned_into_it(
    tmp_path: Path, opened: str, closes: bool
) -> None:
    """The host is still allowed, but its tunnel's address is in a range the policy no longer
    opens: a new CONNECT would be refused (``internal-address``), so the open tunnel is closed."""
    rules = "rules:\n  - {name: r, hosts: [h.test]}\n"
    old = policy(tmp_path, f"version: 1\nallow_internal: [10.0.0.0/8]\n{rules}")
    new = policy(tmp_path, f"version: 1\nallow_internal: {opened}\n{rules}", "new.yaml")
    connections, closed, recorded = Connections(), [], []  # type: ignore[var-annotated]
    tunnel(connections, closed, "c1", connect(old)).tunnel = connect(old).with_(address="10.1.2.3")
    recheck(connections, lambda _conn: new, lambda d: recorded.append(d) or d)
    assert closed == (["c1"] if closes else [])
    assert [(d.decision, d.reason, d.address) for d in recorded] == (
        [(Verdict.DENY, Reason.INTERNAL_ADDRESS, "10.1.2.3")] if closes else []
    )
