"""Threat classes 16 and 18 together: a credential's ``methods`` against a request that tells the
server to act as another method (an override header, a ``_method`` query parameter or form field).

The server does what the override says, with the real value: a credential declared for ``GET`` and
``POST`` that reached a ``POST`` overridden to ``DELETE`` would lend its authority to a deletion.
Every refusal is proven at an upstream that records what it received: nothing arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.decision import Reason
from tests.credentials_harness import (
    GITHUB_TOKEN,
    EchoUpstream,
    credential_store,
    curl_through,
    gate_with_credentials,
)
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import LocalCA, RunningGate, serving

pytestmark = pytest.mark.timeout(120)
API_KEY = "egress-test-api-key-0123456789abcdefXYZ"

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: api
    hosts: [allowed.test]
    ports: [{port}]
    inspect: true
"""


class Setup:
    def __init__(self, gate: RunningGate, issued: dict[str, str], port: int) -> None:
        self.gate = gate
        self.placeholder = issued["github"]
        self.key = issued["keyed"]
        self.url = f"https://allowed.test:{port}/api/x"

    def curl(self, url: str, *args: str) -> Any:
        return curl_through(self.gate, url, *args)


@pytest.fixture(scope="module")
def upstream(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("api", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test")


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    upstream: EchoUpstream,
    test_ca: LocalCA,
) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("credential-methods")
    policy = POLICY.format(port=upstream.port)
    (directory / "p.yaml").write_text(policy)
    store = credential_store(
        directory,
        [
            {
                "name": "github",
                "source": {"env": "EGRESS_METHODS_TEST_TOKEN"},
                "hosts": [f"allowed.test:{upstream.port}"],
                "header": "Authorization",
                "methods": ["GET", "POST"],
            },
            {
                "name": "keyed",
                "source": {"env": "EGRESS_METHODS_TEST_KEY"},
                "hosts": [f"allowed.test:{upstream.port}"],
                "header": "X-Api-Key",
                "format": "Key {}",
            },
        ],
        {"EGRESS_METHODS_TEST_TOKEN": GITHUB_TOKEN, "EGRESS_METHODS_TEST_KEY": API_KEY},
    )
    issued = store.issue(None)
    gate = gate_with_credentials(directory, policy, dns.nameserver, test_ca, store)
    yield Setup(gate, issued, upstream.port)
    gate.stop()


@pytest.fixture(autouse=True)
def _reset(upstream: EchoUpstream) -> None:
    upstream.reset()
    upstream.bodies.clear()


OVERRIDES = [
    ("header", "POST", ["-H", "X-HTTP-Method-Override: DELETE", "--json", "{}"], ""),
    ("underscored header", "GET", ["-H", "X_HTTP_Method_Override: DELETE"], ""),
    ("x-http-method", "GET", ["-H", "X-HTTP-Method: PUT"], ""),
    ("query", "GET", [], "?_method=DELETE"),
    ("form field", "POST", ["--data", "title=x&_method=DELETE"], ""),
    ("multipart field", "POST", ["-F", "_method=DELETE"], ""),
    ("form without a type", "POST", ["-H", "Content-Type:", "--data", "_method=PATCH"], ""),
]


@pytest.mark.parametrize("case", OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_an_override_to_a_method_the_credential_is_not_for_sends_nothing(
    setup: Setup, upstream: EchoUpstream, case: tuple[str, str, list[str], str]
) -> None:
    how, method, args, query = case
    result = setup.curl(
        setup.url + query,
        "-X",
        method,
        "-H",
        f"Authorization: Bearer {setup.placeholder}",
        *args,
    )
    assert result.status == 403, (how, result)
    assert result.headers["x-egress-reason"] == "credential-misuse"
    assert upstream.requests == [], how  # nothing arrived, with the real value or without
    refused = [d for d in setup.gate.memory.decisions if d.reason is Reason.CREDENTIAL_MISUSE]
    assert refused and refused[-1].credential == "github"
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)


def test_a_form_too_long_to_read_for_its_method_is_refused(
    setup: Setup, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """Past what the gate holds, the body's ``_method`` cannot be read: refused (by the request
    step, which holds such a POST's body), never streamed on with the real value in its head."""
    body = tmp_path / "form"
    body.write_bytes(b"a=" + b"x" * (2 * 1024 * 1024) + b"&_method=DELETE")
    result = setup.curl(
        setup.url, "-H", f"Authorization: Bearer {setup.placeholder}", "--data-binary", f"@{body}"
    )
    assert result.status == 403, result
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("GET", ["-H", "X-HTTP-Method-Override: GET"]),
        ("POST", ["--json", json.dumps({"_method": "DELETE"})]),  # JSON is not a form
        ("POST", ["--data", "title=x&body=y"]),
        ("POST", ["--data", "_method=POST"]),
    ],
)
def test_requests_within_the_credentials_methods_still_carry_it(
    setup: Setup, upstream: EchoUpstream, method: str, args: list[str]
) -> None:
    result = setup.curl(
        setup.url, "-X", method, "-H", f"Authorization: Bearer {setup.placeholder}", *args
    )
    assert result.status == 200, result
    assert [h["authorization"] for _, _, h in upstream.requests] == [f"Bearer {GITHUB_TOKEN}"]
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)


@pytest.mark.parametrize("order", ["odd one first", "odd one last"])
def test_every_field_carrying_a_placeholder_must_have_the_declared_format(
    setup: Setup, upstream: EchoUpstream, order: str
) -> None:
    """A credential's ``format`` is the shape its header must have: with the header given twice,
    the field in another shape is refused too, whichever of the two comes last."""
    fields = [f"X-Api-Key: Key {setup.key}", f"X-Api-Key: note {setup.key} end"]
    if order == "odd one first":
        fields.reverse()
    args = [arg for field in fields for arg in ("-H", field)]
    result = setup.curl(setup.url, *args)
    assert result.status == 403, result
    assert result.headers["x-egress-reason"] == "credential-misuse"
    assert upstream.requests == []
    assert API_KEY not in result.body + json.dumps(result.headers)
    control = setup.curl(setup.url, "-H", f"X-Api-Key: Key {setup.key}")
    assert control.status == 200, control
    assert [h["x-api-key"] for _, _, h in upstream.requests] == [f"Key {API_KEY}"]
