"""`egress run` with a journal and OTLP: the export process starts with the run's first recorded
decision (real curl through the real gate, a real receiver), every decision arrives once, and a run
that connects nowhere starts no exporter at all."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.evidence.otel.cursor import cursor_path, read_cursor
from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.otlp_receiver import HttpReceiver, Received
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def _run_exporting(
    world: tuple[Path, FakeDns, Upstream],
    journal: Path,
    command: list[str],
    *,
    cwd: Path = REPO,
    expect: int = 0,
) -> list[Received]:
    """`egress run` with ``journal`` and OTLP/HTTP to a real receiver: every record the receiver
    holds 0.3 s after the run (and after ``expect`` arrived), so a late or repeated one is seen."""
    policy, dns, _ = world
    receiver = HttpReceiver()
    receiver.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy),
             "--nameserver", dns.nameserver, "--journal", str(journal),
             "--otlp-endpoint", receiver.endpoint, "--otlp-protocol", "http", "--quiet", "--",
             *command],
            cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=EGRESS_WAIT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        if expect:
            receiver.wait_for(expect, timeout=10)
        time.sleep(0.3)
        return receiver.records
    finally:
        receiver.stop()


def test_a_run_that_connects_nowhere_starts_no_exporter(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    journal = tmp_path / "audit.jsonl"
    assert _run_exporting(world, journal, ["true"]) == []
    assert read_cursor(cursor_path(journal)) is None  # the export process writes it when it ends


def test_every_decision_of_a_run_reaches_the_collector_once(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    port = world[2].port
    journal = tmp_path / "audit.jsonl"
    url = f"http://allowed.test:{port}"
    command = (
        f"curl -sS -m 10 -o /dev/null {url}/a; curl -sS -m 10 -o /dev/null {url}/b;"
        f" curl -sS -m 10 -o /dev/null http://evil.test:{port}/c || true"
    )
    records = _run_exporting(world, journal, ["sh", "-c", command], expect=1)
    lines = journal.read_text().splitlines()
    seqs = [r.attributes["egress.journal.seq"] for r in records]
    assert sorted(seqs) == list(range(1, len(lines) + 1))  # everything journaled, each once
    paths = {
        r.attributes.get("url.path"): r.attributes["egress.decision"]
        for r in records
        if r.event_name == "egress.decision"
    }
    assert paths.get("/a") == paths.get("/b") == "allow"
    assert read_cursor(cursor_path(journal)) == len(lines)


def test_the_command_cannot_plant_code_in_the_export_process(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The export process starts while the command runs (with its first recorded decision), in the
    host's namespaces: a module the command writes into the directory the run started in must not
    shadow one that process imports (it runs with ``-P`` in ``/``)."""
    workdir = tmp_path / "repo"
    workdir.mkdir()
    marker = tmp_path / "planted-code-ran"
    (workdir / "plant.txt").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    modules = "json argparse logging threading contextlib"
    command = (
        f"for m in {modules}; do cp plant.txt $m.py; done;"
        f" curl -sS -m 10 -o /dev/null http://allowed.test:{world[2].port}/a"
    )
    records = _run_exporting(
        world, tmp_path / "audit.jsonl", ["sh", "-c", command], cwd=workdir, expect=1
    )
    assert (workdir / "json.py").exists()  # the command did plant it
    assert records  # the export process ran, and sent the run's decision
    assert not marker.exists()
