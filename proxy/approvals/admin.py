"""The admin API: JSON over HTTP for people and tools answering approvals, and an event stream.

Served on its own listener (loopback or a management address; the gate registers it as one of its own
endpoints, so no policy can route a sandbox to it). Every request needs ``Authorization: Bearer TOKEN``
(:mod:`.tokens`); answers name the token's owner.

    GET  /v1/whoami                          {"name": ...}
    GET  /v1/approvals                       {"approvals": [approval, ...]}   (open ones, oldest first)
    GET  /v1/approvals/ID                    {"approval": approval}           (any state)
    POST /v1/approvals/ID/approve            {"scope": "once|session|persist", "reason": "..."}
    POST /v1/approvals/ID/deny               {"reason": "..."}
    GET  /v1/events[?decisions=1]            text/event-stream
    GET  /v1/sandboxes                       {"sandboxes": [{"sandbox_id", "allowed", "refused",
                                              "asked", "last"}, ...]}  (this replica's, latest first)
    GET  /v1/policy                          {"version", "mode", "files", "rules": [...]}

Answers: 200 ``{"approval": ...}``; 400 bad input; 401 missing or wrong token; 404 no such approval;
409 not open any more (``{"error", "approval"}``: someone answered first, or it expired); 422 the scope
cannot be granted (e.g. no approved-rules file). Errors are ``{"error": "..."}``.

The stream starts with ``event: snapshot`` (``{"approvals": [...]}``, the open ones), then sends
``event: approval`` (``{"change": "pending|decided|advice", "approval": ...}``) for every change on any
replica, ``event: decision`` (a decision record, this replica's) with ``?decisions=1``, and a comment
every :data:`KEEPALIVE` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from proxy.approvals.broker import Broker, Unavailable
from proxy.approvals.model import NotOpen, Scope
from proxy.approvals.reviewer import RecentDecisions
from proxy.approvals.tokens import AdminTokens
from proxy.core.decision import Decision
from proxy.policy.model import Policy, Rule

log = logging.getLogger(__name__)

KEEPALIVE = 15.0
MAX_BODY = 16 * 1024
ID = r"([0-9a-f]{16})"
DECISION_QUEUE = 1000


class DecisionFeed:
    """A decision sink that hands this replica's decisions to event-stream subscribers (never blocks:
    a subscriber that falls behind loses its oldest)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def record(self, decision: Decision) -> None:
        if not self._queues or self._loop is None:
            return
        record = decision.to_dict()
        self._loop.call_soon_threadsafe(self._publish, record)

    def _publish(self, record: dict[str, Any]) -> None:
        for queue in list(self._queues):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(record)

    def close(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(DECISION_QUEUE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


class _Base(tornado.web.RequestHandler):
    broker: Broker
    tokens: AdminTokens
    who: str

    def initialize(
        self,
        broker: Broker,
        tokens: AdminTokens,
        decisions: DecisionFeed,
        stopping: asyncio.Event,
        recent: RecentDecisions,
        policy: Callable[[], Policy] | None,
    ) -> None:
        self.broker = broker
        self.tokens = tokens
        self.decisions = decisions
        self.stopping = stopping
        self.recent = recent
        self.policy = policy

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.clear_header("Server")

    def prepare(self) -> None:
        who = self.tokens.authenticate(self.request.headers.get("Authorization"))
        if who is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="agent-egress"')
            self.fail(401, "missing or wrong bearer token")
            return
        self.who = who

    def fail(self, status: int, message: str, **extra: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps({"error": message, **extra}))

    def reply(self, body: dict[str, Any]) -> None:
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(json.dumps({"error": self._reason or "error"}))

    def body_json(self) -> dict[str, Any] | None:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None


class WhoAmI(_Base):
    def get(self) -> None:
        self.reply({"name": self.who})


class Approvals(_Base):
    async def get(self) -> None:
        pending = await self.broker.pending()
        self.reply({"approvals": [a.to_json() for a in pending]})


class Sandboxes(_Base):
    def get(self) -> None:
        self.reply({"sandboxes": self.recent.sandboxes()})


class PolicyView(_Base):
    def get(self) -> None:
        if self.policy is None:
            self.fail(404, "this gate does not share its policy here")
            return
        policy = self.policy()
        self.reply(
            {
                "version": policy.version,
                "mode": str(policy.mode),
                "files": [str(f) for f in policy.files],
                "rules": [_rule(r) for r in policy.rules],
            }
        )


def _rule(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": rule.name,
        "action": str(rule.action),
        "hosts": [str(h) for h in rule.hosts],
        "cidrs": [str(c) for c in rule.cidrs],
        "ports": sorted(rule.ports) if rule.ports is not None else None,
        "file": rule.file,
        "line": rule.line,
        "description": rule.description,
    }
    if rule.action == "ask":
        out.update(timeout=rule.timeout, review=str(rule.review))
    return out


class OneApproval(_Base):
    async def get(self, approval_id: str) -> None:
        approval = await self.broker.get(approval_id)
        if approval is None:
            self.fail(404, f"no approval {approval_id}")
            return
        self.reply({"approval": approval.to_json()})


class Answer(_Base):
    async def post(self, approval_id: str, verb: str) -> None:
        body = self.body_json()
        if body is None:
            self.fail(400, "the body must be a JSON object")
            return
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            self.fail(400, "'reason' must be a string")
            return
        try:
            if verb == "approve":
                try:
                    scope = Scope(body.get("scope", Scope.ONCE))
                except ValueError:
                    self.fail(400, "'scope' must be once, session or persist")
                    return
                approval = await self.broker.approve(approval_id, scope, self.who, reason)
            else:
                approval = await self.broker.deny(approval_id, self.who, reason)
        except NotOpen as exc:
            if exc.approval is None:
                self.fail(404, f"no approval {approval_id}")
            else:
                self.fail(409, str(exc), approval=exc.approval.to_json())
            return
        except Unavailable as exc:
            self.fail(422, str(exc))
            return
        log.warning(
            "approval %s %s by %s%s",
            approval.id,
            f"approved ({approval.scope})" if verb == "approve" else "denied",
            self.who,
            f": {approval.reason}" if approval.reason else "",
        )
        self.reply({"approval": approval.to_json()})


class Events(_Base):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        with_decisions = self.get_query_argument("decisions", "0") in ("1", "true", "yes")
        async with contextlib.AsyncExitStack() as stack:
            changes = await stack.enter_async_context(self.broker.store.feed.subscribe())
            decisions = (
                await stack.enter_async_context(self.decisions.subscribe())
                if with_decisions
                else None
            )
            pending = await self.broker.pending()
            seq = 0
            try:
                seq = await self._send(
                    seq, "snapshot", {"approvals": [a.to_json() for a in pending]}
                )
                await self._pump(seq, changes, decisions)
            except tornado.iostream.StreamClosedError:
                return

    async def _pump(
        self,
        seq: int,
        changes: asyncio.Queue[Any],
        decisions: asyncio.Queue[dict[str, Any]] | None,
    ) -> None:
        while True:
            getters: dict[asyncio.Future[Any], str] = {
                asyncio.ensure_future(changes.get()): "approval",
                asyncio.ensure_future(self.stopping.wait()): "stop",
            }
            if decisions is not None:
                getters[asyncio.ensure_future(decisions.get())] = "decision"
            done, waiting = await asyncio.wait(
                getters, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
            )
            for task in waiting:
                task.cancel()
            if not done:
                self.write(": keepalive\n\n")
                await self.flush()
                continue
            for task in done:
                item = task.result()
                if getters[task] == "stop":
                    return
                if getters[task] == "approval":
                    body = {"change": str(item.type), "approval": item.approval.to_json()}
                    seq = await self._send(seq, "approval", body)
                else:
                    seq = await self._send(seq, "decision", item)

    async def _send(self, seq: int, event: str, body: dict[str, Any]) -> int:
        seq += 1
        self.write(f"id: {seq}\nevent: {event}\ndata: {json.dumps(body)}\n\n")
        await self.flush()
        return seq


class AdminServer:
    """The admin listener on the running event loop."""

    def __init__(
        self,
        broker: Broker,
        tokens: AdminTokens,
        decisions: DecisionFeed | None = None,
        *,
        recent: RecentDecisions | None = None,
        policy: Callable[[], Policy] | None = None,
    ) -> None:
        self.decisions = decisions or DecisionFeed()
        self.stopping = asyncio.Event()
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
            ],
            default_handler_class=_NotFound,
            default_handler_args=args,
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


class _NotFound(_Base):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.fail(404, "no such endpoint")
