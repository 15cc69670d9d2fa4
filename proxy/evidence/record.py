"""What a decision or an event looks like as evidence: one field vocabulary for every sink.

A decision is serialised once, by ``Decision.to_dict``; the journal line, the JSON decision log and the
OTel event are all built from that dict (the export process reads it back from the journal). Events use
the same field names for the same facts, so a journal reader meets one vocabulary, and
:data:`ATTRIBUTE_NAMES` says, next to each field, which OpenTelemetry attribute carries it (the semantic
conventions' names where one applies, ``egress.*`` otherwise).

The journal's field names are its on-disk format: renaming one changes what auditors' tools read, so
add fields rather than rename them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from proxy.core.decision import Decision

if TYPE_CHECKING:  # the export process reads records and never loads a policy
    from proxy.policy.reload import Reload

DECISION_EVENT = "egress.decision"
CLOSED_EVENT = "egress.connection.closed"

Record = Mapping[str, Any]
"""A decision or event as field -> JSON value; journal lines add ``seq``, ``prev`` and ``hash``."""

ATTRIBUTE_NAMES: Mapping[str, str] = {
    "id": "egress.decision.id",
    "decision": "egress.decision",
    "reason": "egress.reason",
    "rule": "egress.rule",
    "kind": "egress.kind",
    "host": "server.address",
    "port": "server.port",
    "policy_version": "egress.policy.version",
    "mode": "egress.mode",
    "method": "http.request.method",
    "path": "url.path",  # and url.query (names only): see proxy.evidence.otel.attributes
    "query": "url.query",  # a request's query, recorded apart from its path (values scrubbed)
    "sni": "tls.client.server_name",
    "client": "client.address",
    "sandbox_id": "egress.sandbox.id",
    "qtype": "egress.dns.question.type",
    "address": "network.peer.address",
    "detail": "egress.detail",
    "approval": "egress.approval.id",
    "decided_by": "egress.approval.decided_by",
    "grant": "egress.approval.grant",
    "credential": "egress.credential",
    "pid": "process.pid",
    "host_pid": "egress.process.host_pid",
    "exe": "process.executable.path",
    "argv": "process.command_args",
    "ppid": "process.parent_pid",
    "parents": "egress.process.parents",
    "context": "egress.context",  # one attribute per key: egress.context.<key>
    "user_id": "user.id",
    "user_name": "user.name",
    "parent_span_id": "egress.trace.parent_span_id",
    "seq": "egress.journal.seq",
    "bytes_out": "egress.bytes.out",
    "bytes_in": "egress.bytes.in",
    "duration": "egress.connection.duration",
}
"""Field -> OTel attribute. ``ts`` is the record's timestamp and ``event`` its event name, not
attributes; ``prev`` and ``hash`` belong to the journal's chain only; ``trace_id`` and ``span_id``
fill the log record's trace context."""

NOT_ATTRIBUTES = frozenset({"ts", "event", "prev", "hash", "trace_id", "span_id"})
"""``trace_id`` and ``span_id`` are the OTLP log record's own trace context fields."""


class Event(NamedTuple):
    """A fact that is not a decision, as ``Emitter.event`` and the sinks take it."""

    name: str
    fields: dict[str, Any]


def decision_record(decision: Decision) -> dict[str, Any]:
    """The decision as every sink writes it: its fields and the event name."""
    return {"event": DECISION_EVENT, **decision.to_dict()}


def connection_closed(opened: Decision, *, bytes_out: int, bytes_in: int, duration: float) -> Event:
    """The ``egress.connection.closed`` event of a connection ``opened`` allowed: which decision it
    belongs to, where it went, and bytes each way (out: sandbox to upstream) over ``duration`` seconds."""
    fields: dict[str, Any] = {
        "ts": time.time(),
        "id": opened.id,
        "kind": opened.kind.value,
        "host": opened.host,
    }
    for name in ("port", "rule", "sandbox_id", "client"):
        value = getattr(opened, name)
        if value is not None:
            fields[name] = value
    fields["bytes_out"] = int(bytes_out)
    fields["bytes_in"] = int(bytes_in)
    fields["duration"] = float(duration)
    return Event(CLOSED_EVENT, fields)


POLICY_RELOAD_EVENT = "egress.policy.reload"


def policy_reload(
    done: Reload, *, trigger: str, files: list[str], sandbox_id: str | None = None
) -> Event:
    """The ``egress.policy.reload`` event: a reload went into force (``result: ok``, with the rules
    and hosts it added and removed) or was refused (``result: error``, with the problems, file:line:
    rule first; ``policy_version`` is then the version still in force)."""
    fields: dict[str, Any] = {
        "ts": done.at,
        "result": "ok" if done.ok else "error",
        "trigger": trigger,
        "policy_version": done.to_version,
        "from_version": done.from_version,
        "files": files,
    }
    if sandbox_id is not None:
        fields["sandbox_id"] = sandbox_id
    if done.ok:
        fields.update(
            rules_added=list(done.added),
            rules_removed=list(done.removed),
            rules_changed=list(done.changed),
            hosts_added=list(done.hosts_added),
            hosts_removed=list(done.hosts_removed),
            seconds=round(done.seconds, 6),
        )
    else:
        fields["problems"] = list(done.problems)
    return Event(POLICY_RELOAD_EVENT, fields)
