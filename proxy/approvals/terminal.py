"""``egress run``'s notices: a pending approval's id and the exact command that answers it, on the
terminal of the person watching the agent (or one JSON line each with ``--json``).

Sandbox data in the notice (host, method, path) is escaped: a hostile name cannot move the cursor or
forge a line on that terminal. Each part is bounded on its own, so no long method or path can push the
host out of the question.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import IO

from proxy.approvals.model import Approval
from proxy.core.text import escape


class TerminalNotices:
    """A :class:`proxy.approvals.broker.Notifier` writing to ``stream`` (stderr by default)."""

    def __init__(
        self,
        admin_url: str,
        token_file: str,
        *,
        as_json: bool = False,
        stream: IO[str] | None = None,
    ) -> None:
        self.admin_url = admin_url
        self.token_file = token_file
        self.as_json = as_json
        self.stream = stream

    def command(self, verb: str, approval_id: str, *extra: str) -> list[str]:
        return [
            "egress", verb, approval_id, *extra,
            "--admin", self.admin_url, "--token-file", self.token_file,
        ]  # fmt: skip

    def opened(self, approval: Approval) -> None:
        seconds = int(approval.deadline - approval.created)
        if self.as_json:
            what = f"{approval.kind.upper()} {approval.subject.describe()}"
            line = json.dumps(
                {
                    "event": "approval-pending",
                    "id": approval.id,
                    "sandbox_id": approval.subject.sandbox,
                    "request": what,
                    "rule": approval.rule,
                    "deadline": approval.deadline,
                    "approve": self.command("approve", approval.id),
                    "approve_session": self.command("approve", approval.id, "--session"),
                    "approve_persist": self.command("approve", approval.id, "--persist"),
                    "deny": self.command("deny", approval.id),
                }
            )
            self._write(line)
            return
        self._write(
            f"egress: approval {approval.id}: sandbox {escape(approval.subject.sandbox, 64)} asks "
            f"for {escape(approval.kind.upper(), 16)} {approval.subject.summary()} "
            f"(rule {escape(approval.rule or '-', 64)}); "
            f"{seconds} s to answer:"
        )
        self._write(f"egress:   {shlex.join(self.command('approve', approval.id))}")
        self._write("egress:   (add --session or --persist to allow more; `egress deny` refuses)")

    def closed(self, approval: Approval) -> None:
        if self.as_json:
            self._write(
                json.dumps(
                    {
                        "event": "approval-decided",
                        "id": approval.id,
                        "state": str(approval.state),
                        "decided_by": approval.decided_by,
                        "scope": approval.scope,
                    }
                )
            )
            return
        by = escape(approval.decided_by or "timeout", 64)
        scope = f" ({approval.scope})" if approval.scope else ""
        self._write(f"egress: approval {approval.id}: {approval.state} by {by}{scope}")

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
