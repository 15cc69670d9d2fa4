"""Relaying an admitted tunnel's bytes with the kernel, driven by readiness callbacks.

Once a tunnel is decided and its first bytes are checked, the gate has nothing more to read in it:
the bytes move with ``splice(2)`` through a pipe and never enter Python. Each direction is a
:class:`_Pump` registered once with the gate's own epoll instance (:mod:`proxy.runtime.poller`,
level-triggered): a readiness callback moves what the source has now, and only a destination that
cannot take more switches it to waiting for the destination. No task, future or registration is
made per burst (a small HTTPS exchange is a handful of bursts, and per-burst scheduling was most of
the gate's relay cost).

An EOF is passed on as a half-close; an error on either side (a reset) ends both directions and is
passed on as a reset. Pipes are lent per burst and returned empty, so idle tunnels hold none.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import termios
from collections.abc import Callable

from proxy.runtime.poller import Poller, poller
from proxy.runtime.sockio import Watch

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Pipes:
    """Pipes for splicing, lent per burst and returned empty: a gate holds about as many as it has
    transfers waiting on a slow receiver, not two per open tunnel."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a larger pipe moves more per call; optional
            fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
        return r, w

    def give_back(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


PIPES = Pipes()


class _Pump:
    """One direction: ``src`` to ``dst``. ``finished`` is called once, with the error if any."""

    __slots__ = (
        "count",
        "dst",
        "dst_sock",
        "finished",
        "pending",
        "pipe",
        "poller",
        "src",
        "state",
    )

    def __init__(
        self,
        poller: Poller,
        src: socket.socket,
        dst: socket.socket,
        count: Callable[[int], None],
        finished: Callable[[_Pump, BaseException | None], None],
    ) -> None:
        self.poller = poller
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.count = count
        self.finished = finished
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe not yet written to dst
        self.state = "reading"
        poller.set_reader(self.src, self._readable)

    def _readable(self) -> None:
        if self.state == "done":
            return  # stopped in this turn: its descriptor may be another socket's next
        try:
            self._move()
        except Exception as exc:  # ends the tunnel; the relay logs what is not an OSError
            self._finish(exc)

    def _writable(self) -> None:
        if self.state == "done":
            return
        try:
            if self._flush():
                self.poller.set_writer(self.dst, None)
                self.poller.set_reader(self.src, self._readable)
                self.state = "reading"
                self._move()
        except Exception as exc:  # ends the tunnel; the relay logs what is not an OSError
            self._finish(exc)

    def _flush(self) -> bool:
        """Write what the pipe holds; False when ``dst`` is full (still pending)."""
        assert self.pipe is not None
        while self.pending:
            try:
                self.pending -= os.splice(self.pipe[0], self.dst, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
        return True

    def _move(self) -> None:
        """What ``src`` has now, to ``dst``: until a read takes less than a pipe's worth, the
        source says EAGAIN, EOF or an error. A short read ends the burst without another call to
        find the source empty: the registration is level-triggered, so anything left (more data,
        an end, a reset behind the data) is reported on the next turn of the loop."""
        if self.pipe is None:
            self.pipe = PIPES.take()
        while True:
            try:
                n = os.splice(self.src, self.pipe[1], CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._release()
                if _at_urgent_mark(self.src):
                    raise _UrgentData() from None
                return
            if n == 0:
                self._release()
                with contextlib.suppress(OSError):
                    self.dst_sock.shutdown(socket.SHUT_WR)
                self._finish(None)
                return
            self.count(n)
            self.pending = n
            if not self._flush():
                self.poller.set_reader(self.src, None)
                self.poller.set_writer(self.dst, self._writable)
                self.state = "writing"
                return
            if n < CHUNK:
                self._release()
                return

    def _release(self) -> None:
        if self.pipe is not None:
            PIPES.give_back(self.pipe, empty=self.pending == 0)
            self.pipe = None

    def stop(self) -> None:
        """Unregister (idempotent): before either socket is closed, so a reused fd is never
        served by a stale callback."""
        if self.state == "reading":
            self.poller.set_reader(self.src, None)
        elif self.state == "writing":
            self.poller.set_writer(self.dst, None)
        self.state = "done"
        self._release()

    def _finish(self, error: BaseException | None) -> None:
        if self.state == "done":
            return
        self.stop()
        self.finished(self, error)


_SIOCATMARK = 0x8905  # Linux: whether the read position is at TCP urgent data's mark


class _UrgentData(OSError):
    """TCP urgent data in a relayed tunnel: ``splice`` stops at its mark and says EAGAIN while the
    socket stays readable (a relay waiting there would be called on every turn of the loop, moving
    nothing). TLS never sends it, so the tunnel ends as a reset (fail closed)."""

    def __init__(self) -> None:
        super().__init__(errno.EPROTO, "TCP urgent data in a relayed tunnel")


def _at_urgent_mark(fd: int) -> bool:
    """Asked only when a readable socket gave nothing (rare since a burst ends at a short read)."""
    try:
        mark = fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(mark, sys.byteorder) != 0


_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
DRAIN_BEFORE_RESET = 30.0  # seconds the peer that did not fail is given to take what it was sent
DRAIN_STALLED = 2.0  # ... while it takes some of it at least this often (a stalled one: reset)
_DRAIN_POLL = 0.05
_TCP_CLOSE = 7  # tcp_info.tcpi_state of a socket that was reset


def _unsent(sock: socket.socket) -> int:
    """Bytes the kernel still holds for the peer (``SIOCOUTQ``: not yet sent or not yet
    acknowledged); 0 for a socket that was reset (the kernel keeps counting what it held) or when
    that cannot be told."""
    try:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE:
            return 0
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(queued, sys.byteorder, signed=True)


def _abort(sock: socket.socket) -> None:
    """The caller's close of ``sock`` sends a reset, not an end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    outbound: Callable[[int], None],
    inbound: Callable[[int], None],
    *,
    client_watch: Watch | None = None,
    upstream_watch: Watch | None = None,
) -> None:
    """Both directions until both have ended. An error on either side (a reset) ends both
    directions and is passed on as a reset, not an end, which would make the other peer take an
    aborted transfer for a complete one (a download cut short, an upload whose sender died): once
    the other peer has taken what was relayed to it (up to DRAIN_BEFORE_RESET, while it takes some
    of it every DRAIN_STALLED), the relay returns with both sockets set to reset as the caller
    closes them (which it does without a ``shutdown``, whose end would come first). Cancelling it
    unregisters both directions; the caller then shuts down and closes the sockets.
    ``client_watch``, ``upstream_watch``: the sockets' registrations, which the relay's readers
    replace as they register (the same epoll registration, no system call)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    remaining = 2
    failed = False
    draining: asyncio.TimerHandle | None = None

    def reset_once_sent(deadline: float, left: int, moved: float) -> None:
        """Reset both sides once neither holds a byte for its peer (a reset would drop them), or
        once the peer has taken none of them for DRAIN_STALLED (one that stopped reading, as when
        the gate ends a stalled tunnel), or at ``deadline``."""
        nonlocal draining
        draining = None
        if done.done():
            return
        now, unsent = loop.time(), _unsent(client) + _unsent(upstream)
        if unsent < left:
            moved = now
        if unsent and now < deadline and now - moved < DRAIN_STALLED:
            draining = loop.call_later(_DRAIN_POLL, reset_once_sent, deadline, unsent, moved)
            return
        for sock in (client, upstream):
            _abort(sock)
        done.set_result(None)

    def finished(_pump: _Pump, error: BaseException | None) -> None:
        nonlocal remaining, failed
        remaining -= 1
        if error is not None and not isinstance(error, OSError):
            log.error("relaying a tunnel failed", exc_info=error)
        elif isinstance(error, _UrgentData):
            log.warning("a relayed tunnel carried TCP urgent data; it was ended")
        if error is not None and not failed:
            failed = True
            for pump in pumps:
                pump.stop()
            now = loop.time()
            reset_once_sent(now + DRAIN_BEFORE_RESET, _unsent(client) + _unsent(upstream), now)
            return
        if remaining == 0 and not failed and not done.done():
            done.set_result(None)

    pumps: list[_Pump] = []
    relays = poller(loop)
    try:
        pumps.append(_Pump(relays, client, upstream, outbound, finished))
        if client_watch is not None:
            client_watch.hand_over()
        pumps.append(_Pump(relays, upstream, client, inbound, finished))
        if upstream_watch is not None:
            upstream_watch.hand_over()
        await done
    finally:
        if draining is not None:
            draining.cancel()
        for pump in pumps:
            pump.stop()
