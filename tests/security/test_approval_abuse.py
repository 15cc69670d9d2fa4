"""Threat 17, approval abuse, against a real shared ``egress serve`` with per-sandbox credentials:
reaching the admin API from inside, forging approval headers, flooding the pending list, and widening
a grant to another port, host or sandbox. Every refusal is checked against a counting upstream."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.policy.identities import new_token, token_digest
from tests.approvals_harness import ApprovalGate, fetch
from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env, curl, on_a_free_port

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-apis
    action: ask
    hosts: ["**.api.test"]
    ports: [{port}, {other_port}]
  - name: loopback-opened
    cidrs: [127.0.0.0/8]
    ports: [{admin_port}]
"""


class Shared:
    def __init__(self, gate: ApprovalGate, tokens: dict[str, str], admin_port: int) -> None:
        self.gate = gate
        self.tokens = tokens
        self.admin_port = admin_port

    def proxy(self, sandbox: str) -> str:
        return f"http://{sandbox}:{self.tokens[sandbox]}@127.0.0.1:{self.gate.port}"


def admin_on_a_free_port(
    tmp_path: Path, fake_dns: FakeDns, plain: Upstream, tls: Upstream, directory: Path, *extra: str
) -> tuple[int, ApprovalGate]:
    """A gate whose policy opens loopback on its own admin port (which must stay unreachable)."""
    policy = tmp_path / "policy.yaml"

    def start(admin_port: int) -> ApprovalGate:
        policy.write_text(
            POLICY.format(port=plain.port, other_port=tls.port, admin_port=admin_port)
        )
        return ApprovalGate(policy, fake_dns.nameserver, directory, *extra, admin_port=admin_port)

    return on_a_free_port(start)


@pytest.fixture
def shared(tmp_path: Path, fake_dns: FakeDns, plain: Upstream, tls: Upstream) -> Iterator[Shared]:
    for name in ("api.test", "a.api.test", "b.api.test", *(f"f{i}.api.test" for i in range(6))):
        fake_dns.set(name, "A", ["127.0.0.1"])
    tokens = {name: new_token() for name in ("sbx-a", "sbx-b")}
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text(
        "version: 1\nsandboxes:\n"
        + "".join(
            f"  - id: {name}\n    token_sha256: {token_digest(token)}\n"
            for name, token in tokens.items()
        )
    )
    directory = tmp_path / "gate"
    directory.mkdir()
    admin_port, gate = admin_on_a_free_port(
        tmp_path, fake_dns, plain, tls, directory,
        "--sandboxes", str(sandboxes), "--max-pending-per-sandbox", "3",
    )  # fmt: skip
    plain.reset()
    yield Shared(gate, tokens, admin_port)
    gate.stop()


def test_the_admin_api_is_refused_through_the_gate_even_where_the_policy_opens_it(
    shared: Shared,
) -> None:
    for target in (f"http://127.0.0.1:{shared.admin_port}/v1/approvals",
                   f"http://localhost:{shared.admin_port}/v1/approvals"):  # fmt: skip
        result = curl(target, shared.proxy("sbx-a"))
        assert result.status == 403, target
        assert result.headers["x-egress-reason"] in ("internal-address", "no-matching-rule")
    via_connect = curl(
        f"https://127.0.0.1:{shared.admin_port}/v1/approvals", shared.proxy("sbx-a"), "-k"
    )
    assert via_connect.status == 403
    assert via_connect.headers["x-egress-reason"] == "internal-address"
    reasons = {d["reason"] for d in shared.gate.decisions()}
    assert "internal-address" in reasons


