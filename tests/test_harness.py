"""The suite's own helpers where a mistake would hide a failure or make one (a port picked twice)."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import (
    NAMESPACE_PORTS,
    Canary,
    closed_port,
    on_a_free_port,
    on_a_namespace_port,
    restartable_port,
)


def test_a_start_whose_port_was_taken_is_tried_again_on_another_port() -> None:
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        if len(tried) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        if len(tried) == 2:  # as a gate says it in its log, raised from what it caught
            raise AssertionError("did not become ready") from RuntimeError(
                "error while attempting to bind: address already in use"
            )
        return "started"

    port, started = on_a_free_port(start)
    assert started == "started" and len(tried) == 3 and port == tried[-1]


def test_any_other_failure_and_the_last_attempts_are_raised_as_they_are() -> None:
    calls: list[int] = []

    def broken(port: int) -> None:
        calls.append(port)
        raise ValueError("policy.yaml:3: bad rule")

    with pytest.raises(ValueError, match="bad rule"):
        on_a_free_port(broken)
    assert len(calls) == 1

    def always_taken(port: int) -> None:
        calls.append(port)
        raise OSError(errno.EADDRINUSE, "Address already in use")

    with pytest.raises(OSError, match="already in use"):
        on_a_free_port(always_taken, attempts=3)
    assert len(calls) == 4


def test_a_closed_port_refuses_and_lies_below_the_ports_binds_to_port_0_take() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    port = closed_port()
    assert 1024 <= port < low
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_test_server_lies_above_the_ports_a_sandboxs_connects_take() -> None:
    """A sandbox's connect to a host server's port (free inside) must never be given that port as
    its own: the server is above the range a new network namespace's connects take, and a port
    another server holds is skipped."""
    held = Canary()
    try:
        assert NAMESPACE_PORTS[1] < held.port <= 65535
        taken: list[int] = []

        def start(port: int) -> int:
            taken.append(port)
            if len(taken) == 1:  # the first pick is the held server's: taken, so tried again
                with socket.socket() as clash:
                    clash.bind(("127.0.0.1", held.port))
            return port

        port = on_a_namespace_port(start)
        assert len(taken) == 2 and port == taken[1] and NAMESPACE_PORTS[1] < port <= 65535
    finally:
        held.stop()


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_new_network_namespace_takes_its_ports_from_the_range_assumed() -> None:
    """Whatever the host's range, a new network namespace (a sandbox's) starts with the kernel's."""
    read = ["cat", "/proc/sys/net/ipv4/ip_local_port_range"]
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        result = subprocess.run([*prefix, *read], capture_output=True, text=True, timeout=10)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr
    assert tuple(int(x) for x in result.stdout.split()) == NAMESPACE_PORTS


def test_a_restartable_port_lies_below_the_closed_ports_and_the_local_ports() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    port = restartable_port()
    assert low - 20_000 <= port < low - 10_000


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_an_otlp_receiver_comes_back_on_its_port_and_never_shares_it(kind: str) -> None:
    """A receiver holds its port alone (gRPC without SO_REUSEPORT: a second receiver on it fails
    rather than taking half the exports), and starts again on the same port once stopped."""
    from tests.otlp_receiver import GrpcReceiver, HttpReceiver

    make = GrpcReceiver if kind == "grpc" else HttpReceiver
    first, second = make(), make()
    first.start()
    try:
        port = first.port
        assert (
            1024
            <= port
            < int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        )
        second.port = port
        with pytest.raises((OSError, RuntimeError)):
            second.start()
        first.restart()
        assert first.port == port
    finally:
        first.stop()
        second.stop()
