"""The read-only presets: what real clients send for reads is allowed, every write is refused, and
only the hosts that take writes are inspected.

The request lines are the ones the clients send (git smart HTTP and LFS, npm, pip, cargo, gem, gh);
the writes are the ones their publish/push commands send.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.core.requests import HttpHead
from proxy.policy.loader import lint_files, load_policy
from proxy.policy.model import Policy

ALLOWLISTS = Path(__file__).resolve().parents[3] / "allowlists"
READONLY = [
    "github-readonly",
    "gitlab-readonly",
    "npm-readonly",
    "pypi-readonly",
    "crates-readonly",
    "rubygems-readonly",
    "maven-readonly",
]
ALLOW, DENY = Verdict.ALLOW, Verdict.DENY
LFS = "application/vnd.git-lfs+json"


def preset(name: str) -> Policy:
    path = ALLOWLISTS / f"{name}.yaml"
    if not path.exists():
        path = ALLOWLISTS / "examples" / f"{name}.yaml"
    return load_policy(path)


def ask(policy: Policy, host: str, method: str, target: str, body: bytes | None = None) -> Verdict:
    """The preset's verdict on one request, whose body (if any) is typed as its client types it:
    git's pack requests, LFS batches and GraphQL documents (JSON), or untyped."""
    head = HttpHead(
        method,
        target,
        body_size=len(body) if body else 0,
        body=body,
        content_type=_content_type(target, body),
    )
    decision = decide(Request(Kind.REQUEST, host, 443, method, target, http=head), policy)
    if decision.decision is DENY:
        assert decision.reason in (
            Reason.REQUEST_NOT_ALLOWED,
            Reason.DENIED_BY_RULE,
            Reason.NO_MATCHING_RULE,
            Reason.AMBIGUOUS_REQUEST,
        ), decision
    return decision.decision


def _content_type(target: str, body: bytes | None) -> str | None:
    if body is None:
        return None
    if target.endswith("/git-upload-pack") or target.endswith("/git-receive-pack"):
        return f"application/x-{target.rsplit('/', 1)[1]}-request"
    if "/info/lfs/" in target:
        return LFS
    if body.startswith(b"{"):
        return "application/json"
    return None


def lfs(operation: str) -> bytes:
    return json.dumps(
        {"operation": operation, "transfers": ["basic"], "objects": [{"oid": "a" * 64, "size": 3}]}
    ).encode()


def graphql(document: str) -> bytes:
    return json.dumps({"query": document, "variables": {}}).encode()


