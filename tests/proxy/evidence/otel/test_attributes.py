"""Attribute names (semantic conventions where they apply) and what is scrubbed on the way."""

from __future__ import annotations

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.otel.attributes import attributes
from proxy.evidence.record import ATTRIBUTE_NAMES, connection_closed
from tests.proxy.evidence.decisions import allow, deny_http, dns_query


def test_decision_attribute_names() -> None:
    attrs = attributes(deny_http().to_dict())
    assert attrs["server.address"] == "evil.example"
    assert attrs["server.port"] == 80
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/upload"
    assert attrs["url.query"] == "token=&name="
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["egress.decision"] == "deny"
    assert attrs["egress.reason"] == "no-matching-rule"
    assert attrs["egress.policy.version"] == "abc123"
    assert attrs["egress.mode"] == "enforce"
    assert attrs["network.protocol.name"] == "http"
    assert "egress.rule" not in attrs
    assert "s3cr3t" not in repr(attrs) and "hunter2" not in repr(attrs)
    a = attributes(allow().to_dict())
    assert a["egress.rule"] == "pypi"
    assert a["egress.sandbox.id"] == "sb-1"
    assert a["network.peer.address"] == "203.0.113.7"
    d = attributes(dns_query().to_dict())
    assert d["dns.question.name"] == "exfil-data.attacker.example"
    assert d["network.protocol.name"] == "dns"
    sni = attributes(allow().with_(kind=Kind.TLS, sni="h0.pypi.org").to_dict())
    assert sni["tls.client.server_name"] == "h0.pypi.org"


def test_a_closed_event_uses_the_decision_attribute_names() -> None:
    opened = allow(3)
    name, fields = connection_closed(opened, bytes_out=120, bytes_in=4096, duration=1.5)
    attrs = attributes({**fields, "event": name, "seq": 9})
    assert attrs == {
        "egress.decision.id": opened.id,
        "egress.kind": "connect",
        "server.address": "h3.pypi.org",
        "server.port": 443,
        "egress.rule": "pypi",
        "client.address": "127.0.0.1",
        "egress.sandbox.id": "sb-1",
        "egress.journal.seq": 9,
        "egress.bytes.out": 120,
        "egress.bytes.in": 4096,
        "egress.connection.duration": 1.5,
        "network.protocol.name": "http",
    }


def test_events_with_attribute_names_as_keys_keep_them_scrubbed() -> None:
    """Events outside the field table (and closed events in journals written before it) are exported
    with their own names, scrubbed like everything else."""
    record = {
        "event": "egress.connection.closed",
        "ts": 1.0,
        "seq": 4,
        "prev": "0" * 64,
        "hash": "a" * 64,
        "egress.decision.id": "abc",
        "server.address": "u:pw@h.example",
        "egress.bytes.in": 10,
        "egress.ok": True,
        "note\n": "x\ny",
    }
    assert attributes(record) == {
        "egress.journal.seq": 4,
        "egress.decision.id": "abc",
        "server.address": "h.example",
        "egress.bytes.in": 10,
        "egress.ok": True,
        "note\\x0a": "x\\x0ay",
    }


def test_every_field_has_its_attribute_and_key_order_does_not_matter() -> None:
    record: dict[str, object] = {name: f"v-{name}" for name in ATTRIBUTE_NAMES}
    record.update(port=443, seq=1, bytes_out=1, bytes_in=2, duration=0.5, kind="http")
    record.update(pid=7, host_pid=4242, ppid=2, user_id=1000, argv=["git", "fetch"])
    record.update(parents=["2 /usr/bin/sh"], context={"task": "T-1"})
    attrs = attributes(record)
    assert set(ATTRIBUTE_NAMES.values()) - {"egress.context"} <= attrs.keys()
    assert attrs["egress.context.task"] == "T-1"
    assert attrs["process.command_args"] == ["git", "fetch"] and attrs["process.pid"] == 7
    assert attrs["user.id"] == "1000"  # user.id is a string in the semantic conventions
    reordered = dict(reversed(list(record.items())))
    assert list(attributes(reordered).items()) == list(attrs.items())


def test_numbers_stay_numbers_and_text_in_number_fields_is_left_out() -> None:
    attrs = attributes({"port": "443; DROP", "seq": 5, "duration": 0.25, "host": "h.example"})
    assert "server.port" not in attrs
    assert attrs["egress.journal.seq"] == 5 and attrs["egress.connection.duration"] == 0.25


def test_request_decisions_carry_method_path_and_the_recorded_query() -> None:
    refused = Decision(
        decision=Verdict.DENY,
        reason=Reason.REQUEST_NOT_ALLOWED,
        rule=None,
        kind=Kind.REQUEST,
        host="github.com",
        port=443,
        policy_version="abc123",
        mode="enforce",
        method="GET",
        path="/o/r.git/info/refs",
        query="service=\nx",
    )
    out = attributes(refused.to_dict())
    assert out["http.request.method"] == "GET"
    assert out["url.path"] == "/o/r.git/info/refs"
    assert out["url.query"] == "service=\\x0ax"
    assert out["egress.kind"] == "request"
    assert out["network.protocol.name"] == "http"


def test_a_hostile_argv_cannot_break_lines_in_exported_attributes() -> None:
    """A sandboxed process chooses its own argv: what it puts there leaves the host printable."""
    record = {"event": "egress.decision", "kind": "connect", "argv": ["sh", "x\u2028forged\u202e"]}
    args = attributes(record)["process.command_args"]
    assert args == ["sh", "x\\u2028forged\\u202e"]
    assert all(arg.isprintable() for arg in args)
