"""Tell a chat or ops tool about approvals: a signed JSON POST per new approval and per outcome.

The gate process sends these itself (they never pass through its own policy, and sandboxes gain no
route to the target from them). Each POST carries

    X-Egress-Event: approval.pending | approval.decided
    X-Egress-Timestamp: UNIX-SECONDS
    X-Egress-Signature: v1=HEX(HMAC-SHA256(secret, TIMESTAMP + "." + BODY))

so a receiver can check origin and freshness, and ``links`` to answer through the admin API (with the
receiver's own bearer token, so the answer names it). Delivery is retried with exponential backoff and
then dropped; a webhook that fails only means fewer people hear of the approval: it never grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import tornado.httpclient

from proxy.approvals.model import Approval
from proxy.approvals.private import NotPrivate, read_private

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Egress-Signature"
TIMESTAMP_HEADER = "X-Egress-Timestamp"
EVENT_HEADER = "X-Egress-Event"
ATTEMPTS = 4
BACKOFF = 0.5  # seconds before the first retry; doubled each time
REQUEST_TIMEOUT = 5.0
MAX_QUEUED = 1000
MAX_CONCURRENT = 4


class WebhookError(ValueError):
    pass


def load_secret(path: str) -> bytes:
    """The shared secret, from a file only the gate's user can read."""
    try:
        secret = read_private(path, "webhook secret").strip()
    except NotPrivate as exc:
        raise WebhookError(str(exc)) from None
    if len(secret) < 16:
        raise WebhookError(f"{path}: the webhook secret must be at least 16 bytes")
    return secret


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


class Webhook:
    """A :class:`proxy.approvals.broker.Notifier` that POSTs to ``url``."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        admin_url: str | None,
        *,
        attempts: int = ATTEMPTS,
        backoff: float = BACKOFF,
    ) -> None:
        self.url = url
        self.secret = secret
        self.admin_url = admin_url.rstrip("/") if admin_url else None
        self.attempts = attempts
        self.backoff = backoff
        self.delivered = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def opened(self, approval: Approval) -> None:
        self._queue("approval.pending", approval)

    def closed(self, approval: Approval) -> None:
        self._queue("approval.decided", approval)

    def payload(self, event: str, approval: Approval) -> dict[str, Any]:
        body: dict[str, Any] = {"type": event, "sent": time.time(), "approval": approval.to_json()}
        if self.admin_url is not None:
            base = f"{self.admin_url}/v1/approvals/{approval.id}"
            body["links"] = {"approval": base, "approve": f"{base}/approve", "deny": f"{base}/deny"}
            body["answer"] = {
                "method": "POST",
                "authorization": "Bearer <your admin token>",
                "approve_body": {"scope": "once | session | persist", "reason": "..."},
                "deny_body": {"reason": "..."},
            }
        return body

    def _queue(self, event: str, approval: Approval) -> None:
        if len(self._tasks) >= MAX_QUEUED:
            self.failed += 1
            log.error("webhook backlog full: %s for approval %s dropped", event, approval.id)
            return
        task = asyncio.get_running_loop().create_task(self._deliver(event, approval))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: str, approval: Approval) -> None:
        body = json.dumps(self.payload(event, approval)).encode("utf-8")
        client = tornado.httpclient.AsyncHTTPClient()
        async with self._slots:
            for attempt in range(self.attempts):
                if attempt:
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                timestamp = str(int(time.time()))
                request = tornado.httpclient.HTTPRequest(
                    self.url,
                    method="POST",
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        EVENT_HEADER: event,
                        TIMESTAMP_HEADER: timestamp,
                        SIGNATURE_HEADER: signature(self.secret, timestamp, body),
                    },
                    request_timeout=REQUEST_TIMEOUT,
                    follow_redirects=False,
                )
                try:
                    response = await client.fetch(request, raise_error=False)
                except Exception as exc:  # connection refused, DNS, TLS: retry
                    problem = str(exc)
                else:
                    if 200 <= response.code < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {response.code}"
                log.warning(
                    "webhook %s for approval %s: attempt %d/%d failed (%s)",
                    event,
                    approval.id,
                    attempt + 1,
                    self.attempts,
                    problem,
                )
        self.failed += 1
        log.error("webhook %s for approval %s not delivered", event, approval.id)
