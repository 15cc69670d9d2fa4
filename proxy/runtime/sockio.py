"""Non-blocking socket calls that only wait when the kernel says they must.

The event loop's own ``sock_recv``/``sock_sendall``/``sock_connect`` register the socket with the
poller before every call (uvloop creates a poll handle each time: an add, a delete and an ioctl per
call, measured with strace on the tunnel path). A tunnel's CONNECT head is already there when it is
read, its ``200`` and its ClientHello always fit the socket buffer, and a loopback connect is
usually done at once: these helpers make the system call first and register for readiness only
when it would block, with the gate's own epoll instance (:mod:`proxy.runtime.poller`, one
``epoll_ctl`` per change), which the relay of the same sockets takes over; a socket waited on
again and again (a kept-alive connection) waits through the loop's own registration
instead (:meth:`Watch.to_loop`). Callers bound the waits (``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import math
import socket

from proxy.runtime.poller import poller

REQUESTS_PER_TURN = 16  # a connection's requests answered back to back before others are served


async def take_turns(served: int, every: int = REQUESTS_PER_TURN) -> None:
    """After every ``every`` requests one connection has had answered (REQUESTS_PER_TURN), or
    units of other work it did without waiting, a turn of the event loop for the others. These
    helpers never wait while the kernel has the bytes, so a client that pipelines requests the gate
    refuses (no upstream to wait for) would otherwise hold the loop for all of them: seconds for
    100,000, with every other connection and sandbox of the gate stalled."""
    if served % every == every - 1:
        await asyncio.sleep(0)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (data, EOF or an error)."""
    await _wait(sock, write=False)


