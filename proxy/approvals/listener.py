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
