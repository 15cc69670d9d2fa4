"""``make bench`` in its quickest mode (``BENCH_QUICK=1``): every row and every gate case is produced,
nothing failed. A smoke run of the harness; it asserts no timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import clean_env

ROOT = Path(__file__).resolve().parents[2]

ROWS = (
    "| no proxy (the limit) |",
    "| `egress serve` (HTTPS_PROXY) |",
    "| `egress serve --workers 2` |",
    "| `egress run` (private gate) |",
    "| `egress run --gate-socket` (running gate) |",
    "| `egress run --reuse-gate` (per-user gate) |",
)
GATE_CASES = (
    "| full telemetry (journal + OTLP + metrics) vs off",
    "| memory per idle passthrough tunnel",
    "| decision at 10 rules",
    "| decision at 10,000 rules",
    "| decision at 100,000 rules",
    "| decision not kept, at 100,000 rules",
    "| plain loop of a decision's length, beside them (machine)",
    "| policy reload at 1,000 rules: load + validate + diff",
    "| policy reload at 1,000 rules: swap",
    "| policy reload at 1,000 rules: freeing the old policy",
)


@pytest.mark.timeout(600)
def test_the_quick_bench_produces_every_row() -> None:
    env = clean_env(BENCH_QUICK="1")
    env.pop("BENCH_PEERS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in (*ROWS, *GATE_CASES):
        assert sum(line.startswith(row) for line in out.splitlines()) == 1, row
    rows = [line for line in out.splitlines() if line.startswith(ROWS)]
    assert all("n/a" not in line for line in rows)
    header = next(line for line in out.splitlines() if line.startswith("| same work"))
    column = [c.strip() for c in header.split("|")].index("inspected bulk MB/s")
    for line in rows:
        # measured through an inspecting gate (not the per-user gate's row: the bench's inspected
        # policy needs a hosts file and an upstream CA, options a run with a gate of its own takes)
        if "egress" in line and "--workers" not in line and "--reuse-gate" not in line:
            assert float([c.strip() for c in line.split("|")][column].replace(",", "")) > 0, line
    assert "FAILED" not in out
    if os.geteuid() == 0:  # the idle-tunnel case raises its own fd limit; it did not fall short
        assert "| memory per idle passthrough tunnel, 200 held |" in out
