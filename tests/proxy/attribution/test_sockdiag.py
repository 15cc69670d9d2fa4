"""Exact-tuple lookups of a TCP socket's inode through a real NETLINK_SOCK_DIAG socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from proxy.attribution.sockdiag import SockDiag

NETLINK_SOCK_DIAG = 4


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    try:
        yield SockDiag(sock)
    finally:
        sock.close()


def test_the_inode_of_a_connection_by_its_exact_tuple(diag: SockDiag) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            local, remote = client.getsockname(), client.getpeername()
            assert diag.inode(local, remote) == os.fstat(client.fileno()).st_ino
            # the other end, asked from its side, is the accepted socket
            assert diag.inode(remote, local) == os.fstat(accepted.fileno()).st_ino
            for _ in range(50):  # answers stay in step with their requests
                assert diag.inode(local, remote) == os.fstat(client.fileno()).st_ino


def test_a_tuple_with_no_socket_is_none(diag: SockDiag) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    assert diag.inode(("127.0.0.1", port), ("127.0.0.1", 9)) is None


def test_the_socket_is_polled_only_when_a_call_would_block(diag: SockDiag) -> None:
    """Non-blocking: a socket with a timeout makes the interpreter poll before every call,
    though the kernel answers within the request's send."""
    assert diag.sock.gettimeout() == 0.0
