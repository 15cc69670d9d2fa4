"""Noticing that a policy file changed, however it was changed.

Editors save by writing a new file and renaming it over the old one; Kubernetes updates a ConfigMap
volume by swapping the ``..data`` symlink to a new directory and deleting the old one; ``echo >>``
appends in place. A watch on one inode misses the first two, so a file's identity here is what a fresh
``open`` of its *path* would read: the resolved target's path, device, inode, size and modification
time (``os.stat`` follows every symlink). A missing or unreadable file has an identity too, so
deleting a policy file is a change that is reported (the reload fails and the last good policy stays).

Polling (every 0.5 s by default) is portable, needs no library, costs one ``stat`` per file and
watches paths that do not exist yet. A change is acted on once two polls agree (a half-written file
is not loaded before its writer is done), so a reload follows an edit within about two intervals.
The set of paths is asked for on every poll: a reload that adds an include starts watching it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.5

Identity = tuple[str, int, int, int, int] | tuple[str, str]
Snapshot = dict[str, Identity]


def identity(path: Path) -> Identity:
    """What a fresh open of ``path`` would read, as a comparable value."""
    try:
        target = os.path.realpath(path)
        st = os.stat(target)
    except OSError as exc:
        return (str(path), f"error: {exc.strerror or exc}")
    return (target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def snapshot(paths: Iterable[Path]) -> Snapshot:
    return {str(p): identity(p) for p in paths}


class Watcher:
    """Compares snapshots of a changing set of paths; ``poll`` says when a settled change is seen."""

    def __init__(self, paths: Callable[[], Iterable[Path]]) -> None:
        self._paths = paths
        self._current = snapshot(paths())
        self._pending: Snapshot | None = None

    def poll(self) -> bool:
        """True once per change, when the changed snapshot has held for two polls in a row."""
        now = snapshot(self._paths())
        if now == self._current:
            self._pending = None
            return False
        if now != self._pending:
            self._pending = now  # first sight of this state: wait one poll for the writer to finish
            return False
        self._current = now
        self._pending = None
        return True

    def rebase(self) -> None:
        """Take the paths as they are now (after a reload changed which files are watched)."""
        self._current = snapshot(self._paths())
        self._pending = None


async def watch(
    watcher: Watcher,
    on_change: Callable[[], Awaitable[None]],
    *,
    interval: float = DEFAULT_INTERVAL,
    stop: asyncio.Event | None = None,
) -> None:
    """Poll until ``stop`` is set (or the task is cancelled), calling ``on_change`` on each change."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except TimeoutError:
            pass
        try:
            changed = await asyncio.to_thread(watcher.poll)
        except Exception:  # a watcher that breaks must not take the gate down; SIGHUP still works
            log.exception("policy file watch failed")
            continue
        if changed:
            await on_change()
