"""Threat classes 11 and 16 inside an inspected tunnel: request bodies the gate must read the way the
server will - a ``_method`` override in any body a server could take for a form, an override header
spelled with ``_``, and a body that is a JSON query and a form mutation at once.

The real gate (mitmproxy, the addons, the core) terminates TLS for the hosts below; every refusal is
proven at the counting upstream (nothing reached it), every control by the request arriving whole.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import LocalCA, RunningGate, Upstream, serving
from tests.proxy.core.test_bodies import RACK2_HIDDEN
from tests.security import inspecting, start_gate_with
from tests.security.test_inspection import Tunnel, chunked

pytestmark = pytest.mark.timeout(90)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: gh-read
    hosts: [allowed.test]
    ports: [{port}]
    methods: [GET, HEAD]
  - name: gh-fetch
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/*/*/git-upload-pack"]
  - name: gh-lfs
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/*/*/info/lfs/objects/batch"]
    json_body: {{operation: download}}
  - name: gh-graphql
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [query]
  - name: no-mutations
    action: deny
    hosts: [sub.allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [mutation]
  - name: deny-open
    hosts: [sub.allowed.test]
    ports: [{port}]
  - name: app-post
    hosts: [other.test]
    ports: [{port}]
    methods: [GET, POST]
    paths: ["/myorg/**"]
"""

FORM = b"_method=DELETE"
MULTIPART = b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--B--\r\n'
# Valid JSON whose "query" is a query, AND a strictly valid urlencoded form whose "query" is a
# mutation (express-graphql and Rails pick the form reading for a form type or none).
DUAL_GQL = (
    b'{"a=":"","query":"{ viewer { login } }","x":"&query=mutation{createGist(input:{}){id}}&b=1"}'
)
DUAL_LFS = b'{"a=":"","operation":"download","objects":[],"x":"&operation=upload&b=1"}'
LFS = "/org/repo.git/info/lfs/objects/batch"
LFS_JSON = "application/vnd.git-lfs+json"


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test", "other.test", "sub.allowed.test")


