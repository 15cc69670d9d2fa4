"""Starting and stopping a real ``egress serve`` process for the benchmarks (not a benchmark itself:
the leading underscore keeps ``python -m bench`` from running it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def egress_command() -> list[str]:
    return [sys.executable, "-m", "proxy.app.cli"]


def byte_compile() -> None:
    """Compile the tree once, as installing the package does (pip byte-compiles at install, and
    ``make venv`` and the image write the dataclasses' code table): with PYTHONDONTWRITEBYTECODE set,
    every `egress run` in a checkout would otherwise compile each module it imports from source, and
    the start-up rows would measure the compiler."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("proxy", "addons"):
        compileall.compile_dir(root / package, quiet=1)
    subprocess.run(
        [sys.executable, "-m", "proxy.runtime.codecache"],
        cwd=root, check=True, stdout=subprocess.DEVNULL, env=clean_env(),
    )  # fmt: skip


def clean_env() -> dict[str, str]:
    """The benchmark's own environment minus proxy and OTel settings that would change what runs."""
    return {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith("OTEL_")
    }


def start_serve(
    policy: Path, *extra: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """``egress serve`` on an ephemeral loopback port; returns the process and the proxy port."""
    proc = subprocess.Popen(
        [*egress_command(), "serve", "--policy", str(policy), "--listen", "127.0.0.1:0", *extra],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=dict(env) if env is not None else clean_env(),
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "gate ready" in line:
            # Drain stderr in the background so the gate never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(line.split("listen=", 1)[1].split()[0].rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait(5)
    raise RuntimeError("egress serve did not start")


def stop_serve(proc: subprocess.Popen[str]) -> None:
    stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Stop a process the bench started, by its PID: ``sig``, then SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
