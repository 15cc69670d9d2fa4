"""Blocking work in a daemon thread, its wait bounded."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.runtime.threads import in_daemon_thread


def test_the_result_or_the_error_comes_back() -> None:
    async def main() -> None:
        assert await in_daemon_thread(lambda a, b: a + b, 2, 3, timeout=10) == 5
        with pytest.raises(ValueError, match="bad"):
            await in_daemon_thread(_raise, timeout=10)

    asyncio.run(main())


def test_work_that_never_returns_is_waited_for_only_until_the_timeout() -> None:
    release = threading.Event()
    seen: list[threading.Thread] = []

    def stuck() -> None:
        seen.append(threading.current_thread())
        release.wait(30)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await in_daemon_thread(stuck, timeout=0.2)

    try:
        asyncio.run(main())  # returns: no executor to join at the loop's close
        assert seen and seen[0].daemon  # nor at the interpreter's exit
    finally:
        release.set()


def _raise() -> None:
    raise ValueError("bad")
