"""The embedded store: one SQLite file for one gate (or ``:memory:`` for a gate that lives as long as
one sandbox).

Every transition is one short transaction run on the event loop: approvals are rare and human-paced,
and running them in line means no two can interleave. Session grants survive a restart; pending
approvals do not (the connections they held are gone), so start-up expires them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from proxy.approvals.model import (
    ENDED,
    ENDED_REASON,
    Advice,
    Approval,
    Grant,
    NotOpen,
    Scope,
    State,
    Subject,
    clip,
)
from proxy.approvals.store import Change, ChangeType, Feed, Limits

KEEP_DECIDED = 24 * 3600  # seconds decided approvals stay readable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    subject_key TEXT NOT NULL,
    sandbox TEXT NOT NULL,
    state TEXT NOT NULL,
    deadline REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_open ON approvals (state, subject_key);
CREATE TABLE IF NOT EXISTS grants (
    subject_key TEXT PRIMARY KEY,
    sandbox TEXT NOT NULL,
    expires REAL NOT NULL,
    data TEXT NOT NULL
);
"""


class SqliteStore:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self.feed = Feed()
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the approval store is not started")
        return self._db

    async def start(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        if self.path != ":memory:":
            Path(self.path).chmod(0o600)
            await _write_ahead(db)
        db.executescript(_SCHEMA)
        now = self.clock()
        with _transaction(db):
            for (data,) in db.execute(
                "SELECT data FROM approvals WHERE state = ?", (State.PENDING,)
            ).fetchall():
                closed = Approval.from_json(json.loads(data)).decide(
                    State.EXPIRED, "restart", "the gate restarted", None, now
                )
                self._put(db, closed)
            db.execute(
                "DELETE FROM approvals WHERE state != ? AND deadline < ?",
                (State.PENDING, now - KEEP_DECIDED),
            )
            db.execute("DELETE FROM grants WHERE expires < ?", (now,))
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @staticmethod
    def _put(db: sqlite3.Connection, approval: Approval) -> None:
        db.execute(
            "INSERT OR REPLACE INTO approvals (id, subject_key, sandbox, state, deadline, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                approval.id,
                approval.subject.key,
                approval.subject.sandbox,
                str(approval.state),
                approval.deadline,
                json.dumps(approval.to_json()),
            ),
        )

    def _open_rows(self, where: str = "", *args: object) -> list[Approval]:
        rows = self.db.execute(
            f"SELECT data FROM approvals WHERE state = ? AND deadline > ? {where} "
            "ORDER BY deadline",
            (State.PENDING, self.clock(), *args),
        ).fetchall()
        return [Approval.from_json(json.loads(data)) for (data,) in rows]

    async def open(self, approval: Approval, limits: Limits) -> tuple[Approval, bool] | None:
        db = self.db
        with _transaction(db):
            joined = self._open_rows("AND subject_key = ?", approval.subject.key)
            if joined:
                return joined[0], False
            now = self.clock()
            mine, total = db.execute(
                "SELECT SUM(sandbox = ?), COUNT(*) FROM approvals WHERE state = ? AND deadline > ?",
                (approval.subject.sandbox, State.PENDING, now),
            ).fetchone()
            if (mine or 0) >= limits.per_sandbox or total >= limits.total:
                return None
            self._put(db, approval)
        self.feed.publish(Change(ChangeType.PENDING, approval))
        return approval, True

    async def get(self, approval_id: str) -> Approval | None:
        return self._get(approval_id)

    def _get(self, approval_id: str) -> Approval | None:
        row = self.db.execute("SELECT data FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return Approval.from_json(json.loads(row[0])) if row else None

    async def pending(self) -> list[Approval]:
        return sorted(self._open_rows(), key=lambda a: a.created)

    async def decide(
        self,
        approval_id: str,
        state: State,
        decided_by: str,
        reason: str | None,
        scope: Scope | None,
        grant: Grant | None,
    ) -> Approval:
        db = self.db
        with _transaction(db):
            current = self._get(approval_id)
            now = self.clock()
            if current is None or not current.is_open(now):
                raise NotOpen(current)
            decided = current.decide(state, decided_by, reason, scope, now)
            self._put(db, decided)
            if grant is not None:
                db.execute(
                    "INSERT OR REPLACE INTO grants (subject_key, sandbox, expires, data) "
                    "VALUES (?, ?, ?, ?)",
                    (
                        grant.subject.key,
                        grant.subject.sandbox,
                        grant.expires,
                        json.dumps(grant.to_json()),
                    ),
                )
        self.feed.publish(Change(ChangeType.DECIDED, decided))
        return decided

    async def expire(self, approval_id: str) -> Approval | None:
        db = self.db
        with _transaction(db):
            current = self._get(approval_id)
            if current is None or current.state is not State.PENDING:
                return current
            now = self.clock()
            if now < current.deadline:
                return current
            expired = current.decide(State.EXPIRED, "timeout", None, None, now)
            self._put(db, expired)
        self.feed.publish(Change(ChangeType.DECIDED, expired))
        return expired

    async def advise(self, approval_id: str, advice: Advice, reason: str | None) -> None:
        db = self.db
        with _transaction(db):
            current = self._get(approval_id)
            if current is None or current.state is not State.PENDING:
                return
            advised = replace(current, advice=advice, advice_reason=clip(reason))
            self._put(db, advised)
        self.feed.publish(Change(ChangeType.ADVICE, advised))

    async def grant_for(self, subject: Subject) -> Grant | None:
        row = self.db.execute(
            "SELECT data FROM grants WHERE subject_key = ? AND expires > ?",
            (subject.key, self.clock()),
        ).fetchone()
        if row is None:
            return None
        grant = Grant.from_json(json.loads(row[0]))
        return grant if grant.subject.covers(subject) else None

    async def end_session(self, sandbox: str) -> None:
        db = self.db
        with _transaction(db):
            now = self.clock()
            closed = [
                approval.decide(State.EXPIRED, ENDED, ENDED_REASON, None, now)
                for approval in self._open_rows("AND sandbox = ?", sandbox)
            ]
            for approval in closed:
                self._put(db, approval)
            db.execute("DELETE FROM grants WHERE sandbox = ?", (sandbox,))
        for approval in closed:
            self.feed.publish(Change(ChangeType.DECIDED, approval))


WAL_ATTEMPTS = 100  # x 50 ms: the busy timeout the other statements wait for (5 s)


async def _write_ahead(db: sqlite3.Connection) -> None:
    """Switch the file to write-ahead logging. Workers of one gate open it at the same moment, and
    SQLite answers this pragma "database is locked" at once while another connection holds the
    file, without waiting out the busy timeout as other statements do: it is asked again, for as
    long as they would wait (a worker that gave up would not start)."""
    for attempt in range(WAL_ATTEMPTS):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
