"""A module imported off the loop once, whoever asks first; a failed import fails its callers and is
tried again by the next."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.runtime.lazy import LazyImport

ROOT = Path(__file__).resolve().parents[3]


Write = Callable[[str, str], None]


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Write]:
    """Writes a probe module importable by name (again, as a fresh module); every probe written
    is forgotten by the interpreter after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: set[str] = set()

    def write_module(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        sys.modules.pop(name, None)
        names.add(name)

    yield write_module
    for name in names:
        sys.modules.pop(name, None)


def test_concurrent_callers_share_one_import_in_another_thread(write: Write) -> None:
    name = "egress_lazy_probe_shared"
    write(
        name,
        """
        import threading, time
        IMPORTED_IN = threading.current_thread().name
        time.sleep(0.2)  # long enough for every caller to arrive while it runs
        """,
    )
    lazy = LazyImport(name)

    async def main() -> list[object]:
        return list(await asyncio.gather(*(lazy.load() for _ in range(5))))

    modules = asyncio.run(main())
    assert all(m is modules[0] for m in modules)
    assert modules[0].IMPORTED_IN != "MainThread"


def test_a_failed_import_raises_and_the_next_load_tries_again(write: Write) -> None:
    name = "egress_lazy_probe_retry"
    write(name, "raise RuntimeError('not yet')\n")
    lazy = LazyImport(name)

    async def main() -> object:
        with pytest.raises(RuntimeError, match="not yet"):
            await lazy.load()
        write(name, "VALUE = 7\n")
        return await lazy.load()

    assert asyncio.run(main()).VALUE == 7


def test_a_cancelled_caller_does_not_cancel_the_import_others_wait_for(write: Write) -> None:
    name = "egress_lazy_probe_cancel"
    write(name, "import time\ntime.sleep(0.2)\nVALUE = 1\n")
    lazy = LazyImport(name)

    async def main() -> object:
        first = asyncio.ensure_future(lazy.load())
        second = asyncio.ensure_future(lazy.load())
        await asyncio.sleep(0.05)
        first.cancel()
        return await second

    assert asyncio.run(main()).VALUE == 1


def test_settled_waits_for_a_warm_up_to_end_imported_or_failed(write: Write) -> None:
    """What `egress serve` waits for before taking its start out of the collector's generations:
    the warm-up's end, without raising when the import failed (lookups then fail closed)."""
    slow, broken = "egress_lazy_probe_settled", "egress_lazy_probe_settled_broken"
    write(slow, "import time\ntime.sleep(0.3)\nVALUE = 3\n")
    write(broken, "import time\ntime.sleep(0.1)\nraise RuntimeError('broken')\n")
    imported, failed, idle = LazyImport(slow), LazyImport(broken), LazyImport("json")

    async def main() -> None:
        imported.warm()
        failed.warm()
        await imported.settled()
        assert slow in sys.modules and sys.modules[slow].VALUE == 3
        await failed.settled()  # no exception
        assert failed._loading is not None and failed._loading.done()
        await idle.settled()  # nothing begun: nothing to wait for
        with pytest.raises(RuntimeError, match="broken"):
            await failed.load()  # the failure is still the next caller's

    asyncio.run(main())


def test_settled_does_not_wait_for_a_warm_up_begun_on_another_loop(write: Write) -> None:
    """A warm-up left behind by a loop that has ended (its task cancelled mid-import) is not this
    loop's to wait for: nothing raises, nothing hangs."""
    name = "egress_lazy_probe_settled_other_loop"
    write(name, "import time\ntime.sleep(0.3)\nVALUE = 5\n")
    lazy = LazyImport(name)

    async def begin() -> None:
        lazy.warm()  # the loop ends before the import does

    async def later() -> object:
        await lazy.settled()
        return await lazy.load()  # a new import on this loop

    asyncio.run(begin())
    assert asyncio.run(later()).VALUE == 5


def test_starting_a_gate_imports_no_dnspython() -> None:
    """A private gate's start does not wait for dnspython: the modules it imports to start (the
    gate, its resolver and DNS gate) leave it to the first name asked."""
    probe = textwrap.dedent(
        """
        import sys
        import addons.master, proxy.app.private_gate
        import proxy.destinations.dnsgate, proxy.destinations.resolver
        proxy.destinations.resolver.Resolver(["127.0.0.1:53"])
        loaded = sorted(m for m in sys.modules if m == "dns" or m.startswith("dns."))
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_loop_closed_during_the_import_leaves_no_thread_error_and_a_new_loop_loads(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gate that stops while its warm-up import runs: the import thread finishes after the loop
    closed, quietly (no "Exception in thread" on the way out), and a later loop loads the module."""
    import threading
    import types

    name = "egress_lazy_probe_closed"
    release = threading.Event()
    holder = types.ModuleType("egress_lazy_probe_release")
    holder.release = release  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "egress_lazy_probe_release", holder)
    write(
        name,
        """
        import egress_lazy_probe_release
        egress_lazy_probe_release.release.wait(30)
        VALUE = 3
        """,
    )
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    lazy = LazyImport(name)
    before = set(threading.enumerate())

    async def warm_and_stop() -> None:
        lazy.warm()
        await asyncio.sleep(0)

    try:
        asyncio.run(warm_and_stop())  # the loop closes with the import still running
        (importing,) = set(threading.enumerate()) - before
        release.set()
        importing.join(30)
        assert not importing.is_alive()
        assert errors == []

        async def load() -> object:
            return await lazy.load()

        assert asyncio.run(load()).VALUE == 3  # type: ignore[attr-defined]
    finally:
        release.set()
