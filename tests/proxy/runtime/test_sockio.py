"""Socket calls that try the system call first and wait only when it would block: real loopback
sockets on both event loops."""

from __future__ import annotations

import asyncio
import os
import select
import socket
from typing import Any

import pytest

from proxy.runtime import sockio
from proxy.runtime.poller import poller
from tests.proxy.runtime.loops import LOOPS, nonblocking_pair, run_on


@pytest.mark.parametrize("choice", LOOPS)
def test_recv_waits_for_data_and_reports_eof(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, b.send, b"late")
        first = await asyncio.wait_for(sockio.recv(a, 100), 10)
        b.shutdown(socket.SHUT_WR)
        return first, await asyncio.wait_for(sockio.recv(a, 100), 10)

    try:
        assert run_on(choice, main()) == (b"late", b"")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_send_all_waits_for_a_full_buffer_and_sends_everything(choice: str) -> None:
    a, b = nonblocking_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    payload = os.urandom(4 << 20)

    async def main() -> bytes:
        sender = asyncio.ensure_future(sockio.send_all(a, payload))
        await asyncio.sleep(0.05)
        assert not sender.done()  # the buffers are full: it waits, it does not drop
        got = bytearray()

        async def receive() -> None:
            while len(got) < len(payload):
                got.extend(await sockio.recv(b, 1 << 16))

        await asyncio.wait_for(receive(), 30)
        await asyncio.wait_for(sender, 10)
        return bytes(got)

    try:
        assert run_on(choice, main()) == payload
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_connect_reaches_a_listener_and_reports_a_refusal(choice: str) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    closed = socket.create_server(("127.0.0.1", 0))
    refused = closed.getsockname()
    closed.close()

    async def main() -> None:
        ok = socket.socket()
        ok.setblocking(False)
        try:
            await asyncio.wait_for(sockio.connect(ok, address), 10)
            assert ok.getpeername() == address
        finally:
            ok.close()
        bad = socket.socket()
        bad.setblocking(False)
        try:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(sockio.connect(bad, refused), 10)
        finally:
            bad.close()

    try:
        run_on(choice, main())
    finally:
        server.close()


def test_connect_never_resolves_a_name() -> None:
    """Only the address the gate checked and pinned is dialled: a name is an error, not a lookup."""

    async def main() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            with pytest.raises(OSError):
                await sockio.connect(sock, ("localhost", 80))
        finally:
            sock.close()

    asyncio.run(main())


