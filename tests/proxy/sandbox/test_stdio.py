"""What the command inherits: an IP socket as stdio that could send past the sandbox is refused."""

from __future__ import annotations

import os
import socket
import subprocess

from proxy.sandbox.stdio import stdio_fds, stdio_problem


def test_stdio_fds_checked_are_the_commands() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, open(os.devnull) as null:
        fds = stdio_fds(null, subprocess.PIPE, udp.fileno())
        assert fds == [null.fileno(), udp.fileno()]
        assert (
            stdio_problem(fds)
            == f"fd {udp.fileno()} is a SOCK_DGRAM IP socket, which could send past the sandbox"
        )
    assert stdio_fds(None, None, subprocess.DEVNULL) == [0, 1]


def test_an_unconnected_stream_socket_is_refused_a_connected_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as unconnected:
        assert stdio_problem([unconnected.fileno()]) == (
            f"fd {unconnected.fileno()} is an unconnected IP socket, which could reach past the "
            "sandbox"
        )
        with socket.create_connection(server.getsockname()) as connected:
            assert stdio_problem([connected.fileno()]) is None


def test_unix_sockets_and_files_are_not_ip_sockets() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right, open(os.devnull) as null:
        assert stdio_problem([left.fileno(), null.fileno()]) is None
