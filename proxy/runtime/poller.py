"""One epoll instance of the gate's own for relayed sockets, registered with the event loop once.

uvloop (libuv) gives every descriptor registered with ``add_reader`` a poll handle of its own:
creating one costs an ``epoll_ctl`` add and delete (libuv's check that the descriptor can be polled),
an ``ioctl`` and a failing delete; closing one, three deletes, two of them failing (strace on the
tunnel path: 12 ``epoll_ctl`` and 2 ``ioctl`` per relayed tunnel, half of the calls failing). And it
reports an error on a descriptor once, then drops the descriptor, so a reader must read until
EAGAIN after every wake-up. A relayed tunnel's sockets are registered here instead: one
``epoll_ctl`` as each starts, changes or stops being waited on, level-triggered, so what is left
unread (data, an end, an error) is reported again on the next turn of the loop.

The loop calls :meth:`Poller._ready` when this epoll instance has events; it takes up to
MAX_EVENTS of them without waiting and calls each descriptor's reader or writer (both on an error
or a hang-up, as the loop would). A descriptor no callback waits on is removed from the instance
(an error would otherwise be reported on every turn with nobody to take it).
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable

MAX_EVENTS = 256  # per turn of the loop; the rest are reported on the next (level-triggered)
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_READ_TOO = _READ | select.EPOLLERR | select.EPOLLHUP
_WRITE_TOO = _WRITE | select.EPOLLERR | select.EPOLLHUP

Callback = Callable[[], None]


class Poller:
    """Readers and writers of descriptors, by descriptor. One per event loop (:func:`poller`)."""

    __slots__ = ("__weakref__", "_epoll", "_fds", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()  # close-on-exec
        self._fds: dict[int, list[Callback | None]] = {}  # fd -> [reader, writer]
        self._loop = weakref.ref(loop)
        loop.add_reader(self._epoll.fileno(), self._ready)

    def set_reader(self, fd: int, callback: Callback | None) -> None:
        self._set(fd, 0, callback)

    def set_writer(self, fd: int, callback: Callback | None) -> None:
        self._set(fd, 1, callback)

    def _set(self, fd: int, which: int, callback: Callback | None) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            if callback is None:
                return
            entry = [None, None]
            entry[which] = callback
            self._epoll.register(fd, _READ if which == 0 else _WRITE)
            self._fds[fd] = entry
            return
        if (entry[which] is None) == (callback is None):
            entry[which] = callback  # the same events: only the callback changes
            return
        entry[which] = callback
        reader, writer = entry
        if reader is None and writer is None:
            del self._fds[fd]
            self._epoll.unregister(fd)
            return
        self._epoll.modify(fd, (_READ if reader is not None else 0) | (_WRITE if writer else 0))

    def clear(self, fd: int) -> None:
        """Neither read nor write ``fd`` any more (idempotent); before it is closed."""
        if self._fds.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def registered(self, fd: int) -> bool:
        return fd in self._fds

    def _ready(self) -> None:
        fds = self._fds
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            entry = fds.get(fd)
            if entry is None:
                continue
            reader = entry[0]
            if reader is not None and events & _READ_TOO:
                reader()
                entry = fds.get(fd)  # the reader may have changed what is waited on
                if entry is None:
                    continue
            writer = entry[1]
            if writer is not None and events & _WRITE_TOO:
                writer()

    def close(self) -> None:
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno())
        self._fds.clear()
        self._epoll.close()


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


def poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, made on first use (it holds the loop only weakly, and goes with it)."""
    found = _POLLERS.get(loop)
    if found is None:
        found = _POLLERS[loop] = Poller(loop)
    return found
