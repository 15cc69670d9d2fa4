"""Both stores, the same contract: open-or-join within the limits, one answer wins, deadlines hold,
session grants cover exactly their subject. Redis runs as a real ``redis-server`` on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals.model import ENDED, Advice, Approval, Grant, NotOpen, Scope, State, Subject
from proxy.approvals.store import ChangeType, Limits, Store
from proxy.core.decision import Decision, Kind, Reason, Verdict
from tests.redis_server import RedisServer


class Clock:
    """Starts at the real time (Redis expires keys by its own clock) and moves only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def ask(host: str = "api.test", sandbox: str = "sbx-1", port: int = 443) -> Decision:
    return Decision(
        Verdict.ASK, Reason.APPROVAL_PENDING, "ask-api", Kind.CONNECT, host, port, "v1",
        "enforce", sandbox_id=sandbox, detail=f"{host}:{port} needs an approval",
    )  # fmt: skip


def fresh(clock: Clock, host: str = "api.test", sandbox: str = "sbx-1") -> Approval:
    decision = ask(host, sandbox)
    return Approval.open(decision, Subject.of(decision), "human", 60, clock())


async def approve_for_session(store: Store, clock: Clock) -> tuple[Approval, Grant]:
    """Open a fresh approval and answer it for the session (a grant alice gave for 100 s)."""
    opened = await store.open(fresh(clock), Limits())
    assert opened is not None
    approval = opened[0]
    grant = Grant(approval.subject, approval.id, "alice", clock() + 100)
    await store.decide(approval.id, State.APPROVED, "alice", None, Scope.SESSION, grant)
    return approval, grant


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(kind: str, tmp_path: Path) -> Iterator[Callable[[Clock], Store]]:
    redis: RedisServer | None = None
    if kind == "redis":
        (tmp_path / "redis").mkdir()
        redis = RedisServer(tmp_path / "redis").start()

    def make(clock: Clock) -> Store:
        if redis is not None:
            from proxy.approvals.redisstore import RedisStore

            return RedisStore(redis.url, clock=clock)
        from proxy.approvals.sqlitestore import SqliteStore

        return SqliteStore(tmp_path / "approvals.sqlite3", clock=clock)

    yield make
    if redis is not None:
        redis.stop()


