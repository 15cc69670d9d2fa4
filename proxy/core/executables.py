"""Step 3a of the admission order: a rule bound to executables allows only their processes.

Pure: the process facts come from the attribution layer (``proxy.attribution``), the rule's files
from the policy loader (``proxy.policy.executables``). The most specific rule for a host decides, as
everywhere; when that rule is bound to executables, a connection whose process is unknown
(``process-unattributed``) or runs another file (``executable-not-allowed``) is refused - not handed
to a broader rule - so binding a rule never widens what other processes may reach.

Every owner of the client socket must match, by path and by file identity (device and inode when
the policy loaded): a socket shared with, or passed to, another process proves nothing about who
writes to it. Every owner seen at any lookup counts (:func:`every_owner_seen`): the process that
held the socket when the connection opened, and let go of it before the request came (handing it
to a bound binary that never touches it, its request held in the kernel by ``TCP_CORK``), is still
one of its owners.

Under a managed ceiling, a ``report`` (a gap report mode lets through) is held to the executables of
the managed rule that allows it: report mode learns inside the organisation's bounds, and a managed
rule bound to git bounds what other processes may reach through a gap (:func:`bindings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.core.decision import Decision, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.core.text import escape
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


@dataclass(frozen=True, slots=True)
class Owners:
    """The owners two lookups of one socket saw, together (a :class:`ProcessFacts`)."""

    exes: frozenset[str]
    exe_ids: frozenset[tuple[int, int]]
    complete: bool


def every_owner_seen(earlier: ProcessFacts | None, now: ProcessFacts | None) -> ProcessFacts | None:
    """``now`` (a search for every owner) with the owners an earlier lookup of the same socket saw
    (the first owner, found as the connection opened). A file identity unknown to either lookup
    makes them all unknown, as within one search (a bound rule then refuses)."""
    if now is None or earlier is None or earlier is now:
        return now
    known = bool(earlier.exe_ids) and bool(now.exe_ids)
    return Owners(
        exes=earlier.exes | now.exes,
        exe_ids=earlier.exe_ids | now.exe_ids if known else frozenset(),
        complete=now.complete,
    )


class BoundRules:
    """Rule name -> its executables, for the policies seen lately (policies change only on reload;
    the policy object is kept with its table so an id is never reused while cached)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._tables: dict[int, tuple[Policy, Mapping[str, tuple[Executable, ...]], bool]] = {}

    def of(self, policy: Policy) -> Mapping[str, tuple[Executable, ...]]:
        return self._entry(policy)[1]

    def binds(self, policy: Policy) -> bool:
        """``policy.binds_executables`` (its rules or its ceiling's), read once per policy: a
        decision under it may rest on the process (:func:`bindings`)."""
        return self._entry(policy)[2]

    def _entry(self, policy: Policy) -> tuple[Policy, Mapping[str, tuple[Executable, ...]], bool]:
        cached = self._tables.get(id(policy))
        if cached is not None and cached[0] is policy:
            return cached
        table = {rule.name: rule.executables for rule in policy.rules if rule.executables}
        if len(self._tables) >= self.keep:
            self._tables.pop(next(iter(self._tables)))
        entry = self._tables[id(policy)] = (policy, table, policy.binds_executables)
        return entry


def bindings(
    tables: BoundRules, policy: Policy, request: Request, decision: Decision
) -> list[tuple[str, tuple[Executable, ...]]]:
    """Each rule whose executables ``decision`` is held to, as refusals name it, with those
    executables: its own rule's and, for a ``report`` under a managed ceiling, the managed rule's
    that allows the request. Empty: any process."""
    out: list[tuple[str, tuple[Executable, ...]]] = []
    if decision.rule is not None:
        own = tables.of(policy).get(decision.rule)
        if own:
            out.append((f"rule '{decision.rule}'", own))
    ceiling = policy.ceiling
    if decision.decision is Verdict.REPORT and ceiling is not None:
        outside = decide(request, ceiling)
        if outside.rule is not None:
            managed = tables.of(ceiling).get(outside.rule)
            if managed:
                out.append((f"the managed policy's rule '{outside.rule}'", managed))
    return out


def check_bindings(
    decision: Decision,
    held: list[tuple[str, tuple[Executable, ...]]],
    process: ProcessFacts | None,
) -> Decision:
    """(3a) ``decision``, or the refusal of the first of ``held`` (see :func:`bindings`) that the
    process does not satisfy."""
    for named, bound in held:
        decision = check_executables(decision, bound, process, named)
    return decision


def check_executables(
    decision: Decision,
    bound: tuple[Executable, ...],
    process: ProcessFacts | None,
    rule: str | None = None,
) -> Decision:
    """(3a) ``decision`` as it stands, or its refusal when its rule (or ``rule``, the one that
    binds it, as :func:`bindings` names it) is bound and the process is not one of ``bound``. Only
    decisions a rule let through (or would ask about) are checked."""
    if not bound or not (decision.allowed or decision.decision is Verdict.ASK):
        return decision
    named = rule or f"rule '{decision.rule}'"
    names = ", ".join(e.path for e in bound)
    if process is None or not process.exes or not process.complete:
        return decision.with_(
            decision=Verdict.DENY,
            reason=Reason.PROCESS_UNATTRIBUTED,
            detail=f"{named} allows only {names}, and the process that opened "
            "this connection could not be identified",
        )
    paths = {e.path for e in bound}
    identities = {e.identity for e in bound}
    if process.exes <= paths and process.exe_ids and process.exe_ids <= identities:
        return decision
    # The path is the sandbox's to choose (a file named with control characters): escaped.
    shown = ", ".join(escape(exe) for exe in sorted(process.exes))
    return decision.with_(
        decision=Verdict.DENY,
        reason=Reason.EXECUTABLE_NOT_ALLOWED,
        detail=f"{named} allows only {names}; this connection's process runs {shown}",
    )
