"""The process behind a connection, and its parents up to the sandbox's command, as plain values.

Built from a table of what ``/proc`` said about each process (:class:`ProcEntry`), so the chain logic
is testable without a sandbox. Pids are the sandbox's own (what ``$$`` says inside, and what an agent's
own traces record); ``host_pid`` is the same process as the host sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MAX_CHAIN = 16  # parents recorded; a deeper tree is cut (the record says so with a last "...")


@dataclass(frozen=True, slots=True)
class ProcEntry:
    """One process as read from ``/proc`` (host pids for ``host_pid``/``host_ppid``)."""

    host_pid: int
    host_ppid: int
    pid: int  # in the sandbox's PID namespace (the last NSpid)
    exe: str
    argv: tuple[str, ...]  # already bounded and scrubbed
    exe_id: tuple[int, int] | None = (
        None  # (st_dev, st_ino) of the executable, as the kernel has it
    )


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who owns a client socket. A socket can be shared (inherited or passed): the newest owner is
    recorded, and an executable-bound rule needs every owner to match (a ``complete`` search)."""

    pid: int
    host_pid: int
    exe: str
    argv: tuple[str, ...]
    ppid: int | None
    parents: tuple[str, ...]  # "PID EXE", the parent first, up to the sandbox's command
    exe_ids: frozenset[tuple[int, int]]  # every owner's executable file identity
    exes: frozenset[str]  # every owner's executable path
    complete: bool = False  # every owner was searched for (else the search stopped at the first)


def build(
    owners: list[ProcEntry], table: Mapping[int, ProcEntry], *, complete: bool = False
) -> Attribution | None:
    """The attribution of a socket owned by ``owners`` (host pids in ``table``), or None. The
    newest owner (highest host pid) is the one recorded."""
    if not owners:
        return None
    owners = sorted(owners, key=lambda e: e.host_pid, reverse=True)
    first = owners[0]
    chain = parent_chain(first, table)
    # Every owner's file identity, or none at all when one is unknown (a bound rule then refuses).
    known = all(e.exe_id is not None for e in owners)
    ids = frozenset(e.exe_id for e in owners if e.exe_id is not None) if known else frozenset()
    return Attribution(
        pid=first.pid,
        host_pid=first.host_pid,
        exe=first.exe,
        argv=first.argv,
        ppid=table[first.host_ppid].pid if first.host_ppid in table else None,
        parents=chain,
        exe_ids=ids,
        exes=frozenset(e.exe for e in owners),
        complete=complete,
    )


def parent_chain(entry: ProcEntry, table: Mapping[int, ProcEntry]) -> tuple[str, ...]:
    """``"PID EXE"`` of each parent of ``entry``, nearest first, ending at the sandbox's command (the
    child of the sandbox's init, pid 1). The process that is itself the command has no chain."""
    chain: list[str] = []
    current = entry
    seen = {entry.host_pid}
    while current.pid != 1:
        parent = table.get(current.host_ppid)
        if parent is None or parent.pid == 1 or parent.host_pid in seen:
            break
        if len(chain) >= MAX_CHAIN:
            chain.append("...")
            break
        chain.append(f"{parent.pid} {parent.exe}")
        seen.add(parent.host_pid)
        current = parent
    return tuple(chain)
