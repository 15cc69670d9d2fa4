"""``egress check`` gives the gate's answer: same checkpoint, same safety refusals, honest about DNS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.app.check import check, parse_target
from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from tests.dnsfake import FakeDns

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"

ALLOW_ALL_IPS = """
version: 1
mode: {mode}
rules:
  - name: any-ip
    cidrs: [0.0.0.0/0, "::/0"]
    ports: [80, 443, 3128]
  - name: names
    hosts: [pypi.test, "**.example.test"]
    ports: [80, 443]
  - name: no-ssh
    action: deny
    hosts: [pypi.test]
    ports: [22]
"""

# Every spelling of an internal address, under a rule that allows every address.
INTERNAL_LITERALS = [
    "http://169.254.169.254/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[fd00:ec2::254]/",
    "http://127.1/",
    "http://0/",
    "http://[::1]/",
    "https://10.0.0.1/",
    "100.64.0.1:443",
    "[fe80::1]:443",
]


def policy_text(mode: str) -> str:
    return textwrap.dedent(ALLOW_ALL_IPS.format(mode=mode))


@pytest.fixture(params=["enforce", "report"])
def policy_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(policy_text(request.param))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EGRESS, "check", *args], capture_output=True, text=True, timeout=60)


def decide(policy: Policy, target: str, **kwargs: object) -> object:
    kind, host, port, method, path = parse_target(target, None)
    request = Request(Kind(kind), host, port, method, path)
    return asyncio.run(check(policy, request, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("target", INTERNAL_LITERALS)
def test_internal_literals_are_refused_in_every_mode(policy_file: Path, target: str) -> None:
    result = run("--policy", str(policy_file), "--json", target)
    assert result.returncode == 1, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert (out["decision"], out["reason"]) == ("deny", "internal-address")


def test_public_literal_is_allowed_without_dns(policy_file: Path) -> None:
    result = run("--policy", str(policy_file), "--json", "https://203.0.113.7/")
    assert result.returncode == 0
    out = json.loads(result.stdout)
    assert (out["reason"], out["address"], out["depends_on_dns"]) == (
        "allowed-by-rule",
        "203.0.113.7",
        False,
    )


def test_explicit_deny_rule_holds_in_report_mode(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(policy_text("report"))
    result = run("--policy", str(path), "--json", "pypi.test:22")
    assert result.returncode == 1
    assert json.loads(result.stdout)["reason"] == "denied-by-rule"
    gap = run("--policy", str(path), "--json", "other.test:443")
    assert gap.returncode == 0
    assert (json.loads(gap.stdout)["decision"], json.loads(gap.stdout)["reason"]) == (
        "report",
        "no-matching-rule",
    )


def test_a_name_without_resolve_says_the_verdict_depends_on_dns(policy_file: Path) -> None:
    result = run("--policy", str(policy_file), "https://pypi.test/")
    assert result.returncode == 0
    assert "depends on DNS" in result.stdout and "--resolve" in result.stdout


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.set("pypi.test", "A", ["203.0.113.10"])
        server.set("inside.example.test", "A", ["10.1.2.3"])
        server.set("meta.example.test", "AAAA", ["fd00:ec2::254"])
        yield server


def test_resolve_screens_the_names_addresses(policy_file: Path, dns: FakeDns) -> None:
    base = ("--policy", str(policy_file), "--resolve", "--nameserver", dns.nameserver, "--json")
    allowed = run(*base, "https://pypi.test/")
    assert allowed.returncode == 0
    assert json.loads(allowed.stdout)["address"] == "203.0.113.10"
    assert json.loads(allowed.stdout)["depends_on_dns"] is False
    for name in ("inside.example.test", "meta.example.test"):
        refused = run(*base, f"https://{name}/")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["reason"] == "internal-address"
    missing = run(*base, "https://gone.example.test/")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["reason"] == "dns-failure"


def test_a_name_the_policy_refuses_is_never_resolved(tmp_path: Path, dns: FakeDns) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(policy_text("enforce"))
    result = run(
        "--policy", str(path), "--resolve", "--nameserver", dns.nameserver, "evil.test:443"
    )
    assert result.returncode == 1
    assert dns.queries == []


def test_the_gates_own_listener_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nallow_internal: [0.0.0.0/8, 127.0.0.0/8]\nrules:\n"
        "  - name: any\n    cidrs: [0.0.0.0/0]\n    ports: [3128, 8080]\n"
    )
    policy = load_policy(path)
    own = [("0.0.0.0", 3128)]
    for target in ("127.0.0.1:3128", "0.0.0.0:3128", "http://0/"):
        port_target = target if target != "http://0/" else "0.0.0.0:3128"
        decision = decide(policy, port_target, listeners=own)
        assert (decision.decision, decision.reason) == (  # type: ignore[attr-defined]
            Verdict.DENY,
            Reason.INTERNAL_ADDRESS,
        ), target
    other_port = decide(policy, "127.0.0.1:8080", listeners=own)
    assert other_port.decision is Verdict.ALLOW  # type: ignore[attr-defined]
    cli = run("--policy", str(path), "--listen", "0.0.0.0:3128", "--json", "127.0.0.1:3128")
    assert json.loads(cli.stdout)["reason"] == "internal-address"


def test_parse_target_forms() -> None:
    assert parse_target("https://pypi.org/x", None) == ("connect", "pypi.org", 443, "CONNECT", None)
    assert parse_target("http://h:8080/p?q=1", "post") == ("http", "h", 8080, "POST", "/p")
    assert parse_target("[::1]:22", None) == ("connect", "[::1]", 22, "CONNECT", None)
    assert parse_target("2001:db8::1", None) == ("connect", "2001:db8::1", 443, "CONNECT", None)
    assert parse_target("http://[2001::1]/", None)[1:3] == ("[2001::1]", 80)


@pytest.mark.parametrize(
    "target",
    [
        "http://2001::1/",  # a bare IPv6 address is not a URL authority
        "https://2001:db8::1/",
        "http://user@pypi.org/",
        "ftp://pypi.org/",
        "http://pypi.org\\@evil.test/",
        "http://pypi.org /",
        "http://pypi.org\r\n/",
    ],
)
def test_parse_target_refuses_what_the_gate_refuses(target: str) -> None:
    with pytest.raises(ValueError):
        parse_target(target, None)
    assert run(target).returncode == 2


def test_an_ask_rule_is_reported_as_ask_after_the_same_checks_as_the_gate(tmp_path: Path) -> None:
    path = tmp_path / "ask.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: asked\n    action: ask\n    hosts: [api.test]\n"
        "    cidrs: [127.0.0.0/8, 203.0.113.0/24]\n"
    )
    asked = run("--policy", str(path), "api.test")
    assert asked.returncode == 1  # not allowed until someone answers
    assert asked.stdout.startswith("ASK api.test:443 rule=asked reason=approval-pending")
    public = run("--policy", str(path), "--json", "203.0.113.9")
    assert json.loads(public.stdout)["decision"] == "ask"
    # an internal literal is refused before anyone would be asked
    internal = run("--policy", str(path), "--json", "127.0.0.1")
    assert json.loads(internal.stdout)["reason"] == "internal-address"


def test_check_never_reports_what_a_managed_rule_binds_to_executables(tmp_path: Path) -> None:
    """Report mode under a managed rule bound to git: the dry run sees no process, so it refuses
    (as a gate that cannot see processes does) and says it depends on the process."""
    managed = tmp_path / "managed.yaml"
    managed.write_text(
        "version: 1\nrules:\n  - {name: org-git, hosts: [pypi.test], executables: [/usr/bin/git]}\n"
    )
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nrules: []\n")
    common = ("--policy", str(local), "--managed-policy", str(managed))
    result = run(*common, "--json", "pypi.test:443")
    assert result.returncode == 1, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert (out["decision"], out["reason"]) == ("deny", "process-unattributed")
    assert out["depends_on_process"] is True
    text = run(*common, "pypi.test:443")
    assert text.returncode == 1 and "depends on the process" in text.stdout


def test_a_json_body_rule_is_checked_with_the_declared_content_type(tmp_path: Path) -> None:
    """The gate reads a GraphQL body as JSON only when it is declared JSON: so does the dry run."""
    path = tmp_path / "gql.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: gql\n    hosts: [api.test]\n    methods: [POST]\n"
        "    paths: [/graphql]\n    graphql_operations: [query]\n"
    )
    root = str(Path(__file__).resolve().parents[3])  # this tree's proxy, not the installed one

    def here(*args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from proxy.app.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", code, "check", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": root},
        )

    base = ["--policy", str(path), "--method", "POST", "--data", '{"query": "{ a }"}']
    typed = here(*base, "--content-type", "application/json", "--json", "https://api.test/graphql")
    assert (typed.returncode, json.loads(typed.stdout)["rule"]) == (0, "gql"), typed.stderr
    untyped = here(*base, "https://api.test/graphql")
    assert untyped.returncode == 1
    assert "give --content-type application/json" in untyped.stdout
