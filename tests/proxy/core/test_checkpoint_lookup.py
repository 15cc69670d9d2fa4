"""Step 3a's lookup: answered on the event loop when the sandbox's processes are already known, else
in a worker thread; either way before the connection's first decision is recorded. It starts as
the connection opens under a policy that binds rules to executables; under any other, an admitted
tunnel is answered first and looked up while its client prepares its first bytes."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from proxy.core.checkpoint import Checkpoint
from proxy.core.decision import Decision, Kind, Reason, Request
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from tests.proxy.core.test_checkpoint import FailingJournal, Lookups
from tests.proxy.core.test_checkpoint_executables import GIT, GIT_ID, POLICY, Facts

ANSWER = Facts(frozenset({GIT}), frozenset({GIT_ID}), complete=False)


class Processes:
    """Answers ``attribute_now`` when ``known``, else says it would walk; records the threads."""

    def __init__(self, known: bool, fails: bool = False) -> None:
        self.known, self.fails = known, fails
        self.calls: list[tuple[str, str]] = []
        self.identities: list[bool] = []  # what each lookup was asked to read of the executable
        self.remembered: dict[str, Facts | None] = {}

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Facts | None:
        self.calls.append(("walk", threading.current_thread().name))
        self.identities.append(identity or every_owner)
        return Facts(ANSWER.exes, ANSWER.exe_ids, every_owner)

    def attribute_now(self, peer: str, *, identity: bool = True) -> Facts | None:
        self.calls.append(("now", threading.current_thread().name))
        self.identities.append(identity)
        if self.fails:
            raise RuntimeError("a lookup that broke")
        if not self.known:
            raise BlockingIOError
        return ANSWER

    def remember(self, peer: str, found: Facts | None, owner: object = None) -> None:
        self.remembered[peer] = found

    def forget(self, peer: str | None, owner: object = None) -> None:
        pass


UNBOUND = "version: 1\nrules:\n  - {name: open, hosts: [pypi.test]}\n"


def _admit(
    tmp_path: Path, processes: Processes, policy_text: str = UNBOUND
) -> tuple[object, object]:
    """A refused CONNECT, under a policy that binds nothing unless ``policy_text`` does."""
    path = tmp_path / "p.yaml"
    path.write_text(policy_text)
    policy = load_policy(path)
    checkpoint = Checkpoint(lambda: policy, Emitter([MemorySink()]), Lookups(), processes=processes)

    async def go() -> tuple[object, object]:
        conn, refusal = checkpoint.connected("c1", "127.0.0.1:5000")
        assert refusal is None
        decision = await checkpoint.admit(conn, Request(Kind.CONNECT, "other.test", 443, "CONNECT"))
        return conn, decision

    return asyncio.run(go())


def test_known_processes_are_looked_up_on_the_loop_before_the_first_decision(
    tmp_path: Path,
) -> None:
    processes = Processes(known=True)
    conn, _ = _admit(tmp_path, processes)
    assert processes.calls == [("now", "MainThread")]
    assert conn.process == ANSWER and conn.attributed  # type: ignore[attr-defined]
    assert processes.remembered == {"127.0.0.1:5000": ANSWER}


def test_under_a_policy_bound_to_executables_every_owner_is_searched_as_it_opens(
    tmp_path: Path,
) -> None:
    """Not the first owner on the loop: a search from the newest process stops at a bound program
    that inherited the socket, and misses the older process that connected it and writes to it."""
    processes = Processes(known=True)
    conn, _ = _admit(tmp_path, processes, POLICY)
    assert [c[0] for c in processes.calls] == ["walk"]
    assert processes.calls[0][1].startswith("egress-attribution")
    assert conn.process is not None and conn.process.complete  # type: ignore[attr-defined]


def test_an_executables_identity_is_read_only_where_a_bound_rule_may_check_it(
    tmp_path: Path,
) -> None:
    """Under a policy that binds nothing, a connection's owner is evidence (named by path): its
    executable's file identity is not read, which a bound rule would refuse anyway, as it refuses
    every connection opened before a policy bound it. Under a policy that binds, it is."""
    for known in (True, False):
        processes = Processes(known=known)
        _admit(tmp_path, processes)
        assert processes.identities and not any(processes.identities)
    processes = Processes(known=True)
    _admit(tmp_path, processes, POLICY)
    assert processes.identities == [True]


def test_a_lookup_that_must_walk_runs_in_a_worker_thread(tmp_path: Path) -> None:
    processes = Processes(known=False)
    conn, _ = _admit(tmp_path, processes)
    assert [c[0] for c in processes.calls] == ["now", "walk"]
    assert processes.calls[1][1].startswith("egress-attribution")
    assert conn.attributed and conn.process is not None  # type: ignore[attr-defined]


def test_a_lookup_that_fails_leaves_the_process_unknown(tmp_path: Path) -> None:
    processes = Processes(known=True, fails=True)
    conn, _ = _admit(tmp_path, processes)
    assert conn.attributed and conn.process is None  # type: ignore[attr-defined]
    assert processes.calls == [("now", "MainThread")]


class Ordered(Processes):
    """Puts each lookup, answer and record in one list, in the order they happen."""

    def __init__(self, order: list[str], known: bool = True) -> None:
        super().__init__(known=known)
        self.order = order

    def attribute_now(self, peer: str, *, identity: bool = True) -> Facts | None:
        self.order.append("lookup")
        return super().attribute_now(peer)

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Facts | None:
        self.order.append("walk")
        return super().attribute(peer, every_owner=every_owner)


class Recorded(MemorySink):
    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order

    def record(self, decision: Decision) -> None:
        self.order.append(f"record {decision.decision.value}")
        super().record(decision)


def _answered(
    tmp_path: Path, policy_text: str, host: str, known: bool = True, **emitter: Any
) -> tuple[list[str], Decision]:
    """A CONNECT to ``host`` admitted with an ``answer``: what happened, in order."""
    path = tmp_path / "p.yaml"
    path.write_text(policy_text)
    policy = load_policy(path)
    order: list[str] = []
    checkpoint = Checkpoint(
        lambda: policy,
        Emitter([Recorded(order)], **emitter),
        Lookups({"pypi.test": "203.0.113.10", "other.test": "203.0.113.11"}),
        processes=Ordered(order, known),
    )

    async def answer() -> None:
        order.append("answer")

    async def go() -> Decision:
        conn, refusal = checkpoint.connected("c1", "127.0.0.1:5000")
        assert refusal is None
        order.append("opened")
        request = Request(Kind.CONNECT, host, 443, "CONNECT")
        return await checkpoint.admit(conn, request, answer=answer)

    return order, asyncio.run(go())


def test_a_tunnel_whose_decision_rests_on_no_process_is_answered_before_its_lookup(
    tmp_path: Path,
) -> None:
    """No rule is bound to executables: the lookup cannot change the decision, so the client has
    its 200 first and the lookup runs while it prepares its ClientHello; the record, which names
    the process, is still written before the call returns (before anything is dialled)."""
    order, decision = _answered(tmp_path, UNBOUND, "pypi.test")
    assert decision.allowed
    assert order == ["opened", "answer", "lookup", "record allow"]


@pytest.mark.parametrize("known", [True, False], ids=["on-the-loop", "walked"])
def test_under_a_policy_bound_to_executables_the_lookup_starts_as_the_connection_opens(
    tmp_path: Path, known: bool
) -> None:
    """The process decides: its lookup starts at once (a search for every owner, in the thread
    that walks the process tree, whether or not the processes are known), and the client is
    answered only by the adapter, after the decision (never early), even for a rule of that
    policy that is itself bound to nothing."""
    order, decision = _answered(tmp_path, POLICY, "other.test", known)
    assert decision.allowed
    assert sorted(order[:-1]) == ["opened", "walk"]  # the walk: before or after "opened"
    assert order[-1] == "record allow"


def test_a_refused_tunnel_is_never_answered_early_and_its_record_names_its_process(
    tmp_path: Path,
) -> None:
    order, decision = _answered(tmp_path, UNBOUND, "elsewhere.test")
    assert not decision.allowed
    assert order == ["opened", "lookup", "record deny"]


def test_an_answered_tunnel_whose_record_cannot_be_written_comes_back_refused(
    tmp_path: Path,
) -> None:
    """Answered early, then the write-ahead journal failed under audit-required: the decision
    returned is the refusal the adapter enforces by closing the tunnel (nothing was dialled)."""
    order, decision = _answered(
        tmp_path, UNBOUND, "pypi.test", write_ahead=[FailingJournal()], audit_required=True
    )
    assert order == ["opened", "answer", "lookup", "record deny"]
    assert not decision.allowed and decision.reason is Reason.AUDIT_UNAVAILABLE


class Walking(Processes):
    """A lookup that must walk (a worker thread), during which ``during`` runs (a reload, say)
    and which then waits, bounded, for ``release`` when one is given."""

    def __init__(self, during: Any = None, release: threading.Event | None = None) -> None:
        super().__init__(known=False)
        self.during, self.release = during, release
        self.walking = threading.Event()

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Facts | None:
        self.walking.set()
        if self.during is not None:
            self.during()
        if self.release is not None:
            self.release.wait(10)
        return super().attribute(peer, every_owner=every_owner)


def _reloading(tmp_path: Path, new_text: str) -> tuple[list[str], Decision, MemorySink]:
    """An admitted tunnel answered early, whose lookup walks while the policy is replaced."""
    old = load_policy(_written(tmp_path, "old.yaml", UNBOUND))
    new = load_policy(_written(tmp_path, "new.yaml", new_text))
    holder = {"policy": old}
    order: list[str] = []
    memory = Recorded(order)
    checkpoint = Checkpoint(
        lambda: holder["policy"],
        Emitter([memory]),
        Lookups({"pypi.test": "203.0.113.10"}),
        processes=Walking(during=lambda: holder.update(policy=new)),
    )

    async def answer() -> None:
        order.append("answer")

    async def go() -> Decision:
        conn, _ = checkpoint.connected("c1", "127.0.0.1:5000")
        request = Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")
        return await checkpoint.admit(conn, request, answer=answer)

    return order, asyncio.run(go()), memory


def _written(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_reload_while_an_answered_tunnel_is_looked_up_refuses_what_the_new_policy_refuses(
    tmp_path: Path,
) -> None:
    """A reload's recheck sees only admitted tunnels: one still being admitted (here, its lookup
    walking after its 200) is decided again under the policy now in force before it is recorded,
    and the adapter closes it."""
    order, decision, memory = _reloading(
        tmp_path, "version: 1\nrules:\n  - {name: other, hosts: [other.test]}\n"
    )
    assert not decision.allowed and decision.reason is Reason.NO_MATCHING_RULE
    assert "reloaded while this request was admitted" in (decision.detail or "")
    assert order == ["answer", "record deny"]  # recorded once, as the refusal it now is
    assert [d.decision.value for d in memory.decisions] == ["deny"]


def test_a_reload_that_binds_the_rule_refuses_a_connection_not_looked_up_as_it_opened(
    tmp_path: Path,
) -> None:
    bound = f"version: 1\nrules:\n  - {{name: open, hosts: [pypi.test], executables: [{GIT}]}}\n"
    _, decision, _ = _reloading(tmp_path, bound)
    assert not decision.allowed and decision.reason is Reason.PROCESS_UNATTRIBUTED
    assert "opened before the policy bound the rule" in (decision.detail or "")


def test_control_a_reload_that_still_allows_the_tunnel_lets_it_stand(tmp_path: Path) -> None:
    order, decision, _ = _reloading(tmp_path, UNBOUND)
    assert decision.allowed
    assert order == ["answer", "record allow"]


def test_an_answered_tunnel_whose_admission_is_cancelled_is_still_recorded(
    tmp_path: Path,
) -> None:
    """The client had its 200, then the connection's task was cancelled (its sandbox ended, a
    drain's deadline) while the lookup walked: what was decided is recorded all the same."""
    release = threading.Event()
    processes = Walking(release=release)
    memory = MemorySink()
    policy = load_policy(_written(tmp_path, "p.yaml", UNBOUND))
    checkpoint = Checkpoint(
        lambda: policy,
        Emitter([memory]),
        Lookups({"pypi.test": "203.0.113.10"}),
        processes=processes,
    )
    answered: list[str] = []

    async def answer() -> None:
        answered.append("200")

    async def go() -> None:
        conn, _ = checkpoint.connected("c1", "127.0.0.1:5000")
        request = Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")
        task = asyncio.ensure_future(checkpoint.admit(conn, request, answer=answer))
        assert await asyncio.to_thread(processes.walking.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(go())
    finally:
        release.set()
    assert answered == ["200"]
    assert [(d.kind, d.decision.value) for d in memory.decisions] == [("connect", "allow")]


def _handed(tmp_path: Path, at_accept: str, at_handoff: str) -> tuple[Any, Processes, Decision]:
    """A connection the tunnel front end accepted under ``at_accept`` and handed to mitmproxy's
    layers (a plain request, an inspected host) under ``at_handoff``; then its CONNECT."""
    first = load_policy(_written(tmp_path, "first.yaml", at_accept))
    then = load_policy(_written(tmp_path, "then.yaml", at_handoff))
    holder = {"policy": first}
    processes = Processes(known=True)
    checkpoint = Checkpoint(
        lambda: holder["policy"],
        Emitter([MemorySink()]),
        Lookups({"pypi.test": "203.0.113.10"}),
        processes=processes,
    )

    async def go() -> tuple[Any, Decision]:
        front, _ = checkpoint.connected("t1", "127.0.0.1:5000")
        holder["policy"] = then
        checkpoint.disconnected("t1")  # what the front end does as it hands the socket over
        conn, _ = checkpoint.connected("m1", "127.0.0.1:5000", rated=False, handed=front)
        request = Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")
        return conn, await checkpoint.admit(conn, request)

    conn, decision = asyncio.run(go())
    return conn, processes, decision


def test_a_connection_handed_to_mitmproxy_keeps_the_lookup_made_as_it_opened(
    tmp_path: Path,
) -> None:
    conn, processes, decision = _handed(tmp_path, POLICY, POLICY)
    assert conn.watched and decision.allowed  # git, as the rule binds: every owner searched
    # every owner at accept, kept across the hand-over; and again as the bound rule decides
    assert [c[0] for c in processes.calls] == ["walk", "walk"]
    assert processes.remembered["127.0.0.1:5000"] is not None  # kept for its records


def test_a_connection_accepted_unbound_and_handed_over_after_a_binding_reload_is_refused(
    tmp_path: Path,
) -> None:
    """Accepted while no rule was bound (nobody looked it up then), handed over once a reload bound
    one: not looked up as it opened, so the bound rule refuses it."""
    conn, _, decision = _handed(tmp_path, UNBOUND, POLICY)
    assert not conn.watched
    assert not decision.allowed and decision.reason is Reason.PROCESS_UNATTRIBUTED
    assert "opened before the policy bound the rule" in (decision.detail or "")
