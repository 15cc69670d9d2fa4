"""Approvals as one service with one lifecycle: store, broker, admin listener, webhook and reviewer,
built from a typed config (``egress serve`` flags, or ``egress run``'s private gate).

Start-up fails closed: a token file others can read, a store that cannot be opened or an admin address
that cannot be bound stops the gate before it serves anything (:class:`ApprovalsError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.approvals.admin import DecisionFeed
from proxy.approvals.broker import DEFAULT_SESSION_TTL, ApprovalMetrics, Broker, Notifier
from proxy.approvals.listener import AdminServer
from proxy.approvals.overlay import Overlay
from proxy.approvals.reviewer import CommandReviewer, RecentDecisions
from proxy.approvals.store import Limits, Store, shown_state
from proxy.approvals.tokens import AdminTokens, TokenError
from proxy.core.authority import join_authority
from proxy.evidence.emit import Sink
from proxy.policy.model import Action, Policy

log = logging.getLogger(__name__)


class ApprovalsError(Exception):
    """Approvals cannot start as configured; the message says which setting and why."""


@dataclass
class ApprovalsConfig:
    state: str = "sqlite"  # sqlite[:PATH], memory, redis://..., rediss://...
    state_dir: Path | None = None  # where sqlite keeps its file by default
    approved_file: Path | None = None  # the overlay of persisted grants; None: no persist
    admin_listen: tuple[str, int] | None = None
    admin_tokens: AdminTokens | None = None
    admin_url: str | None = None  # how people and chat tools reach the admin API (webhook links)
    webhook_url: str | None = None
    webhook_secret: bytes | None = None
    reviewer: Sequence[str] | None = None  # argv of the reviewer command
    reviewer_timeout: float = 10.0
    limits: Limits = field(default_factory=Limits)
    session_ttl: float = DEFAULT_SESSION_TTL


def load_tokens(path: str) -> AdminTokens:
    try:
        return AdminTokens.load(Path(path))
    except TokenError as exc:
        raise ApprovalsError(str(exc)) from None


def open_store(spec: str, state_dir: Path | None) -> Store:
    """The store a ``--state`` value names."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from proxy.approvals.redisstore import RedisStore

        return RedisStore(spec)
    from proxy.approvals.sqlitestore import SqliteStore

    if spec == "memory":
        return SqliteStore(":memory:")
    if spec == "sqlite":
        if state_dir is None:
            raise ApprovalsError("--state sqlite needs a state directory (--state-dir)")
        return SqliteStore(state_dir / "approvals.sqlite3")
    if spec.startswith("sqlite:"):
        return SqliteStore(spec.removeprefix("sqlite:"))
    raise ApprovalsError(
        f"--state {shown_state(spec)!r}: expected sqlite, sqlite:PATH, memory or "
        "redis://HOST:PORT/DB"
    )


