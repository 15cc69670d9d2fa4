"""What `egress run` tells the user at exit: how much was allowed, and what was refused and why.

A sink like any other (it sees exactly the decisions every other sink sees, after the emitter), so the
summary can never disagree with the audit trail. Host names are printed with ``ascii()``-style escaping:
a hostile name must not be able to write escape sequences to the user's terminal (threat 15).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from proxy.core.decision import Decision, Kind, Verdict
from proxy.core.text import escape

MAX_LISTED = 20  # refused destinations listed by name; the rest are counted


@dataclass
class SummarySink:
    allowed: int = 0
    dns_answered: int = 0
    reported: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    credentials: Counter[str] = field(default_factory=Counter)  # credential names added upstream
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, decision: Decision) -> None:
        if decision.decision is Verdict.ASK:
            return  # held for an approval: its outcome is recorded (and counted) when it comes
        where = _where(decision)
        with self._lock:
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


def _where(decision: Decision) -> str:
    host = escape(decision.host, 120)
    if decision.kind is Kind.DNS:
        return f"{host} (DNS {escape(decision.qtype or '?', 120)})"
    return f"{host}:{decision.port}" if decision.port is not None else host