@pytest.mark.netns
def test_neither_the_admin_api_nor_the_webhook_target_is_reachable_from_inside_a_sandbox(
    tmp_path: Path, fake_dns: FakeDns, plain: Upstream, tls: Upstream
) -> None:
    """The policy opens loopback on the admin port; the webhook receiver (which the gate calls)
    is on loopback too, with no rule for it. A sandbox holding a valid admin token reaches neither,
    through the gate or around it."""
    from tests.integration.test_approval_answerers import Receiver

    receiver = Receiver()
    secret = tmp_path / "secret"
    secret.write_bytes(b"a shared secret of some length")
    secret.chmod(0o600)
    directory = tmp_path / "gate"
    directory.mkdir()
    admin_port, gate = admin_on_a_free_port(
        tmp_path, fake_dns, plain, tls, directory,
        "--approval-webhook", receiver.url, "--approval-webhook-secret", str(secret),
    )  # fmt: skip
    admin = f"http://127.0.0.1:{admin_port}/v1/approvals"
    token = gate.token_files["alice"].read_text().strip()
    through = "curl -sS --max-time 5 --noproxy '' --proxy \"$http_proxy\" -o /dev/null"
    direct = "curl -sS --max-time 3 --noproxy '*' -o /dev/null"
    script = (
        f"{through} -H 'Authorization: Bearer {token}' -w 'admin-through-gate %{{http_code}}\\n' "
        f"{admin}; "
        f"{direct} {admin} 2>/dev/null || echo 'admin-direct unreachable'; "
        f"{through} -w 'webhook-through-gate %{{http_code}}\\n' -d '{{}}' {receiver.url}; "
        f"{direct} -d '{{}}' {receiver.url} 2>/dev/null || echo 'webhook-direct unreachable'"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--quiet",
             "--proxy", gate.proxy, "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )  # fmt: skip
    finally:
        gate.stop()
        receiver.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "admin-through-gate 403",
        "admin-direct unreachable",
        "webhook-through-gate 403",
        "webhook-direct unreachable",
    ]
    assert receiver.requests == 0
    reasons = [d["reason"] for d in gate.decisions()]
    assert reasons == ["internal-address", "port-not-allowed"]  # no rule for the receiver


def test_forged_approval_headers_do_not_answer_anything(shared: Shared, plain: Upstream) -> None:
    forged = fetch(
        f"http://api.test:{plain.port}/", shared.proxy("sbx-a"),
        "-H", "X-Egress-Decision: allow", "-H", "X-Egress-Reason: approval-granted",
        "-H", "X-Egress-Approval: 0123456789abcdef", "-H", "X-Egress-Grant: persist",
    )  # fmt: skip
    [pending] = shared.gate.wait_pending()
    assert pending["sandbox_id"] == "sbx-a"
    time.sleep(0.5)
    assert not forged.done and plain.accepted == 0
    assert shared.gate.egress("deny", pending["id"]).returncode == 0
    assert forged.result().headers["x-egress-reason"] == "approval-denied"
    assert plain.accepted == 0


def test_a_flooding_sandbox_is_refused_and_others_still_get_asked(
    shared: Shared, plain: Upstream
) -> None:
    flood = [fetch(f"http://f{i}.api.test:{plain.port}/", shared.proxy("sbx-a")) for i in range(3)]
    shared.gate.wait_pending(3)
    over = curl(f"http://f5.api.test:{plain.port}/", shared.proxy("sbx-a"))
    assert over.status == 403 and over.headers["x-egress-reason"] == "approval-limit"
    other = fetch(f"http://api.test:{plain.port}/", shared.proxy("sbx-b"))
    found = shared.gate.wait_pending(4)
    [theirs] = [p for p in found if p["sandbox_id"] == "sbx-b"]
    assert shared.gate.egress("approve", theirs["id"]).returncode == 0
    assert other.result().status == 200
    for pending in found:
        if pending["sandbox_id"] == "sbx-a":
            shared.gate.egress("deny", pending["id"])
    assert [f.result().headers["x-egress-reason"] for f in flood] == ["approval-denied"] * 3
    assert plain.accepted == 1  # only sbx-b's approved request


def test_a_grant_covers_exactly_what_was_asked(
    shared: Shared, plain: Upstream, tls: Upstream
) -> None:
    first = fetch(f"http://a.api.test:{plain.port}/", shared.proxy("sbx-a"))
    [pending] = shared.gate.wait_pending()
    assert shared.gate.egress("approve", pending["id"], "--session").returncode == 0
    assert first.result().status == 200
    assert curl(f"http://a.api.test:{plain.port}/again", shared.proxy("sbx-a")).status == 200
    # another port, another host under the same wildcard, another sandbox: each asks again
    for url, sandbox in (
        (f"https://a.api.test:{tls.port}/", "sbx-a"),
        (f"http://b.api.test:{plain.port}/", "sbx-a"),
        (f"http://a.api.test:{plain.port}/", "sbx-b"),
    ):
        held = fetch(url, shared.proxy(sandbox), "-k")
        [asked] = shared.gate.wait_pending()
        assert asked["sandbox_id"] == sandbox
        assert shared.gate.egress("deny", asked["id"]).returncode == 0
        assert held.result().headers["x-egress-reason"] == "approval-denied", url
    assert plain.accepted == 2 and tls.accepted == 0  # the two granted requests only
