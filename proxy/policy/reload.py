"""Holds the live policy and swaps it atomically on reload.

A reload that fails (unreadable file, any lint problem) keeps the previous policy in force and says why:
a broken edit must never widen access, and must never silently narrow it either without a trace.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.policy.loader import load_policy
from proxy.policy.model import Policy, PolicyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reload:
    """What the last reload did, for the people looking at the policy in force."""

    at: float
    ok: bool
    from_version: str
    to_version: str  # from_version when the reload failed
    added: tuple[str, ...] = ()  # rule names
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(added=list(self.added), removed=list(self.removed), changed=list(self.changed))
        return out


def rule_changes(old: Policy, new: Policy) -> tuple[tuple[str, ...], ...]:
    """Names of the rules added, removed and changed; a rule that only moved to another line or file
    has not changed."""
    before = {r.name: dataclasses.replace(r, file="", line=0) for r in old.rules}
    after = {r.name: dataclasses.replace(r, file="", line=0) for r in new.rules}
    return (
        tuple(n for n in after if n not in before),
        tuple(n for n in before if n not in after),
        tuple(n for n in after if n in before and after[n] != before[n]),
    )


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
        self.last_reload: Reload | None = None

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
            self._failed()
            return False
        except Exception as exc:  # anything unexpected is a failed reload, never a half-applied one
            log.error("policy reload failed (%s); keeping version %s", exc, self._policy.version)
            self._failed()
            return False
        old = self._policy.version
        added, removed, changed = rule_changes(self._policy, new)
        self._policy = new
        self.last_reload = Reload(time.time(), True, old, new.version, added, removed, changed)
        log.warning(
            "policy reloaded: version %s -> %s (%d rules)", old, new.version, len(new.rules)
        )
        self._notify("success")
        return True

    def _failed(self) -> None:
        version = self._policy.version
        self.last_reload = Reload(time.time(), False, version, version)
        self._notify("error")

    def _notify(self, result: str) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload(result, self._policy)
            except Exception:
                log.exception("reload observer failed")
