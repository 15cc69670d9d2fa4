"""A private gate's command is released before the gate has started: what it sends waits in the
listeners' queues, and a command that ends first with nothing queued is never given a gate.

Each run is driven from a fresh interpreter (the sandbox's helper is its only child) whose last
"gate module" step waits, bounded, until the sandbox has ended or the command has left a marker:
the order the tests need is then certain, however loaded the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO

pytestmark = pytest.mark.netns

WAIT_STEP = '''
"""A gate-module step that ends once the sandbox has ended (its helper, this process's only
child, is a zombie) or once the file named by EARLY_MARKER exists: at most EARLY_WAIT seconds
(10). It writes whether it saw the marker to EARLY_SEEN, if set."""
import os, time

_deadline = time.monotonic() + float(os.environ.get("EARLY_WAIT", "10"))
_seen = False
while time.monotonic() < _deadline:
    if os.path.exists(os.environ.get("EARLY_MARKER", "/nonexistent")):
        _seen = True
        break
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
    except ChildProcessError:
        break
    time.sleep(0.01)
if os.environ.get("EARLY_SEEN"):
    with open(os.environ["EARLY_SEEN"], "w") as _out:
        _out.write("seen" if _seen else "not seen")
'''

DRIVER = """
import asyncio, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from proxy.app.private_gate import start_private_gate
from proxy.sandbox.launcher import RunOptions, run

mode, policy, nameserver, log, state = sys.argv[3:8]
argv = json.loads(sys.argv[8])
started = []

async def gate(request):
    started.append(True)
    if mode == "fail":
        raise RuntimeError("the test's gate cannot start")
    if mode == "slow":  # says it is starting, then takes up to 10 s
        import os, time
        open(os.environ["EARLY_STARTING"], "w").close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    return await start_private_gate(request)

code = run(RunOptions(
    argv=argv, policy_path=policy, quiet=True, nameservers=[nameserver], decision_log=log,
    state_dir=state, gate=gate, gate_modules=("early_step",),
))
print(json.dumps({"code": code, "gate_started": len(started)}), flush=True)
"""


def driver_command(
    tmp_path: Path,
    policy: Path,
    nameserver: str,
    argv: list[str],
    *,
    mode: str = "serve",
    step: str = WAIT_STEP,
) -> list[str]:
    """The driver's command line for a run of ``argv``, its files written under ``tmp_path``
    (the decision log is ``decisions.jsonl`` there); ``step`` is its last gate-module step."""
    code = tmp_path / "driver"  # on the launcher's import path, so read-only in the sandbox
    steps = code / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    (steps / "early_step.py").write_text(step)
    driver = code / "drive.py"
    driver.write_text(DRIVER)
    return [
        sys.executable, str(driver), str(REPO), str(steps), mode, str(policy), nameserver,
        str(tmp_path / "decisions.jsonl"), str(tmp_path / "state"), json.dumps(argv),
    ]  # fmt: skip


def drive(
    tmp_path: Path,
    policy: Path,
    dns: FakeDns,
    argv: list[str],
    *,
    mode: str = "serve",
    marker: Path | None = None,
    **env_extra: str,
) -> tuple[dict[str, int], str, list[dict[str, object]]]:
    log = tmp_path / "decisions.jsonl"
    env = clean_env(**env_extra, **({"EARLY_MARKER": str(marker)} if marker else {}))
    result = subprocess.run(
        driver_command(tmp_path, policy, dns.nameserver, argv, mode=mode),
        cwd=REPO, capture_output=True, text=True, timeout=EGRESS_WAIT, env=env,
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr
    outcome: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return outcome, result.stderr, records


def test_a_command_that_ends_before_the_gate_has_loaded_is_never_given_one(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """`egress run -- ls`: nothing for a gate to decide, so none starts; the status is the
    command's own."""
    policy, dns, _ = world
    outcome, stderr, records = drive(tmp_path, policy, dns, ["sh", "-c", "exit 3"])
    assert outcome == {"code": 3, "gate_started": 0}, stderr
    assert records == []


SEND_AND_EXIT = (
    "import socket; s = socket.create_connection(('127.0.0.1', 3128)); "
    "s.sendall(b'CONNECT evil.test:443 HTTP/1.1\\r\\nHost: evil.test:443\\r\\n\\r\\n')"
)

# A DNS question for evil.test (A, IN), id 0x1234, recursion desired.
QUERY = "b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x04evil\\x04test\\x00\\x00\\x01\\x00\\x01'"
ASK_AND_EXIT = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    f"s.sendto({QUERY}, ('127.0.0.1', 53))"
)


TCP_ASK_AND_EXIT = (
    "import socket; s = socket.create_connection(('127.0.0.1', 53)); "
    f"q = {QUERY}; s.sendall(len(q).to_bytes(2, 'big') + q)"
)


