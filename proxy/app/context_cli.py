"""``egress context SANDBOX KEY=VALUE ...``: change the agent context a running sandbox's decisions
carry (the current tool call, say), from the host, through the sandbox gate's admin channel."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    context = subparsers.add_parser(
        "context",
        help="set the agent context (task, tool call, ...) on a running sandbox's later decisions",
        description=(
            "Change the context of a sandbox started by `egress run` on this machine. KEY=VALUE "
            "sets a key (an empty VALUE removes it); the decisions the sandbox causes from now on "
            "carry the new context. Works from the host only: the sandbox cannot reach the channel."
        ),
    )
    context.add_argument(
        "sandbox", metavar="SANDBOX", help="the sandbox id (egress run --sandbox-id)"
    )
    context.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    context.add_argument("--unset", action="append", default=[], metavar="KEY")
    context.add_argument(
        "--state-dir", default=None, help="the gate's state directory (default: the user's)"
    )
    context.set_defaults(func=_cmd_context)


def _cmd_context(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.app import statedir
    from proxy.app.run_args import context_pair  # KEY=VALUE as `egress run --context` reads it
    from proxy.attribution.channel import ChannelError, send, socket_path
    from proxy.core.sandbox_id import check_sandbox_id

    try:
        sandbox = check_sandbox_id(args.sandbox)
        pairs = dict(context_pair(p) for p in args.pairs)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        sys.stderr.write(f"egress context: {exc}\n")
        return 2
    state = Path(args.state_dir) if args.state_dir else statedir.default_state_dir()
    try:
        context = send(socket_path(state, sandbox), pairs, list(args.unset))
    except ChannelError as exc:
        sys.stderr.write(f"egress context: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(context, sort_keys=True) + "\n")
    return 0
