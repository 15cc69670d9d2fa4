"""The event loop a gate runs on: uvloop when it is installed, asyncio's own otherwise.

uvloop (libuv) makes transport writes, connects and accepts cheaper; measured through ``make bench``
it is kept only for what it pays. ``EGRESS_EVENT_LOOP=asyncio`` forces the standard loop (to compare,
or to rule the loop out when debugging); an unknown value is an error, not a silent default.

The gate's own socket code (the tunnel front end, its relay) waits through an epoll instance of
its own (``proxy.runtime.poller``), registered with either loop once: uvloop's per-descriptor poll
handles cost several system calls each, and uvloop reports an error on a descriptor (a reset) once
and then drops it, where a level-triggered registration keeps reporting it. Both loops run the same
tests (``tests/proxy/runtime/test_splice.py``, ``test_sockio.py``, ``test_poller.py``).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any

ENV_VAR = "EGRESS_EVENT_LOOP"


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None means asyncio's default loop."""
    choice = (choice if choice is not None else os.environ.get(ENV_VAR, "")) or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"${ENV_VAR}={choice!r}: expected auto, uvloop or asyncio")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None

    class Loop(uvloop.Loop):  # type: ignore[misc]
        """uvloop passes ``eager_start`` to a task factory, which asyncio's ``eager_task_factory``
        (set by mitmproxy's master) does not take before Python 3.14: drop it, the factory is eager
        anyway."""

        def set_task_factory(self, factory: Any) -> None:
            if factory is not None:
                inner = factory

                def factory(loop: Any, coro: Any, *, eager_start: Any = None, **kw: Any) -> Any:
                    return inner(loop, coro, **kw)

            super().set_task_factory(factory)

    return Loop


def run[T](main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(main, loop_factory=loop_factory())


def gate_started() -> None:
    """Call once a gate serves: what its start allocated (modules, classes, the policy, the gate)
    lives as long as the process, so it is moved out of the cyclic collector's generations.

    Every full collection walked those objects again while the loop waited: ~105,000 for
    ``egress serve`` with a small policy (one 48 ms pause every ~2,700 tunnels in the bench's
    workload), 85,000 more for a 10,000-rule policy (26 ms) and 730,000 for 100,000 rules (250 ms).
    Memory is still freed by reference counting (a policy's objects hold no cycles); only cyclic
    garbage made before this call is never collected, and a start makes little. A policy loaded
    later (a reload) is walked as before: freezing again would also keep for ever the cycles of the
    connections open at that moment.
    """
    gc.freeze()


def gate_settled() -> None:
    """Call once more when what a gate began to import in the background before it said it was
    ready (dnspython: ~8,000 objects in the per-user gate) has ended, at a moment with no connection
    open: those modules leave the generations too. The collection first frees the cycles of the
    connections that came and went meanwhile, which the freeze would otherwise keep for ever. What
    the runs served meanwhile left in caches (resolved names, mitmproxy's layers once started) is
    frozen with them: still freed by reference counting when a cache lets go of it; only a cycle
    among those objects would now outlive it."""
    gc.collect()
    gc.freeze()
