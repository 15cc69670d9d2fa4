"""Every decision of a sandbox carries its user, context, trace and process, set in one place."""

from __future__ import annotations

from proxy.attribution.process import Attribution
from proxy.attribution.stamp import SandboxFacts, Stamped
from proxy.attribution.traceparent import parse
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter, MemorySink
from proxy.evidence.record import decision_record

CURL = Attribution(
    pid=7, host_pid=4242, exe="/usr/bin/curl", argv=("curl", "https://h.test/"), ppid=2,
    parents=("2 /usr/bin/dash",), exe_ids=frozenset({(1, 2)}), exes=frozenset({"/usr/bin/curl"}),
)  # fmt: skip


class Known:
    def known(self, peer: str | None) -> Attribution | None:
        return CURL if peer == "127.0.0.1:5000" else None


def _decision(kind: Kind = Kind.CONNECT, client: str = "127.0.0.1:5000") -> Decision:
    return Decision(
        Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", kind, "h.test", 443, "v", "enforce",
        client=client,
    )  # fmt: skip


def test_user_context_trace_and_process_are_stamped() -> None:
    memory = MemorySink()
    trace = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    facts = SandboxFacts(1000, "dev", {"task": "T-1"}, trace)
    stamped = Stamped(Emitter([memory]), facts, Known())
    first = stamped.emit(_decision())
    second = stamped.emit(_decision())
    assert list(memory.decisions) == [first, second]
    assert (first.user_id, first.user_name, first.context) == (1000, "dev", {"task": "T-1"})
    assert (first.pid, first.host_pid, first.exe, first.ppid) == (7, 4242, "/usr/bin/curl", 2)
    assert first.argv == CURL.argv and first.parents == CURL.parents
    assert first.trace_id == trace.trace_id and first.parent_span_id == trace.span_id
    assert first.span_id and second.span_id and first.span_id != second.span_id
    assert decision_record(first)["context"] == {"task": "T-1"}


def test_dns_and_unknown_peers_carry_no_process_and_no_trace_means_no_ids() -> None:
    stamped = Stamped(Emitter([MemorySink()]), SandboxFacts(0, None), Known())
    dns = stamped.emit(_decision(Kind.DNS))
    other = stamped.emit(_decision(client="127.0.0.1:6000"))
    for d in (dns, other):
        assert d.pid is None and d.exe is None and d.trace_id is None and d.span_id is None
        assert d.user_id == 0 and d.user_name is None and d.context is None


def test_a_context_update_applies_to_later_decisions_only() -> None:
    facts = SandboxFacts(0, "root", {"task": "T-1"})
    stamped = Stamped(Emitter([MemorySink()]), facts)
    before = stamped.emit(_decision())
    facts.set_context({"task": "T-1", "tool": "call-2"})
    after = stamped.emit(_decision())
    assert before.context == {"task": "T-1"}
    assert after.context == {"task": "T-1", "tool": "call-2"}


def test_each_decision_carries_its_own_peers_process_whatever_came_before() -> None:
    facts = SandboxFacts(0, "root", {"task": "T-1"})
    stamped = Stamped(Emitter([MemorySink()]), facts, Known())
    mine, other, dns, again = (
        stamped.emit(_decision()),
        stamped.emit(_decision(client="127.0.0.1:6000")),
        stamped.emit(_decision(Kind.DNS)),
        stamped.emit(_decision()),
    )
    assert mine.pid == again.pid == 7 and mine.exe == again.exe == "/usr/bin/curl"
    assert other.pid is None and other.exe is None and dns.pid is None and dns.argv is None
    assert mine.context == other.context == dns.context == again.context == {"task": "T-1"}
