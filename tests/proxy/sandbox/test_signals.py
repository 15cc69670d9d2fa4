"""The one signal forwarder, in a child interpreter (a signal that is not forwarded kills it, which
must not take the test run with it), and through `egress run` to a command in a real sandbox."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO

WAIT = EGRESS_WAIT


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_signals_go_to_the_command_and_the_old_handlers_come_back() -> None:
    result = run(
        """
        import os, signal
        from proxy.sandbox.signals import FORWARDED_SIGNALS, forwarding_signals

        got = []
        before = {s: signal.getsignal(s) for s in FORWARDED_SIGNALS}
        with forwarding_signals(got.append):
            for sig in FORWARDED_SIGNALS:
                os.kill(os.getpid(), sig)
        assert {s: signal.getsignal(s) for s in FORWARDED_SIGNALS} == before
        print(" ".join(signal.Signals(s).name for s in got))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"]


def test_a_command_that_is_gone_does_not_break_the_launcher() -> None:
    result = run(
        """
        import os, signal
        from proxy.sandbox.signals import forwarding_signals

        def gone(sig):
            raise ProcessLookupError(3, "No such process")

        with forwarding_signals(gone):
            os.kill(os.getpid(), signal.SIGTERM)
        print("still here")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "still here"


def test_signals_are_forwarded_while_an_asyncio_loop_waits() -> None:
    """The private gate's loop sits in epoll while the command runs; the handler must still run."""
    result = run(
        """
        import asyncio, os, signal, threading
        from proxy.sandbox.signals import forwarding_signals

        async def main():
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def send(sig):
                loop.call_soon_threadsafe(done.set_result, sig)

            with forwarding_signals(send):
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
                return await asyncio.wait_for(done, 10)

        print(signal.Signals(asyncio.run(main())).name)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SIGTERM"


@pytest.mark.netns
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("sig", "script", "code"),
    [
        (signal.SIGTERM, "trap 'echo got-term; exit 42' TERM", 42),
        (signal.SIGINT, "trap - INT", 130),
    ],
)
def test_signals_are_forwarded(
    world: tuple[Path, FakeDns, Upstream], sig: int, script: str, code: int
) -> None:
    policy, _, _ = world
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--quiet", "--",
         "sh", "-c", f"{script}; echo ready; while :; do sleep 0.05; done"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        assert proc.wait(WAIT) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
