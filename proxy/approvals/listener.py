"""The admin listener: the admin API (:mod:`.admin`) and the approvals console (:mod:`.console`) on
one tornado application, on the running event loop.

It binds loopback or a management address; the gate registers the bound address as one of its own
endpoints, so no policy routes a sandbox to any page or endpoint here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import tornado.httpserver
import tornado.netutil
import tornado.web

from proxy.approvals import console
from proxy.approvals.admin import (
    ID,
    MAX_BODY,
    Answer,
    Approvals,
    DecisionFeed,
    Events,
    NotFound,
    OneApproval,
    PolicyView,
    Sandboxes,
    WhoAmI,
)
from proxy.approvals.broker import Broker
from proxy.approvals.reviewer import RecentDecisions
from proxy.approvals.tokens import AdminTokens
from proxy.policy.model import Policy


class AdminServer:
    """The admin listener. ``tls_url``: people reach it over https (a TLS proxy in front of it), so
    the console's cookies are marked Secure."""

    def __init__(
        self,
        broker: Broker,
        tokens: AdminTokens,
        decisions: DecisionFeed | None = None,
        *,
        recent: RecentDecisions | None = None,
        policy: Callable[[], Policy] | None = None,
        tls_url: bool = False,
    ) -> None:
        self.decisions = decisions or DecisionFeed()
        self.stopping = asyncio.Event()
        self.console = console.ConsoleState(console.Sessions(), tls_url=tls_url)
        args = {
            "broker": broker,
            "tokens": tokens,
            "decisions": self.decisions,
            "stopping": self.stopping,
            "recent": recent or RecentDecisions(),
            "policy": policy,
        }
        self.app = tornado.web.Application(
            [
                (r"/v1/whoami", WhoAmI, args),
                (r"/v1/approvals", Approvals, args),
                (rf"/v1/approvals/{ID}", OneApproval, args),
                (rf"/v1/approvals/{ID}/(approve|deny)", Answer, args),
                (r"/v1/events", Events, args),
                (r"/v1/sandboxes", Sandboxes, args),
                (r"/v1/policy", PolicyView, args),
                (r"/healthz", Health, {"policy": policy}),
                *console.routes(args),
            ],
            default_handler_class=NotFound,
            default_handler_args=args,
            **console.settings(self.console),
        )
        self._server: tornado.httpserver.HTTPServer | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        sockets = tornado.netutil.bind_sockets(
            port, host, family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
        server = tornado.httpserver.HTTPServer(
            self.app, max_body_size=MAX_BODY, max_header_size=MAX_BODY, idle_connection_timeout=60
        )
        server.add_sockets(sockets)
        self._server = server
        bound = sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    async def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.close_all_connections(), 5)
            self._server = None


class Health(tornado.web.RequestHandler):
    """``/healthz`` without a token (probes carry none): ``ok``, or ``stale`` with the version in
    force when the last policy reload was refused; ``?strict`` answers 503 while stale. It says
    nothing a sandbox could use: the listener is one of the gate's own endpoints, never routed."""

    def initialize(self, policy: Callable[[], Policy] | None) -> None:
        self.policy = policy

    def get(self) -> None:
        stale = bool(getattr(self.policy, "stale", False))
        body: dict[str, object] = {"status": "stale" if stale else "ok"}
        if self.policy is not None:
            body["policy_version"] = self.policy().version
            last = getattr(self.policy, "last_reload", None)
            if stale and last is not None:
                body["problems"] = list(last.problems)
        if stale and "strict" in self.request.arguments:
            self.set_status(503)
        self.set_header("Cache-Control", "no-store")
        self.write(body)