@pytest.fixture(scope="module")
def upstream(test_ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("inspected", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, upstream: Upstream, test_ca: LocalCA
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("bodies")
    running = start_gate_with(
        directory,
        POLICY.format(port=upstream.port),
        dns.nameserver,
        config=inspecting(directory, test_ca),
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(upstream: Upstream) -> None:
    upstream.reset()


def send(
    gate: RunningGate,
    upstream: Upstream,
    host: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
) -> tuple[int, str | None]:
    """One POST in its own inspected tunnel: (status, X-Egress-Reason)."""
    ca = gate.ca
    tunnel = Tunnel(gate, ca, host, upstream.port)
    try:
        status, reply, _ = tunnel.request("POST", target, body, headers)
    finally:
        tunnel.close()
    return status, reply.get("x-egress-reason")


def last_request_decision(gate: RunningGate) -> object:
    decisions = [d for d in gate.decisions if d.kind == Kind.REQUEST]
    assert decisions, "no request decision"
    return decisions[-1]


# -- finding 1: a form `_method` in any body a server could read as a form ----------------------------


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        # Rack: a POST without Content-Type is form data
        ({}, FORM, Reason.REQUEST_NOT_ALLOWED),
        ({"Content-Type": ""}, FORM, Reason.REQUEST_NOT_ALLOWED),
        # Rack and PHP end the media type at ',', PHP also at a space
        (
            {"Content-Type": "application/x-www-form-urlencoded, text/plain"},
            FORM,
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            {"Content-Type": "application/x-www-form-urlencoded charset=utf-8"},
            FORM,
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ({"Content-Type": "Application/X-WWW-Form-Urlencoded"}, FORM, Reason.REQUEST_NOT_ALLOWED),
        # Rack's parseable_data?: multipart/mixed and multipart/related are read too
        ({"Content-Type": "multipart/mixed; boundary=B"}, MULTIPART, Reason.REQUEST_NOT_ALLOWED),
        ({"Content-Type": "multipart/related; boundary=B"}, MULTIPART, Reason.REQUEST_NOT_ALLOWED),
        # a type that is no type/subtype is not known not to be a form
        ({"Content-Type": "nonsense"}, FORM, Reason.REQUEST_NOT_ALLOWED),
        # Rack 2 splits at ';'; PHP reads ' method' and '.method' as _method
        ({}, b"a=1;_method=DELETE", Reason.REQUEST_NOT_ALLOWED),
        ({}, b".method=DELETE", Reason.REQUEST_NOT_ALLOWED),
        ({}, b"%5Fmethod=DELETE", Reason.REQUEST_NOT_ALLOWED),
        # CGI, Rack and Puma: X_HTTP_METHOD_OVERRIDE is HTTP_X_HTTP_METHOD_OVERRIDE
        ({"X_HTTP_METHOD_OVERRIDE": "DELETE"}, b"x", Reason.REQUEST_NOT_ALLOWED),
        ({"x_method_override": "DELETE"}, b"x", Reason.REQUEST_NOT_ALLOWED),
        # a body that must be read and cannot be is ambiguous, not allowed
        ({"Content-Type": "multipart/mixed"}, MULTIPART, Reason.AMBIGUOUS_REQUEST),
        ({"Content-Type": "multipart/form-data; boundary=B"}, b"garbage", Reason.AMBIGUOUS_REQUEST),
        (
            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-16be"},
            "_method=DELETE".encode("utf-16-be"),
            Reason.AMBIGUOUS_REQUEST,
        ),
        ({"Content-Encoding": "gzip"}, b"\x1f\x8b" + FORM, Reason.AMBIGUOUS_REQUEST),
        # two Content-Encoding fields are one list: the body is gzip, whatever the first says
        (
            {"Content-Encoding": "identity", "content-encoding": "gzip"},
            gzip.compress(FORM),
            Reason.AMBIGUOUS_REQUEST,
        ),
        # a transfer coding besides chunked: the body read would still be gzip
        (
            {"Transfer-Encoding": "gzip, chunked"},
            chunked(gzip.compress(FORM)),
            Reason.AMBIGUOUS_REQUEST,
        ),
        # two boundaries: Rack reads the last (a form with _method), Python's parser the first
        (
            {"Content-Type": "multipart/form-data; boundary=a; boundary=b"},
            b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n'
            b'--a\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--a--\r\n',
            Reason.AMBIGUOUS_REQUEST,
        ),
        # two Content-Type fields: a server keeping the last reads a form
        (
            {
                "Content-Type": "application/json",
                "Content-type": "application/x-www-form-urlencoded",
            },
            FORM,
            Reason.REQUEST_NOT_ALLOWED,
        ),
        # part names Rack 2 reads from the raw head and a parser of its fields does not
        *(
            ({"Content-Type": "multipart/form-data; boundary=B"}, body, Reason.REQUEST_NOT_ALLOWED)
            for body in RACK2_HIDDEN.values()
        ),
        # PHP keeps a name up to its first NUL: $_POST['_method']
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"_method%00x=DELETE",
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ({}, b"_method%00=DELETE", Reason.REQUEST_NOT_ALLOWED),
        # more parts than a form has: not read (reading them costs the gate more than the bytes)
        (
            {"Content-Type": "multipart/form-data; boundary=B"},
            b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n' * 1025 + b"--B--\r\n",
            Reason.AMBIGUOUS_REQUEST,
        ),
    ],
    ids=[
        "no-content-type",
        "empty-content-type",
        "comma-type",
        "space-type",
        "upper-case-type",
        "multipart-mixed",
        "multipart-related",
        "not-a-media-type",
        "semicolon-separator",
        "php-dot-name",
        "percent-encoded-name",
        "underscore-header",
        "underscore-x-method-override",
        "multipart-without-boundary",
        "unparseable-multipart",
        "utf16-charset",
        "compressed",
        "compressed-in-a-second-field",
        "gzip-transfer-coding",
        "two-multipart-boundaries",
        "two-content-types",
        *(f"rack2-{name}" for name in RACK2_HIDDEN),
        "php-nul-name",
        "php-nul-name-untyped",
        "too-many-parts",
    ],
)
def test_form_and_header_overrides_are_judged_in_every_spelling(
    gate: RunningGate,
    upstream: Upstream,
    headers: dict[str, str],
    body: bytes,
    reason: Reason,
) -> None:
    status, sent = send(gate, upstream, "other.test", "/myorg/repo", body, headers)
    assert (status, upstream.accepted, upstream.requests) == (403, 0, [])
    assert sent == reason
    decision = last_request_decision(gate)
    assert decision.reason == reason  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"title=hello&body=a;b"),
        ({}, b"title=hello"),
        ({}, b"\x00\xff binary without a type"),
        ({"Content-Type": "multipart/form-data; boundary=B"}, MULTIPART.replace(b"_method", b"t")),
        ({"Content-Type": "application/json"}, b'{"_method": "DELETE"}'),
        ({"Content-Type": "application/octet-stream"}, FORM),
        ({"Content-Type": "text/plain"}, FORM),
    ],
    ids=["form", "untyped-form", "untyped-binary", "multipart", "json", "octet-stream", "text"],
)
def test_posts_without_an_override_still_pass(
    gate: RunningGate, upstream: Upstream, headers: dict[str, str], body: bytes
) -> None:
    status, _ = send(gate, upstream, "other.test", "/myorg/repo", body, headers)
    assert status == 200
    assert [(m, t) for m, t, _ in upstream.requests] == [("POST", "/myorg/repo")]


