"""Whether an upstream's protocol switch may reach the client (threat 16).

After a ``101 Switching Protocols`` (or a 2xx to a CONNECT) the connection carries another protocol,
whose messages no request rule reads: what the client sends next goes to the upstream unjudged.
mitmproxy opens a WebSocket relay on the response's ``Upgrade: websocket`` and the request's
``Sec-WebSocket-Version`` alone, whatever the gate judged the request to be. So a switch is passed
on only to a request the gate allowed as a WebSocket upgrade (:attr:`HttpHead.websocket`), and
only to WebSocket; any other is refused and the connection closed before the switch. An upstream
that switches unasked is either broken or hostile (RFC 9110 15.2.2: a server switches only to a
protocol the client's ``Upgrade`` named). Pure: plain values in, an optional detail out.
"""

from __future__ import annotations

from proxy.core.text import escape


def switch_problem(
    allowed_websocket: bool, method: str, status: int, upgrade: str | None
) -> str | None:
    """Why the response (``status``, its ``Upgrade`` field) to a request (``method``; whether it
    was allowed as a WebSocket upgrade) must not be passed on, or None: not a switch, or the
    switch that was judged."""
    if status != 101:
        if 200 <= status < 300 and method.upper() == "CONNECT":
            return "the upstream answered a CONNECT inside the connection: a tunnel nobody judged"
        return None
    named = (upgrade or "").strip()
    if not allowed_websocket:
        return (
            f"the upstream switched protocols ({escape(named or 'no Upgrade')}) for a request the "
            "gate did not allow as a WebSocket upgrade; what followed would not be judged"
        )
    if named.lower() != "websocket":
        return (
            f"the upstream switched to {escape(named or 'an unnamed protocol')!r} where a "
            "WebSocket upgrade was allowed"
        )
    return None


__all__ = ["switch_problem"]
