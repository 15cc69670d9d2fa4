"""``--recheck-on-reload``: after a policy reload, end the admitted tunnels the new policy refuses.

By default a tunnel admitted before a reload keeps running (a reload must not cut a download in two),
and requests inside *inspected* tunnels are decided one by one against the live policy anyway. With
recheck, each open tunnel's CONNECT is decided again, purely, against the policy that now applies to its
connection; one the new policy refuses (a ``report`` still passes, and an ``ask`` keeps the answer it
already had) is recorded as a decision - the new policy's reason, its detail saying the tunnel was
closed - and then closed through the closer its front end registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from proxy.core.connections import Connections
from proxy.core.decision import Decision, Kind, Request, Verdict
from proxy.core.engine import decide
from proxy.policy.model import Policy


def recheck(
    connections: Connections,
    policy_for: Callable[..., Policy],
    record: Callable[[Decision], Decision],
) -> list[Decision]:
    """Close every relayed tunnel the policy now refuses; returns the decisions recorded."""
    closed: list[Decision] = []
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
        decision = decide(request, policy_for(conn))
        if decision.allowed or decision.decision is Verdict.ASK:
            continue
        detail = f"tunnel closed after a policy reload: {decision.detail or decision.reason}"
        closed.append(record(decision.with_(detail=detail)))
        conn.closer = None
        with contextlib.suppress(OSError):  # already gone
            closer()
    return closed