# -- finding 2: a body condition read as JSON holds only for a body declared JSON ----------------------


@pytest.mark.parametrize(
    ("target", "body", "headers"),
    [
        ("/graphql", DUAL_GQL, {"Content-Type": "application/x-www-form-urlencoded"}),
        ("/graphql", DUAL_GQL, {}),
        ("/graphql", DUAL_GQL, {"Content-Type": "text/plain"}),
        (
            "/graphql",
            DUAL_GQL,
            {"Content-Type": "application/json, application/x-www-form-urlencoded"},
        ),
        (LFS, DUAL_LFS, {"Content-Type": "application/x-www-form-urlencoded"}),
        (LFS, DUAL_LFS, {}),
        ("/graphql", b"query { viewer { login } }", {"Content-Type": "application/graphql"}),
        # Rails merges the query string into params, and a controller running params[:_json] as a
        # batch runs the URL's documents
        (
            "/graphql?_json%5B%5D%5Bquery%5D=mutation%7BcreateGist%7Bid%7D%7D",
            b'{"query": "{ viewer { login } }"}',
            {"Content-Type": "application/json"},
        ),
        # Rails (GitLab's LFS batch) merges the query over the JSON body: the URL's operation wins
        (
            LFS + "?operation=upload",
            b'{"operation": "download", "objects": []}',
            {"Content-Type": LFS_JSON},
        ),
    ],
    ids=[
        "graphql-as-form",
        "graphql-untyped",
        "graphql-as-text",
        "graphql-json-then-form",
        "lfs-as-form",
        "lfs-untyped",
        "application-graphql",
        "graphql-batch-in-the-url",
        "lfs-operation-in-the-url",
    ],
)
def test_json_body_rules_match_only_bodies_declared_json(
    gate: RunningGate, upstream: Upstream, target: str, body: bytes, headers: dict[str, str]
) -> None:
    status, reason = send(gate, upstream, "allowed.test", target, body, headers)
    assert (status, upstream.accepted, upstream.requests) == (403, 0, [])
    assert reason == Reason.REQUEST_NOT_ALLOWED


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/x-www-form-urlencoded"}, {}],
    ids=["as-form", "untyped"],
)
def test_a_deny_rule_reading_json_matches_a_body_not_declared_json(
    gate: RunningGate, upstream: Upstream, headers: dict[str, str]
) -> None:
    status, reason = send(gate, upstream, "sub.allowed.test", "/graphql", DUAL_GQL, headers)
    assert (status, upstream.accepted, upstream.requests) == (403, 0, [])
    assert reason == Reason.DENIED_BY_RULE
    assert last_request_decision(gate).rule == "no-mutations"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Version": "13"},
        {"Sec_WebSocket_Key": "x"},
        {"Upgrade": "websocket", "Connection": "Upgrade"},
    ],
    ids=["handshake-field", "handshake-field-underscored", "upgrade"],
)
def test_a_deny_rule_is_not_stepped_around_by_looking_like_a_websocket_upgrade(
    gate: RunningGate, upstream: Upstream, headers: dict[str, str]
) -> None:
    """Handshake fields make the rules judge an upgrade; a server runs the POST all the same."""
    body = json.dumps({"query": "mutation { createGist { id } }"}).encode()
    fields = {"Content-Type": "application/json", **headers}
    status, reason = send(gate, upstream, "sub.allowed.test", "/graphql", body, fields)
    assert (status, upstream.accepted, upstream.requests) == (403, 0, [])
    assert reason == Reason.DENIED_BY_RULE
    assert last_request_decision(gate).rule == "no-mutations"  # type: ignore[attr-defined]


