"""What the runtime tests share: both event loops, and connected loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from proxy.runtime.loop import loop_factory

LOOPS = ["asyncio", "uvloop"]


def run_on(choice: str, main: Any) -> Any:
    return asyncio.run(main, loop_factory=loop_factory(choice))


def nonblocking_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback, both ends non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b
