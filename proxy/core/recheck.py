"""``--recheck-on-reload``: after a policy reload, end the admitted tunnels the new policy refuses.

By default a tunnel admitted before a reload keeps running (a reload must not cut a download in two),
and requests inside *inspected* tunnels are decided one by one against the live policy anyway. With
recheck, each open tunnel's CONNECT is decided again, purely, against the policy that now applies to its
connection, with step 3a (:mod:`proxy.core.executables`): a rule now bound to executables keeps
only a tunnel whose process was named and runs one of them (a gate that cannot see processes closes
them all, as it refuses every new one), and its pinned address is screened against the internal
ranges the policy now opens, as a new CONNECT's would be. One the new policy refuses (a ``report``
still passes, and an ``ask`` keeps the answer it already had: a tunnel a person approved stays, one
no one was asked about is closed, since a recheck asks no one) is recorded as a decision - the new
policy's reason, its detail saying the tunnel was closed - and then closed through the closer its
front end registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from proxy.core.connections import Connections
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.destination import still_open
from proxy.core.engine import decide
from proxy.core.executables import BoundRules, bindings, check_bindings
from proxy.policy.model import Policy


def recheck(
    connections: Connections,
    policy_for: Callable[..., Policy],
    record: Callable[[Decision], Decision],
) -> list[Decision]:
    """Close every relayed tunnel the policy now refuses; returns the decisions recorded."""
    closed: list[Decision] = []
    tables = BoundRules()
    for conn in connections.live():
        tunnel, closer = conn.tunnel, conn.closer
        if tunnel is None or closer is None or tunnel.port is None:
            continue
        request = Request(
            Kind.CONNECT,
            tunnel.host,
            tunnel.port,
            "CONNECT",
            client=conn.peer,
            sandbox_id=conn.sandbox_id,
        )
        policy = policy_for(conn)
        decision = decide(request, policy)
        if decision.allowed or decision.decision is Verdict.ASK:  # (4) where it is pinned
            decision = still_open(decision, tunnel.address, tunnel.port, policy.allow_internal)
        held = bindings(tables, policy, request, decision)
        decision = check_bindings(decision, held, conn.bound_owners())
        if decision.decision is Verdict.ASK:
            if tunnel.reason is Reason.APPROVAL_GRANTED:
                continue
            decision = decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_UNAVAILABLE,
                detail=f"{decision.detail}; this tunnel was never approved, and a recheck asks "
                "no one (a new connection asks)",
            )
        if decision.allowed:
            continue
        detail = f"tunnel closed after a policy reload: {decision.detail or decision.reason}"
        closed.append(record(decision.with_(detail=detail)))
        conn.closer = None
        with contextlib.suppress(OSError):  # already gone
            closer()
    return closed