def run(
    make_store: Callable[[Clock], Store], body: Callable[[Store, Clock], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        clock = Clock()
        store = make_store(clock)
        await store.start()
        try:
            return await body(store, clock)
        finally:
            await store.close()

    return asyncio.run(main())


def test_identical_asks_join_and_others_open_their_own(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        first = await store.open(fresh(clock), Limits())
        again = await store.open(fresh(clock), Limits())
        other_sandbox = await store.open(fresh(clock, sandbox="sbx-2"), Limits())
        other_host = await store.open(fresh(clock, host="b.test"), Limits())
        assert first is not None and again is not None
        assert first[1] and not again[1] and again[0].id == first[0].id
        assert other_sandbox is not None and other_sandbox[1]
        assert other_host is not None and other_host[1]
        assert sorted(a.id for a in await store.pending()) == sorted(
            [first[0].id, other_sandbox[0].id, other_host[0].id]
        )

    run(make_store, body)


def test_requests_with_another_query_open_their_own_and_the_same_query_joins(
    make_store: Any,
) -> None:
    """A per-request approval is about the exact query and a held body (their digests), and both
    survive the store's round trip: on either store."""

    def opened(
        clock: Clock, query: str, held: bytes = b"{}", fields: Any = ((b"Accept", b"*/*"),)
    ) -> Approval:
        decision = ask().with_(kind=Kind.HTTP, method="POST", path="/upload", query="name=")
        subject = Subject.of(decision, per_request=True, query=query, body=held, fields=fields)
        return Approval.open(decision, subject, "human", 60, clock())

    async def body(store: Store, clock: Clock) -> None:
        first = await store.open(opened(clock, "name=a"), Limits())
        again = await store.open(opened(clock, "name=a"), Limits())
        other = await store.open(opened(clock, "name=b"), Limits())
        other_body = await store.open(opened(clock, "name=a", b'{"x": 1}'), Limits())
        other_fields = await store.open(
            opened(clock, "name=a", fields=((b"Accept", b"*/*"), (b"X-Note", b"1"))), Limits()
        )
        assert first is not None and again is not None and other is not None
        assert first[1] and not again[1] and again[0].id == first[0].id
        assert other[1] and other[0].id != first[0].id
        assert other_body is not None and other_body[1] and other_body[0].id != first[0].id
        assert other_fields is not None and other_fields[1]
        assert other_fields[0].id != first[0].id
        read = await store.get(first[0].id)
        assert read is not None and read.subject == first[0].subject

    run(make_store, body)


def test_the_pending_limits_refuse_a_flood_without_touching_other_sandboxes(
    make_store: Any,
) -> None:
    async def body(store: Store, clock: Clock) -> None:
        limits = Limits(per_sandbox=3, total=5)
        opened = [await store.open(fresh(clock, host=f"h{i}.test"), limits) for i in range(5)]
        assert [o is not None for o in opened] == [True, True, True, False, False]
        assert await store.open(fresh(clock, sandbox="sbx-2"), limits) is not None
        assert await store.open(fresh(clock, sandbox="sbx-3"), limits) is not None
        assert await store.open(fresh(clock, sandbox="sbx-4"), limits) is None  # total reached
        # answered and expired approvals make room again
        first = opened[0]
        assert first is not None
        await store.decide(first[0].id, State.DENIED, "alice", None, None, None)
        assert await store.open(fresh(clock, host="h9.test"), limits) is not None
        clock.now += 61
        assert await store.open(fresh(clock, host="h10.test"), limits) is not None

    run(make_store, body)


def test_the_first_answer_wins_and_later_ones_see_it(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        opened = await store.open(fresh(clock), Limits())
        assert opened is not None
        approval_id = opened[0].id
        results = await asyncio.gather(
            store.decide(approval_id, State.APPROVED, "alice", "ok", Scope.ONCE, None),
            store.decide(approval_id, State.DENIED, "bob", "no", None, None),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, Approval)]
        losers = [r for r in results if isinstance(r, NotOpen)]
        assert len(winners) == 1 and len(losers) == 1
        assert losers[0].approval == winners[0]
        assert await store.get(approval_id) == winners[0]
        assert await store.pending() == []
        assert await store.expire(approval_id) == winners[0]  # an answer that came first stays

    run(make_store, body)


def test_a_deadline_ends_an_approval_and_no_answer_is_taken_after_it(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        opened = await store.open(fresh(clock), Limits())
        assert opened is not None
        approval_id = opened[0].id
        assert (await store.expire(approval_id)).state is State.PENDING  # type: ignore[union-attr]
        clock.now += 60
        with pytest.raises(NotOpen):
            await store.decide(approval_id, State.APPROVED, "alice", None, Scope.ONCE, None)
        expired = await store.expire(approval_id)
        assert expired is not None
        assert (expired.state, expired.decided_by) == (State.EXPIRED, "timeout")
        assert await store.pending() == []
        # a new ask for the same subject opens a new approval
        again = await store.open(fresh(clock), Limits())
        assert again is not None and again[1] and again[0].id != approval_id

    run(make_store, body)


def test_session_grants_cover_their_subject_only_and_expire(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        _, grant = await approve_for_session(store, clock)
        same = Subject.of(ask(), review="human")
        assert await store.grant_for(same) == grant
        assert await store.grant_for(Subject.of(ask(port=8443), review="human")) is None
        assert await store.grant_for(Subject.of(ask(host="b.test"), review="human")) is None
        assert await store.grant_for(Subject.of(ask(sandbox="sbx-2"), review="human")) is None
        # another ask rule, or the same one answered by the reviewer, is another question
        other_rule = ask().with_(rule="ask-api-for-git")
        assert await store.grant_for(Subject.of(other_rule, review="human")) is None
        assert await store.grant_for(Subject.of(ask(), review="auto")) is None
        await store.end_session("sbx-2")
        assert await store.grant_for(same) == grant
        clock.now += 101
        assert await store.grant_for(same) is None

    run(make_store, body)


def test_a_sandbox_that_ends_loses_its_session_grants(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        approval, _ = await approve_for_session(store, clock)
        await store.end_session("sbx-1")
        assert await store.grant_for(approval.subject) is None

    run(make_store, body)


def test_advice_is_published_and_never_overwrites_an_answer(make_store: Any) -> None:
    async def body(store: Store, clock: Clock) -> None:
        async with store.feed.subscribe() as changes:
            opened = await store.open(fresh(clock), Limits())
            assert opened is not None
            approval_id = opened[0].id
            await store.advise(approval_id, Advice.ESCALATE, "unsure")
            advised = await store.get(approval_id)
            assert advised is not None
            assert (advised.state, advised.advice) == (State.PENDING, Advice.ESCALATE)
            await store.decide(approval_id, State.DENIED, "bob", None, None, None)
            await store.advise(approval_id, Advice.ALLOW, "too late")
            final = await store.get(approval_id)
            assert final is not None
            assert (final.state, final.advice, final.decided_by) == (
                State.DENIED, Advice.ESCALATE, "bob",
            )  # fmt: skip
            seen = [(await asyncio.wait_for(changes.get(), 5)).type for _ in range(3)]
            assert seen == [ChangeType.PENDING, ChangeType.ADVICE, ChangeType.DECIDED]

    run(make_store, body)


def test_a_restart_of_the_embedded_store_expires_what_was_pending(tmp_path: Path) -> None:
    from proxy.approvals.sqlitestore import SqliteStore

    async def main() -> None:
        clock = Clock()
        store = SqliteStore(tmp_path / "s.sqlite3", clock=clock)
        await store.start()
        opened = await store.open(fresh(clock), Limits())
        assert opened is not None
        await store.close()
        again = SqliteStore(tmp_path / "s.sqlite3", clock=clock)
        await again.start()
        found = await again.get(opened[0].id)
        assert found is not None and found.state is State.EXPIRED
        assert await again.pending() == []
        await again.close()
        assert (tmp_path / "s.sqlite3").stat().st_mode & 0o077 == 0

    asyncio.run(main())


def test_a_sandbox_that_ends_closes_its_pending_approvals_before_its_grants_end(
    make_store: Any,
) -> None:
    """An answer given after the sandbox left would make a session grant that a new sandbox given
    the same id (a CI job's name) inherits: the approval is closed first, so the answer finds
    nothing open and no grant is made. Other sandboxes' approvals stay open."""

    async def body(store: Store, clock: Clock) -> None:
        _, grant = await approve_for_session(store, clock)
        held = await store.open(fresh(clock, host="b.test"), Limits())
        other = await store.open(fresh(clock, host="b.test", sandbox="sbx-2"), Limits())
        assert held is not None and other is not None
        await store.end_session("sbx-1")
        closed = await store.get(held[0].id)
        assert closed is not None
        assert (closed.state, closed.decided_by) == (State.EXPIRED, ENDED)
        with pytest.raises(NotOpen):
            late = Grant(held[0].subject, held[0].id, "alice", clock() + 100)
            await store.decide(held[0].id, State.APPROVED, "alice", None, Scope.SESSION, late)
        assert await store.grant_for(held[0].subject) is None
        assert await store.grant_for(grant.subject) is None
        assert [a.id for a in await store.pending()] == [other[0].id]

    run(make_store, body)


def _start_when_released(path: str, release: Any, results: Any) -> None:
    """One worker of a gate: opens the embedded store at the same moment as the others."""
    from proxy.approvals.sqlitestore import SqliteStore

    release.wait(30)
    try:
        asyncio.run(SqliteStore(path).start())
        results.put("started")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_workers_opening_the_embedded_store_at_once_all_start(tmp_path: Path) -> None:
    """``--workers N`` opens one file from N processes as they start: SQLite answers the switch to
    write-ahead logging "database is locked" at once while another connection holds the file, so
    a worker that took that answer as final did not start (more than half of such pairs here)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")  # forked from a process with no threads
    for round_ in range(10):  # each round a new file, both processes released together
        path = str(tmp_path / f"approvals-{round_}.sqlite3")
        release, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(target=_start_when_released, args=(path, release, results))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert sorted(results.get(timeout=10) for _ in workers) == ["started", "started"]
