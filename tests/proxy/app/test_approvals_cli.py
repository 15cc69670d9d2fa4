"""``egress approvals``' lines: what each approval is about, whatever the sandbox made of its parts."""

from __future__ import annotations

from typing import Any

from proxy.app.approvals_cli import describe


def listed(**fields: Any) -> dict[str, Any]:
    approval: dict[str, Any] = {
        "id": "0123456789abcdef", "kind": "request", "sandbox_id": "sbx-1", "rule": "ask-api",
        "created": 1000.0, "deadline": 1060.0, "host": "repo.test", "port": 443,
        "method": "GET", "path": "/api/deploy",
    }  # fmt: skip
    approval.update(fields)
    approval.setdefault("what", f"{approval['method']} repo.test:443{approval['path']}")
    return approval


def test_a_long_method_or_path_never_hides_the_host() -> None:
    """Bounded as one string, a long method override (any token) would end the line before the host."""
    method = "PUT" + "X" * 400 + " (sent as GET)"
    line = describe(listed(method=method), 1000.0)
    assert "repo.test:443/api/deploy" in line and method not in line
    line = describe(listed(path="/api/" + "a" * 5000 + "/evil"), 1000.0)
    assert "REQUEST GET repo.test:443/api/aaa" in line and len(line) < 400


def test_control_characters_are_escaped() -> None:
    line = describe(listed(path="/x\x1b[2J", host="evil\ninjected.test"), 1000.0)
    assert "\x1b" not in line and "\n" not in line


def test_an_answer_without_parts_shows_its_what_bounded() -> None:
    approval = listed()
    del approval["host"]
    approval["what"] = "GET " + "y" * 1000 + "\x1b]0;x\x07"
    line = describe(approval, 1000.0)
    assert "\x1b" not in line and len(line) < 400


def test_the_size_of_the_fields_and_of_a_body_not_read_are_on_the_line() -> None:
    """Two approvals that differ only in a header field or an unread body are told apart."""
    line = describe(
        listed(method="POST", head_bytes=91, body_id="unread-00ff", body_bytes=18), 1000.0
    )
    assert line.endswith("/api/deploy (header fields of 91 bytes; a body of 18 bytes, not read)")
    held = describe(listed(method="POST", head_bytes=91, body_id="0a1b", body_bytes=18), 1000.0)
    assert held.endswith("/api/deploy (header fields of 91 bytes; a body of 18 bytes)")
    unknown = describe(listed(head_bytes=7, body_id="unread-1"), 1000.0)
    assert unknown.endswith(
        "(header fields of 7 bytes; a body of unknown length, if any, not read)"
    )
