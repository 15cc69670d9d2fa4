"""The 403 an agent sees: machine-readable headers plus a short text it can act on.

Agents read response bodies. The body therefore says what was refused and why, that the restriction is
deliberate and must not be worked around, and how a human grants access, so the agent stops retrying
tricks and asks instead.
"""

from __future__ import annotations

from mitmproxy import http

from proxy.core.decision import Decision, Reason
from proxy.core.engine import render_host

EGRESS_HEADER_PREFIX = "x-egress-"

_POLICY_REASONS = {Reason.NO_MATCHING_RULE, Reason.PORT_NOT_ALLOWED}


def strip_egress_headers(headers: http.Headers) -> None:
    """Client-sent ``X-Egress-*`` headers could forge a decision upstream or in logs: drop them all,
    including the ``X_Egress_*`` spelling that CGI/WSGI servers map to the same variable."""
    for name in [
        k for k in headers if k.lower().replace("_", "-").startswith(EGRESS_HEADER_PREFIX)
    ]:
        del headers[name]


def refusal_text(decision: Decision) -> str:
    target = decision.host if decision.port is None else f"{decision.host}:{decision.port}"
    # Method and path come from the client: escape them so no control character reaches a terminal.
    what = f"{render_host((decision.method or str(decision.kind)).upper())} {target}"
    if decision.path:
        what += f" {render_host(decision.path)}"
    lines = [
        "agent-egress refused this request.",
        "",
        f"  refused: {what}",
        f"  rule:    {decision.rule or '(no rule matched)'}",
        f"  reason:  {decision.reason}" + (f": {decision.detail}" if decision.detail else ""),
        f"  policy:  {decision.policy_version}   decision id: {decision.id}",
        "",
        "This sandbox's network is restricted by policy. Do not try to work around it (other proxies,",
        "direct connections, other ports, DNS tricks): those paths are blocked and every attempt is recorded.",
    ]
    if decision.reason in _POLICY_REASONS:
        port = decision.port or 443
        lines += [
            "If this access is needed, ask a human to review and add a rule to the allowlist, e.g.:",
            "",
            "  rules:",
            "    - name: <purpose>",
            f"      hosts: [{decision.host}]",
            f"      ports: [{port}]",
            "",
            "then reload the gate (`egress lint` checks the file first).",
        ]
    else:
        lines.append(
            "If you believe this is wrong, report the decision id above to a human operator."
        )
    return "\n".join(lines) + "\n"


def refusal_response(decision: Decision, status: int = 403) -> http.Response:
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "X-Egress-Decision": str(decision.decision),
        "X-Egress-Rule": decision.rule or "-",
        "X-Egress-Reason": str(decision.reason),
        "X-Egress-Decision-Id": decision.id,
        "Cache-Control": "no-store",
    }
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="agent-egress"'
    return http.Response.make(status, refusal_text(decision), headers)
