"""Holds the live policy and swaps it atomically on reload.

A reload that fails (unreadable file, any lint problem) keeps the previous policy in force and says why:
a broken edit must never widen access, and must never silently narrow it either without a trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from proxy.policy.loader import load_policy
from proxy.policy.model import Policy, PolicyError

log = logging.getLogger(__name__)


class PolicyHolder:
    def __init__(
        self,
        path: Path,
        policy: Policy,
        on_reload: Callable[[str, Policy], None] | None = None,
    ) -> None:
        self.path = path
        self._policy = policy
        self._on_reload = on_reload

    def __call__(self) -> Policy:
        return self._policy

    def reload(self) -> bool:
        """Load the file again; True when the new policy is now in force."""
        try:
            new = load_policy(self.path)
        except PolicyError as exc:
            for line in exc.lines():
                log.error("policy reload rejected: %s", line)
            log.error("policy reload failed; keeping version %s in force", self._policy.version)
            self._notify("error")
            return False
        except Exception as exc:  # anything unexpected is a failed reload, never a half-applied one
            log.error("policy reload failed (%s); keeping version %s", exc, self._policy.version)
            self._notify("error")
            return False
        old = self._policy.version
        self._policy = new
        log.warning(
            "policy reloaded: version %s -> %s (%d rules)", old, new.version, len(new.rules)
        )
        self._notify("success")
        return True

    def _notify(self, result: str) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload(result, self._policy)
            except Exception:
                log.exception("reload observer failed")
