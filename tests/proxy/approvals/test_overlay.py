"""Persisted grants: appended as reviewable rules, loaded by the strict loader, re-read on change,
and never a way to widen anything (host rules only, last good file kept)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.approvals.model import Approval, Subject
from proxy.approvals.overlay import Overlay, OverlayError
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.policy.loader import load_policy


def approval(host: str = "api.test", port: int = 443, method: str | None = None) -> Approval:
    decision = Decision(
        Verdict.ASK, Reason.APPROVAL_PENDING, "ask-api", Kind.CONNECT, host, port, "v", "enforce",
        sandbox_id="sbx-1",
    )  # fmt: skip
    subject = Subject.of(decision)
    if method is not None:
        subject = Subject(subject.sandbox, host, port, method, "/upload")
    return Approval.open(decision, subject, "human", 60, 1000.0)


def test_appended_rules_load_strictly_and_cover_their_host_and_port(tmp_path: Path) -> None:
    overlay = Overlay(tmp_path / "approved.yaml")
    assert overlay.policy() is None and overlay.covers(Subject("-", "api.test", 443)) is None
    first, second = approval(), approval("10.0.0.7", 8443)
    overlay.append(first, "alice", "needed\nfor CI # really")
    overlay.append(second, "bob", None)
    policy = load_policy(tmp_path / "approved.yaml")
    assert [r.name for r in policy.rules] == [f"approved-{first.id}", f"approved-{second.id}"]
    text = (tmp_path / "approved.yaml").read_text()
    assert "# reason: needed for CI # really" in text  # one comment line, whatever was typed
    covered = overlay.covers(Subject("sbx-other", "api.test", 443))
    assert covered is not None and covered.approval == first.id
    assert overlay.covers(Subject("-", "10.0.0.7", 8443)) is not None
    for subject in (
        Subject("-", "api.test", 8443),
        Subject("-", "sub.api.test", 443),
        Subject("-", "10.0.0.8", 8443),
        Subject("-", "api.test", 443, "POST", "/upload"),
    ):
        assert overlay.covers(subject) is None, subject


def test_a_broken_edit_keeps_the_last_good_rules_and_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "approved.yaml"
    overlay = Overlay(path)
    overlay.append(approval(), "alice", None)
    assert overlay.covers(Subject("-", "api.test", 443)) is not None
    path.write_text(path.read_text() + "  - name: everything\n    hosts: ['*']\n")
    assert overlay.covers(Subject("-", "api.test", 443)) is not None  # last good version
    assert overlay.covers(Subject("-", "everything.test", 443)) is None
    with pytest.raises(OverlayError, match="would not load"):
        overlay.check(approval("b.test"), "alice", None)
    path.unlink()
    assert overlay.covers(Subject("-", "api.test", 443)) is None  # deleting revokes


def test_a_rules_list_that_is_not_last_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "approved.yaml"
    path.write_text("version: 1\nrules: []\n")
    with pytest.raises(OverlayError):
        Overlay(path).append(approval(), "alice", None)
    assert path.read_text() == "version: 1\nrules: []\n"


def test_a_request_grant_is_not_persisted_as_a_host_rule(tmp_path: Path) -> None:
    with pytest.raises(OverlayError, match="method and path"):
        Overlay(tmp_path / "approved.yaml").check(approval(method="POST"), "alice", None)
