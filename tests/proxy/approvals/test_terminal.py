"""egress run's notices: the command that answers, and nothing a hostile name can forge."""

from __future__ import annotations

import io
import json

from proxy.approvals.model import Approval, Subject
from proxy.approvals.terminal import TerminalNotices
from proxy.core.decision import Decision, Kind, Reason, Verdict


def approval(host: str) -> Approval:
    decision = Decision(
        Verdict.ASK, Reason.APPROVAL_PENDING, "ask-api", Kind.CONNECT, host, 443, "v", "enforce",
        sandbox_id="sbx-1",
    )  # fmt: skip
    return Approval.open(decision, Subject.of(decision), "human", 60, 1000.0)


def test_the_notice_names_the_command_and_escapes_the_host() -> None:
    out = io.StringIO()
    notices = TerminalNotices("http://127.0.0.1:4000", "/state/tok", stream=out)
    pending = approval("evil\x1b[2J\ninjected.test")
    notices.opened(pending)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in out.getvalue()
    assert lines[1] == (
        f"egress:   egress approve {pending.id} --admin http://127.0.0.1:4000 "
        "--token-file /state/tok"
    )


def test_json_notices_are_one_line_each() -> None:
    out = io.StringIO()
    notices = TerminalNotices("http://127.0.0.1:4000", "/state/tok", as_json=True, stream=out)
    pending = approval("api.test")
    notices.opened(pending)
    [line] = out.getvalue().splitlines()
    data = json.loads(line)
    assert data["event"] == "approval-pending" and data["id"] == pending.id
    assert data["deny"][:3] == ["egress", "deny", pending.id]


def test_a_long_method_never_hides_where_the_request_goes() -> None:
    """A method override is any token, as long as the request head allows: bounded as one string, the
    question would end inside the method and never say which host and path it is about."""
    decision = Decision(
        Verdict.ASK, Reason.APPROVAL_PENDING, "ask-api", Kind.REQUEST, "repo.test", 443, "v",
        "enforce", method="GET", path="/api/deploy", sandbox_id="sbx-1",
    )  # fmt: skip
    override = "PUT" + "X" * 400
    subject = Subject.of(decision, methods=("GET", override), review="human")
    pending = Approval.open(decision, subject, "human", 60, 1000.0)
    out = io.StringIO()
    TerminalNotices("http://127.0.0.1:4000", "/state/tok", stream=out).opened(pending)
    question = out.getvalue().splitlines()[0]
    assert "repo.test:443/api/deploy" in question
    assert override not in question and "PUTXXX" in question
