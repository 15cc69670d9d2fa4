"""The kernel relay of admitted tunnels, over real TCP sockets on loopback, on both event loops:
exact bytes and counts both ways, half-closes passed on, a receiver that stops reading (the writer
path), a reset ending both sides, and cancellation leaving no callback behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from proxy.runtime.loop import loop_factory
from proxy.runtime.poller import poller
from proxy.runtime.sockio import Watch, recv
from proxy.runtime.splice import _unsent, relay

LOOPS = ["asyncio", "uvloop"]


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (splice needs real sockets, as the gate has)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


class Tunnel:
    """client <-> [gate_client | relay | gate_up] <-> upstream; the test holds both ends."""

    def __init__(self) -> None:
        self.client, self.gate_client = _pair()
        self.gate_up, self.upstream = _pair()
        for sock in (self.gate_client, self.gate_up):
            sock.setblocking(False)
        self.out = 0
        self.inn = 0

    def counted(self) -> tuple[Callable[[int], None], Callable[[int], None]]:
        def outbound(n: int) -> None:
            self.out += n

        def inbound(n: int) -> None:
            self.inn += n

        return outbound, inbound

    def close(self) -> None:
        for sock in (self.client, self.gate_client, self.gate_up, self.upstream):
            sock.close()


def _run(choice: str, main: Any) -> Any:
    return asyncio.run(main, loop_factory=loop_factory(choice))


async def _recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("choice", LOOPS)
def test_bytes_and_half_closes_both_ways_with_exact_counts(choice: str) -> None:
    t = Tunnel()
    up_payload = os.urandom(3 << 20)  # larger than a pipe and a socket buffer: several bursts
    down_payload = os.urandom(1 << 20)

    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        for sock in (t.client, t.upstream):
            sock.setblocking(False)
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))

        async def client_side() -> bytes:
            await loop.sock_sendall(t.client, up_payload)
            t.client.shutdown(socket.SHUT_WR)  # half-close: the answer still comes
            return await _recv_all(t.client)

        async def upstream_side() -> bytes:
            got = await _recv_all(t.upstream)  # ends at the client's half-close
            await loop.sock_sendall(t.upstream, down_payload)
            t.upstream.shutdown(socket.SHUT_WR)
            return got

        got_down, got_up = await asyncio.gather(client_side(), upstream_side())
        await asyncio.wait_for(task, 10)
        return got_up, got_down

    try:
        got_up, got_down = _run(choice, main())
    finally:
        t.close()
    assert got_up == up_payload
    assert got_down == down_payload
    assert (t.out, t.inn) == (len(up_payload), len(down_payload))


@pytest.mark.parametrize("choice", LOOPS)
def test_a_receiver_that_stops_reading_holds_the_relay_without_losing_bytes(choice: str) -> None:
    t = Tunnel()
    payload = os.urandom(8 << 20)  # far beyond what the (small) socket buffers and a pipe hold
    t.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    t.gate_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        for sock in (t.client, t.upstream):
            sock.setblocking(False)
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))
        sender = asyncio.ensure_future(loop.sock_sendall(t.upstream, payload))
        await asyncio.sleep(0.2)  # the client reads nothing yet: the relay must wait to write
        assert not sender.done()
        assert t.inn < len(payload)
        received = bytearray()

        async def receive() -> None:
            while len(received) < len(payload):
                received.extend(await loop.sock_recv(t.client, 1 << 16))

        await asyncio.wait_for(receive(), 30)
        await sender
        t.upstream.shutdown(socket.SHUT_WR)
        t.client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 10)
        return bytes(received)

    try:
        assert _run(choice, main()) == payload
    finally:
        t.close()
    assert t.inn == len(payload)


@pytest.mark.parametrize("side", ["upstream", "client"])
@pytest.mark.parametrize("choice", LOOPS)
def test_a_reset_on_one_side_ends_both_and_resets_the_other(choice: str, side: str) -> None:
    """The other peer gets a reset, not an end: an end would pass an aborted transfer off as a
    complete one (a download cut short, an upload whose sender died)."""
    t = Tunnel()
    resetting, other = (t.upstream, t.client) if side == "upstream" else (t.client, t.upstream)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        other.setblocking(False)
        resetting.setblocking(False)
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))
        await loop.sock_sendall(other, b"hello")
        assert await loop.sock_recv(resetting, 5) == b"hello"
        await loop.sock_sendall(resetting, b"partial")
        assert await asyncio.wait_for(loop.sock_recv(other, 7), 10) == b"partial"
        resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        resetting.close()  # with SO_LINGER 0: a reset
        await asyncio.wait_for(task, 10)
        t.gate_client.close()  # as the front end does once the relay has returned
        t.gate_up.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(_recv_all(other), 10)

    try:
        _run(choice, main())
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_data_followed_by_a_reset_is_passed_on_and_ends_the_relay(choice: str) -> None:
    """uvloop reports the reset behind the data once (one call of the reader, then no more): a
    relay that waited for another call after reading the data would never end."""
    t = Tunnel()

    async def main() -> None:
        t.upstream.sendall(b"data")
        t.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        t.upstream.close()  # with SO_LINGER 0: a reset, behind the data the gate has not read
        await asyncio.sleep(0.05)  # both have arrived before the relay starts
        await asyncio.wait_for(relay(t.gate_client, t.gate_up, *t.counted()), 10)

    try:
        _run(choice, main())
        assert t.inn == 4
        t.client.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert t.client.recv(16) == b"data"
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_reset_seen_by_the_clients_watch_still_lets_the_relay_start_and_end(choice: str) -> None:
    """A watch that saw data and a reset behind it hands over to the relay, whose reader must
    still be called (and find the reset): uvloop would have reported the error once and dropped
    the descriptor."""
    t = Tunnel()

    async def main() -> None:
        watch = Watch(t.gate_client)
        first = asyncio.ensure_future(recv(t.gate_client, 2, watch=watch))
        await asyncio.sleep(0.05)  # waiting: the watch is registered
        t.client.sendall(b"hello")
        t.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        t.client.close()  # a reset behind the data, both seen by the watch's registration
        assert await asyncio.wait_for(first, 10) == b"he"
        await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(
                relay(t.gate_client, t.gate_up, *t.counted(), client_watch=watch), 10
            )
        finally:
            watch.close()

    try:
        _run(choice, main())
        assert t.out == 3
        t.upstream.settimeout(10)
        assert t.upstream.recv(16) == b"llo"
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_cancelling_leaves_no_callback_on_the_sockets(choice: str) -> None:
    t = Tunnel()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Nothing is registered for either fd any more, with the loop or its poller.
        for fd in (t.gate_client.fileno(), t.gate_up.fileno()):
            assert not poller(loop).registered(fd)
            assert not loop.remove_reader(fd)
            assert not loop.remove_writer(fd)

    try:
        _run(choice, main())
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_the_relay_takes_over_the_clients_watch_and_leaves_nothing_behind(choice: str) -> None:
    t = Tunnel()

    async def main() -> bytes:
        from proxy.runtime import sockio

        loop = asyncio.get_running_loop()
        t.client.setblocking(False)
        watch = sockio.Watch(t.gate_client)
        loop.call_later(0.01, t.client.send, b"hello")
        assert await asyncio.wait_for(sockio.recv(t.gate_client, 10, watch=watch), 10) == b"hello"
        up_watch = sockio.Watch(t.gate_up)
        up_watch.arm()
        task = asyncio.ensure_future(
            relay(
                t.gate_client, t.gate_up, *t.counted(), client_watch=watch, upstream_watch=up_watch
            )
        )
        await asyncio.sleep(0.01)
        watch.close()  # the registrations are the relay's now: these must not remove them
        up_watch.close()
        t.client.sendall(b"world")
        t.upstream.setblocking(False)
        got = await asyncio.wait_for(loop.sock_recv(t.upstream, 10), 10)
        t.upstream.sendall(b"back")
        assert await asyncio.wait_for(loop.sock_recv(t.client, 10), 10) == b"back"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for fd in (t.gate_client.fileno(), t.gate_up.fileno()):
            assert not poller(loop).registered(fd)
            assert not loop.remove_reader(fd)
        return got

    try:
        assert _run(choice, main()) == b"world"
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_reset_after_a_whole_response_still_delivers_it_to_a_slow_reader(choice: str) -> None:
    """An upstream that resets after its response (an abortive close, unread input) must not cost
    a client that reads slowly the bytes the gate already took for it: the reset is passed on once
    they have left the gate, as a direct connection would deliver them before its reset."""
    t = Tunnel()
    payload = os.urandom(300 * 1024)
    t.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    t.gate_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 200 * 1024)  # ~400 KiB: all

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        t.client.setblocking(False)
        t.upstream.setblocking(False)
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))
        # as the front end does once the relay has returned: close both of the gate's sockets
        task.add_done_callback(lambda _: (t.gate_client.close(), t.gate_up.close()))
        await loop.sock_sendall(t.upstream, payload)
        for _ in range(500):  # bounded: the gate has taken the whole response (a reset would
            if t.inn == len(payload) and not _unsent(t.upstream):  # drop what it had not)
                break
            await asyncio.sleep(0.01)
        assert t.inn == len(payload)
        t.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        t.upstream.close()  # a reset behind the whole response
        received = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(10_000):  # bounded: slow reads until the reset
                chunk = await asyncio.wait_for(loop.sock_recv(t.client, 16 * 1024), 10)
                assert chunk, "a clean end instead of the reset"
                received += chunk
                await asyncio.sleep(0.001)
        return received

    try:
        assert _run(choice, main()) == payload
    finally:
        t.close()


def test_a_socket_that_was_reset_holds_nothing_for_its_peer() -> None:
    """The kernel keeps counting what a reset socket held for its peer (SIOCOUTQ), and the relay
    waits for that count to reach 0 before it passes a reset on: a reset socket counts as 0, or
    every relay whose client aborted would wait out the stall."""
    a, b = _pair()
    try:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):  # bounded: until the peer's buffers are full
                a.send(b"x" * 65536)
        assert _unsent(a) > 0
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        b.close()  # a reset
        for _ in range(100):  # bounded: until the reset has arrived
            if _unsent(a) == 0:
                break
            time.sleep(0.01)
        assert _unsent(a) == 0
    finally:
        a.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_tcp_urgent_data_ends_the_relay_instead_of_spinning(choice: str) -> None:
    """``splice`` stops at urgent data's mark and says EAGAIN while the socket stays readable: a
    relay waiting there was called on every turn, moving nothing, for good. TLS never sends it:
    the tunnel ends as a reset, the bytes before the mark delivered."""
    t = Tunnel()

    async def main() -> float:
        started = time.process_time()
        t.client.sendall(b"before")
        t.client.send(b"!", socket.MSG_OOB)
        t.client.sendall(b"after")
        await asyncio.wait_for(relay(t.gate_client, t.gate_up, *t.counted()), 10)
        return time.process_time() - started

    try:
        cpu = _run(choice, main())
        assert cpu < 5  # not a loop turning for the wait's 10 s
        t.upstream.settimeout(10)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := t.upstream.recv(64):
                got += chunk
        assert got.startswith(b"before") and b"!" not in got
    finally:
        t.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_cancelling_a_relay_that_waits_to_write_leaves_nothing_registered(choice: str) -> None:
    """The inbound direction waits for a client that reads nothing: cancelled then, neither socket
    stays registered (its descriptor may be another socket's next)."""
    t = Tunnel()
    t.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    t.gate_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t.upstream.setblocking(False)
        task = asyncio.ensure_future(relay(t.gate_client, t.gate_up, *t.counted()))
        sender = asyncio.ensure_future(loop.sock_sendall(t.upstream, os.urandom(8 << 20)))
        for _ in range(200):  # until the inbound direction waits to write
            await asyncio.sleep(0.01)
            entry = poller(loop)._fds.get(t.gate_client.fileno())
            if entry is not None and entry[1] is not None:
                break
        else:
            raise AssertionError("the relay never waited to write")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        for fd in (t.gate_client.fileno(), t.gate_up.fileno()):
            assert not poller(loop).registered(fd)

    try:
        _run(choice, main())
    finally:
        t.close()
