"""Writing to a client of the front end, which may stop reading at any time.

A client that takes no byte for the stall limit would otherwise hold its connection (and, on the
plain-HTTP path, an upstream) for ever: the connection's closing is recorded as ``idle-timeout``
and the caller ends it. The same for refusals, tunnel answers and relayed responses.
"""

from __future__ import annotations

import socket

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Reason
from proxy.runtime import sockio


async def send_to_client(
    checkpoint: Checkpoint,
    conn: Connection,
    sock: socket.socket,
    data: bytes | bytearray,
    *,
    stall: float,
    what: str = "",
) -> bool:
    """All of ``data``; False when the client took no byte ``what`` (e.g. " of its response") for
    ``stall`` seconds: the closing is recorded, and the caller must close the connection. Nothing
    to a client whose sandbox has ended (``conn.gone``): the caller goes on to decide and record
    what it left (pipelined requests, read until their end)."""
    if conn.gone:
        return True
    try:
        await sockio.send_all(sock, data, stall=stall)
    except TimeoutError:
        checkpoint.refuse_connection(
            conn, Reason.IDLE_TIMEOUT, f"the client took no byte{what} for {stall:g} s; closed"
        )
        return False
    return True
