"""The gate's event loop: uvloop when installed (with mitmproxy's eager task factory working on it),
asyncio's own when asked for or when uvloop is missing, and an error for a value nobody meant."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[3]
POLICY = "version: 1\nrules:\n  - name: pkgs\n    hosts: [pkgs.test]\n"

# Reports how many objects gate_started() took out of the collector's generations, and how many
# a full collection still walks, when the program under test calls it.
REPORT = (
    "import gc, sys\n"
    "import proxy.runtime.loop as loop\n"
    "started = loop.gate_started\n"
    "def report():\n"
    "    started()\n"
    "    print('frozen', gc.get_freeze_count(), len(gc.get_objects()), file=sys.stderr, flush=True)\n"
    "loop.gate_started = report\n"
)


def _frozen(stderr: str) -> tuple[int, int]:
    line = next(line for line in stderr.splitlines() if line.startswith("frozen "))
    frozen, walked = map(int, line.split()[1:])
    return frozen, walked


def test_gate_started_leaves_full_collections_only_what_comes_after(tmp_path: Path) -> None:
    """A 10,000-rule policy is ~85,000 objects, each walked by every full collection (~26 ms of the
    loop's time here, ~250 ms at 100,000 rules) until the gate takes them out."""
    script = (
        "import gc, sys\n"
        "from bench.decisions import build_policy\n"
        "from proxy.runtime.loop import gate_started\n"
        "policy = build_policy(10_000)\n"
        "policy.index\n"
        "before = len(gc.get_objects())\n"
        "gate_started()\n"
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    before, frozen, after = map(int, out.stdout.split())
    assert before > 50_000
    assert frozen >= before
    assert after < 100


@pytest.mark.netns
def test_a_private_gate_takes_its_start_up_out_of_full_collections(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    # The command waits (at most 30 s) until the gate serves: one that ended first would get none.
    served = tmp_path / "served"
    wait = f"i=0; while [ ! -e {served} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    assert "flush=True)\n" in REPORT  # where the hook also marks the gate as serving
    script = REPORT.replace("flush=True)\n", f"flush=True); open({str(served)!r}, 'w')\n") + (
        "from proxy.app.cli import main\n"
        f"sys.exit(main(['run', '--quiet', '--policy', {str(policy)!r}, '--', 'sh', '-c', {wait!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    frozen, walked = _frozen(out.stderr)
    assert frozen > 20_000  # the modules, the policy and the gate
    assert walked < 1_000


def test_egress_serve_takes_its_start_up_out_of_full_collections(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    argv = ["serve", "--listen", "127.0.0.1:0", "--no-metrics", "--policy", str(policy)]
    script = REPORT + f"from proxy.app.cli import main\nsys.exit(main({argv!r}))\n"
    frozen, walked = _frozen(_stderr_until(script, "gate ready"))
    assert frozen > 20_000
    assert walked < 1_000


def _stderr_until(script: str, marker: str) -> str:
    """A gate run by ``script``: its stderr up to the first line holding ``marker``, then it is
    stopped (SIGTERM). A gate that never writes it is killed after a minute, which ends the read."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                break
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    return "".join(lines)


def test_a_per_user_gate_takes_its_background_import_out_at_a_quiet_moment(tmp_path: Path) -> None:
    """Its readiness does not wait for dnspython's import (the first run waits for it): the
    modules leave the generations at the first look that finds the import ended and nobody there."""
    directory = tmp_path / "gate"
    directory.mkdir(mode=0o700)
    script = REPORT + (
        "settle = loop.gate_settled\n"
        "def settled():\n"
        "    imported, walked = 'dns.asyncresolver' in sys.modules, len(gc.get_objects())\n"
        "    settle()\n"
        "    print('settled', gc.get_freeze_count(), len(gc.get_objects()), walked, imported,\n"
        "          file=sys.stderr, flush=True)\n"
        "loop.gate_settled = settled\n"
        "from proxy.app.user_gate import main\n"
        f"sys.exit(main(['--dir', {str(directory)!r}, '--idle-exit', '300']))\n"
    )
    text = _stderr_until(script, "settled ")
    assert "per-user gate ready" in text, text
    frozen_at_ready, _ = _frozen(text)
    line = next(line for line in text.splitlines() if line.startswith("settled "))
    frozen, walked, walked_before, imported = line.split()[1:]
    assert imported == "True"  # settled after the import ended, not before
    assert frozen_at_ready > 20_000
    # dnspython came after the first freeze (its import ends after readiness): walked by every
    # full collection until the settle, none after it
    assert int(walked_before) > 4_000 and int(frozen) - frozen_at_ready > 4_000
    assert int(walked) < 1_000
