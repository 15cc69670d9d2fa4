"""Holds the live policy and swaps it atomically on reload.

A reload that fails (unreadable file, any lint problem) keeps the previous policy in force and says why:
a broken edit must never widen access, and must never silently narrow it either without a trace. A
reload is two steps so the slow one can run off the event loop: :meth:`PolicyHolder.prepare` reads and
validates everything (and raises), :meth:`PolicyHolder.install` swaps one reference - a request sees
either the old policy or the new one, never a mix.
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
    hosts_added: tuple[str, ...] = ()  # host patterns and networks any allow or ask rule names
    hosts_removed: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # why a failed reload was refused (file:line: rule: ...)
    seconds: float = 0.0  # reading and validating the new policy

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("added", "removed", "changed", "hosts_added", "hosts_removed", "problems"):
            out[name] = list(getattr(self, name))
        return out


def reachable(policy: Policy) -> frozenset[str]:
    """Every host pattern and network an allow or ask rule names: what a reload's host diff compares."""
    out: set[str] = set()
    for rule in policy.rules:
        if rule.action == "deny":
            continue
        out.update(str(h) for h in rule.hosts)
        out.update(str(c) for c in rule.cidrs)
    return frozenset(out)


def host_changes(old: Policy, new: Policy) -> tuple[tuple[str, ...], tuple[str, ...]]:
    before, after = reachable(old), reachable(new)
    return tuple(sorted(after - before)), tuple(sorted(before - after))


Changes = tuple[
    tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]
]  # rules added, removed, changed; hosts added, removed


def rule_changes(
    old: Policy, new: Policy
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
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
        *,
        load: Callable[[Path], Policy] | None = None,
    ) -> None:
        self.path = path
        self._policy = policy
        self._on_reload = on_reload
        self._load = load or load_policy
        self.last_reload: Reload | None = None
        self.failures = 0  # reloads refused since the gate started

    def __call__(self) -> Policy:
        return self._policy

    @property
    def stale(self) -> bool:
        """The last reload was refused: the files on disk are not what is enforced."""
        return self.last_reload is not None and not self.last_reload.ok

    def reload(self) -> bool:
        """Load the file again; True when the new policy is now in force."""
        started = time.monotonic()
        try:
            new = self.prepare()
        except Exception as exc:
            self.refused(exc, time.monotonic() - started)
            return False
        self.install(new, time.monotonic() - started)
        return True

    def prepare(self) -> Policy:
        """Read and validate the policy files completely; raises PolicyError (or OSError) and
        changes nothing. Safe to call from another thread."""
        return self._load(self.path)

    def refused(self, exc: BaseException, seconds: float = 0.0) -> None:
        """A prepared reload failed: keep the policy in force and say why, everywhere."""
        # anything unexpected is a failed reload too, never a half-applied one
        problems = tuple(exc.lines()) if isinstance(exc, PolicyError) else (f"{self.path}: {exc}",)
        for line in problems:
            log.error("policy reload rejected: %s", line)
        version = self._policy.version
        log.error("policy reload failed; keeping version %s in force", version)
        self.failures += 1
        self.last_reload = Reload(
            time.time(), False, version, version, problems=problems, seconds=seconds
        )
        self._notify("error")

    def changes(self, new: Policy) -> Changes:
        """What ``new`` changes against the policy in force (O(rules): compute it off the loop)."""
        return (*rule_changes(self._policy, new), *host_changes(self._policy, new))

    def install(self, new: Policy, seconds: float = 0.0, changes: Changes | None = None) -> Reload:
        """Swap ``new`` in (one reference assignment) and record what changed; ``changes`` from
        :meth:`changes`, computed beforehand, keeps the event loop's share to the assignment."""
        old = self._policy
        added, removed, changed, hosts_added, hosts_removed = changes or self.changes(new)
        self._policy = new
        done = Reload(
            time.time(),
            True,
            old.version,
            new.version,
            added,
            removed,
            changed,
            hosts_added,
            hosts_removed,
            seconds=seconds,
        )
        self.last_reload = done
        log.warning(
            "policy reloaded: version %s -> %s (%d rules; rules +%d -%d ~%d; hosts +%d -%d)",
            old.version,
            new.version,
            len(new.rules),
            len(added),
            len(removed),
            len(changed),
            len(hosts_added),
            len(hosts_removed),
        )
        self._notify("success")
        return done

    def _notify(self, result: str) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload(result, self._policy)
            except Exception:
                log.exception("reload observer failed")
