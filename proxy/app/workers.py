"""``egress serve --workers N``: N gate processes accepting on one address.

mitmproxy runs one event loop, so one process uses at most one core. The supervisor binds N listening
sockets to the same address with ``SO_REUSEPORT`` (the kernel spreads new connections over them) and
forks one worker per socket before any thread or event loop exists. It keeps its own copy of every
socket: a worker that dies is forked again on the same socket, and connections the kernel queued for
it meanwhile wait in that socket's backlog instead of being refused.

Every worker loads the same policy file and enforces it alone. SIGHUP is checked by the supervisor
first (a policy that does not load is reported once and every worker keeps the one in force), then
forwarded to every worker, each of which reloads and logs the version it now enforces. Limits that
protect the gate are not multiplied by N: the per-client connection cap is divided between workers.
Each worker writes its own audit journal (a hash chain has one writer), named ``FILE.wI``; decision
lines go to the one decision log (one ``write`` per line, opened for appending); metrics are served
on consecutive ports, one per worker.

Only Linux and other systems with ``SO_REUSEPORT`` load balancing are supported; elsewhere
``--workers`` above 1 is refused at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("egress")

CRASH_WINDOW = 10.0  # a worker that exits sooner than this after its start counts as crashing
MAX_CRASHES = 5  # consecutive quick exits of one worker before the whole gate stops
READY_TIMEOUT = 120.0


def reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address; port 0 picks one port for all of them."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers above 1 needs SO_REUSEPORT, which this system lacks")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            # proto spelled out: asyncio sets TCP_NODELAY on accepted sockets only when it is TCP,
            # and with 0 every small response waited out delayed ACKs (~40 ms per request)
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(1024)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


def worker_file(path: str | None, index: int) -> str | None:
    """The per-worker name of a file only one process may write (``audit.jsonl`` -> ``audit.jsonl.w1``)."""
    if not path or path == os.devnull:
        return path
    return f"{path}.w{index}"


def worker_metrics(spec: str, index: int) -> str:
    """Consecutive metrics ports, one per worker (port 0 stays 0: each picks its own)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) == 0:
        return spec
    return f"{host}:{int(port) + index}"


def per_worker_cap(cap: int, workers: int) -> int:
    """The per-client cap each worker enforces, so that all of them together never exceed ``cap``."""
    return max(1, cap // workers)


@dataclass
class _Worker:
    index: int
    sock: socket.socket
    pid: int = 0
    started: float = 0.0
    crashes: int = 0


# A worker body: (index, its listening socket, fd to write one byte to once ready) -> exit status.
WorkerMain = Callable[[int, socket.socket, int], int]
Check = Callable[[], bool]  # SIGHUP: True when the policy loads, so the workers should reload


class Supervisor:
    def __init__(
        self,
        sockets: list[socket.socket],
        body: WorkerMain,
        check_reload: Check,
        *,
        drain: float = 0.0,
    ) -> None:
        self.workers = [_Worker(i, s) for i, s in enumerate(sockets)]
        self.body = body
        self.check_reload = check_reload
        self.drain = drain  # each worker drains this long on SIGTERM; killed only well after
        self._signals = {signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}

    def run(self, on_ready: Callable[[], None]) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        try:
            ready_r, ready_w = os.pipe()
            try:
                for worker in self.workers:
                    self._fork(worker, ready_w)
                if not self._await_ready(ready_r, len(self.workers)):
                    self._stop_all()
                    return 2
            finally:
                os.close(ready_r)
                os.close(ready_w)
            on_ready()
            return self._supervise()
        finally:
            self._stop_all()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _fork(self, worker: _Worker, ready_w: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                for sig in self._signals:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for other in self.workers:
                    if other is not worker:
                        other.sock.close()
                code = self.body(worker.index, worker.sock, ready_w)
            except BaseException:
                log.exception("worker %d failed", worker.index)
            finally:
                logging.shutdown()
                os._exit(code)
        worker.pid = pid
        worker.started = time.monotonic()

    def _await_ready(self, ready_r: int, count: int) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        got = 0
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("the workers did not start within %.0f s", READY_TIMEOUT)
                return False
            if self._reap(restart=False):
                log.error("a worker stopped during start-up; see the log above")
                return False
            readable, _, _ = select.select([ready_r], [], [], min(left, 0.2))
            if readable:
                got += len(os.read(ready_r, count - got))
        return True

    def _supervise(self) -> int:
        while True:
            info = signal.sigtimedwait(self._signals, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.warning("shutting down %d workers", len(self.workers))
                return 0
            if info is not None and info.si_signo == signal.SIGHUP:
                if self.check_reload():
                    for worker in self.workers:
                        _kill(worker.pid, signal.SIGHUP)
                continue
            if self._reap(restart=True):
                return 1

    def _reap(self, restart: bool) -> bool:
        """Reap exited workers and fork them again; True when one keeps crashing (or at start-up,
        when any exited)."""
        for worker in self.workers:
            if not worker.pid:
                continue
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
            if pid == 0:
                continue
            worker.pid = 0
            code = os.waitstatus_to_exitcode(status)
            if not restart:
                return True
            quick = time.monotonic() - worker.started < CRASH_WINDOW
            worker.crashes = worker.crashes + 1 if quick else 0
            if worker.crashes >= MAX_CRASHES:
                log.error(
                    "worker %d exited %d times in a row within %.0f s of starting; stopping the gate",
                    worker.index,
                    worker.crashes,
                    CRASH_WINDOW,
                )
                return True
            log.error(
                "worker %d (pid %d) exited with %s; starting it again", worker.index, pid, code
            )
            ready_r, ready_w = os.pipe()
            os.close(ready_r)  # nobody waits: its backlog holds connections meanwhile
            try:
                self._fork(worker, ready_w)
            finally:
                os.close(ready_w)
        return False

    def _stop_all(self) -> None:
        for worker in self.workers:
            if worker.pid:
                _kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain + 15
        for worker in self.workers:
            while worker.pid:
                pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                if pid:
                    worker.pid = 0
                elif time.monotonic() > deadline:
                    _kill(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)
                    worker.pid = 0
                else:
                    time.sleep(0.02)
        for worker in self.workers:
            worker.sock.close()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
