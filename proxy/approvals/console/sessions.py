"""Console sessions: a person's admin token is exchanged once for a random session id in a cookie.

The browser never keeps the token. Sessions live in this process only, keyed by a digest of the id (a
memory dump shows no usable cookie), with an idle and an absolute lifetime and a bound on how many
exist, so logging in in a loop cannot grow memory. A restart logs everyone out: failing closed.
Each session carries its own CSRF token, which every state-changing request must repeat.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IDLE = 30 * 60.0  # seconds without a request (an open console page counts) before a session ends
LIFETIME = 12 * 3600.0  # seconds after login at which a session ends whatever happens
MAX_SESSIONS = 1024  # beyond this the least recently used session ends


@dataclass
class Session:
    who: str  # the admin token's name: every answer given in this session names it
    csrf: str
    created: float
    seen: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def csrf_matches(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self.csrf.encode("utf-8"))


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class Sessions:
    def __init__(
        self,
        *,
        idle: float = IDLE,
        lifetime: float = LIFETIME,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.limit = limit
        self._clock = clock
        self._by_key: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def create(self, who: str) -> tuple[str, Session]:
        """A new session for ``who``; returns the id for the cookie (never stored) and the session."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(who=who, csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._by_key[_key(session_id)] = session
        # Least recently used first: drop the idle ones, then any over the bound.
        while self._by_key:
            key, oldest = next(iter(self._by_key.items()))
            if now - oldest.seen <= self.idle:
                break
            self._end(key)
        while len(self._by_key) > self.limit:
            _, oldest = self._by_key.popitem(last=False)
            oldest.ended.set()
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session a cookie names, marked as used now; None (and forgotten) if expired."""
        if not session_id:
            return None
        key = _key(session_id)
        session = self._by_key.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            self._end(key)
            return None
        session.seen = now
        self._by_key.move_to_end(key)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._end(_key(session_id))

    def _end(self, key: str) -> None:
        session = self._by_key.pop(key, None)
        if session is not None:
            session.ended.set()
