"""What starting a sandbox costs: a launch that hands its sandbox to a running gate loads no gate code.

Every ``egress run`` pays for each module it imports (dataclasses alone is ~10 ms here, the policy
loader with YAML, dnspython or mitmproxy far more), so the hand-off path is held to the modules it
needs. Measured by the modules a real launch has loaded, never by time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.app.cli import build_parser
from proxy.app.sandbox_cli import run_parser
from proxy.sandbox.handoff import HandoffServer, gate_attacher
from tests.harness import RunningGate, clean_env

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[3]
WAIT = 30.0

# Modules a hand-off launch must not load: the policy, evidence and gate stacks, the standard library
# modules that only they need, and those the launcher does without (docs/startup.md).
GATE_ONLY = (
    "yaml",
    "dns",
    "mitmproxy",
    "addons",
    "cryptography",
    "psutil",
    "uvloop",
    "asyncio",
    "ssl",
    "logging",
    "dataclasses",
    "inspect",
    "subprocess",
    "tempfile",
    "typing",
    "pathlib",
    "threading",
    "argparse",  # an everyday command line is read without it (proxy/app/run_args.py)
    "gettext",
    "locale",
    "shutil",
    "bz2",
    "lzma",
    "proxy.policy",
    "proxy.evidence.emit",
    "proxy.evidence.record",
    "proxy.destinations",
    "proxy.core.decision",
    "proxy.app.ca",
    "proxy.app.private_gate",
    "proxy.sandbox.private_gate",
    "proxy.sandbox.summary",
    "proxy.sandbox.connect",
    "proxy.app.approvals_cli",
    "proxy.app.learn_cli",
)
# ... and a hand-off to a named gate socket does not load the per-user gate's client either.
HANDOFF_ONLY = ("proxy.sandbox.usergate",)

# Runs `egress run` in-process (main() with arguments returns instead of leaving) and prints the
# exit status and every module then loaded.
LAUNCH = """
import json, sys
from proxy.app.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.fixture
def gate_socket(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    tmp_path: Path,
) -> Iterator[Path]:
    gate = start_gate(write_policy("version: 1\nrules: []\n"))
    assert gate._loop is not None
    path = tmp_path / "gate.sock"
    server = HandoffServer(str(path), gate_attacher(gate.gate))
    asyncio.run_coroutine_threadsafe(server.start(), gate._loop).result(WAIT)
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), gate._loop).result(WAIT)


def _loaded(name: str, modules: list[str]) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_a_hand_off_launch_loads_no_gate_code(gate_socket: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", LAUNCH, "run", "--quiet", "--gate-socket", str(gate_socket),
         "--", "sh", "-c", "exit 3"],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["code"] == 3  # the command really ran in a sandbox the gate served
    modules = result["modules"]
    assert "proxy.sandbox.handoff" in modules and "proxy.sandbox.launcher" in modules
    assert [name for name in (*GATE_ONLY, *HANDOFF_ONLY) if _loaded(name, modules)] == []


def test_a_run_the_per_user_gate_serves_loads_no_gate_code(
    write_policy: Callable[[str], Path],
) -> None:
    """--reuse-gate, once the gate runs: the launcher loads what a hand-off loads, no more (the
    first run, which starts the gate, may load subprocess)."""
    from tests.usergate_support import world

    policy = write_policy("version: 1\nrules: []\n")
    for made in world():
        first = made.run("--quiet", "--reuse-gate", "--policy", str(policy), "--", "true")
        assert first.returncode == 0, first.stderr
        out = subprocess.run(
            [sys.executable, "-c", LAUNCH, "run", "--quiet", "--reuse-gate", "--policy", str(policy),
             "--", "sh", "-c", "exit 3"],
            cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=made.env(),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.splitlines()[-1])
        assert result["code"] == 3
        modules = result["modules"]
        assert "proxy.sandbox.usergate" in modules
        assert [name for name in GATE_ONLY if _loaded(name, modules)] == []


def test_a_hand_off_launch_ends_with_the_commands_status_and_its_summary(
    gate_socket: Path,
) -> None:
    """The launcher leaves without the interpreter's teardown: what it wrote still arrives."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--gate-socket", str(gate_socket),
         "--", "sh", "-c", "echo inside; exit 7"],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(),
    )  # fmt: skip
    assert out.returncode == 7
    assert out.stdout == "inside\n"
    assert "served by the gate at" in out.stderr


def _options(parser: argparse.ArgumentParser) -> list[tuple[object, ...]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    return sorted(
        (tuple(a.option_strings), a.dest, repr(a.default), a.nargs, a.type, a.choices)  # type: ignore[misc]
        for a in run._actions
    )


def test_egress_run_parses_exactly_as_the_full_command_line_does() -> None:
    """`egress run` builds only its own parser; it must accept the same options as `egress`."""
    assert _options(run_parser()) == _options(build_parser())


def test_a_private_run_leaves_only_after_its_decision_log_and_summary_are_written(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A private gate's launcher also skips the interpreter's teardown: every decision it made is
    in the decision log and the summary is printed before the process ends."""
    policy = write_policy("version: 1\nrules: []\n")
    log = tmp_path / "decisions.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--decision-log",
         str(log), "--", "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
         "http://refused.test/"],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(),
    )  # fmt: skip
    assert out.stdout == "403", out.stderr
    decisions = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["host"] for d in decisions if d["decision"] == "deny"] == ["refused.test"]
    assert "1 refused" in out.stderr


def test_a_private_run_makes_its_scratch_files_without_tempfile(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A private gate proves its state directory writable, creates its CA and, as its policy reads
    requests, writes the sandbox a CA bundle: with proxy.runtime.scratch, so tempfile, shutil and
    their compression modules stay unloaded (docs/startup.md)."""
    policy = write_policy(
        "version: 1\nrules:\n  - name: read\n    hosts: [a.test]\n    methods: [GET]\n"
    )
    seen = tmp_path / "seen.pem"  # the state directory is hidden from the sandbox: copied out
    inside = f'cp "$SSL_CERT_FILE" {seen} && exit 3'
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", LAUNCH, "run", "--quiet", "--state-dir", str(tmp_path / "state"),
         "--policy", str(policy), "--", "sh", "-c", inside],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(TMPDIR=str(scratch)),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["code"] == 3  # the bundle was there inside the sandbox
    gate_ca = (tmp_path / "state" / "mitmproxy" / "mitmproxy-ca-cert.pem").read_text().strip()
    assert gate_ca in seen.read_text()
    assert list(scratch.iterdir()) == []  # and removed after the run
    modules = result["modules"]
    assert "proxy.app.private_gate" in modules and "proxy.runtime.scratch" in modules
    assert [name for name in ("tempfile", "shutil", "bz2", "lzma") if _loaded(name, modules)] == []


def test_a_run_refused_after_its_bundle_was_written_removes_it(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """Credentials that cannot be loaded stop the run after the sandbox's CA bundle was written:
    the bundle's directory goes too."""
    policy = write_policy(
        "version: 1\nrules:\n  - name: read\n    hosts: [a.test]\n    methods: [GET]\n"
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--state-dir",
         str(tmp_path / "state"), "--policy", str(policy), "--credentials",
         str(tmp_path / "missing.yaml"), "--", "true"],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(TMPDIR=str(scratch)),
    )  # fmt: skip
    assert out.returncode != 0 and "the command was not run" in out.stderr, out.stderr
    assert list(scratch.iterdir()) == []
