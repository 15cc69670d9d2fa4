"""Non-blocking socket calls that only wait when the kernel says they must.

The event loop's own ``sock_recv``/``sock_sendall``/``sock_connect`` register the socket with the
poller before every call (uvloop creates a poll handle each time: an add, a delete and an ioctl per
call, measured with strace on the tunnel path). A tunnel's CONNECT head is already there when it is
read, its ``200`` and its ClientHello always fit the socket buffer, and a loopback connect is
usually done at once: these helpers make the system call first and register for readiness only
when it would block. Callers bound the waits (``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import errno
import socket


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (data, EOF or an error)."""
    await _wait(sock, write=False)


async def writable(sock: socket.socket) -> None:
    await _wait(sock, write=True)


async def _wait(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()
    if write:
        loop.add_writer(fd, _settle, ready)
    else:
        loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def recv(sock: socket.socket, size: int, *, timeout: float | None = None) -> bytes:
    """Up to ``size`` bytes; b"" at EOF. ``timeout``: TimeoutError when nothing has come that
    long after the first wait began (what has already arrived is taken without the timer)."""
    deadline: float | None = None
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, InterruptedError):
            if deadline is None and timeout is not None:
                deadline = asyncio.get_running_loop().time() + timeout
            async with asyncio.timeout_at(deadline):
                await readable(sock)


async def send_all(
    sock: socket.socket, data: bytes | bytearray | memoryview, *, stall: float | None = None
) -> None:
    """All of ``data``; ``stall``: TimeoutError once the peer has taken no byte for that long (a
    peer that stops reading would otherwise hold the sender for ever)."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            async with asyncio.timeout(stall):
                await writable(sock)
            continue
        view = view[sent:]


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect a non-blocking socket to a numeric address (a name is refused, never resolved)."""
    socket.inet_pton(sock.family, address[0])  # OSError for anything but an address
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        await writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {errno.errorcode.get(err, err)}")
