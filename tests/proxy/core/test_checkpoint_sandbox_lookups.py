"""Step 3a on a gate serving several sandboxes (the per-user gate): each sandbox's processes are
looked up apart, and one sandbox's slow lookups hold up no other sandbox's connections (threat 13).

A sandbox decides how long the lookup of its own connections takes (thousands of processes, each
with a huge fd table to read); if every sandbox's lookups shared one thread, its connections would
queue every other sandbox's connections behind them, before their first decision.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

from proxy.core.checkpoint import Checkpoint
from proxy.core.decision import Kind, Request, Verdict
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from tests.proxy.core.test_checkpoint import Lookups

WAIT = 30.0  # only ever reached when the lookups wait on each other (the failure)


@dataclass(eq=False)
class Blocking:
    """A sandbox whose lookups take as long as it likes: until ``release`` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def attribute(self, peer: str, *, every_owner: bool = False, identity: bool = True) -> None:
        self.entered.set()
        self.release.wait(WAIT)
        return None

    def attribute_now(self, peer: str, *, identity: bool = True) -> None:
        raise BlockingIOError  # a walk: left to a worker thread

    def remember(self, peer: str, found: object, owner: object = None) -> None:
        pass

    def forget(self, peer: str | None, owner: object = None) -> None:
        pass


@dataclass(eq=False)
class Quick(Blocking):
    asked: list[str] = field(default_factory=list)

    def attribute(self, peer: str, *, every_owner: bool = False, identity: bool = True) -> None:
        self.asked.append(peer)
        return None


def _checkpoint(tmp_path: Path, **sandboxes: Blocking) -> Checkpoint:
    """A checkpoint allowing pypi.test, serving these sandboxes' processes."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - {name: open, hosts: [pypi.test]}\n")
    policy = load_policy(path)
    checkpoint = Checkpoint(lambda: policy, Emitter([MemorySink()]), Lookups())
    checkpoint.sandbox_processes.update(sandboxes)
    return checkpoint


def test_one_sandboxs_slow_lookups_do_not_hold_up_anothers(tmp_path: Path) -> None:
    slow, quick = Blocking(), Quick()
    checkpoint = _checkpoint(tmp_path, slow=slow, quick=quick)

    async def scenario() -> Verdict:
        held, _ = checkpoint.connected("c-slow", "127.0.0.1:5000", "slow")
        waiting = asyncio.ensure_future(
            checkpoint.admit(held, Request(Kind.CONNECT, "pypi.test", 443, "CONNECT"))
        )
        assert await asyncio.to_thread(slow.entered.wait, WAIT)  # its lookup holds a thread
        conn, _ = checkpoint.connected("c-quick", "127.0.0.1:5000", "quick")
        try:
            decision = await asyncio.wait_for(
                checkpoint.admit(conn, Request(Kind.CONNECT, "pypi.test", 443, "CONNECT")),
                WAIT / 2,
            )
            assert not waiting.done()  # the slow sandbox's request still waits for its lookup
        finally:
            slow.release.set()
        await waiting
        return decision.decision

    try:
        verdict = asyncio.run(scenario())
    finally:
        slow.release.set()
    assert verdict is Verdict.ALLOW
    assert quick.asked == ["127.0.0.1:5000"]  # its own sandbox's processes were asked


def test_a_connection_is_looked_up_only_among_its_own_sandboxs_processes(tmp_path: Path) -> None:
    """Peers repeat across sandboxes (each has its own loopback): the same client address in two
    sandboxes is asked of each sandbox's own processes."""
    a, b = Quick(), Quick()
    checkpoint = _checkpoint(tmp_path, a=a, b=b)

    async def scenario() -> None:
        for cid, sandbox in (("c1", "a"), ("c2", "b"), ("c3", "b")):
            conn, _ = checkpoint.connected(cid, "127.0.0.1:5000", sandbox)
            await checkpoint.admit(conn, Request(Kind.CONNECT, "pypi.test", 443, "CONNECT"))

    asyncio.run(scenario())
    assert (a.asked, b.asked) == (["127.0.0.1:5000"], ["127.0.0.1:5000"] * 2)
