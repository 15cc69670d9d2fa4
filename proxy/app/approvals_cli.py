"""``egress approvals``, ``approve``, ``deny`` and ``admin-token``, and the approval options of
``egress serve``.

The answering commands talk to a gate's admin API (``--admin URL`` or ``$EGRESS_ADMIN_URL``) with the
caller's own bearer token (``--token-file`` / ``$EGRESS_ADMIN_TOKEN_FILE``, or ``$EGRESS_ADMIN_TOKEN``),
never through a proxy. Only argparse is imported here; the rest when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from proxy.app.arguments import finite
from proxy.app.exits import EXIT_DENY, EXIT_OK, fail

DEFAULT_ADMIN_URL = "http://127.0.0.1:3129"


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "approvals", "who answers 'action: ask' rules, and where pending approvals live"
    )
    group.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=None,
        help="serve the admin API (approvals, event stream) here; keep it on loopback or a "
        "management address (default: off)",
    )
    group.add_argument(
        "--admin-tokens",
        metavar="FILE",
        default=None,
        help="bearer tokens of the people and tools who may answer, mode 0600 "
        "(see `egress admin-token`)",
    )
    group.add_argument(
        "--admin-url",
        metavar="URL",
        default=None,
        help="how people and chat tools reach the admin API, for the links sent with webhooks; "
        "https:// (a TLS proxy in front) marks the console's cookies Secure "
        "(default: http://HOST:PORT of --admin)",
    )
    group.add_argument(
        "--state",
        metavar="STORE",
        default="sqlite",
        help="pending approvals and session grants: sqlite (a file in the state directory), "
        "sqlite:PATH, memory, or redis://HOST:PORT/DB shared by every replica "
        "(default %(default)s)",
    )
    group.add_argument(
        "--approved-file",
        metavar="FILE",
        default=None,
        help="the policy overlay that persisted grants are appended to and loaded from "
        "(default: approved.yaml in the state directory)",
    )
    group.add_argument(
        "--approval-webhook",
        metavar="URL",
        default=None,
        help="POST each new approval (and its outcome) here as signed JSON",
    )
    group.add_argument(
        "--approval-webhook-secret",
        metavar="FILE",
        default=None,
        help="the webhook's HMAC-SHA256 secret (a file of mode 0600)",
    )
    group.add_argument(
        "--reviewer",
        metavar="CMD",
        default=None,
        help="run CMD (no shell) for each new approval: the request as JSON on stdin, "
        "allow/deny/escalate on stdout; it answers only rules with 'review: auto'",
    )
    group.add_argument(
        "--reviewer-timeout",
        type=finite,
        default=10.0,
        metavar="SECONDS",
        help="a reviewer silent this long escalates (default %(default)s)",
    )
    group.add_argument(
        "--max-pending-per-sandbox",
        type=int,
        default=8,
        metavar="N",
        help="open approvals one sandbox may have; more are refused (default %(default)s)",
    )
    group.add_argument(
        "--max-pending",
        type=int,
        default=256,
        metavar="N",
        help="open approvals in all (default %(default)s)",
    )
    group.add_argument(
        "--session-ttl",
        type=finite,
        default=8 * 3600,
        metavar="SECONDS",
        help="how long a --session grant lasts (default %(default)s)",
    )


def approvals_config(args: argparse.Namespace, state_dir: Any) -> Any:
    """The :class:`proxy.approvals.service.ApprovalsConfig` of ``egress serve``'s options; raises
    ApprovalsError naming the option that is wrong."""
    import shlex
    from pathlib import Path

    from proxy.approvals.service import ApprovalsConfig, ApprovalsError, load_tokens
    from proxy.approvals.store import Limits
    from proxy.approvals.webhook import WebhookError, load_secret
    from proxy.core.hosts import parse_endpoint

    admin = None
    if args.admin is not None:
        try:
            admin = parse_endpoint(args.admin, default_host="127.0.0.1", any_port=True)
        except ValueError as exc:
            raise ApprovalsError(f"--admin {args.admin!r}: {exc}") from None
        if args.admin_tokens is None:
            raise ApprovalsError("--admin needs --admin-tokens FILE (see `egress admin-token`)")
    tokens = load_tokens(args.admin_tokens) if args.admin_tokens else None
    secret = None
    if args.approval_webhook_secret is not None:
        try:
            secret = load_secret(args.approval_webhook_secret)
        except WebhookError as exc:
            raise ApprovalsError(str(exc)) from None
    if args.approval_webhook is not None and not args.approval_webhook.startswith(
        ("http://", "https://")
    ):
        raise ApprovalsError(
            f"--approval-webhook {args.approval_webhook!r}: expected an http(s) URL"
        )
    reviewer = None
    if args.reviewer:
        try:
            reviewer = shlex.split(args.reviewer)
        except ValueError as exc:
            raise ApprovalsError(f"--reviewer: {exc}") from None
    for name in ("max_pending_per_sandbox", "max_pending"):
        if getattr(args, name) < 1:
            raise ApprovalsError(f"--{name.replace('_', '-')} must be at least 1")
    if args.session_ttl <= 0 or args.reviewer_timeout <= 0:
        raise ApprovalsError("--session-ttl and --reviewer-timeout must be positive")
    return ApprovalsConfig(
        state=args.state,
        state_dir=Path(state_dir),
        approved_file=Path(args.approved_file)
        if args.approved_file
        else Path(state_dir) / "approved.yaml",
        admin_listen=admin,
        admin_tokens=tokens,
        admin_url=args.admin_url,
        webhook_url=args.approval_webhook,
        webhook_secret=secret,
        reviewer=reviewer,
        reviewer_timeout=args.reviewer_timeout,
        limits=Limits(per_sandbox=args.max_pending_per_sandbox, total=args.max_pending),
        session_ttl=args.session_ttl,
    )


def register(sub: Any) -> None:
    def connection(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--admin",
            metavar="URL",
            default=None,
            help=f"the gate's admin API (default $EGRESS_ADMIN_URL, else {DEFAULT_ADMIN_URL})",
        )
        parser.add_argument(
            "--token-file",
            metavar="FILE",
            default=None,
            help="your admin token (default $EGRESS_ADMIN_TOKEN_FILE, or $EGRESS_ADMIN_TOKEN)",
        )

    listing = sub.add_parser(
        "approvals",
        help="list pending approvals (--watch: follow them live)",
        description="List the approvals waiting for an answer on a gate's admin API.",
    )
    connection(listing)
    listing.add_argument("--watch", action="store_true", help="follow new approvals and answers")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=_cmd_approvals)

    approve = sub.add_parser(
        "approve",
        help="allow a pending request: --once (default), --session or --persist",
        description="Approve a pending approval. --once: the requests held on it; --session: this "
        "sandbox's identical requests until the session grant expires; --persist: append a rule "
        "to the gate's approved-rules file.",
    )
    approve.add_argument("id", metavar="ID")
    scope = approve.add_mutually_exclusive_group()
    for name in ("once", "session", "persist"):
        scope.add_argument(
            f"--{name}", dest="scope", action="store_const", const=name, default="once"
        )
    approve.add_argument("--reason", default=None, help="recorded with the answer")
    connection(approve)
    approve.set_defaults(func=_cmd_answer, verb="approve")

    deny = sub.add_parser(
        "deny",
        help="refuse a pending request",
        description="Deny a pending approval: the requests held on it are refused at once.",
    )
    deny.add_argument("id", metavar="ID")
    deny.add_argument("--reason", default=None, help="recorded, and shown to the agent")
    connection(deny)
    deny.set_defaults(func=_cmd_answer, verb="deny", scope=None)

    token = sub.add_parser(
        "admin-token",
        help="create an admin token for a person or tool (--admin-tokens file)",
        description="Print a new admin token for NAME and the entry for the --admin-tokens file.",
    )
    token.add_argument("name", metavar="NAME")
    token.set_defaults(func=_cmd_admin_token)


# -- the client --------------------------------------------------------------------------------------


class AdminError(Exception):
    pass


class Client:
    def __init__(self, url: str | None, token_file: str | None) -> None:
        import requests

        self.url = (url or os.environ.get("EGRESS_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
        self.token = _token(token_file)
        self.session = requests.Session()
        self.session.trust_env = False  # never through a proxy (a sandbox's, least of all)
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import requests

        try:
            response = self.session.request(method, self.url + path, json=body, timeout=30)
        except requests.RequestException as exc:
            raise AdminError(f"cannot reach the admin API at {self.url}: {exc}") from None
        return response

    def stream(self, path: str) -> Any:
        import requests

        try:
            response = self.session.get(self.url + path, stream=True, timeout=(10, 60))
        except requests.RequestException as exc:
            raise AdminError(f"cannot reach the admin API at {self.url}: {exc}") from None
        _check_auth(response)
        return response


def _token(path: str | None) -> str:
    path = path or os.environ.get("EGRESS_ADMIN_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise AdminError(f"{path}: cannot read the admin token: {exc.strerror}") from None
    else:
        token = os.environ.get("EGRESS_ADMIN_TOKEN", "").strip()
    if not token:
        raise AdminError("no admin token: pass --token-file FILE or set $EGRESS_ADMIN_TOKEN_FILE")
    return token


def _check_auth(response: Any) -> None:
    if response.status_code == 401:
        raise AdminError("the admin API refused the token (401): check --token-file")


def _summary(approval: dict[str, Any]) -> str:
    """The request an approval is about, each part bounded on its own (the host always whole); an
    answer without the parts (not this gate's) shows its ``what``, escaped and bounded."""
    from proxy.approvals.model import body_unread, summary
    from proxy.core.text import escape

    host, port, method, path = (approval.get(k) for k in ("host", "port", "method", "path"))
    if not isinstance(host, str) or not isinstance(port, int):
        return escape(str(approval.get("what", "?")), 200)
    method = method if isinstance(method, str) else None
    query = approval.get("query") or "" if approval.get("query_id") else None
    size, body, runs = (approval.get(k) for k in ("query_bytes", "body_bytes", "runs"))
    head, body_id = approval.get("head_bytes"), approval.get("body_id")
    return summary(
        host,
        port,
        method,
        path if isinstance(path, str) else None,
        query if isinstance(query, str) else None,
        size if isinstance(size, int) else None,
        body if isinstance(body, int) else None,
        runs if isinstance(runs, str) else None,
        head_bytes=head if isinstance(head, int) else None,
        body_read=not body_unread(body_id),
    )


def describe(approval: dict[str, Any], now: float) -> str:
    from proxy.core.text import escape

    age = max(0, int(now - float(approval.get("created", now))))
    left = max(0, int(float(approval.get("deadline", now)) - now))
    sandbox = escape(str(approval.get("sandbox_id", "-")), 40)
    kind = escape(str(approval.get("kind", "?")).upper(), 16)
    what = f"{kind} {_summary(approval)}"
    rule = escape(str(approval.get("rule") or "-"), 64)
    return f"{approval.get('id', '?'):<17} {age:>4}s {left:>4}s  {sandbox:<20} {rule:<20} {what}"


def _answer_hint(approval_id: str) -> str:
    return f"egress approve {approval_id} [--session|--persist]  /  egress deny {approval_id}"


def _cmd_approvals(args: argparse.Namespace) -> int:
    import json
    import time

    try:
        client = Client(args.admin, args.token_file)
        if args.watch:
            return _watch(client, args.json)
        response = client.call("GET", "/v1/approvals")
        _check_auth(response)
        if response.status_code != 200:
            return fail(f"the admin API answered {response.status_code}: {response.text[:200]}")
        approvals = response.json()["approvals"]
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        for approval in approvals:
            print(json.dumps(approval))
        return EXIT_OK
    if not approvals:
        print("no pending approvals")
        return EXIT_OK
    now = time.time()
    print(f"{'ID':<17} {'AGE':>5} {'LEFT':>5}  {'SANDBOX':<20} {'RULE':<20} REQUEST")
    for approval in approvals:
        print(describe(approval, now))
    return EXIT_OK


def _watch(client: Client, as_json: bool) -> int:
    import json
    import time

    from proxy.core.text import escape

    response = client.stream("/v1/events")
    if response.status_code != 200:
        return fail(f"the admin API answered {response.status_code}")
    event = ""
    try:
        for raw in response.iter_lines(decode_unicode=True):
            line = raw or ""
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                continue
            if not line.startswith("data:"):
                continue
            body = json.loads(line.split(":", 1)[1])
            if as_json:
                print(json.dumps({"event": event, **body}), flush=True)
                continue
            now = time.time()
            if event == "snapshot":
                for approval in body["approvals"]:
                    print(f"pending  {describe(approval, now)}", flush=True)
                continue
            if event != "approval":
                continue
            approval, change = body["approval"], body["change"]
            if change == "pending":
                print(f"pending  {describe(approval, now)}", flush=True)
                print(f"         answer: {_answer_hint(approval['id'])}", flush=True)
            elif change == "decided":
                by = escape(str(approval.get("decided_by") or "-"), 64)
                scope = f" ({approval['scope']})" if approval.get("scope") else ""
                print(f"{approval['state']:<8} {approval['id']} by {by}{scope}", flush=True)
            else:
                advice = escape(str(approval.get("advice_reason") or ""), 200)
                print(f"advice   {approval['id']}: {approval.get('advice')}: {advice}", flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except (ValueError, KeyError) as exc:
        return fail(f"unreadable event from the admin API: {exc}")
    except Exception as exc:
        return fail(f"the event stream ended: {exc}")
    return EXIT_OK


def _cmd_answer(args: argparse.Namespace) -> int:
    import json
    import re

    from proxy.core.text import escape

    if not re.fullmatch(r"[0-9a-f]{16}", args.id):
        return fail(f"{args.id!r} is not an approval id (16 hex digits)")
    body: dict[str, Any] = {}
    if args.scope is not None:
        body["scope"] = args.scope
    if args.reason is not None:
        body["reason"] = args.reason
    try:
        client = Client(args.admin, args.token_file)
        response = client.call("POST", f"/v1/approvals/{args.id}/{args.verb}", body)
        _check_auth(response)
    except AdminError as exc:
        return fail(str(exc))
    try:
        data = response.json()
    except ValueError:
        data = {"error": response.text[:200]}
    if response.status_code == 200:
        approval = data["approval"]
        done = f"approved ({approval['scope']})" if args.verb == "approve" else "denied"
        by = escape(str(approval["decided_by"]), 64)
        print(f"{approval['id']}: {done} by {by}: {_summary(approval)}")
        return EXIT_OK
    if response.status_code in (404, 409, 422):
        print(f"egress: {args.id}: {data.get('error')}", file=sys.stderr)
        if response.status_code == 409 and isinstance(data.get("approval"), dict):
            print(json.dumps(data["approval"]), file=sys.stderr)
        return EXIT_DENY
    return fail(f"the admin API answered {response.status_code}: {data.get('error')}")


def _cmd_admin_token(args: argparse.Namespace) -> int:
    from proxy.approvals.tokens import NAME, NAME_RULE
    from proxy.policy.identities import new_token, token_digest

    if not NAME.fullmatch(args.name):
        return fail(f"{args.name!r}: a name is {NAME_RULE}")
    token = new_token()
    print(f"token: {token}")
    print("give it to its owner (e.g. in a file of mode 0600 for --token-file); add to the")
    print("--admin-tokens file (mode 0600):")
    print(f"  - name: {args.name}")
    print(f"    token_sha256: {token_digest(token)}")
    return EXIT_OK
