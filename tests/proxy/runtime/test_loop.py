"""The gate's event loop: uvloop when installed (with mitmproxy's eager task factory working on it),
asyncio's own when asked for or when uvloop is missing, and an error for a value nobody meant."""

from __future__ import annotations

import asyncio
import sys

import pytest

from proxy.runtime.loop import loop_factory, run


async def _eager_tasks() -> list[str]:
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # as mitmproxy does
    order: list[str] = []

    async def child() -> None:
        order.append("child started")

    task = asyncio.get_running_loop().create_task(child())
    order.append("after create_task")
    await task
    return order


def test_uvloop_runs_mitmproxys_eager_task_factory() -> None:
    factory = loop_factory("uvloop")
    assert factory is not None
    assert asyncio.run(_eager_tasks(), loop_factory=factory) == [
        "child started",
        "after create_task",
    ]


def test_asyncio_when_asked_or_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(ImportError):
        loop_factory("uvloop")


def test_the_environment_chooses_and_nonsense_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRESS_EVENT_LOOP", "asyncio")
    assert run(_loop_name()) == "_UnixSelectorEventLoop"
    monkeypatch.setenv("EGRESS_EVENT_LOOP", "uvloop")
    assert run(_loop_name()) == "Loop"
    monkeypatch.setenv("EGRESS_EVENT_LOOP", "fast")
    with pytest.raises(ValueError, match="EGRESS_EVENT_LOOP"):
        loop_factory()


async def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__name__
