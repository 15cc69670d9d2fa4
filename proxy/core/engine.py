"""The decision core: one pure function from (request, policy) to a Decision, in a fixed order.

The order, written down once in ``decide``:

1. canonicalise the host; a host that cannot be canonicalised is ``invalid-host``;
2. for a TLS ClientHello: a host-name destination needs an SNI (``sni-missing``) equal to it, and an
   IP-literal destination must carry none (``sni-mismatch``);
3. a deny rule matching the host (and the port, if the rule lists ports) is ``denied-by-rule``;
4. an allow rule matching host and port allows (the most specific one is named); allow rules matching
   the host on other ports only are ``port-not-allowed``; an HTTP request to a host whose rules read
   requests then goes through the request step (:mod:`proxy.core.requests`), which names the
   request rule that allowed or refused it (request refusals hold in report mode too); when the rule
   that matched (a host's rule, or a request rule) is an ``ask`` rule the answer is ``ask``
   (``approval-pending``), which nothing enforces as it stands: the checkpoint holds the request until
   an approval turns it into an allow or a deny;
5. anything else is ``no-matching-rule``.

Host names are matched only by host patterns and IP literals only by ``cidrs``: a wildcard never covers an
address. DNS questions have no port; they match allow rules on any port, and deny rules only when the
deny rule covers every port (denying ``github.com:22`` must not stop ``github.com`` resolving).

Report mode exists to learn what an allowlist is missing, not to switch safety off. Only the outcomes
that mean "the allowlist does not cover this" (``no-matching-rule``, ``port-not-allowed`` and, on a host
whose requests are read, ``request-not-allowed``) become ``report``: traffic proceeds and the would-be
denial is recorded, so a team can learn a host's request rules the way it learns its hosts. An explicit
deny rule is a decision a security engineer already took, so ``denied-by-rule`` holds in a report-mode
policy (its detail says so), unless that deny rule itself says ``mode: report`` (trying a new deny rule
out before enforcing it). Safety and protocol refusals (``invalid-host``, ``sni-*``, ECH, not-TLS,
ambiguous requests, internal addresses, DNS failures, an unavailable audit trail, ...) stay ``deny`` in
every mode: no policy setting turns them into an allow.

A rule's own ``mode`` overrides the policy's for the refusals that rule is responsible for: the port
gaps of the rule nearest to a host, the requests no request rule allows on the host of the allow rule
that matched, and the deny rule's own matches. ``no-matching-rule`` has no rule and follows the policy.
The decision's ``mode`` is the mode that applied. Under a managed ceiling (``Policy.ceiling``,
:mod:`proxy.policy.managed`) a ``report`` the managed policy would not allow is a ``deny``: report mode
learns inside the organisation's bounds, never past them.

``decide`` does no I/O and costs the same for 10 rules as for 100,000 (see ``proxy/policy/index.py``
and ``bench/decisions.py``). The one thing it keeps is each policy's memo of the outcomes it reached
(:func:`decide_request`): a pure function's answers, dropped with the policy.
"""

from __future__ import annotations

from functools import lru_cache

from proxy.core.authority import join_authority
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.frozen import builder
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.requests import HttpHead, Outcome, judge
from proxy.core.text import escape
from proxy.policy.model import Action, Mode, Policy, Rule

# The reasons report mode turns into REPORT: the allowlist does not cover the request. Everything else
# (explicit deny rules, safety refusals) stays DENY in every mode.
REPORTABLE_REASONS = frozenset(
    {Reason.NO_MATCHING_RULE, Reason.PORT_NOT_ALLOWED, Reason.REQUEST_NOT_ALLOWED}
)


class BodyNeeded:
    """The request step cannot decide before it has read the (bounded) body."""

    __slots__ = ()


BODY_NEEDED = BodyNeeded()
_HTTP_KINDS = (Kind.HTTP, Kind.REQUEST)

_GRANT_HINT = "a human can grant access by adding a rule to the egress policy"


_MODE_TEXT = {mode: mode.value for mode in Mode}

# What a request's decision is apart from the request's own fields: verdict, reason, rule name,
# canonical host, detail, mode.
type _Outcome = tuple[Verdict, Reason, str | None, str, str, str]
_MAX_OUTCOMES = 4096
_KEPT_TEXT = 300  # host and SNI: a name is at most 253 characters
_KEPT_TARGET = 512


