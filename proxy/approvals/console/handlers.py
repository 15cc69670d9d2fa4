"""The approvals console: pages for people answering approvals in a browser, on the admin listener.

The same admin tokens log in (once, on a form: the browser keeps a session cookie, never the token),
and answers given here name the token's owner exactly as ``egress approve`` does. The console reuses
the admin API's handlers for answers and the event stream, with the session instead of a bearer token;
``/v1`` itself still takes bearer tokens only, so a cookie never authorises an API call.

Defences, since the pages show data a sandbox chose (hosts, paths, reasons):

- templates autoescape every value; the script builds the live parts with ``textContent`` only;
- a Content-Security-Policy that allows scripts and styles from this origin only, no inline script or
  style, no framing, no plugins, forms posting here only;
- the session cookie is ``HttpOnly`` and ``SameSite=Strict`` (``Secure``, and ``__Host-``, when people
  reach the listener over TLS);
- every state-changing request repeats its session's CSRF token (``X-CSRF-Token`` or a ``_csrf`` form
  field) and, when the browser says where it came from (``Origin``, ``Sec-Fetch-Site``), came from here;
  the login form carries its own nonce, so no other site can log a person in under another name.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tornado.escape
import tornado.web

from proxy.approvals.admin import ID, Answer, ApiHandler, Events, last_reload, rule_json
from proxy.approvals.console.sessions import Session, Sessions

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PREFIX = "/console"

COOKIE = "egress_session"
SECURE_COOKIE = (
    "__Host-egress_session"  # the prefix makes browsers insist on Secure, Path=/, no Domain
)
LOGIN_COOKIE = "egress_login"
LOGIN_TTL = 600  # seconds a login form stays usable
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "_csrf"

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
PAGES = (("pending", "Pending"), ("decisions", "Decisions"), ("sandboxes", "Sandboxes"),
         ("policy", "Policy"))  # fmt: skip


@dataclass
class ConsoleState:
    sessions: Sessions
    tls_url: bool = False  # people reach the listener over https (e.g. a TLS proxy in front of it)


def settings(state: ConsoleState) -> dict[str, Any]:
    """Application settings the console needs (its state, templates and static files)."""
    return {
        "console": state,
        "template_path": str(TEMPLATES),
        "static_path": str(STATIC),
        "static_url_prefix": f"{PREFIX}/static/",
        "static_handler_class": Static,
        "autoescape": "xhtml_escape",
    }


def routes(args: dict[str, Any]) -> list[tuple[str, type[tornado.web.RequestHandler], Any]]:
    """The console's URL rules; ``args`` are the admin API handlers' arguments."""
    return [
        (r"/", Home, args),
        (rf"{PREFIX}/?", Home, args),
        (rf"{PREFIX}/login", Login, args),
        (rf"{PREFIX}/logout", Logout, args),
        (rf"{PREFIX}/pending", PendingPage, args),
        (rf"{PREFIX}/decisions", DecisionsPage, args),
        (rf"{PREFIX}/sandboxes", SandboxesPage, args),
        (rf"{PREFIX}/policy", PolicyPage, args),
        (rf"{PREFIX}/events", ConsoleEvents, args),
        (rf"{PREFIX}/approvals/{ID}/(approve|deny)", ConsoleAnswer, args),
    ]


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ts: float | None) -> str:
    if not ts:
        return "never"
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


class Static(tornado.web.StaticFileHandler):
    def set_default_headers(self) -> None:
        for name, value in HEADERS.items():
            self.set_header(name, value)
        self.clear_header("Server")


class _Session(ApiHandler):
    """Authenticated by the console session; state-changing requests also need its CSRF token."""

    session: Session | None = None

    @property
    def state(self) -> ConsoleState:
        state = self.settings["console"]
        assert isinstance(state, ConsoleState)
        return state

    def set_default_headers(self) -> None:
        super().set_default_headers()
        for name, value in HEADERS.items():
            self.set_header(name, value)

    @property
    def secure(self) -> bool:
        return self.request.protocol == "https" or self.state.tls_url

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE if self.secure else COOKIE

    def session_id(self) -> str | None:
        return self.get_cookie(self.cookie_name)

    def authenticate(self) -> str | None:
        self.session = self.state.sessions.get(self.session_id())
        return self.session.who if self.session is not None else None

    def refuse(self) -> None:
        self.fail(401, "not logged in (or the session ended)")

    def prepare(self) -> None:
        super().prepare()
        if self._finished or self.request.method in ("GET", "HEAD"):
            return
        if not self.same_origin():
            self.fail(403, "cross-site request refused")
        elif not self.presented_csrf_ok():
            self.fail(403, "missing or wrong CSRF token")

    def presented_csrf_ok(self) -> bool:
        presented = self.request.headers.get(CSRF_HEADER) or self.get_body_argument(
            CSRF_FIELD, None
        )
        return self.session is not None and self.session.csrf_matches(presented)

    def same_origin(self) -> bool:
        """False when the browser says the request came from another site. ``Sec-Fetch-Site`` first:
        under ``Referrer-Policy: no-referrer`` a form post's ``Origin`` is ``null``. Of an origin only
        the host is compared: behind a TLS proxy the listener sees http, the browser https."""
        fetch_site = self.request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None:
            return fetch_site in ("same-origin", "none")
        origin = self.request.headers.get("Origin")
        if origin is None or origin == "null":
            return True  # nothing said: the CSRF token (or the login nonce) decides alone
        return urlsplit(origin).netloc == self.request.host

    def set_session_cookie(self, session_id: str) -> None:
        self.set_cookie(
            self.cookie_name, session_id, path="/", httponly=True, secure=self.secure,
            samesite="Strict",
        )  # fmt: skip


class _Page(_Session):
    """An HTML page: without a session, off to the login form."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")

    def refuse(self) -> None:
        self.redirect(f"{PREFIX}/login", status=303)

    def fail(self, status: int, message: str, **extra: Any) -> None:
        self.set_status(status)
        text = tornado.escape.xhtml_escape(message)
        self.finish(f"<!doctype html><title>{status}</title><p>{status}: {text}</p>")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.fail(status_code, self._reason or "error")

    def page(self, name: str, title: str, **namespace: Any) -> None:
        assert self.session is not None
        self.render(
            f"{name}.html", page=name, title=title, pages=PAGES, who=self.who,
            csrf=self.session.csrf, when=when, ago=ago, **namespace,
        )  # fmt: skip


