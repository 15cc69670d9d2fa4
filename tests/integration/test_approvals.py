"""``action: ask`` end to end: a real ``egress serve`` holds requests from real curl until someone
answers through the real ``egress approve``/``deny`` commands and the admin API.

Every refusal is checked against a counting upstream: a held, denied or timed-out request never opens
a connection to it.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.approvals_harness import ApprovalGate, fetch
from tests.dnsfake import FakeDns
from tests.harness import LocalCA, Upstream, curl, wait_until

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-api
    action: ask
    hosts: [api.test]
    ports: [{port}]
    timeout: {timeout}
  - name: ask-tls
    action: ask
    hosts: [allowed.test]
    ports: [{tls_port}]
  - name: never
    action: deny
    hosts: [blocked.api.test]
"""


@pytest.fixture
def names(fake_dns: FakeDns) -> FakeDns:
    for name in ("api.test", "allowed.test", "blocked.api.test"):
        fake_dns.set(name, "A", ["127.0.0.1"])
    return fake_dns


@pytest.fixture
def start(
    tmp_path: Path,
    names: FakeDns,
    http_upstream: Upstream,
    tls_upstream: Upstream,
) -> Iterator[Callable[..., ApprovalGate]]:
    gates: list[ApprovalGate] = []
    directory = tmp_path / "gate"
    directory.mkdir()

    def start_gate(*extra: str, timeout: int = 30) -> ApprovalGate:
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            POLICY.format(port=http_upstream.port, tls_port=tls_upstream.port, timeout=timeout)
        )
        gate = ApprovalGate(policy, names.nameserver, directory, *extra)
        gates.append(gate)
        return gate

    yield start_gate
    for gate in gates:
        gate.stop()


def api(upstream: Upstream, path: str = "/x") -> str:
    return f"http://api.test:{upstream.port}{path}"