@pytest.mark.parametrize(
    ("probe", "kind"),
    [(SEND_AND_EXIT, "CONNECT"), (ASK_AND_EXIT, "DNS"), (TCP_ASK_AND_EXIT, "DNS over TCP")],
    ids=["connect", "dns", "dns-tcp"],
)
def test_what_a_command_sent_before_the_gate_served_is_decided_and_recorded(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path, probe: str, kind: str
) -> None:
    """A command that sends and ends while the gate is still loading: the gate starts for what
    waits in its listeners' queues, refuses it and records the refusal; nothing reaches the
    upstream or the DNS server."""
    policy, dns, upstream = world
    outcome, stderr, records = drive(tmp_path, policy, dns, [sys.executable, "-I", "-c", probe])
    assert outcome == {"code": 0, "gate_started": 1}, stderr
    refused = [
        r for r in records if r.get("event") == "egress.decision" and r.get("decision") == "deny"
    ]
    assert [r.get("host") for r in refused] == ["evil.test"], (kind, records)
    assert dns.count("evil.test") == 0
    assert upstream.accepted == 0


def test_a_gate_that_fails_to_start_after_the_release_stops_the_command(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The command is already running when its gate fails to start: it is killed with its whole
    sandbox (exit 125, said so), not left to run without a gate."""
    policy, dns, _ = world
    marker = tmp_path / "running"
    token = f"{time.time_ns() % 1000}.{os.getpid()}"  # a sleep of its own, to look for afterwards
    started = time.monotonic()
    outcome, stderr, _ = drive(
        tmp_path,
        policy,
        dns,
        ["sh", "-c", f"touch {marker}; exec sleep 30{token}"],
        mode="fail",
        marker=marker,
    )
    assert outcome == {"code": 125, "gate_started": 1}, stderr
    assert "the gate did not start, so the command was stopped" in stderr
    assert marker.exists()  # it did run
    assert time.monotonic() - started < 25  # killed, not waited for
    assert _processes_with(f"30{token}") == []


def _git_only(write_policy: Callable[[str], Path], upstream: Upstream) -> Path:
    """A policy that binds its one rule to an executable (its command is held for its gate)."""
    return write_policy(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - {{name: git-only, hosts: [allowed.test], ports: [{upstream.port}], "
        "executables: [/usr/bin/git]}\n"
    )


def test_a_policy_bound_to_executables_holds_its_command_until_the_gate_serves(
    write_policy: Callable[[str], Path],
    world: tuple[Path, FakeDns, Upstream],
    tmp_path: Path,
) -> None:
    """The gate names the program behind a connection as it takes it: with connections queued
    while it starts, a command could connect, send, and ``exec`` the bound program first. So such
    a policy's command starts only once its gate serves (here: not within the 1.5 s the last
    module step waits for it)."""
    _, dns, upstream = world
    policy = _git_only(write_policy, upstream)
    marker, seen = tmp_path / "ran", tmp_path / "seen"
    outcome, stderr, _ = drive(
        tmp_path, policy, dns, ["touch", str(marker)], marker=marker,
        EARLY_WAIT="1.5", EARLY_SEEN=str(seen),
    )  # fmt: skip
    assert outcome == {"code": 0, "gate_started": 1}, stderr
    assert seen.read_text() == "not seen"
    assert marker.exists()


def test_a_signal_while_a_held_command_waits_for_its_gate_stops_the_run_before_it_runs(
    write_policy: Callable[[str], Path],
    world: tuple[Path, FakeDns, Upstream],
    tmp_path: Path,
) -> None:
    """A harness that cancels a run (SIGTERM) while the gate of a policy bound to executables is
    still starting: the run stops there, and the command, not yet released, never runs. (Signals
    are forwarded to the command only from its release on.)"""
    _, dns, upstream = world
    policy = _git_only(write_policy, upstream)
    ran, starting = tmp_path / "ran", tmp_path / "starting"
    token = f"{time.time_ns() % 1000}.{os.getpid()}"
    argv = ["sh", "-c", f"touch {ran}; exec sleep 30{token}"]
    proc = subprocess.Popen(
        driver_command(tmp_path, policy, dns.nameserver, argv, mode="slow", step=""),
        cwd=REPO, env=clean_env(EARLY_STARTING=str(starting)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + EGRESS_WAIT
        while not starting.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert starting.exists(), "the gate never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EGRESS_WAIT) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)  # a command released after all would have touched its file by now
    assert not ran.exists()
    assert _processes_with(f"30{token}") == []


def _processes_with(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def test_an_ask_the_command_left_is_closed_when_it_ends_and_recorded(
    write_policy: Callable[[str], Path],
    world: tuple[Path, FakeDns, Upstream],
    tmp_path: Path,
) -> None:
    """A command that asks and ends before its gate took the request: nobody is left to use an
    answer, so nobody is asked (no approval opened, no prompt; not held for its 60 s), and the
    refusal is recorded."""
    _, dns, upstream = world
    policy = write_policy(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - {{name: asked, hosts: [allowed.test], ports: [{upstream.port}], action: ask, "
        "timeout: 60}\n"
    )
    probe = SEND_AND_EXIT.replace("evil.test:443", f"allowed.test:{upstream.port}")
    outcome, stderr, records = drive(tmp_path, policy, dns, [sys.executable, "-I", "-c", probe])
    assert outcome == {"code": 0, "gate_started": 1}, stderr
    asked = [r for r in records if r.get("host") == "allowed.test"]
    assert [(r["decision"], r["reason"]) for r in asked] == [("deny", "approval-unavailable")]
    assert "undecided" not in stderr
    assert upstream.accepted == 0


PIPELINE_AND_EXIT = (
    "import socket; s = socket.create_connection(('127.0.0.1', 3128)); "
    "s.sendall(b''.join(b'GET http://evil.test/p%d HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n' % i "
    "for i in range(10)))"
)


def test_every_request_an_ended_command_pipelined_is_decided_and_recorded(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """Ten refused requests on one connection, then the command ends: a refusal written to its
    closed socket would draw a reset that discards the nine still unread (2 of 10 were recorded),
    so the gate writes nothing more to a sandbox that has ended, and decides every one."""
    policy, dns, upstream = world
    outcome, stderr, records = drive(
        tmp_path, policy, dns, [sys.executable, "-I", "-c", PIPELINE_AND_EXIT]
    )
    assert outcome == {"code": 0, "gate_started": 1}, stderr
    paths = [r.get("path") for r in records if r.get("decision") == "deny"]
    assert paths == [f"/p{i}" for i in range(10)], records
    assert dns.count("evil.test") == 0 and upstream.accepted == 0


def test_a_gate_whose_loop_cannot_start_after_the_release_stops_the_command(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The event loop is chosen after the release (``EGRESS_EVENT_LOOP``): a choice it refuses
    stops the command and says why (exit 125), with no traceback and nothing left running."""
    policy, dns, _ = world
    token = f"{time.time_ns() % 1000}.{os.getpid()}"
    outcome, stderr, _ = drive(
        tmp_path,
        policy,
        dns,
        ["sh", "-c", f"exec sleep 20{token}"],
        EGRESS_EVENT_LOOP="bogus",
        EARLY_WAIT="0.2",
    )
    assert outcome == {"code": 125, "gate_started": 0}, stderr
    assert "the gate did not start" in stderr and "EGRESS_EVENT_LOOP" in stderr
    assert "Traceback" not in stderr
    assert _processes_with(f"20{token}") == []


