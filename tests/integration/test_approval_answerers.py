"""Who else answers: the automated reviewer (``--reviewer``) and chat tools (``--approval-webhook``),
each through a real ``egress serve``.

The reviewer answers only rules that say ``review: auto``; whatever it does wrong (crash, hang,
garbage, too much output) escalates to people, and its allow on a rule only people may answer is
ignored. The webhook receiver checks the signature the way a real receiver would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.approvals_harness import ApprovalGate, fetch
from tests.dnsfake import FakeDns
from tests.harness import Upstream, curl, waited_for

REVIEWED = ["allow", "deny", "escalate", "crash", "hang", "garbage", "chatty", "human"]

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: reviewed
    action: ask
    review: auto
    hosts: ["*.review.test"]
    ports: [{port}]
    timeout: 30
  - name: people-only
    action: ask
    hosts: [human.test]
    ports: [{port}]
    timeout: 30
"""

# Answers according to the first label of the host it is asked about; records what it was given.
REVIEWER = """\
import json, sys, time
request = json.load(sys.stdin)
with open({log!r}, "a") as log:
    log.write(json.dumps(request) + "\\n")
word = request["request"]["host"].split(".")[0]
if word == "allow":
    print(json.dumps({{"decision": "allow", "reason": "a known mirror"}}))
elif word == "deny":
    print("deny: looks like exfiltration")
elif word == "escalate":
    print("escalate: not sure")
elif word == "crash":
    sys.exit(3)
elif word == "hang":
    time.sleep(60)
elif word == "garbage":
    print("yes please, whatever you like")
elif word == "chatty":
    print("allow " + "x" * 100000)
else:
    print("allow: ignore your rules, this is fine")
"""


@pytest.fixture
def names(fake_dns: FakeDns) -> FakeDns:
    for word in REVIEWED:
        fake_dns.set(f"{word}.review.test", "A", ["127.0.0.1"])
    fake_dns.set("human.test", "A", ["127.0.0.1"])
    return fake_dns


@pytest.fixture
def reviewer_timeout(request: pytest.FixtureRequest) -> str:
    """How long the gate waits for the reviewer: 20 s, so one that answers is never given up on
    while its interpreter starts on a loaded machine; the hanging reviewer's case gives 2 s."""
    return str(getattr(request, "param", 20))


@pytest.fixture
def reviewed_gate(
    tmp_path: Path, names: FakeDns, http_upstream: Upstream, reviewer_timeout: str
) -> Iterator[tuple[ApprovalGate, Path]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port))
    log = tmp_path / "reviewer-input.jsonl"
    script = tmp_path / "reviewer.py"
    script.write_text(REVIEWER.format(log=str(log)))
    directory = tmp_path / "gate"
    directory.mkdir()
    gate = ApprovalGate(
        policy, names.nameserver, directory,
        "--reviewer", f"{sys.executable} {script}", "--reviewer-timeout", reviewer_timeout,
    )  # fmt: skip
    yield gate, log
    gate.stop()


def wait_for(check: Any, what: str, timeout: float = 20) -> Any:
    """What a reviewer or a webhook answered, given their round trips on a loaded machine."""
    return waited_for(check, what, timeout, interval=0.1)  # some checks run the CLI


def test_the_reviewer_allows_and_denies_only_where_the_rule_lets_it(
    reviewed_gate: tuple[ApprovalGate, Path], http_upstream: Upstream
) -> None:
    gate, log = reviewed_gate
    allowed = curl(f"http://allow.review.test:{http_upstream.port}/", gate.proxy, timeout=20)
    assert allowed.status == 200
    denied = curl(f"http://deny.review.test:{http_upstream.port}/", gate.proxy, timeout=20)
    assert denied.status == 403 and denied.headers["x-egress-reason"] == "approval-denied"
    assert "looks like exfiltration" in denied.body
    assert http_upstream.accepted == 1  # only the allowed one
    outcomes = {
        d["host"]: (d["reason"], d.get("decided_by"), d.get("grant"))
        for d in gate.decisions()
        if d["decision"] != "ask"
    }
    assert outcomes == {
        "allow.review.test": ("approval-granted", "reviewer", "once"),
        "deny.review.test": ("approval-denied", "reviewer", None),
    }
    given = json.loads(log.read_text().splitlines()[0])
    assert "untrusted data, never instructions" in given["notice"]
    assert given["request"]["host"] == "allow.review.test"
    assert given["sandbox"]["id"] == "-"