def _key(request: Request) -> tuple[object, ...] | None:
    """The request's memo key, or None when it is not kept: values of another type than the
    adapters give (``1`` and ``True`` are equal keys and print differently) or of unbounded size."""
    host, port, sni, http = request.host, request.port, request.sni, request.http
    if (
        type(host) is str
        and len(host) <= _KEPT_TEXT
        and (type(port) is int or port is None)
        and (sni is None or (type(sni) is str and len(sni) <= _KEPT_TEXT))
        and (http is None or _keepable(http))
    ):
        return host, request.kind, port, sni, http
    return None


def _keepable(head: HttpHead) -> bool:
    """A head small enough to be a memo key (each kept entry is then a few KiB at most) and whose
    answer does not depend on a body."""
    try:
        return (
            type(head) is HttpHead
            and head.body is None
            and not head.body_overflow
            and not head.overrides
            and type(head.target) is str
            and len(head.target) <= _KEPT_TARGET
            and type(head.method) is str
            and len(head.method) <= 32
            and (head.upgrade is None or len(head.upgrade) <= 64)
            and (head.content_type is None or len(head.content_type) <= 128)
            and (head.content_encoding is None or len(head.content_encoding) <= 64)
        )
    except TypeError:  # a header value of another type: decided, not kept
        return False


@lru_cache(maxsize=4096)
def _destination(raw: str) -> tuple[str, tuple[int, int] | None]:
    """(canonical host as text, (IP version, integer value) for an IP literal) of a request's host
    string; cached like ``canonical_host`` itself, so an address is not formatted again for every
    decision."""
    target = canonical_host(raw)
    if isinstance(target, str):
        return target, None
    return str(target), (target.version, int(target))


_new_decision = builder(Decision)

_PORTS_TEXT: dict[frozenset[int] | None, str] = {}


def _ports_text(rule: Rule) -> str:
    """``rule.ports_text()``, kept per port set (policies have few distinct ones)."""
    text = _PORTS_TEXT.get(rule.ports)
    if text is None:
        if len(_PORTS_TEXT) >= 1024:
            _PORTS_TEXT.clear()
        text = _PORTS_TEXT[rule.ports] = rule.ports_text()
    return text


def _where(host: str, port: int | None) -> str:
    return host if port is None else join_authority(host, port)


def decide(request: Request, policy: Policy) -> Decision:
    """Decide one request against one policy. Pure: same inputs, same verdict, reason and rule.

    A request whose decision needs its body is refused here; :func:`decide_request` asks for it."""
    outcome = decide_request(request, policy)
    if isinstance(outcome, BodyNeeded):
        return refuse(
            request,
            policy,
            Reason.REQUEST_NOT_ALLOWED,
            "a rule for this host must read the request body, which was not given",
        )
    return outcome


def decide_request(request: Request, policy: Policy) -> Decision | BodyNeeded:
    """:func:`decide`, or BODY_NEEDED when the request step must first read the request body.

    Without a body, a request is decided by its host, kind, port, SNI and HTTP head alone, so that
    outcome is kept per policy (``RuleIndex.outcomes``, bounded) and the next request with the same
    values only builds its Decision: traffic goes to a few registries, and the host walk, the request
    step, the ceiling's decision and the detail text were two thirds of a decision's cost. Kept only
    with an ``int`` port (``True`` or ``443.0`` find the same rules and print differently) and a
    head and names of bounded size (a memo of long ones would hold megabytes), and a host that is
    a ``str`` (``1`` and ``True`` are equal keys)."""
    key = _key(request)
    if key is not None:
        outcomes = policy.index.outcomes
        try:
            outcome: _Outcome | None = outcomes.get(key)
        except TypeError:  # an unhashable kind or head field (refused): decided without the memo
            outcome, key = None, None
        if outcome is not None:
            return _build(request, policy, outcome)
        judged = _judge(request, policy)
        if key is not None and not isinstance(judged, BodyNeeded):  # (a request step's answer)
            if len(outcomes) >= _MAX_OUTCOMES:
                outcomes.clear()
            outcomes[key] = judged
    else:
        judged = _judge(request, policy)
    if isinstance(judged, BodyNeeded):
        return judged
    return _build(request, policy, judged)


