"""Put who-and-why on every decision of one sandbox, on its way to the evidence sinks.

Wraps the sandbox gate's emitter, so every decision - the checkpoint's, the DNS gate's, refusals of
limits and framing alike - carries the same facts: the launching user, the agent's current context,
the process that owns the connection (looked up by the checkpoint, step 3a, before the first
decision of a connection) and, when ``egress run`` was given a TRACEPARENT, the trace with a span id
of the decision's own. Fields are set in one place, so no sink can disagree with another.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.attribution.process import Attribution
from proxy.attribution.traceparent import TraceParent, new_span_id
from proxy.core.decision import Decision, Kind


@dataclass
class SandboxFacts:
    """What holds for every decision of one sandbox. ``context`` is replaced whole on each update
    (never mutated), so a decision sees either the old or the new context, never half of it."""

    user_id: int
    user_name: str | None
    context: Mapping[str, str] = field(default_factory=dict)
    trace: TraceParent | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_context(self, context: Mapping[str, str]) -> None:
        with self._lock:
            self.context = dict(context)


def user_name(uid: int) -> str | None:
    """The account name of ``uid``, or None when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class Stamped:
    """A decision sink in front of ``inner`` (the emitter) that adds the sandbox's facts. Everything
    else (events, close, connection_closed, ...) is the inner emitter's."""

    def __init__(self, inner: Any, facts: SandboxFacts, processes: Any = None) -> None:
        self.inner = inner
        self.facts = facts
        self.processes = processes  # proxy.attribution.procfs.SandboxProcesses, or None
        # The fields of the last (context, process) stamped: a connection's decisions, and its
        # sandbox's, carry the same ones (both are replaced whole, never changed in place).
        self._kept: tuple[Any, Any, dict[str, Any]] | None = None

    def stamp(self, decision: Decision) -> Decision:
        facts = self.facts
        context = facts.context
        process: Attribution | None = None
        if self.processes is not None and decision.kind is not Kind.DNS:
            process = self.processes.known(decision.client)
        kept = self._kept
        if kept is not None and kept[0] is context and kept[1] is process:
            changes = kept[2]
        else:
            changes = {"user_id": facts.user_id}
            if facts.user_name is not None:
                changes["user_name"] = facts.user_name
            if context:
                changes["context"] = context
            if process is not None:
                changes.update(
                    pid=process.pid,
                    host_pid=process.host_pid,
                    exe=process.exe,
                    argv=process.argv,
                    ppid=process.ppid,
                    parents=process.parents,
                )
            self._kept = (context, process, changes)
        if facts.trace is not None:
            return decision.with_(
                **changes,
                trace_id=facts.trace.trace_id,
                span_id=decision.span_id or new_span_id(),
                parent_span_id=facts.trace.span_id,
            )
        return decision.with_(**changes)

    def emit(self, decision: Decision) -> Decision:
        result: Decision = self.inner.emit(self.stamp(decision))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
