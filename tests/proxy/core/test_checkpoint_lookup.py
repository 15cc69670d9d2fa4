"""Step 3a's lookup as a connection opens: answered on the event loop when the sandbox's processes
are already known, else in a worker thread; either way before the connection's first decision."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from proxy.core.checkpoint import Checkpoint
from proxy.core.decision import Kind, Request
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from tests.proxy.core.test_checkpoint import Lookups
from tests.proxy.core.test_checkpoint_executables import GIT, GIT_ID, POLICY, Facts

ANSWER = Facts(frozenset({GIT}), frozenset({GIT_ID}), complete=False)


class Processes:
    """Answers ``attribute_now`` when ``known``, else says it would walk; records the threads."""

    def __init__(self, known: bool, fails: bool = False) -> None:
        self.known, self.fails = known, fails
        self.calls: list[tuple[str, str]] = []
        self.remembered: dict[str, Facts | None] = {}

    def attribute(self, peer: str, *, every_owner: bool = False) -> Facts | None:
        self.calls.append(("walk", threading.current_thread().name))
        return Facts(ANSWER.exes, ANSWER.exe_ids, every_owner)

    def attribute_now(self, peer: str) -> Facts | None:
        self.calls.append(("now", threading.current_thread().name))
        if self.fails:
            raise RuntimeError("a lookup that broke")
        if not self.known:
            raise BlockingIOError
        return ANSWER

    def remember(self, peer: str, found: Facts | None) -> None:
        self.remembered[peer] = found

    def forget(self, peer: str | None) -> None:
        pass


def _admit(tmp_path: Path, processes: Processes) -> tuple[object, object]:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
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
