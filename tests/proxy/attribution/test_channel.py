"""The context channel: host-side callers change a sandbox's context; anyone else is refused."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

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
    real = channel_module._netns
    monkeypatch.setattr(
        channel_module, "_netns", lambda pid: real(pid) if pid == "self" else "net:[1]"
    )
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
