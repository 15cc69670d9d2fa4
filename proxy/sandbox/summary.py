"""What `egress run` tells the user at exit: how much was allowed, and what was refused and why.

A sink like any other (it sees exactly the decisions every other sink sees, after the emitter), so the
summary can never disagree with the audit trail. Host names are printed with ``ascii()``-style escaping:
a hostile name must not be able to write escape sequences to the user's terminal (threat 15).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from proxy.core.decision import Decision, Kind, Verdict
from proxy.core.text import escape

MAX_LISTED = 20  # refused destinations listed by name; the rest are counted
MAX_TALLIES = 1000  # processes / destinations tallied one by one in the JSON summary; then "other"
MAX_PIDS = 20
OTHER = "(other)"
UNKNOWN = "(unattributed)"


@dataclass
class Tally:
    allowed: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    pids: set[int] = field(default_factory=set)

    def add(self, decision: Decision) -> None:
        if decision.decision is Verdict.DENY:
            self.refused += 1
        else:
            self.allowed += 1
        self.reasons[str(decision.reason)] += 1
        if decision.pid is not None and len(self.pids) < MAX_PIDS:
            self.pids.add(decision.pid)

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "refused": self.refused, "reasons": dict(self.reasons)}


@dataclass
class SummarySink:
    allowed: int = 0
    dns_answered: int = 0
    reported: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    credentials: Counter[str] = field(default_factory=Counter)  # credential names added upstream
    processes: dict[str, Tally] = field(default_factory=dict)  # by executable
    destinations: dict[str, Tally] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, decision: Decision) -> None:
        if decision.decision is Verdict.ASK:
            return  # held for an approval: its outcome is recorded (and counted) when it comes
        where = _where(decision)
        with self._lock:
            if decision.kind is not Kind.TLS or decision.decision is Verdict.DENY:
                _tally(self.processes, decision.exe or UNKNOWN, decision)
                _tally(self.destinations, where, decision)
            if decision.decision is Verdict.DENY:
                self.refused[(where, str(decision.reason))] += 1
                return
            if decision.decision is Verdict.REPORT:  # let through, so also counted as allowed
                self.reported[(where, str(decision.reason))] += 1
            if decision.credential:
                self.credentials.update(decision.credential.split(","))
            if decision.kind is Kind.DNS:
                self.dns_answered += 1
            elif decision.kind is not Kind.TLS:  # a TLS check is part of its CONNECT, not a request
                self.allowed += 1

    def close(self) -> None:
        pass

    def render(self, sandbox_id: str) -> str:
        with self._lock:
            refused_total = sum(self.refused.values())
            lines = [
                f"egress: sandbox {sandbox_id}: {self.allowed} request(s) allowed, "
                f"{refused_total} refused, {self.dns_answered} DNS answer(s)"
            ]
            if self.credentials:
                used = ", ".join(
                    f"{escape(n, 64)} (x{c})" for n, c in sorted(self.credentials.items())
                )
                lines.append(f"  credentials added by the gate: {used}")
            for title, table in (("refused", self.refused), ("would refuse", self.reported)):
                items = table.most_common()
                for (where, reason), count in items[:MAX_LISTED]:
                    times = f" (x{count})" if count > 1 else ""
                    lines.append(f"  {title} {where}: {reason}{times}")
                if len(items) > MAX_LISTED:
                    lines.append(f"  ... and {len(items) - MAX_LISTED} more {title} destination(s)")
        return "\n".join(lines)

    def render_json(self, sandbox_id: str) -> str:
        """One JSON object: totals, then per process (by executable) and per destination, allowed
        and refused counts with their reasons."""
        with self._lock:
            out = {
                "sandbox_id": sandbox_id,
                "allowed": self.allowed,
                "refused": sum(self.refused.values()),
                "dns_answered": self.dns_answered,
                "processes": [
                    {"exe": exe, "pids": sorted(t.pids), **t.as_dict()}
                    for exe, t in sorted(self.processes.items())
                ],
                "destinations": [
                    {"destination": where, **t.as_dict()}
                    for where, t in sorted(self.destinations.items())
                ],
            }
        return json.dumps(out, sort_keys=False)


def _tally(table: dict[str, Tally], key: str, decision: Decision) -> None:
    tally = table.get(key)
    if tally is None:
        if len(table) >= MAX_TALLIES:
            key = OTHER
        tally = table.setdefault(key, Tally())
    tally.add(decision)


def _where(decision: Decision) -> str:
    host = escape(decision.host, 120) or "(unread)"  # a DNS query the gate could not parse
    if decision.kind is Kind.DNS:
        return f"{host} (DNS {escape(decision.qtype or '?', 120)})"
    return f"{host}:{decision.port}" if decision.port is not None else host
