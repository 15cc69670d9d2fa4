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


@pytest.mark.parametrize(
    ("local", "remote"),
    [(("127.0.0.1", 3128), ("127.0.0.1", 40000)), (("::1", 3128), ("::1", 40001))],
)
def test_a_request_carries_both_ends_in_the_kernels_layout(
    local: tuple[str, int], remote: tuple[str, int]
) -> None:
    """The same bytes on every call (addresses are parsed once and kept): family, ports in network
    order, each address padded to 16 bytes."""
    import ipaddress
    import socket
    import struct

    from proxy.attribution.sockdiag import request

    for _ in range(2):
        message, family = request(7, local, remote)
        expected = ipaddress.ip_address(local[0])
        assert family == (socket.AF_INET if expected.version == 4 else socket.AF_INET6)
        body = message[16:]
        assert body[0] == family
        sport, dport = struct.unpack_from("!HH", body, 8)
        assert (sport, dport) == (local[1], remote[1])
        assert body[12:28] == expected.packed.ljust(16, b"\0")
        assert body[28:44] == ipaddress.ip_address(remote[0]).packed.ljust(16, b"\0")
