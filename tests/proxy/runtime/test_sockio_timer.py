"""A watched socket's waits with a deadline share one timer (:class:`proxy.runtime.sockio.Watch`):
real loopback sockets on both event loops."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.runtime import sockio
from tests.proxy.runtime.loops import LOOPS, nonblocking_pair, run_on


def _counting_timers(loop: asyncio.AbstractEventLoop) -> list[float]:
    """Records the loop's timers (their deadlines), as _counting records registrations."""
    whens: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        whens.append(when)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counted  # type: ignore[method-assign]
    return whens


@pytest.mark.parametrize("choice", LOOPS)
def test_a_watch_sets_one_timer_for_successive_waits_with_a_deadline(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        timers = _counting_timers(loop)
        for n in range(3):
            loop.call_later(0.01, b.send, b"%d" % n)
            got = await asyncio.wait_for(sockio.recv(a, 10, timeout=600, watch=watch), 10)
            assert got == b"%d" % n
        watch.close()
        return [when for when in timers if when > loop.time() + 300]

    try:
        assert len(run_on(choice, main())) == 1  # the first wait's; later deadlines keep it
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_wait_times_out_at_its_own_deadline_whatever_the_timer_was_set_for(choice: str) -> None:
    """The timer set for an earlier, later deadline is brought forward for a sooner one; one set
    for an earlier, sooner deadline never ends a later wait early (it is set again), nor a wait
    without a deadline."""
    a, b = nonblocking_pair()

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        got = []
        loop.call_later(0.01, b.send, b"1")
        got.append(await sockio.recv(a, 10, timeout=600, watch=watch))
        with pytest.raises(TimeoutError):  # sooner than the timer: brought forward
            await asyncio.wait_for(sockio.recv(a, 10, timeout=0.05, watch=watch), 10)
        loop.call_later(0.01, b.send, b"2")
        got.append(await sockio.recv(a, 10, timeout=0.02, watch=watch))
        # The timer is still set for the wait above (it was answered first): a later wait
        # outlives it.
        loop.call_later(0.3, b.send, b"3")
        got.append(await asyncio.wait_for(sockio.recv(a, 10, timeout=600, watch=watch), 10))
        loop.call_later(0.01, b.send, b"4")
        got.append(await sockio.recv(a, 10, timeout=0.02, watch=watch))
        loop.call_later(0.3, b.send, b"5")
        got.append(await asyncio.wait_for(sockio.recv(a, 10, watch=watch), 10))  # no deadline
        watch.close()
        return got

    try:
        assert run_on(choice, main()) == [b"1", b"2", b"3", b"4", b"5"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_closing_a_watch_stops_its_timer(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        loop.call_later(0.01, b.send, b"x")
        await sockio.recv(a, 10, timeout=600, watch=watch)
        timer = watch._timer  # the one timer, which must not outlive the watch
        assert timer is not None and not timer.cancelled()
        watch.close()
        return timer.cancelled()

    try:
        assert run_on(choice, main())
    finally:
        a.close()
        b.close()
