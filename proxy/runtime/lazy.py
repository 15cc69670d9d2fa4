"""A module imported off the event loop the first time something needs it.

Why: dnspython takes 40 to 80 ms to import, a large share of a private gate's start, which need not wait
for it: a run's first name to resolve comes later, if at all. Imported in a thread, the loop keeps
serving while it loads; every caller that needs it meanwhile waits for the same import. A failed or
stuck import raises to its callers, who fail closed (no answer, a refused connection), and the next
caller tries again.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from types import ModuleType

from proxy.runtime.threads import in_daemon_thread

IMPORT_TIMEOUT = 60.0  # seconds: far above a loaded machine's import, below any client's patience


class LazyImport:
    """``await LazyImport("pkg.mod").load()``: the module, imported once, off the loop."""

    def __init__(self, name: str, timeout: float = IMPORT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self._module: ModuleType | None = None
        self._loading: asyncio.Task[ModuleType] | None = None

    async def load(self) -> ModuleType:
        """The module; only once its import has finished (``sys.modules`` holds a module while it
        is still being executed, so it is not consulted here: importlib waits for that import)."""
        if self._module is not None:
            return self._module
        # shielded: one cancelled caller must not cancel the import the others wait for
        return await asyncio.shield(self._task())

    def warm(self) -> None:
        """Start the import now without waiting for it (from the loop's thread)."""
        if self._module is None:
            self._task()

    async def settled(self) -> None:
        """Until a warm-up begun earlier on this loop has ended, imported or failed (never
        raises; nothing to wait for if none was begun here)."""
        task = self._loading
        if (
            task is not None
            and self._module is None
            and task.get_loop() is asyncio.get_running_loop()
        ):
            await asyncio.wait([task])

    def _task(self) -> asyncio.Task[ModuleType]:
        loop = asyncio.get_running_loop()
        task = self._loading
        if (
            task is None
            or task.get_loop() is not loop
            or (task.done() and (task.cancelled() or task.exception() is not None))
        ):
            task = self._loading = loop.create_task(self._import())
            task.add_done_callback(_retrieve)
        return task

    async def _import(self) -> ModuleType:
        module = await in_daemon_thread(importlib.import_module, self.name, timeout=self.timeout)
        self._module = module
        return module


async def all_settled(*settled: Callable[[], Awaitable[None]]) -> None:
    """Until every given warm-up has ended (each a ``settled`` of a :class:`LazyImport`, or what
    wraps one): what a gate waits for before its start's objects leave the collector."""
    for one in settled:
        await one()


def _retrieve(task: asyncio.Task[ModuleType]) -> None:
    """A warm-up nobody awaited: its failure is seen by the next load, not logged as unretrieved."""
    if not task.cancelled():
        task.exception()
