"""The gate's side of the export process: start it, restart it if it dies, mirror its counters.

With a journal, OTLP export runs in a separate, low-priority process (``python -m proxy.evidence.otel``)
that follows the journal file. A collector outage is then buffered *on disk* in the journal itself, and
the encoding runs on another core instead of competing with the proxy's event loop for the GIL: the gate
pays only the journal write. The process reports its totals as JSON lines on stdout, which become the
gate's Prometheus counters, and stops (flushing, bounded) when its stdin closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.evidence.journal.writer import Journal
from proxy.evidence.otel.cursor import cursor_path, read_cursor, write_cursor
from proxy.evidence.otel.drops import OTLP_DROP_REASONS
from proxy.evidence.otel.endpoint import Protocol
from proxy.evidence.otel.settings import QueueLimits

if TYPE_CHECKING:
    from proxy.evidence.metrics import Metrics

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 15.0
LAUNCH_RETRY = 5.0  # seconds before an on-demand process that could not be started is tried again


class ExportProcess:
    """Parent side of the export process: starts it, restarts it if it dies, mirrors its counters
    into the gate's metrics, and knows which journal seq the collector has."""

    def __init__(
        self,
        journal: Journal,
        target: tuple[str, Protocol],
        *,
        timeout: float | None,
        version: str,
        metrics: Metrics | None,
        limits: QueueLimits,
        on_demand: bool = False,
    ) -> None:
        """``on_demand``: start the process only once the journal holds something to export
        (:meth:`wanted`), without waiting for it; a private gate's run that makes no connection then
        never pays for it (a third of a second of CPU, and its start on the way to the command)."""
        self.journal = journal
        self.target = target
        self.timeout = timeout
        self.version = version
        self.metrics = metrics
        self.limits = limits
        self.cursor = cursor_path(journal.path)
        after = read_cursor(self.cursor)
        if after is None or after > journal.seq:  # first export, or a new journal: no replay
            after = journal.seq
        self.exported_seq = after
        self._last: dict[str, float] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self.on_status: Callable[[], None] = _nothing_to_do
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._retry_at = 0.0
        if on_demand and self.backlog() == 0:
            return
        self._launch()
        if on_demand:
            return
        # Start-up (imports, connecting) happens before the gate says it is ready, not under load.
        if not self.ready.wait(STARTUP_TIMEOUT):
            log.error("OTLP export process not ready after %.0f s; events wait in the journal",
                      STARTUP_TIMEOUT)  # fmt: skip

    def wanted(self) -> None:
        """The journal has (or is about to have) a record to export: make sure the process runs.
        Cheap once started; called for every journaled record of an on-demand process. A process
        that cannot be started (no memory, no descriptors) is tried again later: the records wait
        in the journal, and the caller (the gate's event loop) never sees the error."""
        if self._thread is None and time.monotonic() >= self._retry_at:
            self._try_launch()

    def _try_launch(self) -> bool:
        try:
            self._launch()
        except Exception as exc:  # OSError from fork/exec, RuntimeError from a thread
            self._launch_failed(exc)
            return False
        return True

    def _launch_failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + LAUNCH_RETRY
        log.error("OTLP export process cannot be started (%s); events wait in the journal, "
                  "trying again in %.0f s", exc, LAUNCH_RETRY)  # fmt: skip
        if read_cursor(self.cursor) is None:
            # Without a cursor the next gate would take the journal as never exported and start at
            # its end: say where this one stood, so its records are sent then.
            try:
                write_cursor(self.cursor, self.exported_seq)
            except OSError as error:
                log.error("OTLP export cursor %s cannot be written: %s", self.cursor, error)

    def _launch(self) -> None:
        with self._starting:
            if self._thread is not None or self._stopping.is_set():
                return
            self._start_child()
            thread = threading.Thread(target=self._supervise, name="otlp-process", daemon=True)
            try:
                thread.start()
            except BaseException:
                self._end_child()  # no supervisor: no child either
                raise
            self._thread = thread

    def _end_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _start_child(self) -> None:
        cursor = read_cursor(self.cursor)
        after = self.exported_seq
        if cursor is not None and after < cursor <= self.journal.seq:  # (a cursor past the end is
            after = cursor  # another journal's: the constructor started at this one's end)
        cmd = [
            # -P, and "/" as its directory: nothing in the directory the gate was started in (a
            # repository a sandboxed command writes to) can shadow a module this process imports.
            sys.executable, "-P", "-m", "proxy.evidence.otel",
            "--journal", str(self.journal.path.absolute()),
            "--endpoint", self.target[0],
            "--protocol", self.target[1],
            "--after-seq", str(after),
            "--version", self.version,
        ]  # fmt: skip
        if self.timeout is not None:
            cmd += ["--timeout", str(self.timeout)]
        for key, value in dataclasses.asdict(self.limits).items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._last = {}
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/"
        )

    def _supervise(self) -> None:
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            for line in proc.stdout:
                try:
                    self._apply(json.loads(line))
                except (ValueError, TypeError):
                    log.error("OTLP export process said: %s", line.strip()[:200])
            proc.wait()
            if self._stopping.is_set():
                return
            log.error("OTLP export process exited (%s); restarting it in 1 s", proc.returncode)
            if self._stopping.wait(1.0):
                return
            with self._starting:
                if self._stopping.is_set():
                    return
                try:
                    self._start_child()
                except OSError as exc:
                    # Supervision ends here; the next record to export starts it again.
                    self._proc = None
                    self._thread = None
                    self._launch_failed(exc)
                    return

    def _apply(self, status: dict[str, Any]) -> None:
        self.ready.set()
        seq = status.get("exported_seq")
        if isinstance(seq, int):  # lower too: after a record the journal took back and re-sent
            self.exported_seq = seq
        if self.metrics is not None:
            m = self.metrics
            for key, counter in (
                ("exported", m.otlp_exported),
                ("failures", m.otlp_export_failures),
                ("retries", m.otlp_retries),
            ):
                self._mirror(key, status, counter.inc)
            for reason in OTLP_DROP_REASONS:
                self._mirror(f"dropped_{reason}", status, m.otlp_dropped.labels(reason=reason).inc)
        self.on_status()

    def _mirror(self, key: str, status: Mapping[str, Any], inc: Callable[[float], None]) -> None:
        value = float(status.get(key, 0))
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            inc(delta)
        self._last[key] = value

    def backlog(self) -> int:
        return max(0, self.journal.seq - self.exported_seq)

    def flush(self, timeout: float) -> bool:
        target = self.journal.seq
        if self.exported_seq < target and self._thread is None and not self._try_launch():
            return False
        deadline = time.monotonic() + timeout
        while self.exported_seq < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float) -> None:
        """The process sends what is pending (bounded), writes the cursor and exits."""
        if self.exported_seq < self.journal.seq and self._thread is None:
            self._try_launch()  # needed only now, or failed before: once more, whatever the delay
        with self._starting:
            self._stopping.set()
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(f"close {timeout:.3f}\n")
                proc.stdin.flush()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: flush (bounded by timeout) and exit
        try:
            proc.wait(timeout + 5)
        except subprocess.TimeoutExpired:
            log.error("OTLP export process did not stop; killing pid %d", proc.pid)
            proc.kill()
            proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)


def _nothing_to_do() -> None:
    pass
