"""Where approvals and session grants live, as every replica of a gate sees them.

A store makes each transition atomic (open-or-join, answer, expire), so two replicas, two people or a
person and the timeout can never both win: the first answer stands and every later one gets
:class:`proxy.approvals.model.NotOpen`. Every change is published on the store's :class:`Feed`, on every
replica (Redis pub/sub; in-process for SQLite): held requests wake on it, the event stream shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

from proxy.approvals.model import Advice, Approval, Grant, Scope, State, Subject
from proxy.core.authority import join_authority


def shown_state(spec: str) -> str:
    """A ``--state`` value (a store's URL) for messages, with no credential in it: read as
    redis-py reads it (``urlsplit``), only the scheme, host, port and path are shown, and a query
    or fragment, which redis-py takes connection arguments from (``?password=...``), as ``?***``.
    A value that is not a URL is shown only when nothing in it could hold a credential."""
    if "://" not in spec:
        return spec if not any(mark in spec for mark in "@?#") else "***"
    parts = urlsplit(spec)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # not a port: whatever it is, not shown
        port = None
    where = join_authority(host, port) if port else (f"[{host}]" if ":" in host else host)
    return f"{parts.scheme}://{where}{parts.path}" + (
        "?***" if parts.query or parts.fragment else ""
    )


log = logging.getLogger(__name__)

FEED_QUEUE = 1000  # changes buffered per subscriber; a slower one loses the oldest


class ChangeType(StrEnum):
    PENDING = "pending"  # a new approval was opened
    DECIDED = "decided"  # approved, denied or expired
    ADVICE = "advice"  # the reviewer escalated, or gave advice on a rule only people may answer


@dataclass(frozen=True, slots=True)
class Change:
    type: ChangeType
    approval: Approval


class Feed:
    """Fans changes out to local subscribers (held requests, event streams) without ever blocking the
    publisher: a subscriber that falls behind loses its oldest changes, and re-reads the store."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Change]] = set()

    def publish(self, change: Change) -> None:
        for queue in list(self._queues):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(change)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Change]]:
        queue: asyncio.Queue[Change] = asyncio.Queue(FEED_QUEUE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on pending approvals (threat 17): a sandbox flooding the list is refused without
    crowding out the others, and the list as a whole stays small enough to read."""

    per_sandbox: int = 8
    total: int = 256


class Store(Protocol):
    feed: Feed

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def open(self, approval: Approval, limits: Limits) -> tuple[Approval, bool] | None:
        """The open approval for ``approval.subject`` (joined, False) or ``approval`` itself, stored
        (True); None when opening it would exceed ``limits``."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def pending(self) -> list[Approval]:
        """Open approvals, oldest first."""
        ...

    async def decide(
        self,
        approval_id: str,
        state: State,
        decided_by: str,
        reason: str | None,
        scope: Scope | None,
        grant: Grant | None,
    ) -> Approval:
        """Answer an open approval (and store ``grant`` with it, atomically); NotOpen otherwise."""
        ...

    async def expire(self, approval_id: str) -> Approval | None:
        """Close an approval whose deadline passed; returns it as it now stands (an answer that came
        first stays), or None if it does not exist."""
        ...

    async def advise(self, approval_id: str, advice: Advice, reason: str | None) -> None: ...

    async def grant_for(self, subject: Subject) -> Grant | None:
        """A session grant covering ``subject`` that has not expired."""
        ...

    async def end_session(self, sandbox: str) -> None:
        """The sandbox ended: its pending approvals close (expired, decided by
        :data:`~proxy.approvals.model.ENDED`), then its session grants end. In that order: an
        answer given later finds nothing open, so no grant is made for a sandbox that is gone,
        which a new sandbox given the same id would otherwise inherit."""
        ...
