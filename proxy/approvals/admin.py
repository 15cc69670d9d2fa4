"""The admin API: JSON over HTTP for people and tools answering approvals, and an event stream.

Served on the admin listener (:mod:`.listener`: loopback or a management address; the gate registers it
as one of its own endpoints, so no policy can route a sandbox to it), next to the approvals console.
Every request needs ``Authorization: Bearer TOKEN``
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
from collections.abc import AsyncIterator, Callable
from typing import Any

import tornado.iostream
import tornado.web

from proxy.approvals.broker import Broker, Unavailable
from proxy.approvals.model import NotOpen, Scope
from proxy.approvals.reviewer import RecentDecisions
from proxy.approvals.tokens import AdminTokens
from proxy.core.decision import Decision
from proxy.evidence.record import POLICY_RELOAD_EVENT
from proxy.policy.model import Policy, Rule
from proxy.policy.reload import Reload

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

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        """Policy reloads join the stream (as ``policy`` events); other events stay out of it."""
        if name != POLICY_RELOAD_EVENT or not self._queues or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._publish, {"event": name, **attributes})

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


class ApiHandler(tornado.web.RequestHandler):
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
        who = self.authenticate()
        if who is None:
            self.refuse()
            return
        self.who = who

    def authenticate(self) -> str | None:
        """Who sent this request: the owner of its bearer token (the console uses its session)."""
        return self.tokens.authenticate(self.request.headers.get("Authorization"))

    def refuse(self) -> None:
        self.set_header("WWW-Authenticate", 'Bearer realm="agent-egress"')
        self.fail(401, "missing or wrong bearer token")

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


class WhoAmI(ApiHandler):
    def get(self) -> None:
        self.reply({"name": self.who})


class Approvals(ApiHandler):
    async def get(self) -> None:
        pending = await self.broker.pending()
        self.reply({"approvals": [a.to_json() for a in pending]})


class Sandboxes(ApiHandler):
    def get(self) -> None:
        self.reply({"sandboxes": self.recent.sandboxes()})


class PolicyView(ApiHandler):
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
                "rules": [rule_json(r) for r in policy.rules],
                "reload": last_reload(self.policy),
            }
        )


def last_reload(policy: Callable[[], Policy]) -> dict[str, Any] | None:
    """The last reload of a reloadable policy (``egress serve``'s), or None."""
    reload = getattr(policy, "last_reload", None)
    return reload.to_json() if isinstance(reload, Reload) else None


def rule_json(rule: Rule) -> dict[str, Any]:
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
    if rule.request is not None:
        if rule.request.methods is not None:
            out["methods"] = sorted(rule.request.methods)
        if rule.request.paths is not None:
            out["paths"] = [str(p) for p in rule.request.paths]
    if rule.action == "ask":
        out.update(timeout=rule.timeout, review=str(rule.review))
    return out


class OneApproval(ApiHandler):
    async def get(self, approval_id: str) -> None:
        approval = await self.broker.get(approval_id)
        if approval is None:
            self.fail(404, f"no approval {approval_id}")
            return
        self.reply({"approval": approval.to_json()})


class Answer(ApiHandler):
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


class Events(ApiHandler):
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
            if not self.still_allowed():
                return
            getters: dict[asyncio.Future[Any], str] = {
                asyncio.ensure_future(changes.get()): "approval",
            }
            for event in self.ending():
                getters[asyncio.ensure_future(event.wait())] = "stop"
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
                elif item.get("event") == POLICY_RELOAD_EVENT:
                    seq = await self._send(seq, "policy", item)
                else:
                    seq = await self._send(seq, "decision", item)

    def ending(self) -> list[asyncio.Event]:
        """Events that end the stream at once: the gate stopping (and, for the console, a logout)."""
        return [self.stopping]

    def still_allowed(self) -> bool:
        """Checked at every wake-up (an event or the keepalive): no stream outlives its credential."""
        return True

    async def _send(self, seq: int, event: str, body: dict[str, Any]) -> int:
        seq += 1
        self.write(f"id: {seq}\nevent: {event}\ndata: {json.dumps(body)}\n\n")
        await self.flush()
        return seq


class NotFound(ApiHandler):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.fail(404, "no such endpoint")
