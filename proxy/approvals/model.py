"""The plain values of approvals: what was asked, the pending approval, its answer and the grants.

Everything a sandbox sent (host, path, method) is data here and stays data: it is escaped wherever it is
shown and never interpreted. What an approval covers is fixed when it opens (:class:`Subject`): the host
and port of a host rule, plus the method and path of a request rule. An answer can only narrow that,
never widen it, and a grant covers exactly one subject.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from proxy.core.authority import join_authority
from proxy.core.decision import Decision, Kind
from proxy.core.text import escape


class Scope(StrEnum):
    """How far an approval reaches: this request, this sandbox for a while, or a policy amendment."""

    ONCE = "once"
    SESSION = "session"
    PERSIST = "persist"


class State(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


class Advice(StrEnum):
    """What the automated reviewer answered."""

    ALLOW = "allow"
    DENY = "deny"
    ESCALATE = "escalate"


ANONYMOUS = "-"  # the sandbox of clients a gate cannot tell apart (no sandbox identities)
REVIEWER = "reviewer"  # decided_by of the automated reviewer's answers
TIMEOUT = "timeout"  # decided_by of an approval nobody answered in time
ENDED = "sandbox-ended"  # decided_by of an approval closed because its sandbox left the gate
ENDED_REASON = "the sandbox ended before the approval was answered"
MAX_REASON = 500  # characters of a reason kept (a person's, the reviewer's)
SHOWN_METHOD = 64  # characters of a method on one terminal line (an override is any token)
SHOWN_PATH = 200  # characters of its path there
SHOWN_QUERY = 200  # characters of its query there

# What a per-request subject holds of one request beyond its method and path: left out of what a
# session grant is about (:meth:`Subject.granted`) and of a grant as stored.
REQUEST_DETAIL = (
    "query", "query_id", "query_bytes", "head_id", "head_bytes", "body_id", "body_bytes", "runs",
)  # fmt: skip
UNREAD = "unread-"  # the start of the body id of a body the gate did not hold (unique: joins none)


def body_unread(body_id: object) -> bool:
    """Whether a body id (a subject's, or one read back from JSON) is of a body the gate did not
    hold."""
    return isinstance(body_id, str) and body_id.startswith(UNREAD)


# Kinds whose rules decide a host and port as a whole: their approval covers host:port. Any other kind
# (a request read under inspection) is decided per request, and its approval covers method and path too.
HOST_KINDS = frozenset({Kind.CONNECT, Kind.HTTP, Kind.TLS})


def new_approval_id() -> str:
    """64 random bits as 16 hex digits: short enough to type, and every use is authenticated anyway."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Subject:
    """Exactly what one approval or grant is about. Two requests with the same subject share one
    pending approval; a grant applies to requests with its subject only.

    The asking rule and who may answer it (``review``) are part of the subject: two ``ask`` rules
    can match the same request line (one for a query the reviewer may answer, one people-only for
    the rest; one bound to git, one to every other process), and an answer to one is no answer to
    the other. A subject stored without them (an older gate's grant) matches no request.

    A per-request subject is about the request's exact query too (``query_id``, a keyed digest: the
    query itself may carry values the records scrub): a request with the same method and path but
    another query, which may carry anything, is another question and never joins an approval it was
    not shown on. ``query`` is what people and the reviewer are shown of it (as decisions record
    it) and ``query_bytes`` the size of the query sent (two approvals shown alike differ there when
    only their values differ, and a long value is a sign of data leaving). Under a rule that reads
    bodies, the body the gate held is part of it the same way (``body_id``, ``body_bytes``): two
    GraphQL mutations to one path are two questions. So are its header fields as sent (``head_id``,
    ``head_bytes``: a field carries data as well as a query does), and a body the gate did not hold
    (which may carry anything) makes the request a question of its own that joins no other
    (``body_id`` starting with UNREAD, ``body_bytes`` its declared size if any). A session grant is
    about the method and path (:meth:`granted`): it covers them with any query, fields and body."""

    sandbox: str
    host: str
    port: int
    method: str | None = None
    path: str | None = None
    rule: str | None = None
    review: str | None = None
    query: str | None = None
    query_id: str | None = None
    query_bytes: int | None = None
    head_id: str | None = None  # a keyed digest of the header fields as sent
    head_bytes: int | None = None
    body_id: str | None = None  # a keyed digest of a held body (a rule that reads bodies)
    body_bytes: int | None = None
    runs: str | None = None  # what a GraphQL request runs (operations and root fields), for people

    @classmethod
    def of(
        cls,
        decision: Decision,
        *,
        per_request: bool = False,
        methods: Sequence[str] = (),
        review: str | None = None,
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Sequence[tuple[bytes, bytes]] | None = None,
        unread: int | None = 0,
    ) -> Subject:
        """The subject of an ``ask`` decision. ``per_request``: the asking rule reads requests, so
        the approval is about this method, path and query only (a push, not every request to the
        host). ``methods``: every method the request was judged as (its own first, then the
        overrides it carries); the approval is about what the server will do, so an override is
        part of it. ``review``: the asking rule's (``human`` or ``auto``). ``query``: the request's
        query exactly as sent (None: it had none), of which only a digest and its size are kept.
        A request recorded with a query whose exact form was not given is a question of its own
        (a digest of the recorded form would join requests whose values differ). ``body``: the
        body the gate held to decide the request (None: it held none), kept as a digest and size.
        ``fields``: the request's header fields as sent (None: not an HTTP request), kept the same
        way. ``unread``: the size of a body the gate did not hold (None: unknown; 0: none).
        ``runs``: what a GraphQL request runs, shown to people (not part of the key: the query and
        body it is read from are)."""
        per_request = per_request or decision.kind not in HOST_KINDS
        if not per_request or (query is None and decision.query is None):
            query_id, size = None, None
        elif query is None:
            query_id, size = f"unmatched-{secrets.token_hex(16)}", None
        else:
            query_id, size = query_digest(query), len(query.encode("utf-8", "surrogateescape"))
        head_id, head_bytes = (None, None) if not per_request or fields is None else _head(fields)
        body_id, body_bytes = None, None
        if per_request and body is not None:
            body_id, body_bytes = _digest(body), len(body)
        elif per_request and unread != 0:
            body_id, body_bytes = f"{UNREAD}{secrets.token_hex(16)}", unread
        return cls(
            sandbox=decision.sandbox_id or ANONYMOUS,
            host=decision.host,
            port=decision.port if decision.port is not None else 0,
            method=_method(decision.method, methods) if per_request else None,
            path=decision.path if per_request else None,
            rule=decision.rule,
            review=review,
            query=decision.query if query_id is not None else None,
            query_id=query_id,
            query_bytes=size,
            head_id=head_id,
            head_bytes=head_bytes,
            body_id=body_id,
            body_bytes=body_bytes,
            runs=runs if per_request else None,
        )

    @property
    def key(self) -> str:
        """A fixed-length key for stores (the fields are client data of any length)."""
        fields: list[Any] = [
            self.sandbox,
            self.host,
            self.port,
            self.method,
            self.path,
            self.rule,
            self.review,
        ]
        if self.query_id is not None:  # (a subject without one keeps the key it always had)
            fields.append(self.query_id)
        if self.head_id is not None:
            fields.append(["head", self.head_id])
        if self.body_id is not None:
            fields.append(["body", self.body_id])
        text = json.dumps(fields)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def covers(self, other: Subject) -> bool:
        return self == other

    def granted(self) -> Subject:
        """What a session grant of this subject is about: its method and path with any query."""
        cleared: dict[str, Any] = dict.fromkeys(REQUEST_DETAIL)
        return replace(self, **cleared)

    def describe(self) -> str:
        where = join_authority(self.host, self.port)
        if self.method is None:
            return where
        shown = f"{self.method} {where}{self.path or ''}"
        if self.query_id is not None:
            shown = f"{shown}?{self.query or ''}{_sent(self.query, self.query_bytes)}"
        return shown + _held(self.head_bytes, self.body_bytes, self.runs, body_unread(self.body_id))

    def summary(self) -> str:
        """:meth:`describe` for one line of a terminal (see :func:`summary`)."""
        query = None if self.query_id is None else self.query or ""
        return summary(
            self.host,
            self.port,
            self.method,
            self.path,
            query,
            self.query_bytes,
            self.body_bytes,
            self.runs,
            head_bytes=self.head_bytes,
            body_read=not body_unread(self.body_id),
        )


# The key of query, header and body digests: a digest anyone could compute would give away a short
# value the records scrub (a six-digit code is found by trying them all). Per process: replicas
# sharing a store do not join each other's per-request approvals (each asks its own), and a pending
# approval does not outlive its gate's wait for it anyway.
_QUERY_KEY = secrets.token_bytes(32)


def query_digest(query: str) -> str:
    """A query's digest, as a subject keeps it: equal only for the same query, byte for byte."""
    return _digest(query.encode("utf-8", "surrogateescape"))


def _digest(data: bytes) -> str:
    return hmac.new(_QUERY_KEY, data, hashlib.sha256).hexdigest()[:32]


def _head(fields: Sequence[tuple[bytes, bytes]]) -> tuple[str, int]:
    """(keyed digest, size as ``name: value`` lines) of header fields as sent. Each name and value
    is length-prefixed, so no two lists of fields digest alike."""
    data = b"".join(b"%d:%s%d:%s" % (len(name), name, len(value), value) for name, value in fields)
    return _digest(data), sum(len(name) + len(value) + 4 for name, value in fields)


def _held(head_bytes: int | None, body_bytes: int | None, runs: str | None, unread: bool) -> str:
    """`` (header fields of N bytes; a body of M bytes)`` for a per-request subject: the size of
    its header fields as sent, of a held body, or of one the gate did not read (``unread``: ``,
    not read``), and what a GraphQL request runs (``; runs mutation deleteRepository``) when that
    could be read."""
    said = [] if head_bytes is None else [f"header fields of {head_bytes} bytes"]
    if unread:
        size = "unknown length, if any," if body_bytes is None else f"{body_bytes} bytes,"
        said.append(f"a body of {size} not read")
    elif body_bytes is not None:
        said.append(f"a body of {body_bytes} bytes")
    if runs is not None:
        said.append(f"runs {runs}")
    return f" ({'; '.join(said)})" if said else ""


def _sent(shown: str | None, size: int | None) -> str:
    """`` (N bytes sent)`` when the query shown is not the query sent (values not recorded)."""
    if size is None or len((shown or "").encode("utf-8", "surrogateescape")) == size:
        return ""
    return f" ({size} bytes sent)"


def summary(
    host: str,
    port: int,
    method: str | None = None,
    path: str | None = None,
    query: str | None = None,
    query_bytes: int | None = None,
    body_bytes: int | None = None,
    runs: str | None = None,
    *,
    head_bytes: int | None = None,
    body_read: bool = True,
) -> str:
    """What an approval is about, on one terminal line: printable ASCII, each part escaped and bounded
    on its own. The sandbox chooses the method's length (an override is any token, as long as the
    request head allows), the path's and the query's: bounded as one string, ``describe()`` would
    lose the host and the path after a long method, and a person would be asked about a request
    without being told where it goes. The host and port are always shown whole; a query, when the
    request has one, after a ``?`` (as decisions record it), then the size of its header fields and
    of its body (``not read`` when the gate did not hold it) and what a GraphQL request runs."""
    where = escape(join_authority(host, port), 300)
    if method is None:
        return where
    shown = f"{escape(method, SHOWN_METHOD)} {where}{escape(path or '', SHOWN_PATH)}"
    if query is not None:
        shown = f"{shown}?{escape(query, SHOWN_QUERY)}{_sent(query, query_bytes)}"
    shown_runs = None if runs is None else escape(runs, SHOWN_PATH)
    return shown + _held(head_bytes, body_bytes, shown_runs, not body_read)


def _method(method: str | None, judged: Sequence[str]) -> str | None:
    """The method an approval names: the request's own, or - when it overrides it - the overriding
    methods and what it was sent as (``DELETE (sent as PATCH)``). Never a bare token then, so it
    can neither equal nor join the approval or grant of a request sent with that method."""
    own = method.upper() if method else None
    others = [m.upper() for m in judged if m.upper() != own]
    if not others:
        return own
    return f"{'/'.join(others)} (sent as {own or '-'})"


@dataclass(frozen=True, slots=True)
class Approval:
    """One pending (or decided) approval, as stored and as the admin API shows it."""

    id: str
    subject: Subject
    kind: str  # the request kind that asked (connect, http, ...)
    rule: str | None
    review: str  # human | auto: whether the reviewer may answer
    policy_version: str
    created: float
    deadline: float
    client: str | None = None
    detail: str | None = None
    state: State = State.PENDING
    scope: Scope | None = None  # of an approval that was approved
    decided_by: str | None = None
    reason: str | None = None
    decided: float | None = None
    advice: Advice | None = None  # the reviewer's answer, when it gave one
    advice_reason: str | None = None

    @classmethod
    def open(
        cls, decision: Decision, subject: Subject, review: str, timeout: float, now: float
    ) -> Approval:
        """The subject takes the asking rule and its review, as the approval records them (what is
        stored and read back is then the same subject, with the same key)."""
        return cls(
            id=new_approval_id(),
            subject=replace(subject, rule=decision.rule, review=review),
            kind=str(decision.kind),
            rule=decision.rule,
            review=review,
            policy_version=decision.policy_version,
            created=now,
            deadline=now + timeout,
            client=decision.client,
            detail=decision.detail,
        )

    def is_open(self, now: float | None = None) -> bool:
        """Still answerable: pending and before its deadline."""
        return self.state is State.PENDING and (now or time.time()) < self.deadline

    def decide(
        self, state: State, decided_by: str, reason: str | None, scope: Scope | None, now: float
    ) -> Approval:
        return replace(
            self,
            state=state,
            decided_by=decided_by,
            reason=clip(reason),
            scope=scope,
            decided=now,
        )

    def to_json(self) -> dict[str, Any]:
        """The approval as the admin API, the event stream and the webhook send it."""
        out = asdict(self)
        out.pop("subject")
        out.update(
            sandbox_id=self.subject.sandbox,
            host=self.subject.host,
            port=self.subject.port,
            method=self.subject.method,
            path=self.subject.path,
            **{name: getattr(self.subject, name) for name in REQUEST_DETAIL},
            what=self.subject.describe(),
        )
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Approval:
        subject = Subject(
            sandbox=str(data["sandbox_id"]),
            host=str(data["host"]),
            port=int(data["port"]),
            method=data.get("method"),
            path=data.get("path"),
            rule=data.get("rule"),
            review=data.get("review"),
            **{name: data.get(name) for name in REQUEST_DETAIL},
        )
        return cls(
            id=str(data["id"]),
            subject=subject,
            kind=str(data["kind"]),
            rule=data.get("rule"),
            review=str(data["review"]),
            policy_version=str(data["policy_version"]),
            created=float(data["created"]),
            deadline=float(data["deadline"]),
            client=data.get("client"),
            detail=data.get("detail"),
            state=State(data.get("state", State.PENDING)),
            scope=Scope(data["scope"]) if data.get("scope") else None,
            decided_by=data.get("decided_by"),
            reason=data.get("reason"),
            decided=data.get("decided"),
            advice=Advice(data["advice"]) if data.get("advice") else None,
            advice_reason=data.get("advice_reason"),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """A session grant: this subject (one sandbox) is allowed without asking until ``expires``."""

    subject: Subject
    approval: str  # the approval that granted it
    decided_by: str
    expires: float
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        # A grant is about no query: the fields are left out, so a replica that predates them
        # (sharing the store during an upgrade) still reads the grant.
        subject = asdict(self.subject)
        for name in REQUEST_DETAIL:
            if subject.get(name) is None:
                subject.pop(name, None)
        out["subject"] = subject
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grant:
        return cls(
            subject=Subject(**data["subject"]),
            approval=str(data["approval"]),
            decided_by=str(data["decided_by"]),
            expires=float(data["expires"]),
            created=float(data["created"]),
        )


class NotOpen(Exception):
    """The approval was answered, expired or never existed; carries its current state if any."""

    def __init__(self, approval: Approval | None) -> None:
        self.approval = approval
        state = approval.state if approval is not None else "unknown"
        if approval is not None and approval.state is State.PENDING:
            state = State.EXPIRED
        super().__init__(f"approval is {state}")


def clip(text: str | None, limit: int = MAX_REASON) -> str | None:
    """At most ``limit`` characters, each one that is not printable replaced by a space (the reviewer
    and the admin API show these; every decision passes here, so a printable text is taken as is)."""
    if text is None:
        return None
    text = str(text)[:limit]
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else " " for ch in text)