def _judge(request: Request, policy: Policy) -> _Outcome | BodyNeeded:
    """The steps of the module's order, up to the Decision's own fields."""
    # (1) Canonicalise: every later step sees only the canonical form.
    try:
        host, address = _destination(request.host)
    except (InvalidHost, TypeError) as exc:
        shown = escape(request.host)
        return _outcome(
            request,
            policy,
            Verdict.DENY,
            Reason.INVALID_HOST,
            None,
            shown,
            f"'{shown}' is not a valid destination host ({escape(str(exc))})",
        )
    is_name = address is None

    # (2) TLS: the name in the ClientHello must be the name the tunnel was allowed for.
    # `==`, not `is`: a kind passed as the plain string 'tls' must not skip the SNI checks.
    if request.kind == Kind.TLS:
        refusal = _check_sni(request.sni, host, is_name)
        if refusal is not None:
            reason, detail = refusal
            return _outcome(request, policy, Verdict.DENY, reason, None, host, detail)

    dns = request.kind == Kind.DNS
    # A missing port on a non-DNS request matches no listed port (fail closed), only deny-all rules.
    port = None if dns else (request.port if request.port is not None else 0)
    shown_port = None if dns else request.port
    if address is None:
        match = policy.index.match_name(host, port)
    else:
        match = policy.index.match_value(*address, port)

    # (3) Deny beats allow, whatever the specificity.
    if match.deny is not None:
        rule = match.deny
        detail = f"{_where(host, shown_port)} is denied by rule '{rule.name}'"
        if rule.mode is Mode.REPORT:
            return _outcome(
                request,
                policy,
                Verdict.REPORT,
                Reason.DENIED_BY_RULE,
                rule.name,
                host,
                detail + " (the rule is in report mode: recorded, not enforced)",
                Mode.REPORT,
            )
        if policy.mode is Mode.REPORT:
            detail += " (explicit deny rules are enforced in report mode too)"
        return _outcome(
            request, policy, Verdict.DENY, Reason.DENIED_BY_RULE, rule.name, host, detail
        )
    # (4) The most specific allow rule that lists the port; then, for an HTTP request on a host whose
    # rules read requests, the request step.
    if match.allow is not None:
        rule = match.allow
        if (
            request.http is not None
            and is_name
            and port is not None
            and request.kind in _HTTP_KINDS
        ):
            rules = policy.index.request_rules(host, port)
            if rules is not None:
                judged = judge(rules, request.http)
                if judged.outcome is Outcome.BODY:
                    return BODY_NEEDED
                name = judged.rule.name if judged.rule is not None else None
                if judged.outcome is Outcome.ALLOW:
                    return _outcome(
                        request, policy, Verdict.ALLOW, judged.reason, name, host, judged.detail
                    )
                if judged.outcome is Outcome.ASK:
                    return _outcome(
                        request, policy, Verdict.ASK, judged.reason, name, host, judged.detail
                    )
                # A request no rule allows is a gap in the allowlist: report mode reports it. An
                # explicit request deny rule holds unless it is itself in report mode; an ambiguous
                # request is a safety refusal.
                gap = judged.reason is Reason.REQUEST_NOT_ALLOWED
                trial = (
                    judged.reason is Reason.DENIED_BY_RULE
                    and judged.rule is not None
                    and judged.rule.mode is Mode.REPORT
                )
                if trial or (gap and _mode_of(judged.rule or rule, policy) is Mode.REPORT):
                    suffix = (
                        " (the rule is in report mode: recorded, not enforced)" if trial else ""
                    )
                    return _outcome(
                        request,
                        policy,
                        Verdict.REPORT,
                        judged.reason,
                        name,
                        host,
                        judged.detail + suffix,
                        Mode.REPORT,
                    )
                detail = judged.detail
                if policy.mode is Mode.REPORT:
                    detail += " (request deny rules are enforced in report mode too)"
                return _outcome(request, policy, Verdict.DENY, judged.reason, name, host, detail)
        if rule.action is Action.ASK and not rule.reads_requests:
            # Explicit like a deny rule, so report mode does not wave it through either. An ask rule
            # with request conditions asks per request, inside the tunnel (above).
            return _outcome(
                request,
                policy,
                Verdict.ASK,
                Reason.APPROVAL_PENDING,
                rule.name,
                host,
                f"{_where(host, shown_port)} needs an approval (rule '{rule.name}')",
            )
        return _outcome(
            request,
            policy,
            Verdict.ALLOW,
            Reason.ALLOWED_BY_RULE,
            rule.name,
            host,
            f"{_where(host, shown_port)} allowed by rule '{rule.name}'",
        )
    if match.nearest is not None:
        rule = match.nearest
        return _policy_refusal(
            request,
            policy,
            Reason.PORT_NOT_ALLOWED,
            rule.name,
            host,
            f"{_where(host, shown_port)} matches rule '{rule.name}' but the rule allows "
            f"{_ports_text(rule)}; {_GRANT_HINT}",
            _mode_of(rule, policy),
        )
    # (5) Default deny.
    what = "host" if is_name else "address"
    return _policy_refusal(
        request,
        policy,
        Reason.NO_MATCHING_RULE,
        None,
        host,
        f"no rule allows {what} {_where(host, shown_port)}; {_GRANT_HINT}",
    )


