"""Console sessions: ids are never stored, sessions end when idle, when too old, on logout and when
too many exist, and each has its own CSRF token."""

from __future__ import annotations

import asyncio

from proxy.approvals.console.sessions import Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_found_by_its_id_only_and_names_its_person() -> None:
    sessions = Sessions()
    session_id, session = sessions.create("alice")
    assert sessions.get(session_id) is session and session.who == "alice"
    assert sessions.get(session_id + "x") is None
    assert sessions.get("") is None and sessions.get(None) is None
    assert session_id not in repr(sessions._by_key)  # only digests are kept


def test_idle_and_old_sessions_end() -> None:
    clock = Clock()
    sessions = Sessions(idle=60, lifetime=300, clock=clock)
    session_id, session = sessions.create("alice")
    clock.now += 59
    assert sessions.get(session_id) is session  # used: the idle time starts again
    clock.now += 59
    assert sessions.get(session_id) is session
    clock.now += 61
    assert sessions.get(session_id) is None and session.ended.is_set()

    kept_id, kept = sessions.create("bob")
    for _ in range(7):
        clock.now += 50
        found = sessions.get(kept_id)
    assert found is None and kept.ended.is_set()  # used all along, but past its lifetime


def test_logout_ends_a_session_and_its_streams() -> None:
    sessions = Sessions()
    session_id, session = sessions.create("alice")
    sessions.end(session_id)
    assert sessions.get(session_id) is None
    assert session.ended.is_set()
    sessions.end(session_id)  # twice is harmless
    sessions.end(None)


def test_sessions_are_bounded_least_recently_used_first() -> None:
    clock = Clock()
    sessions = Sessions(limit=3, clock=clock)
    ids = [sessions.create(f"p{i}")[0] for i in range(3)]
    clock.now += 1
    assert sessions.get(ids[0]) is not None  # p0 used: p1 is now the oldest
    sessions.create("p3")
    assert len(sessions) == 3
    assert sessions.get(ids[1]) is None
    assert sessions.get(ids[0]) is not None and sessions.get(ids[2]) is not None


def test_idle_sessions_are_dropped_when_another_logs_in() -> None:
    clock = Clock()
    sessions = Sessions(idle=60, clock=clock)
    for i in range(5):
        sessions.create(f"p{i}")
    clock.now += 61
    sessions.create("late")
    assert len(sessions) == 1


def test_each_session_has_its_own_csrf_token() -> None:
    sessions = Sessions()
    _, first = sessions.create("alice")
    _, second = sessions.create("alice")
    assert first.csrf != second.csrf and len(first.csrf) >= 40
    assert first.csrf_matches(first.csrf)
    assert not first.csrf_matches(second.csrf)
    assert not first.csrf_matches("") and not first.csrf_matches(None)
    assert not first.csrf_matches(first.csrf[:-1])


def test_the_ended_event_wakes_a_waiting_stream() -> None:
    sessions = Sessions()
    session_id, session = sessions.create("alice")

    async def wait() -> bool:
        waiter = asyncio.ensure_future(session.ended.wait())
        await asyncio.sleep(0)
        sessions.end(session_id)
        await asyncio.wait_for(waiter, 5)
        return True

    assert asyncio.run(wait())
