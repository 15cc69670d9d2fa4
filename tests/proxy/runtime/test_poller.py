"""The gate's own epoll instance for relayed sockets, on both event loops, with real sockets:
level-triggered readiness (what a reader leaves is reported again), errors and hang-ups reported
to whichever callback waits, one registration per change, and one poller per loop that goes with
its loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import weakref
from typing import Any

import pytest

from proxy.runtime import poller as poller_module
from proxy.runtime.poller import Poller, poller
from tests.proxy.runtime.loops import LOOPS, nonblocking_pair, run_on

RESET = b"\x01\0\0\0\0\0\0\0"  # SO_LINGER on, 0 s: close sends a reset


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("choice", LOOPS)
def test_what_a_reader_leaves_is_reported_again(choice: str) -> None:
    """A reader that takes one byte per call is called until the data is gone, then no more:
    the relay ends a burst at a short read and relies on this."""
    a, b = nonblocking_pair()

    async def main() -> tuple[bytes, int]:
        got = bytearray()
        calls = 0

        def reader() -> None:
            nonlocal calls
            calls += 1
            with contextlib.suppress(BlockingIOError):
                got.extend(b.recv(1))

        relays = poller(asyncio.get_running_loop())
        relays.set_reader(b.fileno(), reader)
        a.sendall(b"hello")
        for _ in range(200):
            if len(got) == 5:
                break
            await asyncio.sleep(0.005)
        await _turns(10)  # drained: no more calls
        relays.set_reader(b.fileno(), None)
        return bytes(got), calls

    try:
        got, calls = run_on(choice, main())
        assert got == b"hello"
        assert 5 <= calls <= 6  # one per byte (and at most one that found nothing)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
@pytest.mark.parametrize("together", [False, True], ids=["apart", "together"])
def test_a_reset_behind_data_reaches_a_reader_that_stopped_at_the_data(
    choice: str, together: bool
) -> None:
    """uvloop reports an error on a descriptor once and drops it; here it is reported for as
    long as it is there, so a reader that read only the data still sees the reset next: sent after
    the data was dispatched, or both there at the first dispatch (one edge, were it
    edge-triggered)."""
    a, b = nonblocking_pair()

    def reset() -> None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        a.close()

    async def main() -> list[object]:
        seen: list[object] = []
        done = asyncio.get_running_loop().create_future()
        relays = poller(asyncio.get_running_loop())

        def reader() -> None:
            try:
                seen.append(b.recv(2))
            except OSError as exc:
                seen.append(type(exc).__name__)
                relays.clear(b.fileno())
                done.set_result(None)

        a.sendall(b"hi")
        if together:
            reset()
        relays.set_reader(b.fileno(), reader)
        if not together:
            await asyncio.sleep(0.05)
            reset()
        await asyncio.wait_for(done, 10)
        return seen

    try:
        assert run_on(choice, main()) == [b"hi", "ConnectionResetError"]
    finally:
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_hang_up_reaches_a_writer_that_waits_alone(choice: str) -> None:
    """A descriptor waited on only for writing still has its error reported, to the writer."""
    a, b = nonblocking_pair()

    async def main() -> str:
        loop = asyncio.get_running_loop()
        relays = poller(loop)
        fill = b"x" * 65536
        try:
            while True:  # fill b's send buffer and a's receive buffer
                b.send(fill)
        except BlockingIOError:
            pass
        outcome = loop.create_future()

        def writer() -> None:
            try:
                b.send(fill)
            except BlockingIOError:
                return
            except OSError as exc:
                relays.set_writer(b.fileno(), None)
                outcome.set_result(type(exc).__name__)

        relays.set_writer(b.fileno(), writer)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        a.close()
        return await asyncio.wait_for(outcome, 10)

    try:
        assert run_on(choice, main()) in ("ConnectionResetError", "BrokenPipeError")
    finally:
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_one_registration_per_change_and_nothing_left_when_no_one_waits(choice: str) -> None:
    a, b = nonblocking_pair()
    calls: list[str] = []

    class Counting:
        def __init__(self, epoll: Any) -> None:
            self.epoll = epoll

        def register(self, fd: int, events: int) -> None:
            calls.append(f"add {events}")
            self.epoll.register(fd, events)

        def modify(self, fd: int, events: int) -> None:
            calls.append(f"modify {events}")
            self.epoll.modify(fd, events)

        def unregister(self, fd: int) -> None:
            calls.append("remove")
            self.epoll.unregister(fd)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.epoll, name)

    async def main() -> None:
        relays = poller(asyncio.get_running_loop())
        relays._epoll = Counting(relays._epoll)  # type: ignore[assignment]
        fd = b.fileno()
        relays.set_reader(fd, lambda: None)
        relays.set_reader(fd, lambda: None)  # another callback, the same events: no call
        relays.set_writer(fd, lambda: None)
        relays.set_reader(fd, None)
        assert relays.registered(fd)
        relays.set_writer(fd, None)
        assert not relays.registered(fd)
        relays.set_writer(fd, None)  # nothing to remove: no call
        relays.set_reader(fd, lambda: None)
        relays.clear(fd)
        relays.clear(fd)  # idempotent
        assert not relays.registered(fd)

    try:
        run_on(choice, main())
        assert calls == ["add 1", "modify 5", "modify 4", "remove", "add 1", "remove"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_reader_that_stops_waiting_is_not_followed_by_its_writer(choice: str) -> None:
    """A reader that clears its descriptor (a relay that ended) is the last callback for it in
    that turn, even when the event also said writable."""
    a, b = nonblocking_pair()

    async def main() -> list[str]:
        relays = poller(asyncio.get_running_loop())
        seen: list[str] = []

        def reader() -> None:
            seen.append("read")
            relays.clear(b.fileno())

        relays.set_reader(b.fileno(), reader)
        relays.set_writer(b.fileno(), lambda: seen.append("write"))
        a.sendall(b"x")  # readable and writable at once
        await asyncio.sleep(0.05)
        return seen

    try:
        assert run_on(choice, main()) == ["read"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_more_ready_descriptors_than_one_turn_takes_are_all_served(choice: str) -> None:
    count = poller_module.MAX_EVENTS + 44
    pairs = [nonblocking_pair() for _ in range(count)]

    async def main() -> int:
        relays = poller(asyncio.get_running_loop())
        served: set[int] = set()
        for _, b in pairs:

            def reader(sock: socket.socket = b) -> None:
                sock.recv(1)
                served.add(sock.fileno())
                relays.clear(sock.fileno())

            relays.set_reader(b.fileno(), reader)
        for a, _ in pairs:
            a.sendall(b"x")
        for _ in range(400):
            if len(served) == count:
                break
            await asyncio.sleep(0.005)
        return len(served)

    try:
        assert run_on(choice, main()) == count
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def _epoll_instances() -> int:
    """This process's open epoll descriptors."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]"
    return count


