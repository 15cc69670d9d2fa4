"""Persisted grants: rules appended to an overlay policy file, never to the reviewed policy.

The overlay is an ordinary policy file (``version: 1``, ``rules:``) loaded by the strict loader, so it
can be linted, reviewed and moved into the policy by hand. Each rule carries who approved it, when and
why, as comments and as its ``description``. A rule in the overlay only ever answers an ``ask``: the gate
consults it in the checkpoint's ask step, after deny rules and every safety refusal, so an entry can
never allow a host no ask rule covers, and deleting it revokes the grant.

The file is re-read whenever it changes (replicas sharing it on a volume see each other's grants); a
version that does not load is logged and the last good one stays in force. Appends hold an exclusive
``flock`` and replace the file atomically after the new text has loaded.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy.approvals.model import Approval, Subject, clip
from proxy.core.decision import Kind, Request, Verdict
from proxy.core.engine import decide
from proxy.core.text import escape
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy, PolicyError, Rule

log = logging.getLogger(__name__)

HEADER = """\
# Grants persisted by `egress approve --persist`. Each rule answers an ask rule of the policy for one
# host and port, and nothing else: it cannot allow what no ask rule covers, nor override a deny rule.
# Review them: move a rule into the reviewed policy, or delete it to revoke the grant. The gate
# re-reads this file when it changes. `rules` must stay the last key: approvals append to it.
version: 1
rules:
"""


class OverlayError(Exception):
    """The overlay cannot take a new rule; the message says why and names the file."""


@dataclass(frozen=True)
class Covered:
    rule: Rule
    approval: str  # the approval id the rule was made from


def rule_name(approval_id: str) -> str:
    return f"approved-{approval_id}"


class Overlay:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._policy: Policy | None = None

    # -- reading ----------------------------------------------------------------------------------

    def policy(self) -> Policy | None:
        """The overlay in force: re-read when the file changed; the last good one if it broke."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._policy = None, None
            return None
        except OSError as exc:
            log.error("cannot read the approved-rules file %s: %s", self.path, exc)
            return self._policy
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy = load_policy(self.path)
            except PolicyError as exc:
                for line in exc.lines():
                    log.error("approved-rules file rejected: %s", line)
                log.error("keeping the approved rules loaded before (%s)", self.path)
            except OSError as exc:
                log.error("cannot read the approved-rules file %s: %s", self.path, exc)
        return self._policy

    def covers(self, subject: Subject) -> Covered | None:
        """The overlay rule that answers ``subject`` (host rules only: the overlay has no request
        conditions), or None."""
        if subject.method is not None or subject.path is not None:
            return None
        policy = self.policy()
        if policy is None:
            return None
        decision = decide(Request(Kind.CONNECT, subject.host, subject.port), policy)
        if decision.decision is not Verdict.ALLOW or decision.rule is None:
            return None
        rule = policy.rule(decision.rule)
        if rule is None:
            return None
        approval = rule.name.removeprefix("approved-")
        return Covered(rule, approval)

    # -- writing ----------------------------------------------------------------------------------

    def check(self, approval: Approval, who: str, reason: str | None) -> None:
        """Raise OverlayError unless :meth:`append` would succeed now (run before answering, so a
        persisted answer is never given that cannot be written)."""
        text = self._read_text()
        self._validated(text + self.render(approval, who, reason), approval)

    def append(self, approval: Approval, who: str, reason: str | None) -> None:
        with self._locked():
            text = self._read_text()
            new = text + self.render(approval, who, reason)
            self._validated(new, approval)
            self._replace(new)

    def render(self, approval: Approval, who: str, reason: str | None) -> str:
        subject = approval.subject
        if subject.method is not None or subject.path is not None:
            raise OverlayError(
                "a grant for one method and path cannot be persisted as a host rule; "
                "approve it once or for the session"
            )
        when = datetime.datetime.fromtimestamp(approval.created, datetime.UTC)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        why = escape(clip(reason) or "no reason given", 300)
        by = escape(who, 64)
        lines = [
            f"  # approved by {by} at {stamp} (approval {approval.id}, asked "
            f"{when.strftime('%Y-%m-%dT%H:%M:%SZ')} by sandbox {escape(subject.sandbox, 64)} "
            f"under rule {escape(approval.rule or '-', 64)})",
            f"  # reason: {why}",
            f"  - name: {rule_name(approval.id)}",
        ]
        try:
            address = ipaddress.ip_address(subject.host)
        except ValueError:
            lines.append(f"    hosts: [{json.dumps(subject.host)}]")
        else:
            lines.append(f'    cidrs: ["{address}/{address.max_prefixlen}"]')
        lines.append(f"    ports: [{subject.port}]")
        lines.append(f"    description: {json.dumps(f'approved by {by}: {why}')}")
        return "\n".join(lines) + "\n"

    def _read_text(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return HEADER
        except (OSError, UnicodeDecodeError) as exc:
            raise OverlayError(f"cannot read {self.path}: {exc}") from None
        return text if text.endswith("\n") or not text else text + "\n"

    def _validated(self, text: str, approval: Approval) -> None:
        """Load ``text`` with the strict loader (from a file beside the overlay) and check that the
        new rule is in it exactly as rendered."""
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".approved-check-", suffix=".yaml", dir=directory)
        except OSError as exc:
            raise OverlayError(f"cannot write beside {self.path}: {exc}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            try:
                policy = load_policy(name)
            except PolicyError as exc:
                problems = "; ".join(str(p) for p in exc.problems[:3])
                raise OverlayError(
                    f"{self.path} would not load with the new rule ({problems}); fix the file "
                    "(its 'rules' list must be the last key)"
                ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)
        names = [r.name for r in policy.rules]
        if names.count(rule_name(approval.id)) != 1:
            raise OverlayError(f"{self.path}: the new rule did not load as appended")

    def _replace(self, text: str) -> None:
        fd, name = tempfile.mkstemp(prefix=".approved-", suffix=".yaml", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(name, 0o644)
            os.replace(name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise OverlayError(f"cannot lock {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
