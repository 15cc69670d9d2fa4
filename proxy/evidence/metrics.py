"""Prometheus metrics for the gate, on a registry and a listener of their own.

A dedicated :class:`CollectorRegistry` (not the process-global one) keeps tests and several gates in one
process independent, and lets the dashboard test derive the list of metric names from the code, so the
dashboard cannot silently drift from what is exported.

Cardinality is bounded by construction (threat 15): label values come from closed sets (the ``Verdict``,
``Reason`` and ``Kind`` enums, fixed direction/result words) or from the rule names of the *loaded* policy.
Host names, client addresses, paths and sandbox ids never become label values; anything outside a closed set
is folded into ``other``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.otel.drops import OTLP_DROP_REASONS

OTHER = "other"
NONE = "none"
# Without a loaded policy the first rule names seen are accepted up to this many, then folded into "other".
MAX_UNKNOWN_RULES = 256
DIRECTIONS = ("out", "in")  # out: sandbox -> upstream, in: upstream -> sandbox
RELOAD_RESULTS = ("ok", "error")
JOURNAL_ERRORS = ("disk_full", "permission", "other")
APPROVAL_OUTCOMES = ("granted", "denied", "timeout", "limit")
APPROVAL_DECIDERS = ("person", "reviewer", "timeout", "gate")

_KINDS = frozenset(str(k) for k in Kind)
_VERDICTS = frozenset(str(v) for v in Verdict)
_REASONS = frozenset(str(r) for r in Reason)

_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200)
_APPROVAL_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 900, 3600)


MAX_CACHED_CHILDREN = 4096


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= MAX_CACHED_CHILDREN:
        cache.clear()
    cache[key] = value


def _closed(value: object, allowed: frozenset[str] | tuple[str, ...]) -> str:
    text = str(value) if value is not None else NONE
    return text if text in allowed else OTHER


class Metrics:
    """Every metric the gate exports, plus the small API the gate calls for non-decision facts.

    Also a decision sink (``record``/``event``/``close``) so the Emitter feeds the decision counters.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "0") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self._policy_rules: frozenset[str] | None = None  # union of _rule_sets
        self._rule_sets: dict[str, frozenset[str]] = {}  # "" = the main policy, else a sandbox id
        self._seen_rules: set[str] = set()
        self._policy_version: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        # Label children by the raw values they are looked up with: ``labels()`` checks and converts
        # its arguments on every call, a dict probe does not (this runs for every decision). Keys are
        # closed sets and the loaded rule names; each cache is bounded all the same (_remember).
        self._decision_children: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._closed_children: dict[tuple[Any, ...], tuple[Any, Any, Any, Any]] = {}
        self._latency_children: dict[Any, Any] = {}
        self._active_children: dict[Any, Any] = {}
        # What ``/healthz`` on the metrics listener answers: (healthy, details). None: always healthy.
        self.health: Callable[[], tuple[bool, dict[str, Any]]] | None = None

        self.build_info = Gauge(
            "egress_build_info", "Build of the running gate (always 1).", ["version"], registry=r
        )
        self.build_info.labels(version=version).set(1)
        self.decisions = Counter(
            "egress_decisions",
            "Decisions by outcome, matched rule, reason code and request kind.",
            ["decision", "rule", "reason", "kind"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "egress_decision_latency_seconds",
            "Time from receiving a request to having its decision, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dns_queries = Counter(
            "egress_dns_queries",
            "DNS questions answered by the DNS gate, by decision.",
            ["decision"],
            registry=r,
        )
        self.active_connections = Gauge(
            "egress_active_connections",
            "Connections currently open through the gate.",
            ["kind"],
            registry=r,
        )
        self.bytes = Counter(
            "egress_bytes",
            "Payload bytes relayed, by direction (out: sandbox to upstream, in: upstream to sandbox) and rule.",
            ["direction", "rule"],
            registry=r,
        )
        self.connection_duration = Histogram(
            "egress_connection_duration_seconds",
            "Lifetime of closed connections, by kind.",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            "egress_policy_reloads",
            "Policy (re)loads by result (ok|error).",
            ["result"],
            registry=r,
        )
        self.policy_reload_failures = Counter(
            "egress_policy_reload_failures",
            "Policy reloads refused (the last good policy stays in force; see /healthz).",
            registry=r,
        )
        self.policy_stale = Gauge(
            "egress_policy_stale",
            "1 while the last reload was refused: the files on disk are not what is enforced.",
            registry=r,
        )
        self.policy_info = Gauge(
            "egress_policy_info",
            "The policy in force (always 1): content-hash version and mode.",
            ["version", "mode"],
            registry=r,
        )
        self.policy_rules = Gauge(
            "egress_policy_rules", "Number of rules in the policy in force.", registry=r
        )
        self.journal_writes = Counter(
            "egress_journal_writes", "Records appended to the audit journal.", registry=r
        )
        self.journal_errors = Counter(
            "egress_journal_errors",
            "Failed audit journal writes by cause (disk_full|permission|other).",
            ["error"],
            registry=r,
        )
        self.journal_rotations = Counter(
            "egress_journal_rotations", "Size-based rotations of the audit journal.", registry=r
        )
        self.otlp_exported = Counter(
            "egress_otlp_exported_records",
            "Log records accepted by the OTLP collector.",
            registry=r,
        )
        self.otlp_export_failures = Counter(
            "egress_otlp_export_failures",
            "Failed OTLP export attempts (each is retried; see dropped for losses).",
            registry=r,
        )
        self.otlp_retries = Counter(
            "egress_otlp_retries", "OTLP export batches sent again after a failure.", registry=r
        )
        self.otlp_dropped = Counter(
            "egress_otlp_dropped_records",
            "Log records that will never be exported, by reason (queue_full|shutdown|encode|rejected: "
            "the collector took the request and said it rejected them).",
            ["reason"],
            registry=r,
        )
        self.otlp_queue_depth = Gauge(
            "egress_otlp_queue_depth",
            "Events waiting for export (in memory plus the journal backlog).",
            registry=r,
        )
        self.active_sandboxes = Gauge(
            "egress_active_sandboxes", "Sandboxes currently attached to the gate.", registry=r
        )
        self.approvals_pending = Gauge(
            "egress_approvals_pending",
            "Approvals this gate opened that are waiting for an answer.",
            registry=r,
        )
        self.approvals = Counter(
            "egress_approvals",
            "Approvals this gate opened, by outcome (granted|denied|timeout|limit: refused as too "
            "many) and who decided (person|reviewer|timeout|gate).",
            ["outcome", "decided_by"],
            registry=r,
        )
        self.approval_wait = Histogram(
            "egress_approval_wait_seconds",
            "Time from an approval opening to its outcome, by outcome.",
            ["outcome"],
            buckets=_APPROVAL_BUCKETS,
            registry=r,
        )
        self.credential_uses = Counter(
            "egress_credential_uses",
            "Requests that carried a declared credential's placeholder, by credential name (only "
            "names from the credentials file; anything else is 'other') and outcome (used: the "
            "real value was sent; misuse: refused as credential-misuse; refused: refused for "
            "another reason).",
            ["credential", "outcome"],
            registry=r,
        )
        self._credential_names: frozenset[str] = frozenset()
        for reason in JOURNAL_ERRORS:
            self.journal_errors.labels(error=reason)
        for result in RELOAD_RESULTS:
            self.policy_reloads.labels(result=result)
        for reason in OTLP_DROP_REASONS:
            self.otlp_dropped.labels(reason=reason)

    # -- label hygiene ---------------------------------------------------------------------------

    def rule_label(self, rule: str | None) -> str:
        """The rule as a label value: a rule name of the loaded policy, ``none`` or ``other``."""
        if rule is None:
            return NONE
        with self._lock:
            if self._policy_rules is not None:
                return rule if rule in self._policy_rules else OTHER
            if rule in self._seen_rules:
                return rule
            if (
                len(self._seen_rules) < MAX_UNKNOWN_RULES
                and rule.isprintable()
                and len(rule) <= 128
            ):
                self._seen_rules.add(rule)
                return rule
            return OTHER

    # -- sink protocol ---------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        key = (decision.decision, decision.rule, decision.reason, decision.kind)
        found = self._decision_children.get(key)
        if found is None:
            found = self._decision_labels(decision)
            _remember(self._decision_children, key, found)
        decisions, dns = found
        decisions.inc()
        if dns is not None:
            dns.inc()
        if decision.credential:
            self._credential_used(decision)

    def _decision_labels(self, decision: Decision) -> tuple[Any, Any]:
        verdict = _closed(decision.decision, _VERDICTS)
        kind = _closed(decision.kind, _KINDS)
        decisions = self.decisions.labels(
            decision=verdict,
            rule=self.rule_label(decision.rule),
            reason=_closed(decision.reason, _REASONS),
            kind=kind,
        )
        dns = self.dns_queries.labels(decision=verdict) if kind == Kind.DNS else None
        return decisions, dns

    def credentials_loaded(self, names: Iterable[str]) -> None:
        """The declared credential names: the only values the ``credential`` label takes."""
        self._credential_names = frozenset(names)
        for name in self._credential_names:
            for outcome in ("used", "misuse"):
                self.credential_uses.labels(credential=name, outcome=outcome)

    def _credential_used(self, decision: Decision) -> None:
        if decision.decision is Verdict.ASK:
            return  # held for an answer: counted once, as what the answer made of it
        if decision.reason is Reason.CREDENTIAL_MISUSE:
            outcome = "misuse"
        else:
            outcome = "used" if decision.allowed else "refused"
        for name in decision.credential.split(",") if decision.credential else ():
            label = name if name in self._credential_names else OTHER
            self.credential_uses.labels(credential=label, outcome=outcome).inc()

    def close(self) -> None:
        self.stop()

    # -- non-decision facts the gate reports -------------------------------------------------------

    def observe_decision_latency(self, kind: Kind | str, seconds: float) -> None:
        child = self._latency_children.get(kind)
        if child is None:
            child = self.decision_latency.labels(kind=_closed(kind, _KINDS))
            _remember(self._latency_children, kind, child)
        child.observe(max(seconds, 0.0))

    @contextmanager
    def time_decision(self, kind: Kind | str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_decision_latency(kind, time.perf_counter() - start)

    def connection_opened(self, kind: Kind | str = Kind.CONNECT) -> None:
        child = self._active_children.get(kind)
        if child is None:
            child = self.active_connections.labels(kind=_closed(kind, _KINDS))
            _remember(self._active_children, kind, child)
        child.inc()

    def connection_closed(
        self,
        kind: Kind | str = Kind.CONNECT,
        *,
        rule: str | None = None,
        bytes_out: int = 0,
        bytes_in: int = 0,
        duration: float | None = None,
    ) -> None:
        """Pairs with :meth:`connection_opened`; bytes and duration are optional."""
        key = (kind, rule)
        found = self._closed_children.get(key)
        if found is None:
            k = _closed(kind, _KINDS)
            label = self.rule_label(rule)
            found = (
                self.active_connections.labels(kind=k),
                self.bytes.labels(direction="out", rule=label),
                self.bytes.labels(direction="in", rule=label),
                self.connection_duration.labels(kind=k),
            )
            _remember(self._closed_children, key, found)
        active, out, into, lifetime = found
        active.dec()
        if bytes_out > 0:
            out.inc(bytes_out)
        if bytes_in > 0:
            into.inc(bytes_in)
        if duration is not None:
            lifetime.observe(max(duration, 0.0))

    def add_bytes(self, rule: str | None, *, bytes_out: int = 0, bytes_in: int = 0) -> None:
        label = self.rule_label(rule)
        if bytes_out > 0:
            self.bytes.labels(direction="out", rule=label).inc(bytes_out)
        if bytes_in > 0:
            self.bytes.labels(direction="in", rule=label).inc(bytes_in)

    def policy_loaded(self, version: str, rule_names: Iterable[str], mode: str = "enforce") -> None:
        """A policy went into force: its rule names become the only accepted rule label values."""
        names = frozenset(n for n in rule_names if n)
        self._set_rules("", names)
        with self._lock:
            self._policy_version = version
        self.policy_info.clear()  # one series only: the version label changes on every reload
        self.policy_info.labels(
            version=version[:64], mode=_closed(mode, ("enforce", "report"))
        ).set(1)
        self.policy_rules.set(len(names))
        self.policy_reloads.labels(result="ok").inc()
        self.policy_stale.set(0)

    def sandbox_policy_loaded(self, sandbox_id: str, rule_names: Iterable[str]) -> None:
        """A sandbox's own policy (shared gate): its rule names are accepted as labels too. Call again
        on its reloads; the sandbox id itself never becomes a label value."""
        self._set_rules(sandbox_id or "-", frozenset(n for n in rule_names if n))

    def _set_rules(self, source: str, names: frozenset[str]) -> None:
        with self._lock:
            self._rule_sets[source] = names
            self._policy_rules = frozenset().union(*self._rule_sets.values())
            # the rule label of a rule name may have changed: look the children up again
            self._decision_children.clear()
            self._closed_children.clear()

    def policy_reload_failed(self) -> None:
        """The new policy was rejected; the old one stays in force (and stays in ``policy_info``)."""
        self.policy_reloads.labels(result="error").inc()
        self.policy_reload_failures.inc()
        self.policy_stale.set(1)

    def set_active_sandboxes(self, count: int) -> None:
        self.active_sandboxes.set(count)

    def approval_opened(self) -> None:
        self.approvals_pending.inc()

    def approval_closed(self, outcome: str, decided_by: str, seconds: float | None) -> None:
        """An approval this gate opened ended (``seconds`` after opening), or one was refused before
        it opened (``seconds`` None: over the pending limits)."""
        label = _closed(outcome, APPROVAL_OUTCOMES)
        self.approvals.labels(
            outcome=label, decided_by=_closed(decided_by, APPROVAL_DECIDERS)
        ).inc()
        if seconds is not None:
            self.approvals_pending.dec()
            self.approval_wait.labels(outcome=label).observe(max(seconds, 0.0))

    # -- exposition --------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every sample name this registry can expose (incl. _total/_bucket/_sum/_count suffixes)."""
        out: set[str] = set()
        for family in self.registry.collect():
            out.add(family.name)
            out.update(s.name for s in family.samples)
            if family.type == "counter":
                out.update({family.name + "_total", family.name + "_created"})
            if family.type == "histogram":
                out.update(family.name + sfx for sfx in ("_bucket", "_sum", "_count", "_created"))
        return out

    def start(self, host: str = "127.0.0.1", port: int = 9464) -> tuple[str, int]:
        """Serve ``/metrics`` and ``/healthz`` on their own listener; returns the bound address (port
        0 picks one)."""
        if self._server is not None:
            raise RuntimeError("metrics listener already started")
        from proxy.evidence.health import serve_metrics

        server, thread = serve_metrics(host, port, self.registry, lambda: self.health)
        self._server, self._thread = server, thread
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
