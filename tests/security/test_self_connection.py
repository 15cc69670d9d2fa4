"""The gate never dials itself: not through a public address of its own host behind a wildcard listener,
not through the unspecified address, whatever the policy opens (threat 10).

Each case runs a real ``egress serve`` inside a network namespace this test creates, with addresses
outside every private range on the namespace's loopback interface, and a policy that allows them. One
request through the gate must produce exactly one decision (a refusal): a nested request through the
gate's own listener would have produced more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"

DRIVER = r"""
import json, signal, socket, subprocess, sys, threading
egress, policy, log, listen, target, addresses = sys.argv[1:7]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for address in addresses.split(","):
    subprocess.run(["ip", "addr", "add", address, "dev", "lo"], check=True)
port = int(listen.rsplit(":", 1)[1])
local = "::1" if listen.startswith("[") else "127.0.0.1"  # asyncio binds "::" IPv6-only
gate = subprocess.Popen(
    [egress, "serve", "--policy", policy, "--listen", listen, "--decision-log", log, "--no-metrics",
     "--nameserver", "127.0.0.1:9"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
)
# Ready is the gate's own "gate ready" line (its listener is bound by then), never a probe connection:
# the port is in the ephemeral range, so a connect while nothing listens on it can pick it as its own
# source port and connect to itself, and the request that follows is then refused.
ready = threading.Event()
started = []
def copy_stderr():
    with open(log + ".stderr", "w") as out:
        for line in gate.stderr:
            out.write(line)
            out.flush()
            if "gate ready" in line and not started:
                started.append(line)
                ready.set()
    ready.set()  # the gate exited
threading.Thread(target=copy_stderr, daemon=True).start()
try:
    if not ready.wait(60) or not started:
        sys.exit("the gate did not start: " + open(log + ".stderr").read())
    with socket.create_connection((local, port), 30) as sock:
        sock.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    # No grace period: a nested request through the gate's own listener would be decided before
    # this answer could arrive, and the log is read only after the gate has stopped.
finally:
    gate.send_signal(signal.SIGTERM)
    try:
        gate.wait(30)
    except subprocess.TimeoutExpired:
        gate.kill()
        gate.wait(10)
print(json.dumps({"head": data.split(b"\r\n\r\n")[0].decode("latin-1")}))
"""


def run_case(
    tmp_path: Path, policy: str, listen: str, target: str, addresses: str
) -> tuple[str, list[dict[str, object]]]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to create a network namespace")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(textwrap.dedent(policy))
    log = tmp_path / "decisions.jsonl"
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", DRIVER, EGRESS, str(policy_path), str(log), listen,
         target, addresses],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    gate_log = Path(str(log) + ".stderr")
    gate_err = gate_log.read_text() if gate_log.exists() else ""
    assert result.returncode == 0, result.stderr + gate_err
    head = json.loads(result.stdout.strip().splitlines()[-1])["head"]
    assert head, f"no answer from the gate: {gate_err}"
    decisions = [json.loads(line) for line in log.read_text().splitlines()]
    return head, [d for d in decisions if d.get("event") == "egress.decision"]


@pytest.mark.parametrize(
    ("listen", "target", "addresses", "cidrs"),
    [
        ("0.0.0.0:38128", "8.8.9.100:38128", "8.8.9.100/32", '["8.8.9.0/24"]'),
        (
            "[::]:38128",
            "[2a00:1450:4001::100]:38128",
            "2a00:1450:4001::100/128",
            '["2a00:1450:4001::/48"]',
        ),
    ],
    ids=["v4-wildcard", "v6-wildcard"],
)
def test_a_public_address_of_the_gates_own_host_is_refused(
    tmp_path: Path, listen: str, target: str, addresses: str, cidrs: str
) -> None:
    policy = f"""
    version: 1
    rules:
      - name: this-host-range
        cidrs: {cidrs}
        ports: [38128]
    """
    head, decisions = run_case(tmp_path, policy, listen, target, addresses)
    assert head.startswith("HTTP/1.1 403"), head
    assert "X-Egress-Reason: internal-address" in head
    assert len(decisions) == 1, decisions  # no nested request through the gate itself
    assert "own listener" in str(decisions[0]["detail"])


@pytest.mark.parametrize("target", ["0.0.0.0:38128", "0:38128", "[::]:38128"])
def test_the_unspecified_address_is_this_host(tmp_path: Path, target: str) -> None:
    policy = """
    version: 1
    allow_internal: [0.0.0.0/8, "::/128"]
    rules:
      - name: everything
        cidrs: [0.0.0.0/0, "::/0"]
        ports: [38128]
    """
    head, decisions = run_case(tmp_path, policy, "0.0.0.0:38128", target, "192.0.2.1/32")
    assert head.startswith("HTTP/1.1 403"), head
    assert "X-Egress-Reason: internal-address" in head
    assert len(decisions) == 1, (decisions, head)
