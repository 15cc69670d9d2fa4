"""Report, then learn, end to end: a real gate in report mode records an agent's traffic in its audit
journal; ``egress learn`` turns the journal into a policy; that policy, decided by ``egress check``
(the real Checkpoint), allows exactly what was observed and nothing it did not see. A tampered journal
is said to be broken."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from tests.dnsfake import FakeDns
from tests.harness import WAIT, LocalCA, RunningGate, Upstream, clean_env, curl
from tests.proxy.app.test_serve import EGRESS

NAMES = ("pkgs.learn.test", "git.learn.test", "never.learn.test")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"), ["git.learn.test"])


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA
) -> Iterator[tuple[Path, int, int]]:
    """(journal, plain port, tls port) after an agent's session through a report-mode gate."""
    root = tmp_path_factory.mktemp("learn")
    plain = Upstream("plain")
    tls = Upstream("tls", tls=ca.server_context())
    policy = root / "report.yaml"
    policy.write_text("version: 1\nmode: report\nallow_internal: [127.0.0.0/8]\nrules: []\n")
    journal_path = root / "audit.jsonl"
    with FakeDns() as dns:
        for name in NAMES:
            dns.set(name, "A", ["127.0.0.1"])
        gate = RunningGate(policy, [dns.nameserver])
        journal = Journal(journal_path)
        gate.emitter = Emitter([gate.memory], write_ahead=[journal])
        gate.start()
        try:
            base = f"http://pkgs.learn.test:{plain.port}"
            for path in ("/simple/requests/", "/simple/idna/", "/packages/a.whl"):
                assert curl(base + path, gate.url).status == 200
            assert curl(base + "/upload/x", gate.url, "-X", "POST", "-d", "x").status == 200
            raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
            target = f"git.learn.test:{tls.port}"
            raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            context = ssl.create_default_context(cafile=str(ca.ca_path))
            with context.wrap_socket(raw, server_hostname="git.learn.test") as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: git.learn.test\r\n\r\n")
                assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            gate.stop()
            journal.close()
    try:
        yield journal_path, plain.port, tls.port
    finally:
        plain.stop()
        tls.stop()


def egress(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS, *args], capture_output=True, text=True, timeout=60, env=clean_env()
    )


def check(policy: Path, *args: str) -> int:
    return egress("check", "--policy", str(policy), *args).returncode


def test_the_learned_policy_allows_exactly_the_observed_traffic(
    recorded: tuple[Path, int, int], tmp_path: Path
) -> None:
    journal, plain, tls = recorded
    reports = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {r["decision"] for r in reports if r.get("event") == "egress.decision"} == {"report"}
    proposal = tmp_path / "proposal.yaml"
    result = egress("learn", str(journal), "-o", str(proposal))
    assert result.returncode == 0, result.stderr
    text = proposal.read_text()
    assert "Journal hash chain verified" in text
    assert "seen 1x" in text and "first " in text and "last " in text
    pkgs = f"http://pkgs.learn.test:{plain}"
    observed = [
        (f"{pkgs}/simple/requests/",),
        (f"{pkgs}/simple/anything-below/",),  # the proposed prefix is /simple/**
        (f"{pkgs}/packages/a.whl",),
        ("--method", "POST", f"{pkgs}/upload/x"),
        (f"https://git.learn.test:{tls}/",),
    ]
    for args in observed:
        assert check(proposal, *args) == 0, args
    unseen = [
        (f"{pkgs}/admin/",),
        ("--method", "DELETE", f"{pkgs}/simple/requests/"),
        ("--method", "POST", f"{pkgs}/simple/requests/"),
        (f"http://pkgs.learn.test:{plain + 1}/simple/requests/",),
        (f"https://git.learn.test:{tls + 1}/",),
        (f"https://never.learn.test:{tls}/",),
        ("https://learn.test/",),
        (f"https://127.0.0.1:{tls}/",),
    ]
    for args in unseen:
        assert check(proposal, *args) != 0, args


def test_learn_says_when_the_journal_chain_is_broken(
    recorded: tuple[Path, int, int], tmp_path: Path
) -> None:
    journal, _, _ = recorded
    lines = journal.read_text().splitlines()
    record = json.loads(lines[0])
    record["host"] = "forged.example"
    lines[0] = json.dumps(record)
    tampered = tmp_path / "audit.jsonl"
    tampered.write_text("\n".join(lines) + "\n")
    result = egress("learn", str(tampered))
    assert result.returncode == 1
    assert "journal chain broken" in result.stderr
    assert "hash chain is BROKEN" in result.stdout


def test_two_journals_are_two_chains_each_verified(
    recorded: tuple[Path, int, int], tmp_path: Path
) -> None:
    journal, _, _ = recorded
    first, second = tmp_path / "audit.jsonl.w0", tmp_path / "audit.jsonl.w1"
    first.write_bytes(journal.read_bytes())
    second.write_bytes(journal.read_bytes())
    result = egress("learn", str(first), str(second))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Journal hash chain verified") == 2