def test_a_deny_rule_is_not_stepped_around_by_a_trailing_slash(
    gate: RunningGate, upstream: Upstream
) -> None:
    """Rails and Express route ``/graphql/`` to ``/graphql``: the deny rule on it holds there."""
    body = json.dumps({"query": "mutation { createGist { id } }"}).encode()
    fields = {"Content-Type": "application/json"}
    status, reason = send(gate, upstream, "sub.allowed.test", "/graphql/", body, fields)
    assert (status, upstream.accepted, upstream.requests) == (403, 0, [])
    assert reason == Reason.DENIED_BY_RULE
    assert last_request_decision(gate).rule == "no-mutations"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("host", "target", "body", "content_type", "rule"),
    [
        ("allowed.test", "/graphql", b'{"query": "{ viewer { login } }"}', "application/json", "gh-graphql"),
        (
            "allowed.test",
            "/graphql",
            b'{"query": "{ viewer { login } }"}',
            "Application/JSON; charset=utf-8",
            "gh-graphql",
        ),
        ("allowed.test", LFS, b'{"operation": "download", "objects": []}', LFS_JSON, "gh-lfs"),
        ("allowed.test", LFS, b'{"operation": "download", "objects": []}', "application/json", "gh-lfs"),
        ("allowed.test", "/o/r.git/git-upload-pack", b"0032want x\n0000", "application/x-git-upload-pack-request", "gh-fetch"),
        ("sub.allowed.test", "/graphql", b'{"query": "{ a }"}', "application/json", "deny-open"),
    ],
    ids=["graphql-query", "graphql-query-charset", "lfs-download", "lfs-as-json", "git-fetch", "deny-rule-query"],
)  # fmt: skip
def test_legitimate_json_and_git_posts_still_pass(
    gate: RunningGate,
    upstream: Upstream,
    host: str,
    target: str,
    body: bytes,
    content_type: str,
    rule: str,
) -> None:
    status, _ = send(gate, upstream, host, target, body, {"Content-Type": content_type})
    assert status == 200
    assert [(m, t) for m, t, _ in upstream.requests] == [("POST", target)]
    decision = last_request_decision(gate)
    assert (decision.decision, decision.rule) == (Verdict.ALLOW, rule)  # type: ignore[attr-defined]


def test_a_json_mutation_is_still_refused(gate: RunningGate, upstream: Upstream) -> None:
    body = json.dumps({"query": "mutation { createGist(input: {}) { id } }"}).encode()
    status, _ = send(
        gate, upstream, "allowed.test", "/graphql", body, {"Content-Type": "application/json"}
    )
    assert (status, upstream.accepted) == (403, 0)