class Approvals:
    """The running approvals of one gate."""

    def __init__(
        self,
        config: ApprovalsConfig,
        *,
        notifiers: Sequence[Notifier] = (),
        metrics: ApprovalMetrics | None = None,
    ) -> None:
        self.config = config
        store = open_store(config.state, config.state_dir)
        notify = list(notifiers)
        self.webhook = None
        if config.webhook_url is not None:
            from proxy.approvals.webhook import Webhook

            if config.webhook_secret is None:
                raise ApprovalsError("--approval-webhook needs --approval-webhook-secret FILE")
            self.webhook = Webhook(config.webhook_url, config.webhook_secret, None)
            notify.append(self.webhook)
        self.recent = RecentDecisions()
        reviewer = None
        if config.reviewer:
            reviewer = CommandReviewer(
                config.reviewer, timeout=config.reviewer_timeout, recent=self.recent
            )
        self.reviewer = reviewer
        self.overlay = Overlay(config.approved_file) if config.approved_file else None
        self.broker = Broker(
            store,
            overlay=self.overlay,
            reviewer=reviewer,
            notifiers=notify,
            limits=config.limits,
            session_ttl=config.session_ttl,
            metrics=metrics,
        )
        self.decisions = DecisionFeed()
        self.notices_json = False
        self.admin: AdminServer | None = None
        self.admin_address: tuple[str, int] | None = None

    def sinks(self) -> list[Sink]:
        """Decision sinks: the event stream's decisions, and each sandbox's recent ones (reviewer)."""
        return [self.decisions, self.recent]

    def admin_base(self) -> str | None:
        if self.config.admin_url:
            return self.config.admin_url.rstrip("/")
        if self.admin_address is None:
            return None
        return f"http://{join_authority(*self.admin_address)}"

    def describe(self) -> dict[str, str]:
        """For the gate's ready line."""
        info = {"approvals": shown_state(self.config.state)}
        if self.admin_address is not None:
            info["admin"] = self.admin_base() or "-"
        if self.overlay is not None:
            info["approved"] = str(self.overlay.path)
        return info

    def warnings(self, policies: Sequence[Policy]) -> list[str]:
        asks = any(r.action is Action.ASK for p in policies for r in p.rules)
        if asks and self.admin is None and self.reviewer is None and self.webhook is None:
            return [
                "the policy has ask rules but nobody can answer them (no --admin, --reviewer or "
                "--approval-webhook): they will time out"
            ]
        return []

    async def start(self, policy: Callable[[], Policy] | None = None) -> None:
        """Open the store and bind the admin listener; ``policy`` is what ``/v1/policy`` shows."""
        try:
            await self.broker.start()
        except Exception as exc:
            raise ApprovalsError(
                f"the approval store ({shown_state(self.config.state)}) failed: {exc}"
            ) from exc
        if self.config.admin_listen is not None:
            if self.config.admin_tokens is None:
                await self.close()
                raise ApprovalsError("--admin needs --admin-tokens FILE")
            self.admin = AdminServer(
                self.broker,
                self.config.admin_tokens,
                self.decisions,
                recent=self.recent,
                policy=policy,
                tls_url=(self.config.admin_url or "").startswith("https://"),
            )
            try:
                self.admin_address = await self.admin.start(*self.config.admin_listen)
            except OSError as exc:
                await self.close()
                host, port = self.config.admin_listen
                raise ApprovalsError(f"--admin {host}:{port}: {exc.strerror or exc}") from exc
        if self.webhook is not None:
            self.webhook.admin_url = self.admin_base()
        if self.overlay is not None:
            self.overlay.policy()  # say at start-up if the file is broken

    def ending_sessions(self, attach: Any) -> Any:
        """Wrap a hand-off ``attach`` so that a sandbox's session grants end when it detaches (the
        sandbox is gone; a new one with the same id asks again)."""

        async def attach_sandbox(sandbox_id: str, sockets: Any, request: Any = None) -> Any:
            detach = await attach(sandbox_id, sockets, request)

            async def detach_sandbox() -> Any:
                try:
                    return await detach()
                finally:
                    try:
                        await self.broker.store.end_session(sandbox_id)
                    except Exception:
                        log.exception("could not end the session grants of %s", sandbox_id)

            return detach_sandbox

        return attach_sandbox

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.webhook is not None:
            await self.webhook.close()
        await self.broker.close()


def private_approvals(
    state_dir: Path,
    sandbox_id: str,
    *,
    as_json: bool = False,
    metrics: ApprovalMetrics | None = None,
) -> tuple[Approvals, Path]:
    """Approvals for a gate serving one sandbox (``egress run``): state in memory (it ends with the
    sandbox, and so do its session grants), persisted grants in the state directory's approved.yaml,
    and an admin listener on host loopback (not in the sandbox's network namespace) with a token
    made for this run, in a 0600 file named for the person running it. Returns the approvals and
    that token file; :class:`TerminalNotices` tell the terminal how to answer."""
    import getpass
    import os
    import secrets

    from proxy.approvals.tokens import NAME, Admin, digest

    token = secrets.token_urlsafe(32)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "local"
    name = user if NAME.fullmatch(user) else "local"
    token_file = state_dir / f"admin-token-{sandbox_id}"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    config = ApprovalsConfig(
        state="memory",
        approved_file=state_dir / "approved.yaml",
        admin_listen=("127.0.0.1", 0),
        admin_tokens=AdminTokens([Admin(name, digest(token))]),
    )
    approvals = Approvals(config, metrics=metrics)
    approvals.notices_json = as_json
    return approvals, token_file
