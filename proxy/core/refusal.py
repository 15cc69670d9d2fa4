"""The text an agent reads when the gate refuses it: what, why, and how a human grants access.

Agents read response bodies. The body therefore says what was refused and why, that the restriction is
deliberate and must not be worked around, and how a human grants access, so the agent stops retrying
tricks and asks instead. Everything that came from the client is escaped.
"""

from __future__ import annotations

from proxy.core.decision import Decision, Reason
from proxy.core.engine import REPORTABLE_REASONS
from proxy.core.text import escape


def refusal_text(decision: Decision) -> str:
    target = decision.host if decision.port is None else f"{decision.host}:{decision.port}"
    # Method and path come from the client: escape them so no control character reaches a terminal.
    what = f"{escape((decision.method or str(decision.kind)).upper())} {target}"
    if decision.path:
        what += f" {escape(decision.path)}"
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
    if decision.reason in REPORTABLE_REASONS and decision.reason is not Reason.REQUEST_NOT_ALLOWED:
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
    elif decision.reason is Reason.REQUEST_NOT_ALLOWED:
        method = escape((decision.method or "GET").upper())
        lines += [
            "This host is reachable, but only for the requests its rules list (for example, read",
            "access without push or publish). If this request is needed, ask a human to review and",
            "add a request rule, e.g.:",
            "",
            "  rules:",
            "    - name: <purpose>",
            f"      hosts: [{decision.host}]",
            f"      methods: [{method}]",
            f'      paths: ["{escape(decision.path or "/")}"]',
            "",
            "then reload the gate (`egress lint` checks the file first).",
        ]
    else:
        lines.append(
            "If you believe this is wrong, report the decision id above to a human operator."
        )
    return "\n".join(lines) + "\n"


__all__ = ["refusal_text"]