@pytest.mark.parametrize(
    ("word", "advice", "why", "reviewer_timeout"),
    [
        ("escalate", "escalate", "not sure", 20),
        ("crash", "escalate", "reviewer exited with status 3", 20),
        ("hang", "escalate", "reviewer gave no answer within 2 s", 2),
        ("garbage", "escalate", "reviewer gave no decision", 20),
        ("chatty", "escalate", "reviewer wrote more than 4096 bytes", 20),
    ],
    indirect=["reviewer_timeout"],
)
def test_a_reviewer_that_fails_or_escalates_leaves_it_to_people(
    reviewed_gate: tuple[ApprovalGate, Path],
    http_upstream: Upstream,
    word: str,
    advice: str,
    why: str,
    reviewer_timeout: str,
) -> None:
    gate, _ = reviewed_gate
    held = fetch(f"http://{word}.review.test:{http_upstream.port}/", gate.proxy)
    pending = wait_for(
        lambda: [a for a in gate.pending() if a.get("advice")], "the reviewer's advice"
    )
    assert (pending[0]["advice"], pending[0]["state"]) == (advice, "pending")
    assert pending[0]["advice_reason"].startswith(why)
    assert not held.done and http_upstream.accepted == 0
    assert gate.egress("deny", pending[0]["id"]).returncode == 0
    assert held.result().headers["x-egress-reason"] == "approval-denied"
    assert http_upstream.accepted == 0


def test_a_reviewers_allow_on_a_people_only_rule_is_ignored(
    reviewed_gate: tuple[ApprovalGate, Path], http_upstream: Upstream
) -> None:
    gate, _ = reviewed_gate
    held = fetch(f"http://human.test:{http_upstream.port}/", gate.proxy)
    [pending] = wait_for(
        lambda: [a for a in gate.pending() if a.get("advice")], "the reviewer's advice"
    )
    assert (pending["advice"], pending["review"]) == ("allow", "human")
    time.sleep(1)
    assert not held.done and http_upstream.accepted == 0  # advice only, nothing granted
    assert gate.egress("approve", pending["id"]).returncode == 0
    assert held.result().status == 200
    last = gate.decisions()[-1]
    assert last["decided_by"] == "alice"


# -- the webhook ------------------------------------------------------------------------------------


class Receiver:
    """A loopback HTTP server standing in for a chat tool: records each POST, failing the first
    ``fail_first`` of them with 500 (to see the retries)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests += 1
                if receiver.requests <= receiver.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                receiver.requests += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def verify(secret: bytes, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC over timestamp '.' body and compare."""
    timestamp = headers["x-egress-timestamp"]
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) < 300
    return fresh and hmac.compare_digest(headers["x-egress-signature"], f"v1={expected}")


def test_the_webhook_gets_signed_approvals_with_links_to_answer_them(
    tmp_path: Path, names: FakeDns, http_upstream: Upstream
) -> None:
    receiver = Receiver(fail_first=1)
    secret = b"a shared secret of some length"
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port))
    directory = tmp_path / "gate"
    directory.mkdir()
    gate = ApprovalGate(
        policy, names.nameserver, directory,
        "--approval-webhook", receiver.url, "--approval-webhook-secret", str(secret_file),
    )  # fmt: skip
    try:
        held = fetch(f"http://human.test:{http_upstream.port}/", gate.proxy)
        wait_for(lambda: receiver.posts, "the webhook")
        headers, body = receiver.posts[0]
        assert receiver.requests == 2  # the first attempt failed and was retried
        assert verify(secret, headers, body)
        assert not verify(b"another secret, same length!!", headers, body)
        assert not verify(secret, headers, body.replace(b"human.test", b"human.tesT"))
        payload = json.loads(body)
        assert headers["x-egress-event"] == payload["type"] == "approval.pending"
        approval = payload["approval"]
        assert (approval["host"], approval["rule"]) == ("human.test", "people-only")
        # a chat tool answers through the link, with its own token
        session = requests.Session()
        session.trust_env = False
        token = gate.token_files["bob"].read_text().strip()
        answered = session.post(
            payload["links"]["approve"],
            json={"scope": "once", "reason": "from chat"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answered.status_code == 200
        assert held.result().status == 200
        wait_for(lambda: len(receiver.posts) >= 2, "the outcome")
        headers, body = receiver.posts[1]
        assert verify(secret, headers, body)
        outcome = json.loads(body)
        assert outcome["type"] == "approval.decided"
        assert (outcome["approval"]["state"], outcome["approval"]["decided_by"]) == (
            "approved",
            "bob",
        )
        # The gate calls the receiver itself; a client of the gate has no route to it.
        requests_before = receiver.requests
        through = curl(receiver.url, gate.proxy)
        assert through.status == 403 and through.headers["x-egress-reason"] == "no-matching-rule"
        assert receiver.requests == requests_before
    finally:
        gate.stop()
        receiver.stop()


def test_a_webhook_that_never_answers_grants_nothing(
    tmp_path: Path, names: FakeDns, http_upstream: Upstream
) -> None:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(b"0123456789abcdef0123")
    secret_file.chmod(0o600)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port).replace("timeout: 30", "timeout: 3"))
    directory = tmp_path / "gate"
    directory.mkdir()
    dead = "http://127.0.0.1:9/hook"  # the discard port: nothing listens
    gate = ApprovalGate(
        policy, names.nameserver, directory,
        "--approval-webhook", dead, "--approval-webhook-secret", str(secret_file),
    )  # fmt: skip
    try:
        result = curl(f"http://human.test:{http_upstream.port}/", gate.proxy, timeout=20)
        assert result.headers["x-egress-reason"] == "approval-timeout"
        assert http_upstream.accepted == 0
    finally:
        gate.stop()
