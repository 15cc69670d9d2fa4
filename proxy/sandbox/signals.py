"""Signals meant for the command: while it runs, what reaches ``egress run`` is passed on to it."""

from __future__ import annotations

import contextlib
import signal

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def forwarding_signals(send: Callable[[int], object]) -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM, SIGHUP and SIGQUIT go to ``send`` instead of stopping us;
    the previous handlers come back after it. Enter it before the command starts: a signal right
    after it starts must not kill only us.

    One mechanism for every mode, plain ``signal.signal``: it also serves an asyncio loop in the main
    thread (PEP 475 retries the interrupted wait after the handler ran)."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # the command is already gone: nothing to forward to
            send(sig)

    previous = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
    try:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