# fmt: off
CASES: list[tuple[str, str, str, str, bytes | None, Verdict]] = [
    # git clone / fetch (smart HTTP v0-v2) and LFS downloads
    ("github-readonly", "github.com", "GET", "/o/r.git/info/refs?service=git-upload-pack", None, ALLOW),
    ("github-readonly", "github.com", "GET", "/O/R/info/refs?service=git-upload-pack", None, ALLOW),
    ("github-readonly", "github.com", "POST", "/o/r.git/git-upload-pack", b"0000", ALLOW),
    ("github-readonly", "github.com", "POST", "/o/r.git/info/lfs/objects/batch", lfs("download"), ALLOW),
    ("github-readonly", "github.com", "GET", "/o/r/archive/refs/heads/main.tar.gz", None, ALLOW),
    ("github-readonly", "github.com", "GET", "/o/r/releases/download/v1/x.tgz", None, ALLOW),
    ("github-readonly", "api.github.com", "GET", "/repos/o/r/releases/latest", None, ALLOW),
    ("github-readonly", "api.github.com", "POST", "/graphql", graphql("query { viewer { login } }"), ALLOW),
    # git push, LFS uploads, gists, REST and GraphQL writes, release-asset uploads
    ("github-readonly", "github.com", "GET", "/o/r.git/info/refs?service=git-receive-pack", None, DENY),
    ("github-readonly", "github.com", "POST", "/o/r.git/git-receive-pack", b"0000", DENY),
    ("github-readonly", "github.com", "POST", "/o/r.git/info/lfs/objects/batch", lfs("upload"), DENY),
    ("github-readonly", "github.com", "POST", "/o/r.git/info/lfs/locks/verify", b"{}", DENY),
    ("github-readonly", "api.github.com", "POST", "/gists", b"{}", DENY),
    ("github-readonly", "api.github.com", "POST", "/repos/o/r/issues", b"{}", DENY),
    ("github-readonly", "api.github.com", "PATCH", "/repos/o/r", b"{}", DENY),
    ("github-readonly", "api.github.com", "DELETE", "/repos/o/r", None, DENY),
    ("github-readonly", "api.github.com", "PUT", "/repos/o/r/contents/x", b"{}", DENY),
    ("github-readonly", "api.github.com", "POST", "/repos/o/r/releases", b"{}", DENY),
    ("github-readonly", "api.github.com", "POST", "/graphql", graphql("mutation { addStar(input: {}) { clientMutationId } }"), DENY),
    ("github-readonly", "uploads.github.com", "POST", "/repos/o/r/releases/1/assets?name=x", b"x", DENY),
    ("github-readonly", "gist.github.com", "POST", "/", b"x", DENY),
    # GitLab, nested groups
    ("gitlab-readonly", "gitlab.com", "GET", "/g/sub/p.git/info/refs?service=git-upload-pack", None, ALLOW),
    ("gitlab-readonly", "gitlab.com", "POST", "/g/sub/p.git/git-upload-pack", b"0000", ALLOW),
    ("gitlab-readonly", "gitlab.com", "POST", "/g/p.git/info/lfs/objects/batch", lfs("download"), ALLOW),
    ("gitlab-readonly", "gitlab.com", "GET", "/api/v4/projects/1/packages/npm/x", None, ALLOW),
    ("gitlab-readonly", "gitlab.com", "POST", "/api/graphql", graphql("{ currentUser { id } }"), ALLOW),
    ("gitlab-readonly", "gitlab.com", "GET", "/g/sub/p.git/info/refs?service=git-receive-pack", None, DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/g/sub/p.git/git-receive-pack", b"0000", DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/g/p.git/info/lfs/objects/batch", lfs("upload"), DENY),
    ("gitlab-readonly", "gitlab.com", "PUT", "/api/v4/projects/1/packages/generic/x/1/f", b"x", DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/api/v4/projects/1/issues", b"{}", DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/api/graphql", graphql("mutation { x }"), DENY),
    # GitLab runs params[:_json] as a batch instead of the body's query (Rails keeps the key)
    ("gitlab-readonly", "gitlab.com", "POST", "/api/graphql", json.dumps({"query": "{ a }", "_json": [{"query": "mutation { x }"}]}).encode(), DENY),
    # the Files API creating a file whose name the fetch and LFS paths end with
    ("gitlab-readonly", "gitlab.com", "POST", "/api/v4/projects/42/repository/files/git-upload-pack", b"{}", DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/API/V4/projects/42/repository/files/git-upload-pack", b"{}", DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/api/v4/projects/42/x/info/lfs/objects/batch", lfs("download"), DENY),
    ("gitlab-readonly", "gitlab.com", "POST", "/g/p/-/x/git-upload-pack", b"0000", DENY),
    # npm: installs and audits yes; publish, unpublish, deprecate, dist-tags, login, tokens no
    ("npm-readonly", "registry.npmjs.org", "GET", "/left-pad", None, ALLOW),
    ("npm-readonly", "registry.npmjs.org", "GET", "/@types%2fnode", None, ALLOW),
    ("npm-readonly", "registry.npmjs.org", "GET", "/left-pad/-/left-pad-1.3.0.tgz", None, ALLOW),
    ("npm-readonly", "registry.npmjs.org", "POST", "/-/npm/v1/security/advisories/bulk", b"{}", ALLOW),
    ("npm-readonly", "registry.npmjs.org", "POST", "/-/npm/v1/security/audits/quick", b"{}", ALLOW),
    ("npm-readonly", "registry.yarnpkg.com", "GET", "/left-pad", None, ALLOW),
    ("npm-readonly", "registry.npmjs.org", "PUT", "/left-pad", b"{}", DENY),
    ("npm-readonly", "registry.npmjs.org", "PUT", "/@scope%2fpkg", b"{}", DENY),
    ("npm-readonly", "registry.yarnpkg.com", "PUT", "/left-pad", b"{}", DENY),
    ("npm-readonly", "registry.npmjs.org", "DELETE", "/left-pad/-rev/3-abc", None, DENY),
    ("npm-readonly", "registry.npmjs.org", "PUT", "/-/user/org.couchdb.user:agent", b"{}", DENY),
    ("npm-readonly", "registry.npmjs.org", "PUT", "/-/package/left-pad/dist-tags/latest", b"1", DENY),
    ("npm-readonly", "registry.npmjs.org", "POST", "/-/npm/v1/tokens", b"{}", DENY),
    # PyPI: the index yes; uploads (a different host) and web forms no
    ("pypi-readonly", "pypi.org", "GET", "/simple/requests/", None, ALLOW),
    ("pypi-readonly", "pypi.org", "GET", "/pypi/requests/json", None, ALLOW),
    ("pypi-readonly", "upload.pypi.org", "POST", "/legacy/", b"x", DENY),
    ("pypi-readonly", "pypi.org", "POST", "/legacy/", b"x", DENY),
    ("pypi-readonly", "pypi.org", "POST", "/manage/account/token/", b"x", DENY),
    # crates.io
    ("crates-readonly", "crates.io", "GET", "/api/v1/crates?q=serde", None, ALLOW),
    ("crates-readonly", "crates.io", "GET", "/api/v1/crates/serde/1.0.0/download", None, ALLOW),
    ("crates-readonly", "crates.io", "PUT", "/api/v1/crates/new", b"x", DENY),
    ("crates-readonly", "crates.io", "DELETE", "/api/v1/crates/x/1.0.0/yank", None, DENY),
    ("crates-readonly", "crates.io", "PUT", "/api/v1/crates/x/owners", b"{}", DENY),
    # RubyGems
    ("rubygems-readonly", "rubygems.org", "GET", "/api/v1/dependencies?gems=rails", None, ALLOW),
    ("rubygems-readonly", "rubygems.org", "GET", "/gems/rails-7.0.0.gem", None, ALLOW),
    ("rubygems-readonly", "rubygems.org", "POST", "/api/v1/gems", b"gem", DENY),
    ("rubygems-readonly", "rubygems.org", "DELETE", "/api/v1/gems/yank", None, DENY),
    ("rubygems-readonly", "rubygems.org", "POST", "/api/v1/gems/x/owners", b"x", DENY),
    # the compact index host is the same application: its API takes the same writes
    ("rubygems-readonly", "index.rubygems.org", "GET", "/versions", None, ALLOW),
    ("rubygems-readonly", "index.rubygems.org", "GET", "/info/rails", None, ALLOW),
    ("rubygems-readonly", "index.rubygems.org", "GET", "/api/v1/dependencies?gems=rails", None, ALLOW),
    ("rubygems-readonly", "index.rubygems.org", "POST", "/api/v1/gems", b"gem", DENY),
    ("rubygems-readonly", "index.rubygems.org", "DELETE", "/api/v1/gems/yank", None, DENY),
    ("rubygems-readonly", "index.rubygems.org", "POST", "/api/v1/web_hooks/fire", b"x", DENY),
    # Maven deploys go to hosts that are not listed; plugin publishing is refused on the portal
    ("maven-readonly", "plugins.gradle.org", "GET", "/m2/com/x/1/x-1.pom", None, ALLOW),
    ("maven-readonly", "plugins.gradle.org", "POST", "/api/v1/publish/versions/new/x", b"x", DENY),
    ("maven-readonly", "oss.sonatype.org", "PUT", "/service/local/staging/deploy/maven2/x", b"x", DENY),
    ("maven-readonly", "central.sonatype.com", "POST", "/api/v1/publisher/upload", b"x", DENY),
    # one organisation only
    ("github-org", "github.com", "GET", "/myorg/r.git/info/refs?service=git-upload-pack", None, ALLOW),
    ("github-org", "github.com", "GET", "/MyOrg/r/info/refs?service=git-receive-pack", None, ALLOW),
    ("github-org", "github.com", "POST", "/myorg/r.git/git-receive-pack", b"0000", ALLOW),
    ("github-org", "github.com", "GET", "/other/r.git/info/refs?service=git-upload-pack", None, DENY),
    ("github-org", "github.com", "POST", "/other/r.git/git-receive-pack", b"0000", DENY),
    ("github-org", "github.com", "POST", "/myorg/../other/r.git/git-receive-pack", b"0000", DENY),
    ("github-org", "github.com", "POST", "/myorg%2f..%2fother/r.git/git-receive-pack", b"0000", DENY),
    ("github-org", "api.github.com", "GET", "/repos/myorg/r/pulls", None, ALLOW),
    ("github-org", "api.github.com", "GET", "/repos/other/r/pulls", None, DENY),
    ("github-org", "api.github.com", "POST", "/graphql", graphql("{ viewer { login } }"), DENY),
    ("github-org", "codeload.github.com", "GET", "/myorg/r/tar.gz/refs/heads/main", None, ALLOW),
    ("github-org", "raw.githubusercontent.com", "GET", "/other/r/main/x", None, DENY),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "host", "method", "target", "body", "verdict"),
    CASES,
    ids=[f"{c[0]}:{c[2]} {c[1]}{c[3][:50]}" for c in CASES],
)
def test_readonly_presets(
    name: str, host: str, method: str, target: str, body: bytes | None, verdict: Verdict
) -> None:
    assert ask(preset(name), host, method, target, body) is verdict