def test_a_held_request_waits_until_approved_once_and_the_next_one_asks_again(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start()
    first = fetch(api(http_upstream), gate.proxy)
    [pending] = gate.wait_pending()
    assert (pending["host"], pending["port"], pending["rule"], pending["state"]) == (
        "api.test",
        http_upstream.port,
        "ask-api",
        "pending",
    )
    time.sleep(0.5)
    assert not first.done
    assert http_upstream.accepted == 0  # nothing reached the upstream while it was held

    answer = gate.egress("approve", pending["id"], "--once", "--reason", "build needs it")
    assert answer.returncode == 0, answer.stderr
    assert "approved (once) by alice" in answer.stdout
    result = first.result()
    assert result.status == 200 and "hello from http-upstream: GET /x" in result.body
    assert http_upstream.accepted == 1

    second = fetch(api(http_upstream, "/y"), gate.proxy)
    [again] = gate.wait_pending()
    assert again["id"] != pending["id"]
    denied = gate.egress("deny", again["id"], "--reason", "not this one", who="bob")
    assert denied.returncode == 0, denied.stderr
    refused = second.result()
    assert refused.status == 403
    assert refused.headers["x-egress-reason"] == "approval-denied"
    assert "denied by bob: not this one" in refused.body
    assert http_upstream.accepted == 1  # the denied request reached nothing

    outcomes = [
        (d["decision"], d["reason"], d.get("decided_by"), d.get("grant"), d.get("approval"))
        for d in gate.decisions()
    ]
    assert outcomes == [
        ("ask", "approval-pending", None, None, pending["id"]),
        ("allow", "approval-granted", "alice", "once", pending["id"]),
        ("ask", "approval-pending", None, None, again["id"]),
        ("deny", "approval-denied", "bob", None, again["id"]),
    ]
    late = gate.egress("approve", again["id"])
    assert late.returncode == 1 and "approval is denied" in late.stderr


def test_a_held_connect_gets_no_200_until_approved(
    start: Callable[..., ApprovalGate], tls_upstream: Upstream, test_ca: LocalCA
) -> None:
    gate = start()
    url = f"https://allowed.test:{tls_upstream.port}/tls"
    held = fetch(url, gate.proxy, "--cacert", str(test_ca.ca_path))
    [pending] = gate.wait_pending()
    assert pending["kind"] == "connect"
    assert tls_upstream.accepted == 0
    assert gate.egress("approve", pending["id"]).returncode == 0
    result = held.result()
    assert result.status == 200 and "hello from tls-upstream: GET /tls" in result.body
    reasons = [d["reason"] for d in gate.decisions()]
    # the ClientHello inside the approved tunnel is checked for its name, under the same answer
    assert reasons == ["approval-pending", "approval-granted", "approval-granted"]


def test_a_session_grant_lets_the_same_sandbox_through_without_asking(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start()
    first = fetch(api(http_upstream), gate.proxy)
    [pending] = gate.wait_pending()
    assert gate.egress("approve", pending["id"], "--session").returncode == 0
    assert first.result().status == 200
    for path in ("/a", "/b"):
        assert curl(api(http_upstream, path), gate.proxy).status == 200
    assert gate.pending() == []
    later = gate.decisions()[-1]
    assert (later["reason"], later["grant"], later["decided_by"], later["approval"]) == (
        "approval-granted",
        "session",
        "alice",
        pending["id"],
    )


def test_a_persisted_grant_is_a_reviewable_rule_and_survives_a_restart(
    start: Callable[..., ApprovalGate], http_upstream: Upstream, tmp_path: Path
) -> None:
    gate = start()
    first = fetch(api(http_upstream), gate.proxy)
    [pending] = gate.wait_pending()
    answer = gate.egress("approve", pending["id"], "--persist", "--reason", "CI mirror")
    assert answer.returncode == 0, answer.stderr
    assert first.result().status == 200
    assert gate.stop() == 0

    overlay = tmp_path / "gate" / "state" / "approved.yaml"
    text = overlay.read_text()
    assert f"name: approved-{pending['id']}" in text
    assert "# approved by alice at " in text and "# reason: CI mirror" in text
    assert f"ports: [{http_upstream.port}]" in text
    from proxy.policy.loader import load_policy

    [rule] = load_policy(overlay).rules  # the strict loader takes it as it is
    assert rule.description == "approved by alice: CI mirror"

    restarted = start()
    result = curl(api(http_upstream, "/after"), restarted.proxy)
    assert result.status == 200
    assert restarted.pending() == []
    last = restarted.decisions()[-1]
    assert (last["reason"], last["grant"], last["approval"]) == (
        "approval-granted",
        "persist",
        pending["id"],
    )
    # a grant never reaches past its ask rule: the deny rule for a subdomain still holds
    blocked = curl(f"http://blocked.api.test:{http_upstream.port}/", restarted.proxy)
    assert blocked.headers["x-egress-reason"] == "denied-by-rule"


def test_nobody_answering_refuses_at_the_rules_timeout_and_reaches_nothing(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start(timeout=2)
    result = curl(api(http_upstream), gate.proxy, timeout=20)
    assert result.status == 403
    assert result.headers["x-egress-reason"] == "approval-timeout"
    assert http_upstream.accepted == 0
    assert gate.pending() == []
    last = gate.decisions()[-1]
    assert (last["reason"], last["decided_by"]) == ("approval-timeout", "timeout")


def test_concurrent_identical_requests_share_one_approval(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start()
    held = [fetch(api(http_upstream), gate.proxy) for _ in range(10)]
    wait_until(lambda: sum(d["decision"] == "ask" for d in gate.decisions()) == 10, 20)
    [pending] = gate.pending()
    asks = [d for d in gate.decisions() if d["decision"] == "ask"]
    assert len(asks) == 10 and {d["approval"] for d in asks} == {pending["id"]}
    assert http_upstream.accepted == 0
    assert gate.egress("approve", pending["id"]).returncode == 0
    assert [h.result().status for h in held] == [200] * 10


def test_the_admin_api_refuses_missing_and_wrong_tokens(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start()
    held = fetch(api(http_upstream), gate.proxy)
    [pending] = gate.wait_pending()
    approve = f"{gate.admin}/v1/approvals/{pending['id']}/approve"
    session = requests.Session()
    session.trust_env = False
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {gate.token_files['alice'].read_text().strip()}"},
    ):
        for method, url in (("GET", f"{gate.admin}/v1/approvals"), ("POST", approve)):
            response = session.request(method, url, headers=headers, timeout=10)
            assert response.status_code == 401, (method, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "approvals" not in response.json()
    assert not held.done  # none of that answered it
    token = gate.token_files["bob"].read_text().strip()
    ok = session.post(
        approve, json={"scope": "once"}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert ok.status_code == 200 and ok.json()["approval"]["decided_by"] == "bob"
    assert held.result().status == 200
    bad = session.post(
        f"{gate.admin}/v1/approvals/{pending['id']}/approve",
        data=b"not json",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert bad.status_code in (400, 409)


def test_the_event_stream_shows_pending_approvals_and_their_answers(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start()
    session = requests.Session()
    session.trust_env = False
    stream = gate.event_stream(session)
    assert stream.status_code == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    lines = stream.iter_lines(decode_unicode=True)
    events: list[tuple[str, dict[str, object]]] = []
    event = ""

    def next_event() -> tuple[str, dict[str, object]]:
        nonlocal event
        for line in lines:
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                return event, json.loads(line.split(":", 1)[1])
        raise AssertionError("the stream ended")

    assert next_event() == ("snapshot", {"approvals": []})
    held = fetch(api(http_upstream), gate.proxy)
    while not any(name == "approval" for name, _ in events):
        events.append(next_event())
    [(_, change)] = [e for e in events if e[0] == "approval"]
    assert change["change"] == "pending"
    approval = change["approval"]
    assert isinstance(approval, dict)
    assert gate.egress("approve", str(approval["id"])).returncode == 0
    while not any(e[0] == "approval" and e[1]["change"] == "decided" for e in events):
        events.append(next_event())
    assert held.result().status == 200
    decided = [e[1]["approval"] for e in events if e[0] == "approval"][-1]
    assert isinstance(decided, dict)
    assert (decided["state"], decided["decided_by"], decided["scope"]) == (
        "approved",
        "alice",
        "once",
    )
    kinds = [body.get("decision") for name, body in events if name == "decision"]
    assert "ask" in kinds
    stream.close()


def test_two_replicas_share_approvals_and_session_grants_through_redis(
    tmp_path: Path, names: FakeDns, http_upstream: Upstream, tls_upstream: Upstream
) -> None:
    from tests.redis_server import RedisServer

    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisServer(directory).start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.format(port=http_upstream.port, tls_port=tls_upstream.port, timeout=30)
    )
    replicas: list[ApprovalGate] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(
                ApprovalGate(
                    policy,
                    names.nameserver,
                    tmp_path / name,
                    "--state",
                    redis.url,
                    "--approved-file",
                    str(tmp_path / "shared-approved.yaml"),
                )
            )
        a, b = replicas
        # Held on a, shown and answered on b; identical requests through b join it.
        on_a = fetch(api(http_upstream), a.proxy)
        [pending] = b.wait_pending()
        on_b = fetch(api(http_upstream), b.proxy)
        held_on_b = wait_until(lambda: any(d["decision"] == "ask" for d in b.decisions()), 20)
        assert held_on_b, "the request through b was not held"
        assert [p["id"] for p in a.pending()] == [pending["id"]]  # one approval for both
        assert http_upstream.accepted == 0
        assert b.egress("approve", pending["id"], "--session", who="bob").returncode == 0
        assert on_a.result().status == 200 and on_b.result().status == 200
        # The session grant holds on both replicas.
        for replica in (a, b):
            assert curl(api(http_upstream, "/later"), replica.proxy).status == 200
            assert replica.decisions()[-1]["grant"] == "session"
        # A denial given through a reaches a request held on b.
        held = fetch(f"https://allowed.test:{tls_upstream.port}/", b.proxy)
        [second] = a.wait_pending()
        assert a.egress("deny", second["id"]).returncode == 0
        refused = held.result()
        assert refused.status == 403 and refused.headers["x-egress-reason"] == "approval-denied"
        assert b.decisions()[-1]["reason"] == "approval-denied"
        assert tls_upstream.accepted == 0
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()


def test_the_admin_api_shows_sandboxes_and_the_policy_in_force(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    gate = start(timeout=2)
    assert curl(f"http://nowhere.test:{http_upstream.port}/", gate.proxy).status == 403
    assert curl(api(http_upstream), gate.proxy, timeout=20).status == 403  # asked, timed out
    session = requests.Session()
    session.trust_env = False
    headers = {"Authorization": f"Bearer {gate.token_files['alice'].read_text().strip()}"}
    whoami = session.get(f"{gate.admin}/v1/whoami", headers=headers, timeout=10).json()
    assert whoami == {"name": "alice"}
    [sandbox] = session.get(f"{gate.admin}/v1/sandboxes", headers=headers, timeout=10).json()[
        "sandboxes"
    ]
    assert (sandbox["sandbox_id"], sandbox["allowed"], sandbox["refused"], sandbox["asked"]) == (
        "-",
        0,
        2,
        1,
    )
    policy = session.get(f"{gate.admin}/v1/policy", headers=headers, timeout=10).json()
    rules = {r["name"]: r for r in policy["rules"]}
    assert rules["ask-api"]["action"] == "ask" and rules["ask-api"]["timeout"] == 2
    assert rules["never"]["action"] == "deny" and rules["never"]["ports"] is None
    assert len(policy["version"]) == 16 and policy["mode"] == "enforce"
    unknown = session.get(f"{gate.admin}/v2/anything", headers=headers, timeout=10)
    assert unknown.status_code == 404
    assert session.get(f"{gate.admin}/v1/sandboxes", timeout=10).status_code == 401


def test_egress_approvals_watch_follows_new_approvals_and_their_answers(
    start: Callable[..., ApprovalGate], http_upstream: Upstream
) -> None:
    import subprocess
    import sys
    import threading

    from tests.approvals_harness import REPO
    from tests.harness import clean_env

    gate = start()
    env = clean_env(
        EGRESS_ADMIN_URL=gate.admin, EGRESS_ADMIN_TOKEN_FILE=str(gate.token_files["alice"])
    )
    watch = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "approvals", "--watch", "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[dict[str, object]] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(count: int) -> None:
        assert wait_until(lambda: len(lines) >= count, 20), lines

    try:
        wait_for(1)
        assert lines[0] == {"event": "snapshot", "approvals": []}
        held = fetch(api(http_upstream), gate.proxy)
        wait_for(2)
        pending = lines[1]
        assert pending["event"] == "approval" and pending["change"] == "pending"
        approval = pending["approval"]
        assert isinstance(approval, dict)
        assert gate.egress("deny", str(approval["id"]), "--reason", "no").returncode == 0
        wait_for(3)
        decided = lines[2]["approval"]
        assert isinstance(decided, dict)
        assert (lines[2]["change"], decided["state"], decided["reason"]) == (
            "decided",
            "denied",
            "no",
        )
        assert held.result().status == 403
    finally:
        watch.terminate()
        watch.wait(10)
        reader.join(10)


@pytest.mark.parametrize("kind", ["request", "connect"])
def test_a_request_held_when_the_gate_stops_is_never_sent(
    start: Callable[..., ApprovalGate],
    http_upstream: Upstream,
    tls_upstream: Upstream,
    test_ca: LocalCA,
    kind: str,
) -> None:
    """SIGTERM while a request waits for a person: the drain ends at its deadline, the request is
    cut off unanswered, and nothing reaches the upstream (plain HTTP through mitmproxy's layers, a
    CONNECT through the tunnel front end)."""
    gate = start("--drain-timeout", "0.5")
    if kind == "request":
        upstream, held = http_upstream, fetch(api(http_upstream), gate.proxy)
    else:
        url = f"https://allowed.test:{tls_upstream.port}/tls"
        upstream, held = tls_upstream, fetch(url, gate.proxy, "--cacert", str(test_ca.ca_path))
    gate.wait_pending()
    gate.serve.proc.send_signal(signal.SIGTERM)
    assert gate.serve.proc.wait(30) == 0
    assert held.result().status != 200
    assert upstream.accepted == 0 and upstream.requests == []
    assert "approval-granted" not in [d["reason"] for d in gate.decisions()]
