"""Step 3a of the admission order: a rule bound to executables allows only their processes.

Pure: the process facts come from the attribution layer (``proxy.attribution``), the rule's files
from the policy loader (``proxy.policy.executables``). The most specific rule for a host decides, as
everywhere; when that rule is bound to executables, a connection whose process is unknown
(``process-unattributed``) or runs another file (``executable-not-allowed``) is refused - not handed
to a broader rule - so binding a rule never widens what other processes may reach.

Every owner of the client socket must match, by path and by file identity (device and inode when
the policy loaded): a socket shared with, or passed to, another process proves nothing about who
writes to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from proxy.core.decision import Decision, Reason, Verdict
from proxy.policy.executables import Executable
from proxy.policy.model import Policy


class ProcessFacts(Protocol):
    """What the kernel said about the processes owning a connection's client socket."""

    @property
    def exes(self) -> frozenset[str]: ...

    @property
    def exe_ids(self) -> frozenset[tuple[int, int]]: ...

    @property
    def complete(self) -> bool: ...  # every owner was found, not only the first


class BoundRules:
    """Rule name -> its executables, for the policies seen lately (policies change only on reload;
    the policy object is kept with its table so an id is never reused while cached)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._tables: dict[int, tuple[Policy, Mapping[str, tuple[Executable, ...]]]] = {}

    def of(self, policy: Policy) -> Mapping[str, tuple[Executable, ...]]:
        cached = self._tables.get(id(policy))
        if cached is not None and cached[0] is policy:
            return cached[1]
        table = {rule.name: rule.executables for rule in policy.rules if rule.executables}
        if len(self._tables) >= self.keep:
            self._tables.pop(next(iter(self._tables)))
        self._tables[id(policy)] = (policy, table)
        return table


def check_executables(
    decision: Decision, bound: tuple[Executable, ...], process: ProcessFacts | None
) -> Decision:
    """(3a) ``decision`` as it stands, or its refusal when its rule is bound and the process is not
    one of ``bound``. Only decisions a rule let through (or would ask about) are checked."""
    if not bound or not (decision.allowed or decision.decision is Verdict.ASK):
        return decision
    names = ", ".join(e.path for e in bound)
    if process is None or not process.exes or not process.complete:
        return decision.with_(
            decision=Verdict.DENY,
            reason=Reason.PROCESS_UNATTRIBUTED,
            detail=f"rule '{decision.rule}' allows only {names}, and the process that opened "
            "this connection could not be identified",
        )
    paths = {e.path for e in bound}
    identities = {e.identity for e in bound}
    if process.exes <= paths and process.exe_ids and process.exe_ids <= identities:
        return decision
    shown = ", ".join(sorted(process.exes))
    return decision.with_(
        decision=Verdict.DENY,
        reason=Reason.EXECUTABLE_NOT_ALLOWED,
        detail=f"rule '{decision.rule}' allows only {names}; this connection's process runs "
        f"{shown}",
    )
