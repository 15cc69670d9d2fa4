"""Options of the policy lifecycle (live reload, the managed ceiling) for the commands that run a gate.
Nothing is imported here (argparse neither), so ``egress --help`` and ``egress run`` stay fast."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import argparse

MANAGED_ENV = "EGRESS_MANAGED_POLICY"


def add_lifecycle_options(parser: argparse.ArgumentParser, *, watch: bool = True) -> None:
    from proxy.app.arguments import finite

    parser.add_argument(
        "--managed-policy",
        metavar="FILE",
        default=None,
        help="the organisation's managed policy: its deny rules always win and the local policy may "
        f"only narrow it (default: ${MANAGED_ENV}); see docs/lifecycle.md",
    )
    if not watch:
        return
    parser.add_argument(
        "--watch-interval",
        metavar="SECONDS",
        type=finite,
        default=0.5,
        help="how often the policy files, their includes, the managed policy, the approvals overlay "
        "and the hosts file are checked for changes (default: 0.5; 0: only SIGHUP reloads)",
    )
    parser.add_argument(
        "--recheck-on-reload",
        action="store_true",
        help="after a reload, close admitted tunnels the new policy no longer allows (each closure "
        "is recorded as a decision); by default they keep running",
    )


def managed_policy_path(args: argparse.Namespace) -> str | None:
    """``--managed-policy``, else ``$EGRESS_MANAGED_POLICY``; an empty value means none."""
    value = getattr(args, "managed_policy", None) or os.environ.get(MANAGED_ENV) or None
    return value