class Home(_Page):
    def get(self) -> None:
        self.redirect(f"{PREFIX}/pending", status=303)


class PendingPage(_Page):
    def get(self) -> None:
        self.page("pending", "Pending approvals")


class DecisionsPage(_Page):
    def get(self) -> None:
        self.page("decisions", "Live decisions")


class SandboxesPage(_Page):
    def get(self) -> None:
        self.page("sandboxes", "Sandboxes", sandboxes=self.recent.sandboxes(), now=time.time())


class PolicyPage(_Page):
    def get(self) -> None:
        policy = self.policy() if self.policy is not None else None
        self.page(
            "policy",
            "Policy",
            policy=policy,
            rules=[rule_json(r) for r in policy.rules] if policy is not None else [],
            reload=last_reload(self.policy) if self.policy is not None else None,
        )


class Login(_Page):
    """Exchanges a token for a session. The form's nonce (also in a short-lived cookie) proves the
    form was served here, so another site cannot post its own token into a person's browser."""

    def prepare(self) -> None:
        self.session = None  # no session needed; POST is checked in post()

    def get(self) -> None:
        if self.state.sessions.get(self.session_id()) is not None:
            self.redirect(f"{PREFIX}/pending", status=303)
            return
        self.form()

    def form(self, error: str | None = None) -> None:
        nonce = secrets.token_urlsafe(24)
        self.set_cookie(
            LOGIN_COOKIE, nonce, path=f"{PREFIX}/login", httponly=True, secure=self.secure,
            samesite="Strict", max_age=LOGIN_TTL,
        )  # fmt: skip
        self.render("login.html", title="Log in", nonce=nonce, error=error, pages=(), who=None,
                    page="login", csrf=None)  # fmt: skip

    def post(self) -> None:
        """The nonces are compared as bytes: either may be any text the client sent, and comparing
        text that is not ASCII raises (an error page instead of the form saying why)."""
        expected = self.get_cookie(LOGIN_COOKIE)
        presented = self.get_body_argument("nonce", None)
        if (
            not self.same_origin()
            or not expected
            or not presented
            or not secrets.compare_digest(expected.encode(), presented.encode())
        ):
            self.set_status(403)
            self.form("This login form expired or came from elsewhere; try again.")
            return
        who = self.tokens.name_of(self.get_body_argument("token", "") or "")
        if who is None:
            log.warning("console login refused (wrong token) from %s", self.request.remote_ip)
            self.set_status(401)
            self.form("Wrong token.")
            return
        self.state.sessions.end(self.session_id())  # a login never reuses a session id
        session_id, _ = self.state.sessions.create(who)
        self.set_session_cookie(session_id)
        self.clear_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
        log.warning("console login: %s from %s", who, self.request.remote_ip)
        self.redirect(f"{PREFIX}/pending", status=303)


class Logout(_Page):
    def post(self) -> None:
        self.state.sessions.end(self.session_id())
        self.clear_cookie(self.cookie_name, path="/")
        self.redirect(f"{PREFIX}/login", status=303)


class ConsoleAnswer(_Session, Answer):
    """``POST /console/approvals/ID/approve|deny``: the admin API's answer, by the session's person."""


class ConsoleEvents(_Session, Events):
    """The admin API's event stream for the console; ends when the session does."""

    def ending(self) -> list[asyncio.Event]:
        assert self.session is not None
        return [*super().ending(), self.session.ended]

    def still_allowed(self) -> bool:
        return self.state.sessions.get(self.session_id()) is not None