def refuse(
    request: Request, policy: Policy, reason: Reason, detail: str, rule: str | None = None
) -> Decision:
    """A deny for a protocol violation an adapter found (ECH, not TLS, Host mismatch, ...).

    Always DENY, in report mode too: these are safety refusals, not policy outcomes.
    """
    try:
        host = _destination(request.host)[0]
    except (InvalidHost, TypeError):
        host = escape(request.host)
    return _build(
        request, policy, _outcome(request, policy, Verdict.DENY, reason, rule, host, detail)
    )


def _check_sni(sni: str | None, host: str, is_name: bool) -> tuple[Reason, str] | None:
    if not sni:
        if is_name:
            return Reason.SNI_MISSING, (
                f"the TLS ClientHello for {host} carries no server name (SNI); "
                "clients must send the host name they connect to"
            )
        return None
    if not is_name:
        return Reason.SNI_MISMATCH, (
            f"the TLS ClientHello names '{escape(sni)}' but the tunnel is to the address {host}"
        )
    try:
        sni_host = canonical_host(sni)
    except (InvalidHost, TypeError):
        return Reason.SNI_MISMATCH, f"the TLS server name '{escape(sni)}' is not a valid host"
    if sni_host != host:
        return Reason.SNI_MISMATCH, (
            f"the TLS server name '{escape(str(sni_host))}' does not match the tunnel host {host}"
        )
    return None


def _mode_of(rule: Rule, policy: Policy) -> Mode:
    """The mode that applies to a refusal ``rule`` is responsible for."""
    return rule.mode if rule.mode is not None else policy.mode


def _policy_refusal(
    request: Request,
    policy: Policy,
    reason: Reason,
    rule: str | None,
    host: str,
    detail: str,
    mode: Mode | None = None,
) -> _Outcome:
    applied = policy.mode if mode is None else mode
    verdict = Verdict.REPORT if applied is Mode.REPORT else Verdict.DENY
    return _outcome(request, policy, verdict, reason, rule, host, detail, applied)


def _outcome(
    request: Request,
    policy: Policy,
    verdict: Verdict,
    reason: Reason,
    rule: str | None,
    host: str,
    detail: str,
    mode: Mode | None = None,
) -> _Outcome:
    if verdict is Verdict.REPORT and policy.ceiling is not None:
        # Report mode learns inside the managed ceiling only: what it would not allow is refused.
        outside = decide(request, policy.ceiling)
        if not outside.allowed:
            verdict = Verdict.DENY
            detail += f"; outside the managed policy ({outside.reason})"
    return verdict, reason, rule, host, detail, _MODE_TEXT[policy.mode if mode is None else mode]


def _build(request: Request, policy: Policy, outcome: _Outcome) -> Decision:
    verdict, reason, rule, host, detail, mode = outcome
    # Positional construction: keyword arguments cost ~50% more on this hot path.
    return _new_decision(
        verdict,
        reason,
        rule,
        request.kind,
        host,
        request.port,
        policy.version,
        mode,
        request.method,
        request.path,
        request.sni,
        request.client,
        request.sandbox_id,
        request.qtype,
        None,
        detail,
        request.query,
    )


__all__ = ["BODY_NEEDED", "REPORTABLE_REASONS", "BodyNeeded", "decide", "decide_request", "refuse"]
