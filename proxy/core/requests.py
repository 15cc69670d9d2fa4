"""The request step: one HTTP request against the request rules of its host, as a pure function.

The order, for a request on a host whose rules read requests (see :meth:`RuleIndex.request_rules`):

1. the target must be readable (:mod:`proxy.core.paths`), or ``ambiguous-request``;
2. an ``Upgrade`` other than WebSocket is ``ambiguous-request`` (its protocol would not be judged);
   ``Upgrade: websocket``, or a WebSocket handshake's ``Sec-WebSocket-*`` fields without any
   ``Upgrade`` (mitmproxy and some servers switch on those alone), make it a WebSocket upgrade,
   which only a ``websocket: true`` rule (or one without request conditions) allows;
3. the methods to judge are the request method and every method-override it carries
   (``X-HTTP-Method-Override``, ``X-Method-Override``, ``X-HTTP-Method``, also spelled with ``_``, a
   ``_method`` query parameter, and the ``_method`` field of a POST body a server could read as a form
   - any body whose type is not known to be something else): servers act on the override, so each
   must be allowed;
4. for each method, a deny rule whose conditions match is ``denied-by-rule`` (deny beats allow, as for
   hosts); then the first allow rule in policy order whose conditions match allows it;
5. nothing allows it: ``request-not-allowed`` (``ambiguous-request`` when only an ambiguous path stood
   in the way).

A condition that needs the body (GraphQL operations, a JSON field, a form's ``_method``, a size limit
on a body of unknown length) makes the answer :data:`BODY` until the body is given: the adapter then
holds it, bounded by :data:`HOLD_LIMIT`, and asks again before anything is sent upstream. Where a
condition cannot be read (an ambiguous path, an unreadable body) an allow rule does not match and a
deny rule does: doubt never allows. A body condition read as JSON (GraphQL operations, a JSON field)
holds only for a body declared JSON: servers pick the parser by the Content-Type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from proxy.core.bodies import (
    forget_documents,
    form_methods,
    graphql_operations,
    is_json,
    is_method_field,
    json_field,
    maybe_form,
)
from proxy.core.decision import Reason
from proxy.core.fieldlines import is_token
from proxy.core.frozen import fast_init
from proxy.core.paths import Target, Unreadable, parse_target, php_name
from proxy.core.text import escape
from proxy.policy.index import RequestRules
from proxy.policy.model import RequestConditions, Rule

HOLD_LIMIT = 1024 * 1024  # bytes of body held back to decide a body-dependent rule
MAX_JUDGED = 1024  # request heads remembered per host's rules (keep-alive traffic repeats)
OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")


@dataclass(frozen=True, slots=True)
class HttpHead:
    """What the request step reads from one request, as plain values (untrusted)."""

    method: str
    target: str  # origin-form: /path?query, exactly as sent
    overrides: tuple[str, ...] = ()  # values of the method-override headers
    upgrade: str | None = None  # the Upgrade header
    body_size: int | None = 0  # declared size; None when unknown (chunked, HTTP/2 without length)
    content_type: str | None = None
    content_encoding: str | None = None  # a compressed body is not read (no decompression bombs)
    body: bytes | None = None  # the held body, once read
    body_overflow: bool = False  # the body was longer than HOLD_LIMIT (and not held)
    handshake: bool = False  # it carries WebSocket handshake fields (Sec-WebSocket-*)

    @property
    def websocket(self) -> bool:
        """Judged as a WebSocket upgrade: ``Upgrade: websocket``, or handshake fields without any
        ``Upgrade`` (what the upstream may switch on is what the rules judge; a 101 is passed on
        only for a request allowed as one)."""
        if self.upgrade is None:
            return self.handshake
        return self.upgrade.strip().lower() == "websocket"

    def with_body(self, body: bytes | None, overflow: bool = False) -> HttpHead:
        return replace(self, body=body, body_overflow=overflow)

    @property
    def body_read(self) -> bool:
        return self.body is not None or self.body_overflow

    @property
    def readable_body(self) -> bytes | None:
        """The held body when a parser may read it: not past the limit, not compressed."""
        encoding = (self.content_encoding or "identity").strip().lower()
        return self.body if encoding == "identity" else None


fast_init(HttpHead)  # one per HTTP request


class Outcome(Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"  # an ask rule matched: the checkpoint holds the request for an approval
    BODY = "body"  # cannot be decided before the body is held


@dataclass(frozen=True, slots=True)
class Judgement:
    outcome: Outcome
    reason: Reason
    rule: Rule | None
    detail: str


BODY = Judgement(Outcome.BODY, Reason.REQUEST_NOT_ALLOWED, None, "the decision needs the body")


class _Match(Enum):
    NO = 0
    YES = 1
    BODY = 2


def judge(rules: RequestRules, head: HttpHead) -> Judgement:
    """Decide ``head`` against ``rules`` (see the module docstring for the order). Pure, so the
    answer for a head without a body is remembered with the rules it was judged against."""
    if head.body is not None or head.body_overflow:
        try:
            return _judge_head(rules, head)
        finally:
            forget_documents()  # (kept while every rule and method judged it)
    cache = rules.judged
    found = cache.get(head)
    if isinstance(found, Judgement):
        return found
    verdict = _judge_head(rules, head)
    if len(cache) >= MAX_JUDGED:
        cache.clear()
    cache[head] = verdict
    return verdict


def _judge_head(rules: RequestRules, head: HttpHead) -> Judgement:
    verdict = _judge(rules, head)
    announced = head.body_size is not None and head.body_size > HOLD_LIMIT
    # A held body that overflowed was dropped while it was counted: what is left is not what the
    # client sent, so nothing may let the request on (another rule allowing it without reading the
    # body included) - it is refused as too large, unless a deny rule refused it already.
    if (announced and verdict is BODY) or (
        head.body_overflow
        and (verdict.outcome is not Outcome.DENY or verdict.reason is Reason.REQUEST_NOT_ALLOWED)
    ):
        return _refuse(
            Reason.REQUEST_TOO_LARGE,
            f"a rule must read this request's body, which is longer than the {HOLD_LIMIT} bytes "
            "the gate holds to decide it",
        )
    return verdict


def _judge(rules: RequestRules, head: HttpHead) -> Judgement:
    try:
        target = parse_target(head.target)
    except Unreadable as exc:
        return _refuse(Reason.AMBIGUOUS_REQUEST, f"unreadable request target: {exc}")
    websocket = head.websocket
    if head.upgrade is not None and not websocket:
        return _refuse(
            Reason.AMBIGUOUS_REQUEST,
            f"'Upgrade: {escape(head.upgrade)}' is not supported here (only WebSocket is)",
        )
    method = head.method.upper()
    overrides, problem = _overrides(head, target)
    if problem is not None:
        return _refuse(Reason.AMBIGUOUS_REQUEST, problem)
    first: Judgement | None = None
    waiting = False
    for each in (method, *overrides):
        verdict = _judge_method(rules, each, target, websocket, head)
        if verdict.outcome is Outcome.DENY:
            if each != method:
                verdict = _refuse(
                    verdict.reason,
                    f"the request overrides its method {escape(method)} with {escape(each)}: "
                    + verdict.detail,
                    verdict.rule,
                )
            return verdict
        if verdict.outcome is Outcome.BODY:
            waiting = True
        if first is None or (verdict.outcome is Outcome.ASK and first.outcome is Outcome.ALLOW):
            first = verdict  # every method must be allowed: one that needs an approval asks
    if waiting:
        return BODY
    assert first is not None
    if method == "POST" and maybe_form(head.content_type) and head.body_size != 0:
        # A body a server could read as a form can carry ``_method``: read it before letting a POST
        # through, unless its type is known not to be a form (fail closed: no type is a form).
        if not head.body_read:
            return BODY
        rule = escape(first.rule.name) if first.rule is not None else "-"
        kind = escape(head.content_type) if head.content_type else "none"
        why = (
            f"rule '{rule}' allows this POST only once its body is read for a '_method' "
            f"override (a server could read it as an HTML form: Content-Type {kind}), and it"
        )
        if head.body_overflow:
            return _refuse(
                Reason.REQUEST_TOO_LARGE,
                f"{why} is longer than the {HOLD_LIMIT} bytes the gate holds; send it with its "
                "real Content-Type",
            )
        body = head.readable_body
        found = None if body is None else form_methods(body, head.content_type)
        if found is None:
            return _refuse(
                Reason.AMBIGUOUS_REQUEST,
                f"{why} cannot be read (compressed, an unreadable multipart or charset); send it "
                "with its real Content-Type",
            )
        seen = {method, *overrides}
        new = tuple(each for each in found if each not in seen)
        if new:  # judged again with all of them at once (its body is not read again for each)
            return _judge(rules, replace(head, overrides=(*head.overrides, *new)))
    return first


def _override_values(head: HttpHead, target: Target | None) -> list[str]:
    """The method overrides a request carries as sent: its override headers, then its ``_method``
    query parameters (none when its target cannot be read). A parameter is ``_method`` under every
    name PHP gives it: PHP decodes ``+`` in a query as a space, drops leading spaces and reads ``.``
    and a space as ``_``, so ``?.method=DELETE`` and ``?+_method=DELETE`` reach Symfony's (Laravel's)
    method override as ``_method``."""
    values = list(head.overrides)
    if target is not None:
        values += [
            value if value is not None else ""
            for name, value in target.query.params
            if is_method_field(name)
        ]
    return values


def _overrides(head: HttpHead, target: Target) -> tuple[tuple[str, ...], str | None]:
    out: dict[str, None] = {}
    for value in _override_values(head, target):
        method = value.strip(" \t")  # OWS; anything else around it is not a method
        if not is_token(method):
            return (), f"an unreadable method override {escape(value)!r}"
        out[method.upper()] = None
    return tuple(out), None


def _judge_method(
    rules: RequestRules, method: str, target: Target, websocket: bool, head: HttpHead
) -> Judgement:
    pending = False
    for rule in rules.deny:
        found = _matches(rule, method, target, websocket, head, deny=True)
        if found is _Match.YES:
            return _refuse(
                Reason.DENIED_BY_RULE,
                f"{_what(method, target)} is denied by rule '{rule.name}'",
                rule,
            )
        pending = pending or found is _Match.BODY
    ambiguous = False
    allowed: Rule | None = None
    for rule in rules.allow:
        found = _matches(rule, method, target, websocket, head, deny=False)
        if found is _Match.YES:
            allowed = rule
            break
        if found is _Match.BODY:
            pending = True
        elif rule.request is not None and rule.request.paths and target.path is None:
            ambiguous = True
    if pending:
        return BODY
    if allowed is not None and allowed.action == "ask":
        return Judgement(
            Outcome.ASK,
            Reason.APPROVAL_PENDING,
            allowed,
            f"{_what(method, target)} needs an approval (rule '{allowed.name}')",
        )
    if allowed is not None:
        return Judgement(
            Outcome.ALLOW,
            Reason.ALLOWED_BY_RULE,
            allowed,
            f"{_what(method, target)} allowed by rule '{allowed.name}'",
        )
    if ambiguous:
        return _refuse(
            Reason.AMBIGUOUS_REQUEST,
            f"the path has no canonical form ({target.problem}), so no path rule can allow it",
        )
    return _refuse(
        Reason.REQUEST_NOT_ALLOWED,
        f"no rule allows {_what(method, target)}{' (WebSocket)' if websocket else ''} on this host",
    )


def _matches(
    rule: Rule, method: str, target: Target, websocket: bool, head: HttpHead, *, deny: bool
) -> _Match:
    c = rule.request
    if c is None:
        return _Match.YES  # no conditions: every request (an inspect-only rule)
    if c.methods is not None and method not in c.methods:
        return _Match.NO
    if c.websocket is None:
        # Absent: an allow rule allows plain requests only (an upgrade needs websocket: true); a
        # deny rule refuses both. A request carrying ``Sec-WebSocket-Version`` alone is judged as
        # an upgrade, and a server runs it as the plain request it also is: a deny rule must not
        # be stepped around with one header.
        if websocket and not deny:
            return _Match.NO
    elif c.websocket != websocket:
        return _Match.NO
    if c.paths is not None:
        if target.path is None:
            if not deny:
                return _Match.NO
        else:
            spellings = _spellings(target, deny)
            if not any(glob.matches(each) for glob in c.paths for each in spellings):
                return _Match.NO
    for name, accepted in c.query:
        values = target.query.values(name)
        if deny:
            if not any(v in accepted for v in values if v is not None):
                return _Match.NO
        elif len(values) != 1 or values[0] not in accepted:
            return _Match.NO  # absent, repeated (servers pick different copies) or another value
    return _body_match(c, head, target, deny=deny)


def _spellings(target: Target, deny: bool) -> tuple[str, ...]:
    """The paths a rule's globs are tried on: the canonical path; for a deny rule also the spellings
    routers take for the same route - with or without a trailing ``/`` (Rails, Express:
    ``/graphql/`` is ``/graphql``), and without a format suffix on the last segment (Rails routes
    ``/graphql.json`` to ``/graphql``; cut at its first dot and at its last) - so a deny rule is
    not stepped around by one."""
    path = target.path
    assert path is not None
    if not deny or path == "/":
        return (path,)
    bare = path[:-1] if path.endswith("/") else path
    stems = [bare]
    head, _, last = bare.rpartition("/")
    if "." in last[1:]:
        stems += [f"{head}/{last[: last.index('.', 1)]}", f"{head}/{last[: last.rindex('.')]}"]
    return tuple(dict.fromkeys([path, *(each for stem in stems for each in (stem, stem + "/"))]))


def url_documents(target: str) -> list[str] | None:
    """:func:`_url_documents` of an origin-form target (None when it cannot be read)."""
    try:
        return _url_documents(parse_target(target))
    except ValueError:
        return None


def _url_documents(target: Target) -> list[str]:
    """The URL parameters a GraphQL server may run as a document, judged with the body's:
    ``query`` (express-graphql runs it instead of the body's), any ``...[query]``, and anything
    under ``_json`` - Rails merges the query string into ``params``, and controllers that run a
    batch from ``params[:_json]`` (Zammad's, GitLab's) then run ``?_json[][query]=mutation...``.
    A value that is no document leaves the request unreadable (no allow rule matches it)."""
    found: list[str] = []
    for name, value in target.query.params:
        key, php = name.lower(), php_name(name)  # PHP's servers read ``?+query=`` as ``query``
        as_sent = key == "query" or key.endswith("[query]") or key.startswith("_json")
        if as_sent or php == "query" or php.startswith("_json"):
            found.append(value or "")
    return found


def _body_match(c: RequestConditions, head: HttpHead, target: Target, *, deny: bool) -> _Match:
    if c.max_request_bytes is not None:
        size = head.body_size
        if size is None and head.body_read:
            size = None if head.body is None else len(head.body)
            if size is None:
                return _Match.NO  # longer than we hold: longer than any limit we can check
        if size is None:
            return _Match.BODY
        if size > c.max_request_bytes:
            return _Match.NO
    if not c.reads_body:
        return _Match.YES
    if not is_json(head.content_type):
        # Read as JSON only what the server reads as JSON: it picks its parser by the type, and a
        # body may be a JSON query and a form mutation at once. Unknown: a deny rule matches.
        return _Match.YES if deny else _Match.NO
    if not head.body_read:
        return _Match.BODY
    body = head.readable_body
    if body is None:  # too long to hold, or compressed: unreadable
        return _Match.YES if deny else _Match.NO
    if c.graphql_operations is not None:
        found = graphql_operations(body, _url_documents(target))
        if found is None:
            return _Match.YES if deny else _Match.NO
        if deny and not (found & c.graphql_operations):
            return _Match.NO
        if not deny and not found <= c.graphql_operations:
            return _Match.NO
    for key, accepted in c.json_body:
        # Rails merges the query over the JSON body (``params[:operation]`` is the URL's when both
        # name it, as GitLab's LFS batch reads it): a URL parameter of the field's name counts too.
        value = json_field(body, key)
        in_url = target.query.values(key)
        if deny:
            if value is not None and value not in accepted and not (set(in_url) & accepted):
                return _Match.NO
        elif value not in accepted or any(each not in accepted for each in in_url):
            return _Match.NO
    return _Match.YES


def judged_methods(head: HttpHead) -> tuple[str, ...]:
    """Every method the request step judged ``head`` as: its own, then each override (headers, a
    ``_method`` parameter, a held form's ``_method`` field) that names another. The server acts on
    an override, so what an approval of this request is about is all of them, not the method the
    request line shows (:class:`proxy.approvals.model.Subject`)."""
    method = head.method.upper()
    try:
        target: Target | None = parse_target(head.target)
    except Unreadable:  # refused by the request step; the headers still count
        target = None
    named = _override_values(head, target)
    body = head.readable_body
    if body is not None and method == "POST" and maybe_form(head.content_type):
        named += form_methods(body, head.content_type) or ()
    found: list[str] = [method]
    for each in (value.strip().upper() for value in named):
        if each and each not in found:
            found.append(each)
    return tuple(found)


def _what(method: str, target: Target) -> str:
    path = target.path if target.path is not None else target.raw_path
    return f"{escape(method)} {escape(path)}"


def _refuse(reason: Reason, detail: str, rule: Rule | None = None) -> Judgement:
    return Judgement(Outcome.DENY, reason, rule, detail)


__all__ = [
    "BODY",
    "HOLD_LIMIT",
    "OVERRIDE_HEADERS",
    "HttpHead",
    "Judgement",
    "Outcome",
    "judge",
    "judged_methods",
]
