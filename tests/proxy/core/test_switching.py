"""An upstream's protocol switch reaches the client only for a request allowed as a WebSocket
upgrade (finding 6: mitmproxy opens its relay on the response and Sec-WebSocket-Version alone)."""

from __future__ import annotations

import pytest

from proxy.core.switching import switch_problem


@pytest.mark.parametrize(
    ("allowed_websocket", "method", "status", "upgrade"),
    [
        (True, "GET", 101, "websocket"),
        (True, "GET", 101, " WebSocket "),
        (False, "GET", 200, None),
        (False, "GET", 100, None),
        (False, "POST", 103, None),
        (False, "GET", 204, "websocket"),  # not a switch, whatever it says
        (True, "GET", 426, "websocket"),
    ],
)
def test_what_is_passed_on(
    allowed_websocket: bool, method: str, status: int, upgrade: str | None
) -> None:
    assert switch_problem(allowed_websocket, method, status, upgrade) is None


@pytest.mark.parametrize(
    ("allowed_websocket", "method", "status", "upgrade", "detail"),
    [
        (False, "GET", 101, "websocket", "did not allow as a WebSocket upgrade"),
        (False, "GET", 101, None, "did not allow"),
        (False, "GET", 101, "h2c", "did not allow"),
        (True, "GET", 101, "h2c", "switched to 'h2c'"),
        (True, "GET", 101, None, "an unnamed protocol"),
        (True, "GET", 101, "websocket, h2c", "switched to"),
        (False, "CONNECT", 200, None, "CONNECT"),
        (False, "connect", 204, None, "CONNECT"),
    ],
)
def test_what_is_refused(
    allowed_websocket: bool, method: str, status: int, upgrade: str | None, detail: str
) -> None:
    problem = switch_problem(allowed_websocket, method, status, upgrade)
    assert problem is not None and detail in problem


def test_the_upstreams_protocol_name_is_escaped() -> None:
    problem = switch_problem(False, "GET", 101, "evil\x1b[2J\r\nX: y")
    assert problem is not None and problem.isprintable()
