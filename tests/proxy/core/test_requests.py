"""The request step on a read-only GitHub-like policy: a table of requests and what each must get.

Every refusal row is an exfiltration or evasion attempt (threat classes 11 and 16); every allow row is
what a real read-only client sends. The properties check that spelling never changes the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import BODY_NEEDED, decide, decide_request
from proxy.core.requests import HOLD_LIMIT, HttpHead, judged_methods
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

POLICY = """
version: 1
mode: {mode}
rules:
  - name: git-discovery
    hosts: [github.test]
    methods: [GET]
    paths: ["/*/*/info/refs"]
    paths_case: insensitive
    query: {{service: git-upload-pack}}
  - name: git-fetch
    hosts: [github.test]
    methods: [POST]
    paths: ["/*/*/git-upload-pack"]
    paths_case: insensitive
  - name: lfs-download
    hosts: [github.test]
    methods: [POST]
    paths: ["/*/*/info/lfs/objects/batch"]
    json_body: {{operation: download}}
  - name: pages
    hosts: [github.test]
    methods: [GET, HEAD]
    paths: ["/myorg/**"]
    paths_case: insensitive
  - name: graphql-read
    hosts: [api.github.test]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [query]
  - name: api-read
    hosts: [api.github.test]
    methods: [GET, HEAD]
  - name: no-gists
    action: deny
    hosts: [api.github.test]
    paths: ["/gists", "/gists/**"]
  - name: uploads-small
    hosts: [upload.test]
    methods: [PUT]
    max_request_bytes: 100
  - name: socket
    hosts: [ws.test]
    methods: [GET]
    paths: [/socket]
    websocket: true
  - name: ws-pages
    hosts: [ws.test]
    methods: [GET]
  - name: mixed-read
    hosts: [mixed.test]
    methods: [GET]
  - name: mixed-open
    hosts: [mixed.test]
  - name: audited
    hosts: [audited.test]
    inspect: true
  - name: big-small-puts
    hosts: [big.test]
    methods: [PUT]
    max_request_bytes: 10
  - name: big-open
    hosts: [big.test]
  - name: lfs-open
    hosts: [lfs.test]
  - name: no-lfs-upload
    action: deny
    hosts: [lfs.test]
    methods: [POST]
    json_body: {{operation: upload}}
  - name: open-api
    hosts: [open.test]
  - name: open-no-delete
    action: deny
    hosts: [open.test]
    methods: [DELETE]
  - name: open-no-sockets
    action: deny
    hosts: [open.test]
    paths: [/chat]
    websocket: true
  - name: open-no-admin
    action: deny
    hosts: [open.test]
    paths: [/admin/]
  - name: open-no-push
    action: deny
    hosts: [open.test]
    query: {{service: git-receive-pack}}
  - name: open-no-plain-feed
    action: deny
    hosts: [open.test]
    paths: [/feed]
    websocket: false
  - name: plain
    hosts: [plain.test]
  - name: app-post
    hosts: [app.test]
    methods: [GET, POST]
    paths: ["/myorg/**"]
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("requests") / "policy.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    return load_policy(path)


def ask(
    policy: Policy, host: str, method: str, target: str, **head: object
) -> tuple[Verdict, Reason, str | None]:
    request = Request(
        Kind.REQUEST, host, 443, method, target, http=HttpHead(method, target, **head)
    )  # type: ignore[arg-type]
    decision = decide(request, policy)
    return decision.decision, decision.reason, decision.rule


ALLOW, DENY = Verdict.ALLOW, Verdict.DENY
GQL_QUERY = json.dumps({"query": "query { viewer { login } }"}).encode()
GQL_MUTATION = json.dumps({"query": "mutation { createGist(input: {}) { id } }"}).encode()
JSON, LFS_JSON = "application/json", "application/vnd.git-lfs+json"
GIT_FETCH = "application/x-git-upload-pack-request"
FORM = "application/x-www-form-urlencoded"
# Valid JSON (a query, a download) and a valid form (a mutation, an upload) at once.
DUAL_GQL = b'{"a=":"","query":"{ a }","x":"&query=mutation{b}&c=1"}'
DUAL_LFS = b'{"a=":"","operation":"download","x":"&operation=upload&c=1"}'
MULTIPART = b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--B--\r\n'