@pytest.mark.parametrize("name", [*READONLY, "default", "github-org"])
def test_presets_lint_clean(name: str) -> None:
    path = ALLOWLISTS / f"{name}.yaml"
    if not path.exists():
        path = ALLOWLISTS / "examples" / f"{name}.yaml"
    assert [str(p) for p in lint_files([path])] == []


@pytest.mark.parametrize("name", [*READONLY, "github-org"])
def test_every_rule_and_host_says_why(name: str) -> None:
    path = ALLOWLISTS / f"{name}.yaml"
    if not path.exists():
        path = ALLOWLISTS / "examples" / f"{name}.yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    document = yaml.compose("\n".join(lines), Loader=yaml.SafeLoader)
    assert document is not None
    rules = next(value for key, value in document.value if key.value == "rules")
    for rule in rules.value:
        first = rule.start_mark.line
        assert lines[first + 1].strip().startswith("#"), f"{name}: rule on line {first + 1}"
        for key, value in rule.value:
            if key.value == "hosts":
                for item in value.value:
                    line = lines[item.start_mark.line]
                    assert "#" in line.split(str(item.value), 1)[1], f"{name}: {line.strip()}"


INSPECTED = {
    "github.com",
    "api.github.com",
    "gitlab.com",
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "pypi.org",
    "crates.io",
    "rubygems.org",
    "index.rubygems.org",
    "plugins.gradle.org",
}


def test_the_default_inspects_only_hosts_that_take_writes() -> None:
    policy = load_policy(ALLOWLISTS / "default.yaml")
    hosts = {str(p) for rule in policy.rules for p in rule.hosts}
    inspected = {h for h in hosts if policy.index.request_rules(h, 443) is not None}
    assert inspected == INSPECTED
    assert policy.reads_requests
    for passthrough in ("files.pythonhosted.org", "static.crates.io", "codeload.github.com"):
        assert passthrough in hosts and passthrough not in inspected


def test_no_readonly_preset_has_a_rule_without_conditions_on_an_inspected_host() -> None:
    """Such a rule would allow every request there (writes included)."""
    for name in READONLY:
        policy = preset(name)
        for rule in policy.rules:
            if rule.request is None and not rule.inspect:
                for pattern in rule.hosts:
                    assert policy.index.request_rules(pattern.base, 443) is None, (name, rule.name)