class Watch:
    """A socket's read readiness, registered once for all the waits of its owner instead of once
    per wait (each registration is an ``epoll_ctl``).

    Readiness is level-triggered, so a registration that nobody waits on would be called on every
    turn of the loop while the socket stays readable: the callback then unregisters, and the next
    wait registers again. The owner calls :meth:`close` before the socket is closed or handed to
    another reader (a stale registration must never outlive its descriptor, whose number the next
    socket may take), or :meth:`hand_over` when the next reader of the descriptor registers its
    own callback at once (:mod:`proxy.runtime.splice`'s, which replaces this one's without a
    system call).

    A wake-up may be stale: the owner may have read the data and begun a new wait before a
    readiness callback taken in the same turn runs. Callers read through :func:`recv`, which reads
    again after every wake-up and waits again when it would still block.

    Waits with a deadline (:meth:`readable_until`) share one timer too: a timer costs the loop
    about as much as a registration (uvloop), and a kept-alive connection waits twice a request
    with a deadline minutes away. The timer is moved only when a wait's deadline comes sooner
    than it; when it fires before the deadline of the wait then under way, it is set again."""

    __slots__ = (
        "_deadline", "_fd", "_loop", "_on_loop", "_poller", "_registered", "_timer", "_timer_at",
        "_waiter",
    )  # fmt: skip

    def __init__(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._poller = poller(self._loop)
        self._fd = sock.fileno()
        self._registered = False
        self._on_loop = False  # waits through the event loop's own registration (:meth:`to_loop`)
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # of the wait under way, in loop time
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _ready(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._unregister()  # only ever called while this callback is the fd's reader
            return
        waiter.set_result(None)

    def to_loop(self) -> None:
        """Wait through the event loop's own registration from now on, for a socket waited on
        again and again (a kept-alive connection and its kept upstream): the gate's
        epoll instance is itself watched by the loop's, so a wake-up through it reads both, and
        the readiness passes through both in the kernel (on the plain-HTTP keep-alive path, about
        15 µs of gate CPU a request). A loop registration costs several system calls to make and
        to end (see :mod:`proxy.runtime.poller`), so only for sockets that wait often; never for
        one a relay may take over (:meth:`hand_over` then unregisters it). Between waits only, and
        every wait after a read that found nothing (:func:`recv`): uvloop reports an error once and
        then stops watching the descriptor."""
        if self._on_loop:
            return
        if self._waiter is not None:
            raise RuntimeError("a watched socket changes its registration between waits only")
        if self._registered:
            self._unregister()
        self._on_loop = True

    def _unregister(self) -> None:
        self._registered = False
        if self._on_loop:
            self._loop.remove_reader(self._fd)
        else:
            self._poller.set_reader(self._fd, None)

    async def readable(self) -> None:
        """Until the socket has something to read (data, EOF or an error)."""
        self._one_at_a_time()
        self._deadline = math.inf
        await self._wait()

    def _one_at_a_time(self) -> None:
        """Before a wait touches the deadline: a second wait must never move the first's."""
        if self._waiter is not None:
            raise RuntimeError("one wait at a time on a watched socket")

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        self.arm()
        try:
            await waiter
        finally:
            self._waiter = None

    async def readable_until(self, deadline: float) -> None:
        """:meth:`readable`, or TimeoutError once the loop's clock reaches ``deadline``."""
        self._one_at_a_time()
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            self._schedule(deadline)
        await self._wait()

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no wait under way: the next one sets the timer again
        if self._deadline <= self._timer_at:
            waiter.set_exception(TimeoutError())
        elif self._deadline != math.inf:
            self._schedule(self._deadline)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def arm(self) -> None:
        """Register now, before the first wait: a socket about to wait for another event (an
        upstream's connect) then adds that wait to this registration and takes it off again,
        and its reader finds the registration in place."""
        if not self._registered:
            if self._on_loop:
                self._loop.add_reader(self._fd, self._ready)
            else:
                self._poller.set_reader(self._fd, self._ready)
            self._registered = True

    def close(self) -> None:
        """Unregister (idempotent). Before the socket is closed or given to another reader."""
        self._stop_timer()
        if self._registered:
            self._unregister()

    def hand_over(self) -> None:
        """The caller registers its own reader for the descriptor with the gate's poller next,
        replacing this one (a registration with the loop is ended here: nothing replaces it)."""
        self._stop_timer()
        if self._registered and self._on_loop:
            self._unregister()
        self._registered = False


async def writable(sock: socket.socket) -> None:
    await _wait(sock, write=True)


async def _wait(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()
    register = poller(loop).set_writer if write else poller(loop).set_reader
    register(fd, functools.partial(_settle, ready))
    try:
        await ready
    finally:
        register(fd, None)


async def recv(
    sock: socket.socket,
    size: int,
    *,
    timeout: float | None = None,
    watch: Watch | None = None,
    flags: int = 0,
) -> bytes:
    """Up to ``size`` bytes; b"" at EOF. ``timeout``: TimeoutError when nothing has come that
    long after the first wait began (what has already arrived is taken without the timer).
    ``watch``: the socket's :class:`Watch`, when its owner keeps one. ``flags``: ``recv(2)``'s
    (``MSG_PEEK`` to look without consuming).

    A wait begins only after a read found nothing: on a watch moved to the loop's own
    registration (:meth:`Watch.to_loop`) uvloop reports an error once and then stops watching
    the descriptor, so a wait begun with an error still unread would never end."""
    deadline: float | None = None
    while True:
        try:
            return sock.recv(size, flags)
        except (BlockingIOError, InterruptedError):
            if deadline is None and timeout is not None:
                deadline = asyncio.get_running_loop().time() + timeout
            if watch is None:
                async with asyncio.timeout_at(deadline):
                    await readable(sock)
            elif deadline is None:
                await watch.readable()
            else:
                await watch.readable_until(deadline)  # the watch's one timer


async def send_all(
    sock: socket.socket, data: bytes | bytearray | memoryview, *, stall: float | None = None
) -> None:
    """All of ``data``; ``stall``: TimeoutError once the peer has taken no byte for that long (a
    peer that stops reading would otherwise hold the sender for ever)."""
    if not data:
        return
    try:
        sent = sock.send(data)  # usually all of it: no view to make
    except (BlockingIOError, InterruptedError):
        sent = 0
        async with asyncio.timeout(stall):
            await writable(sock)
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            async with asyncio.timeout(stall):
                await writable(sock)
            continue
        view = view[sent:]


async def connect(
    sock: socket.socket,
    address: tuple[str, int],
    *,
    timeout: float | None = None,
    watch: Watch | None = None,
) -> None:
    """Connect a non-blocking socket to a numeric address (a name is refused, never resolved).

    A loopback or same-host handshake completes inside ``connect(2)`` (the peer's SYN-ACK is
    processed as the call returns), which still says EINPROGRESS: the socket is asked whether it
    is connected before the event loop is, and waits only when it is not. ``timeout`` bounds that
    wait (TimeoutError); ``watch``, the socket's read registration, is armed before it so the wait
    and the socket's later reader share one registration."""
    socket.inet_pton(sock.family, address[0])  # OSError for anything but an address
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        if _connected(sock):  # a socket with a peer has no error to ask for
            err = 0
        else:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err:
                if watch is not None:
                    watch.arm()
                async with asyncio.timeout(timeout):
                    await writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {errno.errorcode.get(err, err)}")


def _connected(sock: socket.socket) -> bool:
    """Whether the handshake is complete: only a connected socket has a peer."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
