"""`egress doctor`: the real self-test passes here, and every kind of gap makes it fail."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.app.private_gate import start_private_gate
from proxy.sandbox import doctor
from proxy.sandbox.doctor import REFUSED_NAME, evaluate, host_resolvers, render

REPO = Path(__file__).resolve().parents[3]

GOOD: dict[str, Any] = {
    "interfaces": ["lo"],
    "routes4": 0,
    "routes6": 0,
    "tcp_out": "ENETUNREACH",
    "tcp_metadata": "ENETUNREACH",
    "tcp_host_loopback": "ECONNREFUSED",
    "tcp_gate_host_port": "ECONNREFUSED",
    "tcp6_out": "ENETUNREACH",
    "tcp6_host_loopback": "ECONNREFUSED",
    "udp_out": "ENETUNREACH",
    "udp_host_loopback": "ECONNREFUSED",
    "outside_resolvers": {"10.0.0.53": "ENETUNREACH"},
    "resolv_conf": ["127.0.0.1"],
    "dns_gate_allowed": "NOERROR 127.0.0.1",
    "dns_gate_refused": "NXDOMAIN",
    "proxy_allowed": ["200", True],
    "proxy_refused": ["403", False],
    "caps": {"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1"},
}
COUNTS = {"tcp": 0, "tcp6": 0, "udp": 0, "upstream": 1}


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_doctor_passes_on_this_machine() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "doctor", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=45,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["ok"] is True, result.stdout + result.stderr
    assert result.returncode == 0
    names = {c["name"] for c in report["checks"]}
    for needed in (
        "direct TCP out (192.0.2.1:443)",
        "UDP out (192.0.2.1:443)",
        "IPv6 out ([2001:db8::1]:443)",
        "host loopback TCP service",
        "gate's own host port",
        "proxy path: allowed request",
        "proxy path: refused request",
        "DNS gate: refused name",
    ):
        assert needed in names


def test_all_good_observations_pass() -> None:
    assert all(c.ok for c in evaluate(GOOD, COUNTS, []))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("interfaces", ["lo", "eth0"]),
        ("routes4", 1),
        ("tcp_out", "connected"),
        ("tcp_metadata", "timeout"),
        ("udp_out", "sent"),
        ("tcp6_out", "connected"),
        ("tcp_host_loopback", "connected"),
        ("tcp_gate_host_port", "connected"),
        ("udp_host_loopback", "NOERROR"),
        ("udp_host_loopback", "EADDRINUSE"),  # never asked: no local port apart from its own
        ("outside_resolvers", {"10.0.0.53": "NOERROR 192.0.2.7"}),
        ("resolv_conf", ["127.0.0.1", "10.0.0.53"]),
        ("dns_gate_refused", "NOERROR 127.0.0.1"),
        ("proxy_allowed", ["403", False]),
        ("proxy_refused", ["200", True]),
        ("caps", {"CapEff": "0000000000001000", "CapBnd": "0", "NoNewPrivs": "1"}),
    ],
)
def test_each_gap_is_reported(key: str, value: object) -> None:
    obs = copy.deepcopy(GOOD)
    obs[key] = value
    failed = [c.name for c in evaluate(obs, COUNTS, []) if not c.ok]
    assert len(failed) == 1, failed


@pytest.mark.parametrize("canary", ["tcp", "tcp6", "udp"])
def test_a_packet_reaching_a_host_canary_is_a_gap(canary: str) -> None:
    assert not all(c.ok for c in evaluate(GOOD, {**COUNTS, canary: 1}, []))


def test_a_refused_name_reaching_upstream_dns_is_a_gap() -> None:
    assert not all(c.ok for c in evaluate(GOOD, COUNTS, [REFUSED_NAME]))


def test_doctor_main_exits_1_on_a_gap(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    obs = {**GOOD, "tcp_out": "connected"}
    monkeypatch.setattr(doctor, "run_doctor", lambda _start: (evaluate(obs, COUNTS, []), ""))
    assert doctor.doctor_main(start_private_gate) == 1
    out = capsys.readouterr().out
    assert "GAP" in out and "NOT a boundary" in out


def test_doctor_main_exits_1_when_the_sandbox_cannot_be_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(doctor, "run_doctor", lambda _start: ([], "cannot isolate"))
    assert doctor.doctor_main(start_private_gate, json_output=True) == 1
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "cannot isolate"}


def test_render_is_a_table() -> None:
    text = render(evaluate(GOOD, COUNTS, []))
    assert text.splitlines()[0].startswith("CHECK")
    assert all(line.endswith(("ok", "RESULT")) for line in text.splitlines() if "  " in line)


def test_host_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search corp\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n# x\n")
    assert host_resolvers(str(conf)) == ["10.0.0.53", "fe80::1"]
    assert host_resolvers(str(tmp_path / "missing")) == []
