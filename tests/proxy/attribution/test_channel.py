"""The context channel: host-side callers change a sandbox's context; anyone else is refused."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.attribution import channel as channel_module
from proxy.attribution.channel import ChannelError, ContextChannel, send, socket_path
from proxy.attribution.stamp import SandboxFacts


def _with_channel(tmp_path: Path, calls: list[tuple[dict[str, str], list[str]]]) -> list[object]:
    facts = SandboxFacts(0, "root", {"task": "T-1"})
    path = socket_path(tmp_path, "sbx-1")
    results: list[object] = []

    async def main() -> None:
        channel = ContextChannel(path, facts)
        await channel.start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        try:
            for updates, unset in calls:
                try:
                    results.append(await asyncio.to_thread(send, path, updates, unset))
                except ChannelError as exc:
                    results.append(exc)
        finally:
            await channel.close()
        results.append(dict(facts.context))

    asyncio.run(main())
    assert not path.exists()
    return results


def test_the_host_sets_and_unsets_keys(tmp_path: Path) -> None:
    results = _with_channel(tmp_path, [({"tool": "call-2"}, []), ({"tool": ""}, ["task"])])
    assert results == [{"task": "T-1", "tool": "call-2"}, {}, {}]


def test_bad_values_are_refused_and_change_nothing(tmp_path: Path) -> None:
    results = _with_channel(tmp_path, [({"bad key": "x"}, []), ({"k": "line\nbreak"}, [])])
    assert all(isinstance(r, ChannelError) for r in results[:2])
    assert results[-1] == {"task": "T-1"}


def test_a_caller_in_another_network_namespace_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandboxed process runs as the same uid: its network namespace is what gives it away."""
    monkeypatch.setattr(channel_module, "peer_netns", lambda sock: 1)
    (refused, context) = _with_channel(tmp_path, [({"task": "evil"}, [])])
    assert isinstance(refused, ChannelError) and "outside the sandbox" in str(refused)
    assert context == {"task": "T-1"}


def test_no_gate_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match="cannot reach the sandbox's gate"):
        send(socket_path(tmp_path, "sbx-none"), {"a": "b"}, [])


def test_a_second_gate_with_the_same_id_leaves_the_first_ones_channel(tmp_path: Path) -> None:
    path = socket_path(tmp_path, "sbx-1")
    first, second = SandboxFacts(0, None, {"n": "1"}), SandboxFacts(0, None, {"n": "2"})

    async def main() -> object:
        one, two = ContextChannel(path, first), ContextChannel(path, second)
        assert await one.start()
        assert not await two.start()
        await two.close()  # closes nothing of the first's
        answer = await asyncio.to_thread(send, path, {"k": "v"}, [])
        await one.close()
        return answer

    assert asyncio.run(main()) == {"n": "1", "k": "v"}


_CONNECT_AND_PASS_ON = """
import socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"x"], [conn.fileno()])
"""


def test_a_caller_that_passed_its_connection_on_and_exited_is_refused_though_its_pid_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host process connects, hands the connection to a sandboxed process and exits; by the time
    the request arrives its pid may belong to another process in the gate's namespace. The caller
    is checked through its pidfd (the process that connected), never through a pid looked up
    again, so that reuse (simulated here: its /proc entry points at ours) does not let it in."""
    if not _peer_pidfd_supported():
        pytest.skip("SO_PEERPIDFD needs Linux 6.5")
    facts = SandboxFacts(0, "root", {"task": "T-1"})
    path = socket_path(tmp_path, "sbx-1")
    gone: list[int] = []
    real_stat, real_readlink = os.stat, os.readlink

    def reused(target: Any) -> Any:
        text = os.fsdecode(target) if isinstance(target, str | bytes) else target
        for pid in gone:
            if isinstance(text, str) and text.startswith(f"/proc/{pid}/"):
                return "/proc/self/" + text[len(f"/proc/{pid}/") :]
        return target

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(reused(p), *a, **k))
    monkeypatch.setattr(os, "readlink", lambda p, *a, **k: real_readlink(reused(p), *a, **k))

    def handed_over() -> socket.socket:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            child = subprocess.Popen(
                [sys.executable, "-c", _CONNECT_AND_PASS_ON, str(path), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
            assert child.wait(30) == 0
        gone.append(child.pid)
        return socket.socket(fileno=fds[0])

    def ask(sock: socket.socket) -> bytes:
        with sock:
            sock.settimeout(10)
            sock.sendall(b'{"version": 1, "set": {"task": "evil"}}\n')
            return sock.recv(4096)

    async def main() -> bytes:
        channel = ContextChannel(path, facts)
        await channel.start()
        try:
            sock = await asyncio.to_thread(handed_over)
            return await asyncio.to_thread(ask, sock)
        finally:
            await channel.close()

    answer = json.loads(asyncio.run(main()))
    assert answer["ok"] is False, answer
    assert facts.context == {"task": "T-1"}


def _peer_pidfd_supported() -> bool:
    one, two = socket.socketpair()
    with one, two:
        try:
            os.close(one.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERPIDFD", 77)))
        except OSError:
            return False
    return True
