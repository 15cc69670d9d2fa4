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

Owners clear a descriptor before they close it (as they must with the loop's own registrations: its
number is the next socket's). Should one not, the instance may keep the closed socket's
registration (another process holding a copy of it) and report it on every turn with nobody to
take it: the instance is then made anew from what is registered, which the kernel forgets the
stale registration with.
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Callable

MAX_EVENTS = 256  # per turn of the loop; the rest are reported on the next (level-triggered)
STRAY_TURNS = 3  # turns in a row a descriptor nobody waits on may be reported before a renewal
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_READ_TOO = _READ | select.EPOLLERR | select.EPOLLHUP
_WRITE_TOO = _WRITE | select.EPOLLERR | select.EPOLLHUP

Callback = Callable[[], None]

log = logging.getLogger(__name__)


class Poller:
    """Readers and writers of descriptors, by descriptor. One per event loop (:func:`poller`)."""

    __slots__ = ("__weakref__", "_epoll", "_fds", "_loop", "_strays")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()  # close-on-exec
        self._fds: dict[int, list[Callback | None]] = {}  # fd -> [reader, writer]
        self._loop = weakref.ref(loop)
        self._strays: dict[int, int] = {}  # fd -> turns in a row it was reported unregistered
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
            events = _READ if which == 0 else _WRITE
            try:
                self._epoll.register(fd, events)
            except FileExistsError:  # a registration its owner left behind: this socket's now
                self._epoll.modify(fd, events)
            self._fds[fd] = entry
            return
        if (entry[which] is None) == (callback is None):
            entry[which] = callback  # the same events: only the callback changes
            return
        entry[which] = callback
        reader, writer = entry
        if reader is None and writer is None:
            del self._fds[fd]
            self._unregister(fd)
            return
        self._epoll.modify(fd, (_READ if reader is not None else 0) | (_WRITE if writer else 0))

    def clear(self, fd: int) -> None:
        """Neither read nor write ``fd`` any more (idempotent); before it is closed."""
        if self._fds.pop(fd, None) is not None:
            self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        """Failing when the instance no longer holds ``fd`` as this process has it (closed before
        it was cleared): logged, never raised into an owner's clean-up."""
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            log.error("descriptor %d was closed before it was cleared from the poller: %s", fd, exc)

    def registered(self, fd: int) -> bool:
        return fd in self._fds

    def _ready(self) -> None:
        fds = self._fds
        strays: list[int] = []
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            entry = fds.get(fd)
            if entry is None:  # cleared in this turn by another's callback, or left behind
                strays.append(fd)
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
        if strays or self._strays:
            self._count_strays(strays)

    def _count_strays(self, strays: list[int]) -> None:
        """A descriptor cleared in a turn is reported no more; one reported with nobody waiting
        turn after turn is a registration its owner left behind (closed, not cleared)."""
        seen = {fd: self._strays.get(fd, 0) + 1 for fd in strays}
        self._strays = seen
        if any(turns >= STRAY_TURNS for turns in seen.values()):
            log.error("descriptors %s were closed before they were cleared", sorted(seen))
            self._strays = {}
            self._renew()

    def _renew(self) -> None:
        """A new epoll instance holding what is registered now (see the module docstring)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return
        old, self._epoll = self._epoll, select.epoll()
        loop.remove_reader(old.fileno())
        old.close()
        for fd, (reader, writer) in list(self._fds.items()):
            events = (_READ if reader is not None else 0) | (_WRITE if writer is not None else 0)
            try:
                self._epoll.register(fd, events)
            except OSError:  # closed too: nobody is woken for it again
                log.error("descriptor %d was closed before it was cleared from the poller", fd)
                del self._fds[fd]
        loop.add_reader(self._epoll.fileno(), self._ready)

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
