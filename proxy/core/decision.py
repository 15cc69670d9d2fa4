"""The plain values that flow between adapters, the policy engine and the evidence sinks.

Requests and decisions are frozen dataclasses over strings and ints so the engine stays a pure function,
decisions can be serialised identically by every sink, and tests can build them by hand.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from proxy.core.frozen import Replacer, fast_init

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.core.requests import HttpHead


class Kind(StrEnum):
    """What the client asked for; decides which fields of a Request matter."""

    CONNECT = "connect"  # an HTTP CONNECT tunnel (host, port)
    HTTP = "http"  # a plain-HTTP request (host, port, method, path)
    DNS = "dns"  # a DNS question (host = qname, qtype)
    TLS = "tls"  # a ClientHello inside an allowed tunnel (host = CONNECT host, sni)
    REQUEST = "request"  # an HTTP request inside an inspected (TLS-terminated) tunnel


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REPORT = "report"  # report mode: allowed, but enforce mode would have denied
    # An ``ask`` rule matched: never enforceable by itself. The checkpoint holds the request until an
    # approval turns it into ALLOW or DENY; anything that meets an unresolved ASK refuses it.
    ASK = "ask"


class Reason(StrEnum):
    """Stable, machine-readable reason codes. Never rename one: dashboards and alerts key on them."""

    ALLOWED_BY_RULE = "allowed-by-rule"
    NO_MATCHING_RULE = "no-matching-rule"
    DENIED_BY_RULE = "denied-by-rule"
    PORT_NOT_ALLOWED = "port-not-allowed"
    INVALID_HOST = "invalid-host"
    SNI_MISMATCH = "sni-mismatch"
    SNI_MISSING = "sni-missing"
    ECH_REFUSED = "ech-refused"
    NOT_TLS = "not-tls"
    HOST_MISMATCH = "host-mismatch"
    INTERNAL_ADDRESS = "internal-address"
    DNS_FAILURE = "dns-failure"
    DNS_TYPE_REFUSED = "dns-type-refused"
    AUDIT_UNAVAILABLE = "audit-unavailable"
    PROXY_AUTH_REQUIRED = "proxy-auth-required"
    CONNECTION_LIMIT = "connection-limit"
    RATE_LIMIT = "rate-limit"
    REQUEST_TIMEOUT = "request-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    HEAD_TOO_LARGE = "head-too-large"  # request line, header count or head over the caps
    BAD_REQUEST = "bad-request"  # a head the HTTP parser refused
    UNSUPPORTED = "unsupported"
    REQUEST_NOT_ALLOWED = "request-not-allowed"  # the host reads requests; no rule allows this one
    AMBIGUOUS_REQUEST = (
        "ambiguous-request"  # a target, override or upgrade servers read differently
    )
    REQUEST_TOO_LARGE = "request-too-large"  # a body a rule must read is longer than is held
    UPSTREAM_TLS_FAILED = "upstream-tls-failed"  # the upstream's certificate did not verify
    APPROVAL_PENDING = "approval-pending"  # held: an ask rule matched, waiting for an answer
    APPROVAL_GRANTED = "approval-granted"  # a person or reviewer allowed it, or a grant covers it
    APPROVAL_DENIED = "approval-denied"
    APPROVAL_TIMEOUT = "approval-timeout"
    APPROVAL_LIMIT = "approval-limit"  # too many pending approvals (this sandbox, or the gate)
    APPROVAL_UNAVAILABLE = "approval-unavailable"  # nobody can be asked (no approvals, store down)
    CREDENTIAL_MISUSE = "credential-misuse"  # a credential's placeholder where it is never sent
    EXECUTABLE_NOT_ALLOWED = "executable-not-allowed"  # the rule is bound to other executables
    PROCESS_UNATTRIBUTED = "process-unattributed"  # bound rule, and no process could be named


@dataclass(frozen=True, slots=True)
class Request:
    """One thing a sandbox tried to reach, as plain values taken from the wire (not yet trusted)."""

    kind: Kind
    host: str
    port: int | None = None
    method: str | None = None
    path: str | None = None
    sni: str | None = None
    client: str | None = None
    sandbox_id: str | None = None
    qtype: str | None = None
    http: HttpHead | None = None  # what the request step reads (HTTP and inspected requests)
    query: str | None = None  # the query as recorded (values scrubbed unless configured)
    # An HTTP request's method and header fields as sent, for an approval about exactly this
    # request (None: not stated, and an approval then joins none): not part of its equality or
    # hash (nothing decides or is remembered by them), never recorded.
    fields: tuple[tuple[bytes, bytes], ...] | None = field(default=None, compare=False, repr=False)


fast_init(Request)


_IDS_PER_READ = 256
_ids: deque[str] = deque()


def new_id() -> str:
    """128 random bits: unguessable and collision-free across workers without coordination.

    Drawn from ``os.urandom`` 256 ids at a time (one system call per id cost a tenth of a decision);
    ``popleft`` hands each one out once across threads, and a forked child drops the parent's unused
    ones so two workers never share an id."""
    try:
        return _ids.popleft()
    except IndexError:
        text = os.urandom(16 * _IDS_PER_READ).hex()
        _ids.extend([text[at : at + 32] for at in range(32, len(text), 32)])
        return text[:32]


os.register_at_fork(after_in_child=_ids.clear)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request: the single record every sink (log, journal, OTel, metrics) serialises."""

    decision: Verdict
    reason: Reason
    rule: str | None
    kind: Kind
    host: str
    port: int | None
    policy_version: str
    mode: str
    method: str | None = None
    path: str | None = None
    sni: str | None = None
    client: str | None = None
    sandbox_id: str | None = None
    qtype: str | None = None
    address: str | None = None  # the checked address actually connected to, once known
    detail: str | None = None  # human-readable explanation for the refusal message
    query: str | None = None  # the request's query as recorded: values scrubbed unless configured
    approval: str | None = None  # the approval an ask rule opened (or the grant that answered it)
    decided_by: str | None = None  # who answered an approval: a person's name, reviewer, timeout
    grant: str | None = None  # the scope of an approval's answer: once, session or persist
    credential: str | None = None  # declared credential name(s) used or misused, never a value
    # Who caused it (``egress run``: the sandbox process owning the client socket; see
    # proxy.attribution), the agent's context, and the trace it belongs to.
    pid: int | None = None  # in the sandbox's PID namespace
    host_pid: int | None = None
    exe: str | None = None  # the kernel's /proc/PID/exe
    argv: tuple[str, ...] | None = None  # bounded, secrets scrubbed
    ppid: int | None = None
    parents: tuple[str, ...] | None = None  # "PID EXE", nearest first, up to the sandbox's command
    context: Mapping[str, str] | None = None  # egress run --context / egress context
    user_id: int | None = None  # the user who launched the sandbox
    user_name: str | None = None
    trace_id: str | None = None  # from the launcher's TRACEPARENT
    span_id: str | None = None  # this decision's own span
    parent_span_id: str | None = None  # the TRACEPARENT's span
    id: str = field(default_factory=new_id)
    ts: float = field(default_factory=time.time)

    @property
    def allowed(self) -> bool:
        """Report-mode decisions let traffic through; DENY blocks, and so does an ASK nobody resolved."""
        return self.decision is Verdict.ALLOW or self.decision is Verdict.REPORT

    def with_(self, **changes: Any) -> Decision:
        """A copy with fields changed (e.g. a later destination check turning allow into deny)."""
        return _REPLACE(self, changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with fields that are None omitted, so log lines stay short.

        Every sink calls this on the hot path, so it reads the slots directly (all in one
        ``attrgetter`` call) instead of going through ``dataclasses.asdict`` (which deep-copies)."""
        out = {
            name: value
            for name, value in zip(_FIELDS, _VALUES(self), strict=True)
            if value is not None
        }
        out["decision"] = self.decision.value
        out["reason"] = self.reason.value
        out["kind"] = self.kind.value
        return out


fast_init(Decision)
_REPLACE = Replacer(Decision)
_FIELDS = tuple(f.name for f in fields(Decision))
_VALUES = attrgetter(*_FIELDS)  # every field's value in one call