# A DNS question for allowed.test (A, IN): the policy allows the name, so the gate asks upstream.
ALLOWED_QUERY = (
    "b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x07allowed\\x04test\\x00"
    "\\x00\\x01\\x00\\x01'"
)


def _signalled_while_resolving(
    command: Callable[[str, list[str]], list[str]], sig: int, **popen: Any
) -> tuple[int, str, str]:
    """Runs ``command(nameserver, probe)``: the probe asks a question the policy allows and ends,
    and the nameserver never answers, so the gate is still deciding after the command has ended;
    ``sig`` is sent then (once the question has reached the nameserver). Status, stdout, stderr."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a resolver that never answers
    hole.bind(("127.0.0.1", 0))
    hole.settimeout(EGRESS_WAIT)
    probe = [
        sys.executable, "-I", "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.sendto({ALLOWED_QUERY}, ('127.0.0.1', 53))",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command(f"127.0.0.1:{hole.getsockname()[1]}", probe),
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **popen,
    )  # fmt: skip
    try:
        hole.recv(512)  # the gate is resolving: the command has ended, its question is in flight
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=EGRESS_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hole.close()
    return proc.returncode, out, err


def test_a_signal_after_the_command_ended_stops_the_run_instead_of_vanishing(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """While the gate decides what an ended command left (a question its resolver never
    answers), a signal has nobody to be forwarded to: it stops the run, as it would before the
    release, rather than being sent to a sandbox that is gone and lost. (SIGTERM: a test runner's
    worker may ignore SIGINT, and its children inherit that.)"""
    policy, _, _ = world
    code, out, _ = _signalled_while_resolving(
        lambda nameserver, probe: driver_command(tmp_path, policy, nameserver, probe),
        signal.SIGTERM,
    )
    assert code != 0 and not out.strip()  # run() never returned: the signal stopped it


def test_ctrl_c_after_the_command_ended_ends_the_run_with_130_and_no_traceback(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """`egress run` interrupted (SIGINT) while its gate still decides what the ended command left:
    exit 130 and one line, as a shell's interrupted command, not a Python traceback."""
    policy, _, _ = world

    def run(nameserver: str, probe: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
            "--nameserver", nameserver, "--state-dir", str(tmp_path / "state"), "--", *probe,
        ]  # fmt: skip

    # a test runner's worker may ignore SIGINT; the run must have Python's own handler
    code, _, err = _signalled_while_resolving(
        run, signal.SIGINT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