@pytest.mark.parametrize("choice", LOOPS)
def test_one_poller_per_loop_and_it_goes_with_its_loop(choice: str) -> None:
    async def main() -> Poller:
        loop = asyncio.get_running_loop()
        assert poller(loop) is poller(loop)
        return poller(loop)

    gc.collect()
    before = _epoll_instances()
    first = run_on(choice, main())
    second = run_on(choice, main())
    assert first is not second
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None  # the loop is gone, and its poller with it
    assert _epoll_instances() == before  # and its epoll instance is closed


@pytest.mark.parametrize("choice", LOOPS)
def test_a_closed_poller_leaves_its_loop(choice: str) -> None:
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        relays = Poller(loop)
        fd = relays._epoll.fileno()
        relays.close()
        return relays._epoll.closed and not loop.remove_reader(fd)

    assert run_on(choice, main())


@pytest.mark.parametrize("choice", LOOPS)
def test_an_error_alone_reaches_the_reader(choice: str) -> None:
    """A connected UDP socket told by ICMP that nobody listens has an error and nothing to read
    (EPOLLERR without EPOLLIN): its reader is still called, and finds the error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    udp.connect(("127.0.0.1", port))

    async def main() -> str:
        relays = poller(asyncio.get_running_loop())
        found = asyncio.get_running_loop().create_future()

        def reader() -> None:
            try:
                udp.recv(16)
            except OSError as exc:
                relays.clear(udp.fileno())
                found.set_result(type(exc).__name__)

        relays.set_reader(udp.fileno(), reader)
        udp.send(b"x")
        return await asyncio.wait_for(found, 10)

    try:
        assert run_on(choice, main()) == "ConnectionRefusedError"
    finally:
        udp.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_registration_left_behind_is_dropped_instead_of_spinning(choice: str) -> None:
    """An owner that forgot its descriptor without clearing it (the kernel still reporting it):
    after a few turns the instance is made anew without it, and the loop goes quiet."""
    a, b = nonblocking_pair()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        relays = poller(loop)
        relays.set_reader(b.fileno(), lambda: None)
        relays._fds.pop(b.fileno())  # forgotten, still registered with the kernel

        class Counting:
            def __init__(self, epoll: Any) -> None:
                self.epoll, self.polls = epoll, 0

            def poll(self, *args: Any) -> Any:
                self.polls += 1
                return self.epoll.poll(*args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.epoll, name)

        counting = Counting(relays._epoll)
        relays._epoll = counting  # type: ignore[assignment]
        a.sendall(b"x")  # readable for good: nobody reads it
        for _ in range(50):
            await asyncio.sleep(0)
        assert relays._epoll is not counting  # made anew
        return counting.polls

    try:
        assert run_on(choice, main()) <= poller_module.STRAY_TURNS + 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("choice", LOOPS)
def test_a_descriptor_closed_before_it_was_cleared_is_logged_not_raised(
    choice: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nonblocking_pair()

    async def main() -> None:
        relays = poller(asyncio.get_running_loop())
        fd = b.fileno()
        relays.set_reader(fd, lambda: None)
        b.close()
        relays.clear(fd)  # the owner's clean-up goes on
        assert not relays.registered(fd)

    try:
        run_on(choice, main())
        assert "closed before it was cleared" in caplog.text
    finally:
        a.close()
