"""Blocking work off the event loop that may never return (a policy on a hung mount).

``asyncio.to_thread`` runs on the loop's default executor, whose threads the interpreter joins at
exit: one call stuck in the kernel would keep a gate from stopping on SIGTERM. A daemon thread per
call does not hold the exit, and the caller bounds its wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


async def in_daemon_thread[T](work: Callable[..., T], *args: Any, timeout: float) -> T:
    """``work(*args)`` in a new daemon thread; TimeoutError after ``timeout`` seconds (the thread
    is then left to finish, or not, on its own: its result is dropped)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result = work(*args)
        except BaseException as exc:  # handed to the caller, whatever it is
            deliver(None, exc)
        else:
            deliver(result, None)

    def deliver(result: Any, error: BaseException | None) -> None:
        # RuntimeError: the loop closed meanwhile (a gate stopped), nobody waits for the result
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="egress-blocking", daemon=True).start()
    async with asyncio.timeout(timeout):
        return await done