# fmt: off
TABLE: list[tuple[str, str, str, dict[str, object], Verdict, Reason, str | None]] = [
    # git clone and fetch
    ("github.test", "GET", "/org/repo/info/refs?service=git-upload-pack", {}, ALLOW, Reason.ALLOWED_BY_RULE, "git-discovery"),
    ("github.test", "GET", "/Org/Repo.git/info/refs?service=git-upload-pack", {}, ALLOW, Reason.ALLOWED_BY_RULE, "git-discovery"),
    ("github.test", "GET", "/org/repo/info/refs?service=git%2Dupload-pack", {}, ALLOW, Reason.ALLOWED_BY_RULE, "git-discovery"),
    ("github.test", "POST", "/org/repo.git/git-upload-pack", {"content_type": GIT_FETCH, "body_size": 200}, ALLOW, Reason.ALLOWED_BY_RULE, "git-fetch"),
    # git push: discovery and the pack
    ("github.test", "GET", "/org/repo/info/refs?service=git-receive-pack", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/git-receive-pack", {"body_size": 200}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/git-receive-pack", {"body_size": None}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # parameters repeated, absent, or in another case: servers pick different copies
    ("github.test", "GET", "/org/repo/info/refs?service=git-upload-pack&service=git-receive-pack", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/org/repo/info/refs?service=git-upload-pack;service=git-receive-pack", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/org/repo/info/refs?service=git-upload-pack&SERVICE=git-receive-pack", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/org/repo/info/refs", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # path tricks
    ("github.test", "GET", "/myorg/repo/blob/main/README.md", {}, ALLOW, Reason.ALLOWED_BY_RULE, "pages"),
    ("github.test", "GET", "/MyOrg/repo", {}, ALLOW, Reason.ALLOWED_BY_RULE, "pages"),
    ("github.test", "GET", "/myorg/../evil/repo", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/%2e%2e/evil/repo", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg%2f..%2fevil/repo", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg\\..\\evil", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg//evil", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg;/../evil", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/%00", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/evil/repo", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # method overrides: the server acts on the override
    ("github.test", "GET", "/myorg/repo", {"overrides": ("DELETE",)}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?_method=DELETE", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?_METHOD=put", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # ... under every name PHP (Symfony's override reads the query too) gives the parameter
    ("github.test", "GET", "/myorg/repo?.method=DELETE", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?+_method=DELETE", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?%20_method=DELETE", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?_method%5B%5D=DELETE", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?x=1&%2Emethod=PUT", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "GET", "/myorg/repo?.method", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/repo?.method=HEAD&method=DELETE&my_method=PUT", {}, ALLOW, Reason.ALLOWED_BY_RULE, "pages"),
    ("github.test", "GET", "/myorg/repo", {"overrides": ("head",)}, ALLOW, Reason.ALLOWED_BY_RULE, "pages"),
    ("github.test", "GET", "/myorg/repo", {"overrides": ("DEL ETE",)}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/repo", {"overrides": ("HEAD\x0b",)}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/repo", {"overrides": ("HE\u017fD",)}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/repo?_method=HE%C5%BFD", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "GET", "/myorg/repo?_method", {}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("github.test", "get", "/myorg/repo", {}, ALLOW, Reason.ALLOWED_BY_RULE, "pages"),
    # LFS: the body decides
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-download"),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "upload"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 60, "body": b'{"operation": "download", "operation": "upload"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 3, "body": b"{{{"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": HOLD_LIMIT + 1}, DENY, Reason.REQUEST_TOO_LARGE, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": None, "body_overflow": True}, DENY, Reason.REQUEST_TOO_LARGE, None),
    # a JSON body condition holds only for a body declared JSON: servers parse by the type
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": JSON, "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-download"),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": "Application/Vnd.Git-Lfs+JSON; charset=utf-8", "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-download"),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": FORM, "body_size": 60, "body": DUAL_LFS}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": "text/plain", "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": "application/jsonx", "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch", {"content_type": "application/json, text/plain", "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"body_size": 60, "body": DUAL_GQL}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": FORM, "body_size": 60, "body": DUAL_GQL}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": "application/graphql", "body_size": 9, "body": b"{ a }"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # GraphQL: queries only, parsed
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, ALLOW, Reason.ALLOWED_BY_RULE, "graphql-read"),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": GQL_MUTATION}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'{"query": "query { a } mutation { b }"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'[{"query": "{ a }"}, {"query": "mutation { b }"}]'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'{"query": "{ a }", "query": "mutation { b }"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'{"extensions": {"persistedQuery": {"sha256Hash": "ab"}}}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'{"query": "mutation"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql", {"content_type": JSON, "body_size": 50, "body": b'{"query": "# mutation {\\n{ a }"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "graphql-read"),
    # URL parameters a server may run as documents: Rails merges the query into params[:_json]
    ("api.github.test", "POST", "/graphql?_json%5B%5D%5Bquery%5D=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?_json[0][query]=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?_json[][variables]=x", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?graphql[query]=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?_json[][query]=%7Ba%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, ALLOW, Reason.ALLOWED_BY_RULE, "graphql-read"),
    ("api.github.test", "POST", "/graphql?queryId=1&json=x", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, ALLOW, Reason.ALLOWED_BY_RULE, "graphql-read"),
    # ... and as PHP's servers (graphql-php) name them: a leading "+" or space dropped, "query[]"
    ("api.github.test", "POST", "/graphql?+query=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?%20query=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "POST", "/graphql?query[]=mutation%7Bb%7D", {"content_type": JSON, "body_size": 50, "body": GQL_QUERY}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # REST: reads yes, writes no, a deny rule with conditions beats the allow rule
    ("api.github.test", "GET", "/repos/o/r", {}, ALLOW, Reason.ALLOWED_BY_RULE, "api-read"),
    ("api.github.test", "DELETE", "/repos/o/r", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "PATCH", "/repos/o/r", {"body_size": 10}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("api.github.test", "GET", "/gists", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("api.github.test", "GET", "/gists/abc", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("api.github.test", "GET", "/gists/./abc", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),  # doubt denies
    ("api.github.test", "GET", "/user/../gists", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("api.github.test", "POST", "/user", {"content_type": "application/x-www-form-urlencoded", "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # a POST body any server could read as a form is read for `_method`; a type known not to be one is not
    ("app.test", "POST", "/myorg/r", {"content_type": FORM, "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": "", "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": FORM + ", text/plain", "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": FORM + " charset=utf-8", "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": "application/json, " + FORM, "body_size": 14, "body": b"_method=DELETE"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": "multipart/related; boundary=B", "body_size": 70, "body": MULTIPART}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"content_type": "multipart/mixed", "body_size": 70, "body": MULTIPART}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("app.test", "POST", "/myorg/r", {"body_size": 14, "content_encoding": "gzip", "body": b"_method=DELETE"}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("app.test", "POST", "/myorg/r", {"body_size": None, "body_overflow": True}, DENY, Reason.REQUEST_TOO_LARGE, None),
    ("app.test", "POST", "/myorg/r", {"body_size": HOLD_LIMIT + 1}, DENY, Reason.REQUEST_TOO_LARGE, None),
    ("app.test", "POST", "/myorg/r", {"overrides": ("DELETE",), "body_size": 1, "content_type": JSON}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("app.test", "POST", "/myorg/r", {"body_size": 9, "body": b"title=a;b"}, ALLOW, Reason.ALLOWED_BY_RULE, "app-post"),
    ("app.test", "POST", "/myorg/r", {"body_size": 3, "body": b"\xff\x00\x01"}, ALLOW, Reason.ALLOWED_BY_RULE, "app-post"),
    ("app.test", "POST", "/myorg/r", {"content_type": JSON, "body_size": 14}, ALLOW, Reason.ALLOWED_BY_RULE, "app-post"),
    ("app.test", "POST", "/myorg/r", {"content_type": "application/octet-stream", "body_size": HOLD_LIMIT + 1}, ALLOW, Reason.ALLOWED_BY_RULE, "app-post"),
    ("app.test", "POST", "/myorg/r", {"content_type": FORM, "body_size": 0}, ALLOW, Reason.ALLOWED_BY_RULE, "app-post"),
    # sizes
    ("upload.test", "PUT", "/f", {"body_size": 100}, ALLOW, Reason.ALLOWED_BY_RULE, "uploads-small"),
    ("upload.test", "PUT", "/f", {"body_size": 101}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("upload.test", "PUT", "/f", {"body_size": None, "body": b"x" * 100}, ALLOW, Reason.ALLOWED_BY_RULE, "uploads-small"),
    ("upload.test", "PUT", "/f", {"body_size": None, "body": b"x" * 101}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("upload.test", "PUT", "/f", {"body_size": None, "body_overflow": True}, DENY, Reason.REQUEST_TOO_LARGE, None),
    # WebSocket only where a rule says so
    ("ws.test", "GET", "/socket", {"upgrade": "websocket"}, ALLOW, Reason.ALLOWED_BY_RULE, "socket"),
    ("ws.test", "GET", "/socket", {"upgrade": "WebSocket"}, ALLOW, Reason.ALLOWED_BY_RULE, "socket"),
    ("ws.test", "GET", "/other", {"upgrade": "websocket"}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("ws.test", "GET", "/other", {}, ALLOW, Reason.ALLOWED_BY_RULE, "ws-pages"),
    ("ws.test", "GET", "/socket", {"upgrade": "h2c"}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    # handshake fields without Upgrade: mitmproxy (and servers) switch on them, so the rules judge
    # an upgrade
    ("ws.test", "GET", "/other", {"handshake": True}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("ws.test", "GET", "/socket", {"handshake": True}, ALLOW, Reason.ALLOWED_BY_RULE, "socket"),
    ("ws.test", "GET", "/socket", {"handshake": True, "upgrade": "h2c"}, DENY, Reason.AMBIGUOUS_REQUEST, None),
    ("mixed.test", "GET", "/a", {"handshake": True}, ALLOW, Reason.ALLOWED_BY_RULE, "mixed-open"),
    # a rule without request conditions allows every request, WebSocket included
    ("mixed.test", "DELETE", "/anything", {}, ALLOW, Reason.ALLOWED_BY_RULE, "mixed-open"),
    ("mixed.test", "GET", "/chat", {"upgrade": "websocket"}, ALLOW, Reason.ALLOWED_BY_RULE, "mixed-open"),
    ("mixed.test", "GET", "/a", {}, ALLOW, Reason.ALLOWED_BY_RULE, "mixed-read"),
    ("audited.test", "POST", "/x/../y", {"content_type": "text/plain", "body_size": 5}, ALLOW, Reason.ALLOWED_BY_RULE, "audited"),
    ("audited.test", "GET", "/chat", {"upgrade": "websocket"}, ALLOW, Reason.ALLOWED_BY_RULE, "audited"),
    # a deny rule without `websocket` refuses upgrades too: handshake fields do not step around it
    # Rails merges the query over a JSON body: a URL parameter of the field's name counts too
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch?operation=upload", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch?operation=download&operation=upload", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch?operation", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("github.test", "POST", "/org/repo.git/info/lfs/objects/batch?operation=download", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-download"),
    ("lfs.test", "POST", "/o/r/info/lfs/objects/batch?operation=upload", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, DENY, Reason.DENIED_BY_RULE, "no-lfs-upload"),
    ("lfs.test", "POST", "/o/r/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "upload"}'}, DENY, Reason.DENIED_BY_RULE, "no-lfs-upload"),
    ("lfs.test", "POST", "/o/r/info/lfs/objects/batch", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-open"),
    ("lfs.test", "POST", "/o/r/info/lfs/objects/batch?operation=download", {"content_type": LFS_JSON, "body_size": 30, "body": b'{"operation": "download"}'}, ALLOW, Reason.ALLOWED_BY_RULE, "lfs-open"),
    ("open.test", "DELETE", "/x", {}, DENY, Reason.DENIED_BY_RULE, "open-no-delete"),
    ("open.test", "DELETE", "/x", {"handshake": True}, DENY, Reason.DENIED_BY_RULE, "open-no-delete"),
    ("open.test", "DELETE", "/x", {"upgrade": "websocket"}, DENY, Reason.DENIED_BY_RULE, "open-no-delete"),
    ("open.test", "GET", "/x", {"handshake": True}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    ("open.test", "GET", "/chat", {"upgrade": "websocket"}, DENY, Reason.DENIED_BY_RULE, "open-no-sockets"),
    ("open.test", "GET", "/chat", {}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    ("open.test", "GET", "/feed", {}, DENY, Reason.DENIED_BY_RULE, "open-no-plain-feed"),
    ("open.test", "GET", "/feed", {"upgrade": "websocket"}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    # query names as PHP reads them: another copy of the parameter
    ("open.test", "GET", "/r/info/refs?%2Bservice=git-receive-pack", {}, DENY, Reason.DENIED_BY_RULE, "open-no-push"),
    ("open.test", "GET", "/r/info/refs?service%5B%5D=git-receive-pack", {}, DENY, Reason.DENIED_BY_RULE, "open-no-push"),
    ("open.test", "GET", "/r/info/refs?xservice=git-receive-pack", {}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    ("github.test", "GET", "/o/r/info/refs?service=git-upload-pack&+service=git-receive-pack", {}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    # a held body that overflowed is gone: no rule lets the rest of it on
    ("big.test", "PUT", "/f", {"body_size": None}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
    ("big.test", "PUT", "/f", {"body_size": None, "body": b"x" * 10}, ALLOW, Reason.ALLOWED_BY_RULE, "big-small-puts"),
    ("big.test", "PUT", "/f", {"body_size": None, "body": b"x" * 11}, ALLOW, Reason.ALLOWED_BY_RULE, "big-open"),
    ("big.test", "PUT", "/f", {"body_size": None, "body_overflow": True}, DENY, Reason.REQUEST_TOO_LARGE, None),
    # a deny rule's path with or without a trailing '/': routers take both for one route
    ("open.test", "GET", "/feed/", {}, DENY, Reason.DENIED_BY_RULE, "open-no-plain-feed"),
    ("open.test", "GET", "/chat/", {"upgrade": "websocket"}, DENY, Reason.DENIED_BY_RULE, "open-no-sockets"),
    ("open.test", "GET", "/admin", {}, DENY, Reason.DENIED_BY_RULE, "open-no-admin"),
    ("open.test", "GET", "/admin/", {}, DENY, Reason.DENIED_BY_RULE, "open-no-admin"),
    ("open.test", "GET", "/feeds", {}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    ("open.test", "GET", "/", {}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    ("api.github.test", "GET", "/gists/", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    # a deny rule's path ignores case unless told otherwise (Express routes /Gists as /gists)
    ("api.github.test", "GET", "/Gists", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("open.test", "GET", "/ADMIN/", {}, DENY, Reason.DENIED_BY_RULE, "open-no-admin"),
    # ... and without a format suffix (Rails routes /gists.json as /gists)
    ("api.github.test", "GET", "/gists.json", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("api.github.test", "GET", "/gists.x.json", {}, DENY, Reason.DENIED_BY_RULE, "no-gists"),
    ("open.test", "GET", "/admin.json/", {}, DENY, Reason.DENIED_BY_RULE, "open-no-admin"),
    ("open.test", "GET", "/feeds.json", {}, ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
    # an allow rule's path is exact
    ("github.test", "POST", "/org/repo/git-upload-pack/", {"content_type": GIT_FETCH, "body_size": 4}, DENY, Reason.REQUEST_NOT_ALLOWED, None),
]
# fmt: on


@pytest.mark.parametrize(
    ("host", "method", "target", "head", "verdict", "reason", "rule"),
    TABLE,
    ids=[f"{row[1]} {row[0]}{row[2][:60]}" for row in TABLE],
)
def test_request_table(
    policy: Policy,
    host: str,
    method: str,
    target: str,
    head: dict[str, object],
    verdict: Verdict,
    reason: Reason,
    rule: str | None,
) -> None:
    assert ask(policy, host, method, target, **head) == (verdict, reason, rule)


def test_unread_bodies_are_asked_for_before_anything_is_decided(policy: Policy) -> None:
    def request(host: str, target: str, method: str = "POST", **head: object) -> Request:
        http = HttpHead(method, target, **head)  # type: ignore[arg-type]
        return Request(Kind.REQUEST, host, 443, method, target, http=http)

    lfs = request("github.test", "/o/r/info/lfs/objects/batch", body_size=30, content_type=LFS_JSON)
    assert decide_request(lfs, policy) is BODY_NEEDED
    graphql = request("api.github.test", "/graphql", body_size=30, content_type=JSON)
    assert decide_request(graphql, policy) is BODY_NEEDED
    # not declared JSON: no JSON rule can allow it, so nothing need be held to refuse it
    untyped = decide(request("api.github.test", "/graphql", body_size=30), policy)
    assert (untyped.decision, untyped.reason) == (Verdict.DENY, Reason.REQUEST_NOT_ALLOWED)
    # an untyped POST body may be a form: held for its `_method`
    assert decide_request(request("app.test", "/myorg/x", body_size=30), policy) is BODY_NEEDED
    assert (
        decide_request(request("upload.test", "/f", "PUT", body_size=None), policy) is BODY_NEEDED
    )
    form = "application/x-www-form-urlencoded"
    assert (
        decide_request(request("audited.test", "/f", body_size=9, content_type=form), policy)
        is BODY_NEEDED
    )
    # decide() refuses what it cannot decide without the body: a caller that cannot hold bodies fails closed.
    refused = decide(graphql, policy)
    assert (refused.decision, refused.reason) == (Verdict.DENY, Reason.REQUEST_NOT_ALLOWED)


def test_a_host_without_request_rules_is_decided_as_a_whole(policy: Policy) -> None:
    assert ask(policy, "plain.test", "DELETE", "/a/../b%2f") == (
        ALLOW,
        Reason.ALLOWED_BY_RULE,
        "plain",
    )
    assert policy.index.request_rules("plain.test", 443) is None
    assert policy.index.request_rules("github.test", 443) is not None
    assert policy.index.request_rules("github.test", 8443) is None  # no rule on that port


def test_a_deny_rule_with_conditions_does_not_deny_the_host(policy: Policy) -> None:
    tunnel = decide(Request(Kind.CONNECT, "api.github.test", 443), policy)
    assert (tunnel.decision, tunnel.rule) == (ALLOW, "graphql-read")


def test_report_mode_reports_requests_no_rule_allows_but_not_ambiguous_ones(tmp_path: Path) -> None:
    """A team learns a host's request rules in report mode: a request no rule allows goes through
    and is recorded; an ambiguous request and an explicit request deny rule still refuse."""
    path = tmp_path / "report.yaml"
    path.write_text(POLICY.format(mode="report"))
    report = load_policy(path)
    cases = (
        (
            "github.test",
            "/org/repo/info/refs?service=git-receive-pack",
            Verdict.REPORT,
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ("github.test", "/myorg/../evil", Verdict.DENY, Reason.AMBIGUOUS_REQUEST),
        ("api.github.test", "/gists", Verdict.DENY, Reason.DENIED_BY_RULE),
    )
    for host, target, verdict, reason in cases:
        request = Request(Kind.REQUEST, host, 443, "GET", target, http=HttpHead("GET", target))
        decision = decide(request, report)
        assert (decision.decision, decision.reason, decision.mode) == (verdict, reason, "report")
        if verdict is Verdict.DENY:
            assert decision.detail is not None and "report mode too" in decision.detail
        enforced = decide(request, load_policy(_enforce(tmp_path)))
        assert (enforced.decision, enforced.reason) == (Verdict.DENY, reason)


def _enforce(tmp_path: Path) -> Path:
    path = tmp_path / "enforce.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    return path


def test_a_rule_in_report_mode_reports_only_its_own_host_requests(tmp_path: Path) -> None:
    path = tmp_path / "rule.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        "  - {name: learning, hosts: [learn.test], methods: [GET], mode: report}\n"
        "  - {name: strict, hosts: [strict.test], methods: [GET]}\n"
        "  - {name: trial-deny, action: deny, hosts: [learn.test], methods: [DELETE], mode: report}\n"
    )
    policy = load_policy(path)

    def post(host: str, method: str = "POST") -> tuple[Verdict, Reason, str]:
        d = decide(
            Request(Kind.REQUEST, host, 443, method, "/x", http=HttpHead(method, "/x")), policy
        )
        return d.decision, d.reason, d.mode

    assert post("learn.test") == (Verdict.REPORT, Reason.REQUEST_NOT_ALLOWED, "report")
    assert post("strict.test") == (Verdict.DENY, Reason.REQUEST_NOT_ALLOWED, "enforce")
    assert post("learn.test", "DELETE") == (Verdict.REPORT, Reason.DENIED_BY_RULE, "report")


# -- properties --------------------------------------------------------------------------------------

UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~"


def respell(text: str, data: st.DataObject) -> str:
    return "".join(
        f"%{ord(ch):02X}" if ch in UNRESERVED and data.draw(st.booleans()) else ch for ch in text
    )


@given(
    st.sampled_from([row for row in TABLE if "%" not in row[2] and "\\" not in row[2]]),
    st.data(),
)
def test_equivalent_spellings_decide_alike(
    policy: Policy,
    row: tuple[str, str, str, dict[str, object], Verdict, Reason, str | None],
    data: st.DataObject,
) -> None:
    host, method, target, head, verdict, reason, rule = row
    assert ask(policy, host, method, respell(target, data), **head) == (verdict, reason, rule)


@given(
    st.lists(
        st.sampled_from(["..", ".", "%2e%2e", "%2e", "", "%2f", "%5c", "\\", ";a", "evil", "x"]),
        min_size=1,
        max_size=5,
    )
)
def test_no_spelling_leaving_the_allowed_tree_is_allowed(policy: Policy, parts: list[str]) -> None:
    target = "/myorg/" + "/".join(parts)
    verdict, _, _ = ask(policy, "github.test", "GET", target)
    if verdict is ALLOW:  # only plain names, and an empty last segment (a trailing slash)
        assert all(part in ("evil", "x") for part in parts[:-1]), target
        assert parts[-1] in ("evil", "x", ""), target


def test_judged_methods_are_the_request_line_then_every_override() -> None:
    assert judged_methods(HttpHead("get", "/x")) == ("GET",)
    head = HttpHead("PATCH", "/x?_method=delete", overrides=("put", "PATCH", "DELETE"))
    assert judged_methods(head) == ("PATCH", "PUT", "DELETE")
    form = HttpHead(
        "POST", "/x", body_size=14, content_type="application/x-www-form-urlencoded"
    ).with_body(b"_method=DELETE")
    assert judged_methods(form) == ("POST", "DELETE")
    assert judged_methods(HttpHead("GET", "/%zz", overrides=("POST",))) == ("GET", "POST")
