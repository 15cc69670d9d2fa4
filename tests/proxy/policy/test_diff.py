"""``egress policy diff``: what a change opens and what it closes."""

from __future__ import annotations

from pathlib import Path

from proxy.policy.diff import diff_policies
from proxy.policy.loader import load_policy


def load(tmp_path: Path, name: str, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text)
    return load_policy(path)


def test_opens_and_closes_hosts_ports_requests_denies_mode(tmp_path: Path) -> None:
    old = load(
        tmp_path,
        "old.yaml",
        "version: 1\nrules:\n"
        "  - {name: pypi, hosts: [pypi.org]}\n"
        "  - {name: gone, hosts: [old.example]}\n"
        "  - {name: gh, hosts: [api.github.com], methods: [GET]}\n"
        "  - {name: no-paste, action: deny, hosts: [pastebin.com]}\n",
    )
    new = load(
        tmp_path,
        "new.yaml",
        "version: 1\nmode: report\nallow_internal: [10.0.0.0/8]\nrules:\n"
        "  - {name: pypi, hosts: [pypi.org], ports: [443, 8443]}\n"
        "  - {name: gh, hosts: [api.github.com], methods: [GET, POST]}\n"
        "  - {name: new, hosts: [new.example]}\n",
    )
    lines = diff_policies(old, new)
    text = "\n".join(lines)
    assert "opens: pypi.org port 8443: rule 'pypi'" in text
    assert "opens: new.example port 443: rule 'new'" in text
    assert "opens: api.github.com port 443 (methods ['GET', 'POST']): rule 'gh'" in text
    assert "closes: old.example port 443: rule 'gone'" in text
    assert "opens: deny rule 'no-paste'" in text and "removed" in text
    assert "opens: mode enforce -> report" in text
    assert "opens: allow_internal 10.0.0.0/8" in text
    assert not any(line.startswith("closes: pypi.org") for line in lines)
    assert diff_policies(old, old) == []


def test_unbinding_a_rule_from_its_executables_opens_its_hosts(tmp_path: Path) -> None:
    bound = "version: 1\nrules:\n  - {name: g, hosts: [git.example], executables: [/usr/bin/git]}\n"
    old = load(tmp_path, "old.yaml", bound)
    new = load(tmp_path, "new.yaml", "version: 1\nrules:\n  - {name: g, hosts: [git.example]}\n")
    lines = diff_policies(old, new)
    assert any(
        line.startswith("opens: git.example port 443") and "/usr/bin/git" in line for line in lines
    ), lines
    assert not any(line.startswith("opens") for line in diff_policies(new, old))  # binding narrows