@pytest.mark.parametrize("choice", LOOPS)
def test_send_all_to_a_peer_that_stops_reading_ends_after_the_stall_limit(choice: str) -> None:
    a, b = nonblocking_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def main() -> None:
        await sockio.send_all(a, b"x" * (64 * 1024 * 1024), stall=0.05)  # b never reads

    try:
        with pytest.raises(TimeoutError):
            run_on(choice, main())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_recv_takes_what_has_arrived_and_times_out_only_waiting(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> bytes:
        b.send(b"here")
        await asyncio.sleep(0.05)
        got = await sockio.recv(a, 100, timeout=0)  # already there: no timer involved
        with pytest.raises(TimeoutError):
            await sockio.recv(a, 100, timeout=0.05)  # nothing more comes
        return got

    try:
        assert run_on(choice, main()) == b"here"
    finally:
        a.close()
        b.close()


def _named(events: int) -> str:
    names = [
        name for bit, name in ((select.EPOLLIN, "in"), (select.EPOLLOUT, "out")) if events & bit
    ]
    return "+".join(names)


class _CountingEpoll:
    """The poller's epoll instance, recording each change of what it waits for."""

    def __init__(self, epoll: Any, calls: list[str]) -> None:
        self._epoll, self._calls = epoll, calls

    def register(self, fd: int, events: int) -> None:
        self._calls.append(f"add {_named(events)}")
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._calls.append(f"modify {_named(events)}")
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._calls.append("remove")
        self._epoll.unregister(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)


def _counting(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Records the registrations with the loop's poller (each one an ``epoll_ctl``)."""
    calls: list[str] = []
    relays = poller(loop)
    relays._epoll = _CountingEpoll(relays._epoll, calls)  # type: ignore[assignment]
    return calls


@pytest.mark.parametrize("choice", LOOPS)
def test_a_watch_registers_once_for_successive_waits(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        calls = _counting(loop)
        watch = sockio.Watch(a)
        for n in range(3):
            loop.call_later(0.01, b.send, b"%d" % n)
            assert await asyncio.wait_for(sockio.recv(a, 10, watch=watch), 10) == b"%d" % n
        watch.close()
        watch.close()  # idempotent
        assert not poller(loop).registered(a.fileno())  # nothing left registered
        return calls

    try:
        assert run_on(choice, main()) == ["add in", "remove"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_readiness_nobody_waits_for_unregisters_instead_of_spinning(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        loop.call_later(0.01, b.send, b"x")
        await asyncio.wait_for(watch.readable(), 10)
        calls = _counting(loop)
        # Still readable (nothing was read) and nobody waits: one call, which unregisters.
        turns = 0
        for _ in range(20):
            await asyncio.sleep(0)
            turns += 1
        assert not poller(loop).registered(a.fileno())
        await asyncio.wait_for(watch.readable(), 10)  # registers again, ready at once
        watch.close()
        return calls, turns

    try:
        calls, turns = run_on(choice, main())
        assert calls == ["remove", "add in", "remove"] and turns == 20
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_watch_moved_to_the_loop_waits_through_the_loops_own_registration(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        waiting = asyncio.ensure_future(sockio.recv(a, 10, watch=watch))
        for _ in range(3):
            await asyncio.sleep(0)
        assert poller(loop).registered(a.fileno())  # the gate's poller, until moved
        with pytest.raises(RuntimeError):
            watch.to_loop()  # never in the middle of a wait
        b.send(b"0")
        got = [await asyncio.wait_for(waiting, 10)]
        watch.to_loop()
        watch.to_loop()  # idempotent
        assert not poller(loop).registered(a.fileno())
        for n in (1, 2):
            waiting = asyncio.ensure_future(sockio.recv(a, 10, watch=watch))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not waiting.done() and not poller(loop).registered(a.fileno())
            b.send(b"%d" % n)
            got.append(await asyncio.wait_for(waiting, 10))
        watch.close()
        assert not loop.remove_reader(a.fileno())  # closed: nothing left with the loop
        return got

    try:
        assert run_on(choice, main()) == [b"0", b"1", b"2"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_watch_on_the_loop_unregisters_when_nobody_waits_or_it_is_handed_over(
    choice: str,
) -> None:
    a, b = nonblocking_pair()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        watch.to_loop()
        loop.call_later(0.01, b.send, b"x")
        await asyncio.wait_for(watch.readable(), 10)
        for _ in range(20):  # still readable and nobody waits: unregistered, not spinning
            await asyncio.sleep(0)
        assert not loop.remove_reader(a.fileno())
        await asyncio.wait_for(watch.readable(), 10)  # registers again, ready at once
        watch.hand_over()  # a relay takes the socket: nothing of the watch stays with the loop
        assert not loop.remove_reader(a.fileno())
        assert not poller(loop).registered(a.fileno())

    try:
        run_on(choice, main())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_wait_that_timed_out_leaves_no_waiter_behind(choice: str) -> None:
    a, b = nonblocking_pair()

    async def main() -> bytes:
        watch = sockio.Watch(a)
        with pytest.raises(TimeoutError):
            await sockio.recv(a, 10, timeout=0.01, watch=watch)
        b.send(b"late")
        for _ in range(5):
            await asyncio.sleep(0)  # the readiness finds no waiter: unregistered
        got = await asyncio.wait_for(sockio.recv(a, 10, watch=watch), 10)
        watch.close()
        return got

    try:
        assert run_on(choice, main()) == b"late"
    finally:
        a.close()
        b.close()


def test_one_wait_at_a_time_on_a_watch() -> None:
    a, b = nonblocking_pair()

    async def main() -> None:
        watch = sockio.Watch(a)
        first = asyncio.ensure_future(watch.readable())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            await watch.readable()
        first.cancel()
        watch.close()

    try:
        run_on("uvloop", main())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_refused_second_wait_leaves_the_first_waits_deadline(choice: str) -> None:
    """A second wait on a watched socket is refused before it touches anything: the first wait
    still ends at its own deadline (a deadline moved to "never" would hold it for ever)."""
    a, b = nonblocking_pair()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = sockio.Watch(a)
        first = asyncio.ensure_future(watch.readable_until(loop.time() + 0.2))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            await watch.readable()
        done, _ = await asyncio.wait({first}, timeout=10)
        assert first in done and isinstance(first.exception(), TimeoutError)
        watch.close()

    try:
        run_on(choice, main())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_an_armed_watch_keeps_its_registration_through_a_connect(choice: str) -> None:
    """An upstream registered for reading before its connect waits to write: the connect's
    writer comes and goes beside that registration, and the first read needs no new one."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        async def main() -> tuple[list[str], bytes]:
            loop = asyncio.get_running_loop()
            up = socket.socket()
            up.setblocking(False)
            try:
                watch = sockio.Watch(up)
                watch.arm()
                calls = _counting(loop)
                await asyncio.wait_for(sockio.connect(up, server.getsockname()), 10)
                peer, _ = server.accept()
                with peer:
                    loop.call_later(0.02, peer.sendall, b"first")  # the read has to wait
                    got = await asyncio.wait_for(sockio.recv(up, 10, watch=watch), 10)
                watch.close()
                return calls, got
            finally:
                up.close()

        calls, got = run_on(choice, main())
        assert got == b"first" and calls == ["remove"]  # no add_reader: only the close


@pytest.mark.parametrize("choice", LOOPS)
def test_a_handshake_done_within_the_call_is_not_waited_for(choice: str) -> None:
    """A loopback handshake completes inside connect(2), which still says EINPROGRESS: the
    socket is asked before the loop is, so nothing is registered and no turn of the loop passes."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        async def main() -> list[str]:
            loop = asyncio.get_running_loop()
            up = socket.socket()
            up.setblocking(False)
            try:
                watch = sockio.Watch(up)
                calls = _counting(loop)
                await asyncio.wait_for(sockio.connect(up, server.getsockname(), watch=watch), 10)
                assert up.getpeername() == server.getsockname()
                return calls
            finally:
                up.close()

        assert run_on(choice, main()) == []


@pytest.mark.parametrize("choice", LOOPS)
def test_a_connect_that_must_wait_arms_its_watch_and_is_bounded(choice: str) -> None:
    """A listener whose accept queue is full drops the SYN: the connect waits, with the socket's
    read registration armed first (one poll handle for the wait and the later reader), and ends
    with TimeoutError at its bound instead of the kernel's minutes of retries."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = socket.socket()
    queued.setblocking(False)
    queued.connect_ex(full.getsockname())  # fills the queue; never accepted

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        up = socket.socket()
        up.setblocking(False)
        try:
            watch = sockio.Watch(up)
            readers = _counting(loop)
            with pytest.raises(TimeoutError):
                await sockio.connect(up, full.getsockname(), timeout=0.2, watch=watch)
            watch.close()
            return readers
        finally:
            up.close()

    try:  # the wait to write comes and goes beside the read registration
        assert run_on(choice, main()) == ["add in", "modify in+out", "modify in", "remove"]
    finally:
        queued.close()
        full.close()
