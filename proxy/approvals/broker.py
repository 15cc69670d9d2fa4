"""The approver the checkpoint calls, and the one place answers are given.

For a held ``ask`` decision (:meth:`Broker.answer`), in this order:

1. a grant that covers exactly what is asked answers at once: a session grant for this sandbox (in the
   store, so it holds on every replica), or a persisted rule in the overlay file;
2. otherwise the request opens a pending approval, or joins the open one for the same sandbox and the
   same subject (under a rule that reads requests, the same method, path, exact query, header
   fields and held body; a request with a body the gate did not read joins none); a sandbox over
   its pending limit (or a gate over its total) is refused
   (``approval-limit``) without affecting anyone else;
3. its ``ask`` event is recorded, whoever must hear of a new approval hears of it (event stream,
   webhook, ``egress run``'s terminal, the reviewer), and the request waits: for a change published by
   the store (an answer given through any replica), re-reading the store at least every
   :data:`POLL` seconds, until the rule's timeout expires it (``approval-timeout``).

People and the reviewer answer through :meth:`Broker.approve` and :meth:`Broker.deny`. A persisted answer
is checked against the overlay before it is given, so it is never given when it cannot be written.
Nothing here fails open: any error on the way is a refusal for the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from proxy.approvals.model import (
    ENDED,
    REVIEWER,
    TIMEOUT,
    Advice,
    Approval,
    Grant,
    NotOpen,
    Scope,
    State,
    Subject,
)
from proxy.approvals.overlay import Overlay, OverlayError
from proxy.approvals.store import Limits, Store
from proxy.core.decision import Decision, Reason, Verdict
from proxy.policy.model import DEFAULT_ASK_TIMEOUT, Review, Rule

log = logging.getLogger(__name__)

POLL = 1.0  # seconds between store reads of a held request (a missed publish costs at most this)
DEFAULT_SESSION_TTL = 8 * 3600.0


class Notifier(Protocol):
    """Hears of approvals this gate opened (and how they ended); must not block or raise."""

    def opened(self, approval: Approval) -> None: ...

    def closed(self, approval: Approval) -> None: ...


class Reviewer(Protocol):
    """The automated reviewer (:class:`proxy.approvals.reviewer.CommandReviewer`)."""

    async def review(self, approval: Approval) -> tuple[Advice, str, Scope]: ...


class ApprovalMetrics(Protocol):
    """:class:`proxy.evidence.metrics.Metrics` implements this."""

    def approval_opened(self) -> None: ...

    def approval_closed(self, outcome: str, decided_by: str, seconds: float | None) -> None: ...


class Unavailable(Exception):
    """An answer that cannot be given as asked (e.g. persisting without an overlay file)."""


class Broker:
    def __init__(
        self,
        store: Store,
        *,
        overlay: Overlay | None = None,
        reviewer: Reviewer | None = None,
        notifiers: Iterable[Notifier] = (),
        limits: Limits | None = None,
        session_ttl: float = DEFAULT_SESSION_TTL,
        metrics: ApprovalMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.overlay = overlay
        self.reviewer = reviewer
        self.notifiers = list(notifiers)
        self.limits = limits or Limits()
        self.session_ttl = session_ttl
        self.metrics = metrics
        self.clock = clock
        self._wakers: dict[str, set[asyncio.Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._ended: set[str] = set()  # sandboxes of this gate that have exited

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        ready = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(ready), name="approvals-listener")
        await ready.wait()

    async def close(self) -> None:
        tasks = [t for t in (self._listener, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.store.close()

    async def _listen(self, ready: asyncio.Event) -> None:
        """Wake the requests held on an approval whenever the store says it changed."""
        async with self.store.feed.subscribe() as changes:
            ready.set()
            while True:
                change = await changes.get()
                for event in self._wakers.get(change.approval.id, ()):
                    event.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sandbox_ended(self, sandbox: str) -> None:
        """A sandbox of a gate that serves it alone has exited, for good: its pending approvals
        close (``sandbox-ended``), and what it asks from now on (a request it left queued) is
        refused at once, with nobody asked: no one is left to use an answer."""
        self._ended.add(sandbox)
        await self.store.end_session(sandbox)

    # -- the checkpoint's side ----------------------------------------------------------------------

    async def answer(
        self,
        decision: Decision,
        rule: Rule | None,
        record: Callable[[Decision], Decision],
        *,
        methods: tuple[str, ...] = (),
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Sequence[tuple[bytes, bytes]] | None = None,
        unread: int | None = 0,
    ) -> Decision:
        """:class:`proxy.core.checkpoint.Approver`: the held ``ask`` decision, answered."""
        review = str(rule.review) if rule is not None else str(Review.HUMAN)
        subject = Subject.of(
            decision,
            per_request=_reads_requests(rule),
            methods=methods,
            review=review,
            query=query,
            body=body,
            runs=runs,
            fields=fields,
            unread=unread,
        )
        # (1) grants
        grant = await self.store.grant_for(subject.granted())
        if grant is not None:
            return _granted(
                decision, grant.approval, grant.decided_by, Scope.SESSION, "a session grant"
            )
        covered = self.overlay.covers(subject) if self.overlay is not None else None
        if covered is not None:
            where = f"rule '{covered.rule.name}' of {self.overlay.path if self.overlay else '-'}"
            return _granted(decision, covered.approval, covered.rule.name, Scope.PERSIST, where)
        if subject.sandbox in self._ended:
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_UNAVAILABLE,
                detail=f"{decision.detail}; the sandbox had ended: nobody is left to ask for",
            )
        # (2) open or join
        timeout = rule.timeout if rule is not None else DEFAULT_ASK_TIMEOUT
        fresh = Approval.open(decision, subject, review, timeout, self.clock())
        opened = await self.store.open(fresh, self.limits)
        if opened is None:
            self._count("limit", "gate", None)
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_LIMIT,
                detail=f"{decision.detail}; too many approvals are pending for this sandbox "
                f"(at most {self.limits.per_sandbox}) or this gate (at most "
                f"{self.limits.total}): answer or let them expire first",
            )
        approval, created = opened
        # (3) record, announce, wait
        record(
            decision.with_(
                approval=approval.id,
                detail=f"{decision.detail}; held for approval {approval.id} "
                f"(at most {approval.deadline - approval.created:g} s)",
            )
        )
        if created:
            if self.metrics is not None:
                self.metrics.approval_opened()
            self._announce(approval)
        final = await self._wait(approval)
        if created:
            self._closed(final)
        return _outcome(decision, final)

    def _announce(self, approval: Approval) -> None:
        for notifier in self.notifiers:
            try:
                notifier.opened(approval)
            except Exception:
                log.exception("approval notifier %r failed", notifier)
        if self.reviewer is not None:
            self._spawn(self._review(approval), f"review-{approval.id}")

    def _closed(self, approval: Approval | None) -> None:
        if approval is None:
            return
        if approval.state is State.APPROVED:
            outcome = "granted"
        elif approval.state is State.DENIED:
            outcome = "denied"
        else:
            outcome = "timeout"
        by = approval.decided_by or TIMEOUT
        kind = TIMEOUT if by == ENDED else by if by in (REVIEWER, TIMEOUT) else "person"
        self._count(outcome, kind, (approval.decided or self.clock()) - approval.created)
        for notifier in self.notifiers:
            try:
                notifier.closed(approval)
            except Exception:
                log.exception("approval notifier %r failed", notifier)

    def _count(self, outcome: str, decided_by: str, seconds: float | None) -> None:
        if self.metrics is not None:
            self.metrics.approval_closed(outcome, decided_by, seconds)

    async def _wait(self, approval: Approval) -> Approval | None:
        event = asyncio.Event()
        wakers = self._wakers.setdefault(approval.id, set())
        wakers.add(event)
        try:
            while True:
                remaining = approval.deadline - self.clock()
                if remaining <= 0:
                    return await self.store.expire(approval.id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, POLL))
                event.clear()
                current = await self.store.get(approval.id)
                if current is None or current.state is not State.PENDING:
                    return current
        finally:
            wakers.discard(event)
            if not wakers:
                self._wakers.pop(approval.id, None)

    # -- the answering side -------------------------------------------------------------------------

    async def pending(self) -> list[Approval]:
        return await self.store.pending()

    async def get(self, approval_id: str) -> Approval | None:
        return await self.store.get(approval_id)

    async def approve(
        self, approval_id: str, scope: Scope, who: str, reason: str | None = None
    ) -> Approval:
        """Approve an open approval for ``scope``; NotOpen if it is not open (any more), Unavailable
        if the scope cannot be granted (nothing is granted then)."""
        current = await self.store.get(approval_id)
        if current is None or not current.is_open(self.clock()):
            raise NotOpen(current)
        grant: Grant | None = None
        if scope is Scope.PERSIST:
            if self.overlay is None:
                raise Unavailable("this gate has no approved-rules file (--approved-file)")
            try:
                self.overlay.check(current, who, reason)
            except OverlayError as exc:
                raise Unavailable(str(exc)) from None
        elif scope is Scope.SESSION:
            grant = Grant(
                current.subject.granted(), current.id, who, self.clock() + self.session_ttl
            )
        decided = await self.store.decide(approval_id, State.APPROVED, who, reason, scope, grant)
        if scope is Scope.PERSIST and self.overlay is not None:
            try:
                self.overlay.append(decided, who, reason)
            except (OverlayError, OSError) as exc:
                # Approved for the requests held now; later ones ask again (fail closed).
                log.error("approval %s: the persisted rule was not written: %s", decided.id, exc)
        return decided

    async def deny(self, approval_id: str, who: str, reason: str | None = None) -> Approval:
        return await self.store.decide(approval_id, State.DENIED, who, reason, None, None)

    async def _review(self, approval: Approval) -> None:
        """Ask the reviewer; act on its answer only where the rule lets it (``review: auto``)."""
        assert self.reviewer is not None
        try:
            advice, reason, scope = await self.reviewer.review(approval)
        except Exception as exc:  # the reviewer's own failures already escalate; this is a bug
            log.exception("reviewer failed for approval %s", approval.id)
            advice, reason, scope = Advice.ESCALATE, f"reviewer error: {exc}", Scope.ONCE
        try:
            if approval.review == Review.AUTO and advice is Advice.ALLOW:
                await self.approve(approval.id, scope, REVIEWER, reason)
            elif approval.review == Review.AUTO and advice is Advice.DENY:
                await self.deny(approval.id, REVIEWER, reason)
            else:
                await self.store.advise(approval.id, advice, reason)
        except (NotOpen, Unavailable) as exc:
            log.info("reviewer answer for approval %s not applied: %s", approval.id, exc)


def _reads_requests(rule: Rule | None) -> bool:
    """A rule that reads requests asks about one method and path, not the whole host."""
    return rule is not None and rule.reads_requests


def _granted(decision: Decision, approval: str, by: str, scope: Scope, how: str) -> Decision:
    return decision.with_(
        decision=Verdict.ALLOW,
        reason=Reason.APPROVAL_GRANTED,
        approval=approval,
        decided_by=by,
        grant=str(scope),
        detail=f"{decision.detail}; allowed by {how} (approval {approval})",
    )


def _outcome(decision: Decision, approval: Approval | None) -> Decision:
    if approval is None:
        return decision.with_(
            decision=Verdict.DENY,
            reason=Reason.APPROVAL_UNAVAILABLE,
            detail=f"{decision.detail}; the approval disappeared from the store",
        )
    if approval.state is State.APPROVED and approval.scope is not None:
        by = approval.decided_by or "?"
        return _granted(decision, approval.id, by, approval.scope, f"{by} ({approval.scope})")
    if approval.state is State.DENIED:
        why = f": {approval.reason}" if approval.reason else ""
        return decision.with_(
            decision=Verdict.DENY,
            reason=Reason.APPROVAL_DENIED,
            approval=approval.id,
            decided_by=approval.decided_by,
            detail=f"{decision.detail}; approval {approval.id} was denied by "
            f"{approval.decided_by}{why}",
        )
    return decision.with_(
        decision=Verdict.DENY,
        reason=Reason.APPROVAL_TIMEOUT,
        approval=approval.id,
        decided_by=TIMEOUT,
        detail=f"{decision.detail}; nobody answered approval {approval.id} in "
        f"{approval.deadline - approval.created:g} s",
    )
