"""The admission order: every connection, request and tunnel a sandbox opens passes here, in this order.

At connection open (:meth:`Checkpoint.connected`):

0. **limits** - more concurrent connections than the gate's cap or one client's cap (sandbox, or peer
   address until a credential names the sandbox) is ``connection-limit``; more new connections per
   second than a client's rate is ``rate-limit`` (:mod:`proxy.core.limits`).

For each CONNECT and each HTTP request - plain, or inside an inspected tunnel (:meth:`Checkpoint.admit`,
:meth:`Checkpoint.admit_request`):

1. **identity** - on a shared gate, the request must prove its sandbox with a proxy credential
   (``proxy-auth-required``); requests inside a tunnel inherit the tunnel's identity, and one connection
   never switches identity. From here on the sandbox's own policy and connection cap apply
   (``connection-limit``).
2. **framing** - a problem the adapter's pure classifiers found (a Host header, HTTP/2 ``:authority`` or
   absolute-form target naming another authority than the request is routed to - inside an inspected
   tunnel, the tunnel's host -, an unsupported scheme) is refused with its own reason.
3. **policy** - :func:`proxy.core.engine.decide_request`: canonical host, deny rules, allow rules and
   ports, default deny; then, on a host whose rules read requests, the request step
   (:mod:`proxy.core.requests`: canonical target, method overrides, request conditions). Report mode
   turns only the policy refusals into ``report``. A CONNECT to such a host is marked *inspected* here,
   once: its TLS is terminated and each request inside comes back to this step. A rule that must read
   the body makes the answer :data:`BODY_NEEDED`: nothing is recorded or sent yet; the adapter holds
   the body (bounded) and :meth:`Checkpoint.admit_body` takes the request on from this step.
3a. **process** - when the gate can see the sandbox's processes (``egress run``; on a gate serving
   several sandboxes, those of the connection's own sandbox), the connection's client socket is
   attributed to its process once, before its first decision is recorded, so every decision names it
   (:mod:`proxy.attribution`). Under a policy that binds a rule to executables the lookup starts as
   the connection opens (the earliest moment: threat 19) and the decision waits for it; under any
   other policy the answer cannot change the decision, so it is looked up when first needed (a
   record, a reviewer's question), and an admitted CONNECT taken with an ``answer`` is answered
   first: the lookup runs while the client prepares its first bytes (step 7). A connection opened
   while no rule was bound has no owner from its opening, so a rule bound by a later reload
   refuses it (``process-unattributed``; the client's next connection is looked up as it opens).
   A rule bound to executables then allows only a process
   running one of them (:mod:`proxy.core.executables`): an unknown process is
   ``process-unattributed``, another executable ``executable-not-allowed``. Nothing is resolved for
   either. (The tunnel's ClientHello is decided by the same rule for the same process.) Under a
   managed ceiling, a ``report`` is held to the executables of the managed rule that allows it.
3b. **credentials** - every placeholder of a declared credential the request carries (header values
   and Basic credentials, the URL, a held body; :mod:`proxy.core.credentials`) is judged: issued to
   this sandbox, bound to this host and port, inside an inspected tunnel, only where its declaration
   sends it and within its request rules is a *use* (the decision names the credential and the
   adapter swaps in the real value); anything else is ``credential-misuse``, refused whatever the
   policy or mode said, so nothing is sent. A request that is only reported (report mode) proceeds
   without the real value. A request without placeholders passes unchanged, but for a protocol
   upgrade to a host a credential of the sandbox is bound to, on any port: refused too (its
   messages are not read, so what the service sends back over it could not be scrubbed).
4. **destination** - an allowed host is resolved (hosts file, then DNS) and every address screened
   against the internal ranges; one screened address is pinned (``internal-address``, ``dns-failure``).
   A request inside a tunnel is not resolved again: it goes to the tunnel's pinned address.
5. **self** - the pinned address and port must not be one of the gate's own listeners, on any address
   of this host (``internal-address``): the gate never dials itself.
6. **ask** - an ``ask`` rule's decision, having passed every refusal above (no one is ever asked about
   a destination the gate would refuse anyway), is held: the :class:`Approver` answers it from a grant
   (session, persisted) or opens (or joins) a pending approval and waits for a person, the reviewer or
   the rule's timeout. Its ``ask`` event is recorded while it waits; the answer is an allow
   (``approval-granted``) or a deny (``approval-denied``, ``approval-timeout``, ``approval-limit``,
   ``approval-unavailable``). Nothing is dialled while it is held, and an ask that comes back
   unresolved, or an approver that fails, refuses. A policy reloaded while it was held decides it
   again (steps 3 and 3a): an allow stands only if the new policy still allows or asks. So does a
   policy reloaded while any request was admitted (its destination resolved, its process looked
   up): a reload's recheck sees only admitted tunnels, so the allow stands only if the policy now in
   force allows it too.
7. **audit** - the decision is recorded; the write-ahead journal can still turn an allow into
   ``audit-unavailable``. What the emitter returns is what is enforced. An admitted CONNECT whose
   decision rests on no process may have had its ``200`` before this step (3a): nothing is dialled
   or relayed until the tunnel's first bytes are decided, after this record, and an adapter closes a
   tunnel answered early whose record turned it into a refusal.
8. **pin** - only the screened address may then be dialled for this connection (:meth:`dial_target`).

For the first bytes inside an allowed tunnel (:meth:`Checkpoint.admit_tunnel`): the pure classifier
(:mod:`proxy.core.firstbytes`) refuses anything but the protocol the port calls for (an inspected tunnel
carries TLS or, on port 80, HTTP); a TLS ClientHello's server name is decided by the policy against the
tunnel's host (``sni-missing``, ``sni-mismatch``, ``ech-refused``); then audit as above. A refused tunnel
forgets its pinned destination. An upstream whose certificate does not verify for an inspected tunnel is
a refusal too (:meth:`Checkpoint.refuse_upstream`, ``upstream-tls-failed``), never a fallback.

Nothing here imports mitmproxy: adapters translate hook events into these calls and enforce the
returned decision.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from proxy.core.authority import join_authority
from proxy.core.connections import Connection, Connections, Observer
from proxy.core.credentials import Carried, Credentials, asks_upgrade, judge
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict, new_id
from proxy.core.destination import (
    Destination,
    DestinationRefused,
    Network,
    still_open,
)
from proxy.core.engine import BODY_NEEDED, BodyNeeded, decide, decide_request, refuse
from proxy.core.executables import (
    BoundRules,
    ProcessFacts,
    bindings,
    check_bindings,
    every_owner_seen,
)
from proxy.core.firstbytes import FirstBytes
from proxy.core.firstbytes import Protocol as FirstProtocol
from proxy.core.framing import Problem
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.requests import HttpHead, judged_methods
from proxy.policy.model import Policy, Rule

log = logging.getLogger(__name__)


class Destinations(Protocol):
    """Resolve and screen a destination (:class:`proxy.core.destination.DestinationCheck`)."""

    async def destination(
        self, host: Any, port: int, allow_internal: Sequence[Network]
    ) -> Destination: ...


class DecisionSink(Protocol):
    """Records a decision and returns the one to enforce (:class:`proxy.evidence.emit.Emitter`)."""

    def emit(self, decision: Decision) -> Decision: ...

    def connection_closed(
        self, opened: Decision, *, bytes_out: int, bytes_in: int, duration: float
    ) -> None: ...


class SelfCheck(Protocol):
    """Whether an address and port reach one of the gate's own listeners."""

    def is_self(self, address: str, port: int) -> bool: ...


class Approver(Protocol):
    """Answers a held ``ask`` decision (:class:`proxy.approvals.broker.Broker`).

    ``record`` records the ``ask`` event (verdict ASK, with the approval id) while the request waits;
    the returned decision is the answer: the same request, now ALLOW or DENY. ``methods``: every
    method an HTTP request was judged as (its own, then its method overrides), which the answer
    must be about; ``query``: its query exactly as sent (None without one), ``fields``: its header
    fields as sent (None: not an HTTP request), and ``body``: the body the gate held to decide it
    (None: none held), which an answer about that request must be about too; ``unread``: the size
    of a body the gate did not hold (None: of unknown size; 0: none), which no answer about another
    request may cover; ``runs``: what a GraphQL request runs, for the people asked.
    """

    async def answer(
        self,
        decision: Decision,
        rule: Rule | None,
        record: Callable[[Decision], Decision],
        *,
        methods: tuple[str, ...] = (),
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Sequence[tuple[bytes, bytes]] | None = None,
        unread: int | None = 0,
    ) -> Decision: ...


class Processes(Protocol):
    """Who owns a client socket (:class:`proxy.attribution.procfs.SandboxProcesses`)."""

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> ProcessFacts | None:
        """Without ``identity``, the answer need not carry the executables' file identities (none
        is then a refusal under a rule bound to executables): evidence only."""
        ...

    def attribute_now(self, peer: str, *, identity: bool = True) -> ProcessFacts | None:
        """``attribute(peer)`` when it is cheap enough for the event loop; BlockingIOError when
        it is not."""
        ...

    def remember(self, peer: str, found: ProcessFacts | None, owner: object = None) -> None:
        """``found`` is ``owner``'s process (a connection from ``peer``) until it is forgotten."""
        ...

    def forget(self, peer: str | None, owner: object = None) -> None: ...


class Identified(Protocol):
    @property
    def id(self) -> str: ...


class Authenticator(Protocol):
    def authenticate(self, header: str | None) -> Identified | None: ...


SHARED_GATE_HINT = (
    "this shared gate needs a per-sandbox credential (HTTPS_PROXY=http://ID:TOKEN@host:port)"
)


class Checkpoint:
    def __init__(
        self,
        policy: Callable[[], Policy],
        emitter: DecisionSink,
        destinations: Destinations,
        *,
        connections: Connections | None = None,
        identities: Authenticator | None = None,
        own: SelfCheck | None = None,
        observer: Observer | None = None,
        approvals: Approver | None = None,
        credentials: Callable[[], Credentials | None] | None = None,
        processes: Processes | None = None,
    ) -> None:
        self._policy = policy
        self.credentials = credentials
        self.processes = processes
        # A gate serving several sandboxes sees each one's processes apart (peers repeat: every
        # sandbox has its own loopback); a connection of a sandbox not listed has none to see.
        self.sandbox_processes: dict[str, Processes] = {}
        self._lookup_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # ... each with a lookup thread of its own: one sandbox's slow lookups (its processes and
        # fd tables are its own to grow) hold up none of another's connections.
        self._sandbox_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._bound = BoundRules()
        self.emitter = emitter
        self.destinations = destinations
        self.connections = connections or Connections(observer=observer)
        self.identities = identities
        self.own = own
        self.observer = observer
        self.approvals = approvals

    def policy_for(self, conn: Connection) -> Policy:
        return (conn.policy or self._policy)()

    # -- connections ------------------------------------------------------------------------------

    def connected(
        self,
        cid: str,
        peer: str | None,
        listener_sandbox: str | None = None,
        *,
        rated: bool = True,
        handed: Connection | None = None,
    ) -> tuple[Connection, Decision | None]:
        """(0) limits: the connection and, when it is over a limit, its refusal. ``rated=False``
        for a connection already counted against the new-connection rate (one handed from the
        tunnel front end to mitmproxy's layers is the same connection); ``handed``: the front
        end's record of it, whose lookup as it opened (3a) this one keeps."""
        conn = self.connections.open(cid, peer, listener_sandbox, rated=rated)
        conn.processes = self.processes_of(conn)
        if handed is not None and (handed.peer, handed.sandbox_id) == (conn.peer, conn.sandbox_id):
            conn.watched, conn.lookup = handed.watched, handed.lookup
            if handed.attributed:
                conn.process, conn.attributed = handed.process, True
                _remember(conn.processes, conn)
        elif conn.refusal is not None or self._bound.binds(self.policy_for(conn)):
            conn.watched = True
            # Every owner as it opened: the first found (newest) may be a bound program that
            # inherited the socket, while an older process connected it, corked its request and
            # lets go of it before the request is decided (threat 19).
            self._start_lookup(conn, every_owner=conn.refusal is None)
        if conn.refusal is None:
            return conn, None
        return conn, self.refuse_connection(conn, *conn.refusal)

    def processes_of(self, conn: Connection) -> Processes | None:
        """Whose processes the connection's client may be: its sandbox's, where the gate serves
        several (as when it connected), else the gate's one sandbox's (or nobody's)."""
        if conn.processes is not None:
            return conn.processes  # type: ignore[no-any-return]
        if self.sandbox_processes and conn.sandbox_id is not None:
            return self.sandbox_processes.get(conn.sandbox_id)
        return self.processes

    def release_sandbox(self, sandbox_id: str) -> None:
        """A sandbox of a gate serving several has gone: its processes are no longer looked up, and
        its lookup thread ends once the lookups it has begun are done."""
        self.sandbox_processes.pop(sandbox_id, None)
        pool = self._sandbox_pools.pop(sandbox_id, None)
        if pool is not None:
            pool.shutdown(wait=False)

    def disconnected(self, cid: str) -> None:
        conn = self.connections.close(cid)
        processes = self.processes_of(conn) if conn is not None else None
        if conn is not None and processes is not None:
            processes.forget(conn.peer, conn)
        if conn is None or conn.opened is None:
            return
        # The observer (metrics and evidence) records it; without one, the decision sinks do.
        (self.observer or self.emitter).connection_closed(
            conn.opened,
            bytes_out=conn.bytes_out,
            bytes_in=conn.bytes_in,
            duration=time.monotonic() - conn.started,
        )

    def refuse_connection(self, conn: Connection, reason: Reason, detail: str) -> Decision:
        """A refusal of the connection as a whole (over the cap, silent past its deadline). Its
        process is looked up now if it can be without a walk of the sandbox's process tree (a
        refusal never waits on one)."""
        self._start_lookup(conn, walk=False)
        tunnel = conn.tunnel
        request = Request(
            kind=Kind.TLS if tunnel else Kind.CONNECT,
            host=tunnel.host if tunnel else "-",
            port=tunnel.port if tunnel else None,
            client=conn.peer,
            sandbox_id=conn.sandbox_id,
        )
        return self.emitter.emit(refuse(request, self.policy_for(conn), reason, detail))

    def opened(self, conn: Connection, decision: Decision) -> None:
        self.connections.opened(conn, decision)

    # -- requests ---------------------------------------------------------------------------------

    async def admit(
        self,
        conn: Connection,
        request: Request,
        *,
        credential: str | None = None,
        problem: Problem | None = None,
        carried: Carried | None = None,
        answer: Callable[[], Awaitable[None]] | None = None,
    ) -> Decision:
        """Admit a CONNECT or an HTTP request, in the order of the module docstring. A request whose
        rules must read its body is refused here: adapters that can hold bodies call
        :meth:`admit_request`.

        ``answer``: for a CONNECT, what tells the client its tunnel is admitted (its ``200``), which
        this may call before the decision is recorded when the decision rests on no process (3a,
        7). The adapter must then close a tunnel whose returned decision is not an allow."""
        outcome = await self.admit_request(
            conn, request, credential=credential, problem=problem, carried=carried, answer=answer
        )
        if isinstance(outcome, BodyNeeded):
            request = self._attributed(conn, request)
            policy = self.policy_for(conn)
            decision = await self._process(conn, policy, request, decide(request, policy))
            decision = self._credentials(conn, decision, carried)
            return self._finish(conn, request, decision, 0.0)
        return outcome

    async def admit_request(
        self,
        conn: Connection,
        request: Request,
        *,
        credential: str | None = None,
        problem: Problem | None = None,
        carried: Carried | None = None,
        answer: Callable[[], Awaitable[None]] | None = None,
    ) -> Decision | BodyNeeded:
        """:meth:`admit`, or BODY_NEEDED (nothing recorded yet): hold the body, then call
        :meth:`admit_body` before anything of the request is sent upstream."""
        started = time.perf_counter()
        # (1) identity
        if not self._identify(conn, credential):
            request = self._attributed(conn, request)
            policy = self.policy_for(conn)
            return await self._refused(
                conn, refuse(request, policy, Reason.PROXY_AUTH_REQUIRED, SHARED_GATE_HINT)
            )
        request = self._attributed(conn, request)
        policy = self.policy_for(conn)
        # (3a) process: now, unless there is one to look up, its answer cannot change the decision
        # and the client may be answered before it is looked up
        if answer is not None and (
            request.kind is not Kind.CONNECT
            or conn.attributed
            or self.processes_of(conn) is None
            or self._bound.binds(policy)
        ):
            answer = None
        if answer is None:
            await self._attribute(conn)
        if conn.refusal is not None:  # the proven sandbox is over its own connection cap
            return await self._refused(conn, refuse(request, policy, *conn.refusal))
        if request.kind is Kind.REQUEST and (conn.tunnel is None or not conn.inspected):
            detail = "a request inside a tunnel that was not admitted for inspection"
            return await self._refused(conn, refuse(request, policy, Reason.UNSUPPORTED, detail))
        # (2) framing
        if problem is not None:
            return await self._refused(conn, refuse(request, policy, problem[0], problem[1]))
        # (3) policy, with the request step
        outcome = decide_request(request, policy)
        if isinstance(outcome, BodyNeeded):
            return BODY_NEEDED
        # (3a) process
        outcome = await self._process(conn, policy, request, outcome)
        # (3b) credentials
        outcome = self._credentials(conn, outcome, carried)
        return await self._from_destination(conn, request, outcome, started, policy, answer)

    async def _refused(self, conn: Connection, decision: Decision) -> Decision:
        """(7) a refusal before the policy step, recorded with its process (3a)."""
        await self._attribute(conn)
        return self.emitter.emit(decision)

    async def admit_body(
        self, conn: Connection, request: Request, *, carried: Carried | None = None
    ) -> Decision:
        """Step (3) again for a request whose body is now held (``request.http.body``, or
        ``body_overflow``), then steps 4-8. Identity and framing were admitted with its head."""
        started = time.perf_counter()
        request = self._attributed(conn, request)
        if request.http is None or not request.http.body_read:
            raise ValueError("admit_body needs a request whose body was read")
        # (3) policy, with the body: decide() refuses anything that still wants more.
        policy = self.policy_for(conn)
        decision = decide(request, policy)
        decision = await self._process(conn, policy, request, decision)  # (3a) process
        # (3b) credentials, with the held body
        decision = self._credentials(conn, decision, carried)
        return await self._from_destination(conn, request, decision, started, policy)

    def _credentials(
        self, conn: Connection, decision: Decision, carried: Carried | None
    ) -> Decision:
        """(3b) credentials: a use names the credential; a misuse refuses, in any mode."""
        declared = self.credentials() if self.credentials is not None else None
        if declared is None or not declared.issued:
            return decision
        upgrade = (
            decision.kind in (Kind.REQUEST, Kind.HTTP)
            and carried is not None
            and asks_upgrade(carried.headers)
        )
        if upgrade and decision.decision is not Verdict.DENY:
            bound = declared.bound_to(_bare(decision.host), conn.sandbox_id)
            if bound:
                # Its messages are not read, so what the service sends back over it (a value it
                # kept from an earlier request, on any of its ports) could not be scrubbed, as a
                # response is.
                where = join_authority(decision.host, decision.port or 443)
                return decision.with_(
                    decision=Verdict.DENY,
                    reason=Reason.CREDENTIAL_MISUSE,
                    detail=f"no protocol upgrade to {where}, where credential '{bound[0]}' is "
                    "bound: what comes back over it could not be scrubbed of the real value",
                    credential=",".join(bound),
                )
        # The host itself (a CONNECT's too) is searched as well: a placeholder is never a name.
        carried = replace(carried or Carried(target=""), authority=decision.host)
        found = declared.scan(carried)
        if not found:
            return decision
        try:
            judged = judge(
                declared,
                found,
                kind=decision.kind,
                host=_bare(decision.host),
                port=decision.port,
                method=decision.method,
                target=carried.target,
                sandbox_id=conn.sandbox_id,
                headers=carried.headers,
                body=carried.body,
            )
        except Exception:  # a credential step that fails never lets a placeholder through
            log.exception("the credential step failed for %s", decision.id)
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.CREDENTIAL_MISUSE,
                detail="the request carries a credential placeholder the gate could not judge",
            )
        if judged is None:
            return decision
        if judged.misuse:
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.CREDENTIAL_MISUSE,
                detail=judged.detail,
                credential=judged.label,
            )
        if decision.decision is Verdict.REPORT:
            # Only reported (enforce mode would refuse it): it may proceed for the trial, but never
            # with the real value - report mode must not hand out a credential's authority for a
            # request the policy does not allow. The placeholder goes to its own host unchanged.
            return decision.with_(
                detail=f"{decision.detail}; credential {judged.label} not added: the request is "
                "only reported"
            )
        return decision.with_(credential=judged.label)

    def credential_body(self, conn: Connection, admitted: Decision, body: bytes) -> Decision | None:
        """(3b) for a body buffered after its request was admitted at the head (no rule held it):
        a refusal, recorded as a decision of its own, when the body carries a placeholder (no
        credential is ever sent in a body); else None. Nothing of the request was sent yet."""
        decision = self._credentials(conn, admitted, Carried(target="/", body=body))
        if decision.allowed:
            return None
        return self.emitter.emit(decision.with_(id=new_id(), ts=time.time()))

    async def _from_destination(
        self,
        conn: Connection,
        request: Request,
        decision: Decision,
        started: float,
        decided: Policy,
        answer: Callable[[], Awaitable[None]] | None = None,
    ) -> Decision:
        """Steps 4-8 for ``decision``, under the policy ``decided`` it was made under (a policy
        reloaded since is met before the record: steps 6 and 7)."""
        policy = decided
        # (4) destination and (5) self; a request inside a tunnel goes where the tunnel is pinned.
        if request.kind is Kind.REQUEST:
            tunnel = conn.tunnel
            if _screened(decision) and tunnel is not None:
                decision = decision.with_(address=tunnel.address)
        elif _screened(decision) and request.port is not None:
            decision = await self._destination(decision, request.port, policy)
        # (6) ask
        asked = decision.decision is Verdict.ASK
        if asked:
            await self._attribute(conn)  # (3a) the question names the process that asks
            decision = await self._ask(decision, policy, request)
            started = 0.0  # a person's wait is not decision latency
            if decision.allowed:
                decision = await self._reloaded_while_held(conn, request, decision, policy)
        answering = False
        try:
            if answer is not None:
                # An admitted tunnel is answered before its process is looked up (3a): the lookup
                # runs while the client prepares its first bytes, decided after this record.
                if (
                    decision.allowed
                    and decision.address is not None
                    and request.port is not None
                    and not self._inspects(self.policy_for(conn), decision, request.port)
                ):
                    answering = True
                    await answer()
                await self._attribute(conn)
            if decision.allowed:
                decision = await self._reloaded_while_admitted(
                    conn, request, decision, decided, asked=asked
                )
        except asyncio.CancelledError:
            if answering:  # the client may have its 200: what was decided is recorded
                try:
                    self._finish(conn, request, decision, 0.0)
                except Exception:
                    log.exception("recording %s as its admission was cancelled", decision.id)
            raise
        return self._finish(conn, request, decision, started)

    async def _reloaded_while_admitted(
        self,
        conn: Connection,
        request: Request,
        decision: Decision,
        decided: Policy,
        *,
        asked: bool = False,
    ) -> Decision:
        """(3, 3a) a policy reloaded while the request was being admitted (its destination was
        resolved, its process looked up): a reload's recheck cannot see a tunnel not yet
        admitted, so the allow stands only if the policy now in force allows the request too
        (an ``ask`` there asks on a new request). An answer to an ask stands as step 6 says
        (``asked``: answered under ``decided``; a reload while its tunnel was answered meets it
        here)."""
        for attempt in range(3):
            now = self.policy_for(conn)
            if now is decided:
                break
            # The last time without a wait, so no reload can come between it and the record.
            if asked:
                again = await self._reloaded_while_held(
                    conn, request, decision, decided, wait=attempt < 2
                )
                if not again.allowed:
                    return again
                decided = now
                continue
            again = await self._process(conn, now, request, decide(request, now), wait=attempt < 2)
            if again.allowed:  # (4) the pinned address, screened against the ranges now open
                again = still_open(again, decision.address, request.port, now.allow_internal)
            if not again.allowed:
                if again.decision is Verdict.ASK:
                    again = again.with_(decision=Verdict.DENY, reason=Reason.APPROVAL_UNAVAILABLE)
                return again.with_(
                    detail=f"{again.detail}; the policy was reloaded while this request was "
                    "admitted, and the policy now in force does not allow it"
                )
            decided = now
        return decision

    async def _reloaded_while_held(
        self,
        conn: Connection,
        request: Request,
        answer: Decision,
        asked: Policy,
        *,
        wait: bool = True,
    ) -> Decision:
        """(6) a policy reloaded while the request was held: the answer was given under the old
        policy, so it stands only where the policy now in force allows the request, or still asks
        the question that was answered: the same rule, answerable by the same reviewers (steps 3
        and 3a again). Otherwise the request is refused: a new policy's refusal, or an ask rule
        the answer was not given to (one the reviewer may no longer answer, say)."""
        now = self.policy_for(conn)
        if now is asked:
            return answer
        again = await self._process(conn, now, request, decide(request, now), wait=wait)
        if again.allowed:
            return answer
        if again.decision is Verdict.ASK:
            if again.rule == answer.rule and _review(asked, answer.rule) == _review(
                now, again.rule
            ):
                return answer
            again = again.with_(decision=Verdict.DENY, reason=Reason.APPROVAL_UNAVAILABLE)
        return again.with_(
            approval=answer.approval,
            decided_by=answer.decided_by,
            grant=answer.grant,
            detail=f"{again.detail}; the policy was reloaded while this request was held for "
            "approval, and the approval does not answer the policy now in force",
        )

    def _finish(
        self, conn: Connection, request: Request, decision: Decision, started: float
    ) -> Decision:
        # (7) audit
        decision = self.emitter.emit(decision)
        if self.observer is not None and started:
            self.observer.observe_latency(request.kind, time.perf_counter() - started)
        # (8) pin
        if decision.allowed and request.port is not None and request.kind is not Kind.REQUEST:
            if decision.address is not None:
                conn.pin(decision.host, request.port, decision.address)
            if request.kind is Kind.CONNECT:  # without an address (a dry run), nothing is dialled
                conn.tunnel = decision
                conn.inspected = self._inspects(self.policy_for(conn), decision, request.port)
        return decision

    def _start_lookup(
        self, conn: Connection, *, walk: bool = True, every_owner: bool = False
    ) -> None:
        """(3a) the lookup, done at once when the sandbox's processes are already known (a few
        /proc reads, cheaper than a hand-off to a thread), else started in a worker thread, off the
        event loop, as it walks the process tree (:meth:`_attribute` awaits it); not at all then
        without ``walk``. ``every_owner``: a search for every owner, always in the worker."""
        processes = self.processes_of(conn)
        if processes is None or conn.peer is None or conn.attributed or conn.lookup is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): looked up when the first request comes
        if every_owner:
            search = functools.partial(processes.attribute, conn.peer, every_owner=True)
            conn.lookup = loop.run_in_executor(self._pool(conn), search)
            return
        # An executable's file identity is read only where a rule bound to executables may check
        # it: on a connection opened under a policy that binds one (watched); elsewhere the answer
        # is evidence, which names the executable by its path.
        try:
            conn.process = processes.attribute_now(conn.peer, identity=conn.watched)
        except BlockingIOError:
            if walk:
                search = functools.partial(processes.attribute, conn.peer, identity=conn.watched)
                conn.lookup = loop.run_in_executor(self._pool(conn), search)
            return
        except Exception:
            log.exception("attributing %s failed", conn.peer)
            conn.process = None
        conn.attributed = True
        _remember(processes, conn)

    def start_lookups(self, warm: Callable[[], None]) -> None:
        """Start the lookup thread now and do ``warm`` (what the first lookup would do first) on
        the event loop at its next turn: a gate that starts with its command would otherwise do
        both in its first connection's lookup, which that connection's first decision waits
        for. On the loop, not in the thread: pure Python there would hold the interpreter lock
        against the loop for up to its switch interval at a time."""
        self._pool().submit(int)
        asyncio.get_running_loop().call_soon(warm)

    def _pool(self, conn: Connection | None = None) -> concurrent.futures.ThreadPoolExecutor:
        """One thread for every lookup: they are /proc system calls, which gain nothing from
        running side by side on a gate's few cores, while several threads contending with the event
        loop for the interpreter lock cost a hand-off on every call. On a gate serving several
        sandboxes, one thread per sandbox (:meth:`release_sandbox` ends it)."""
        sandbox = conn.sandbox_id if conn is not None else None
        if sandbox is not None and sandbox in self.sandbox_processes:
            pool = self._sandbox_pools.get(sandbox)
            if pool is None:
                pool = self._sandbox_pools[sandbox] = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"egress-attribution-{sandbox}"
                )
            return pool
        if self._lookup_pool is None:
            self._lookup_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="egress-attribution"
            )
        return self._lookup_pool

    async def _attribute(self, conn: Connection) -> None:
        """(3a) once per connection, before its first decision is recorded: the process that owns
        its client socket, where the gate can see the sandbox's processes. Kept on the connection
        (and, for evidence, by peer). A lookup that fails leaves the process unknown."""
        processes = self.processes_of(conn)
        if processes is None or conn.attributed or conn.peer is None:
            return
        self._start_lookup(conn)
        if conn.attributed:
            return
        lookup, conn.lookup = conn.lookup, None
        try:
            if lookup is None:
                search = functools.partial(processes.attribute, conn.peer, identity=conn.watched)
                lookup = asyncio.get_running_loop().run_in_executor(self._pool(conn), search)
            conn.process = await lookup
        except Exception:
            log.exception("attributing %s failed", conn.peer)
            conn.process = None
        conn.attributed = True
        _remember(processes, conn)

    async def _process(
        self,
        conn: Connection,
        policy: Policy,
        request: Request,
        decision: Decision,
        *,
        wait: bool = True,
    ) -> Decision:
        """(3a) a rule bound to executables lets through only their processes: every process that
        holds the socket, so the lookup that stopped at the first owner is completed here, once.
        A report under a managed ceiling is held to the managed rule's executables. Without
        ``wait``, nothing is awaited: a search not yet completed refuses."""
        held = bindings(self._bound, policy, request, decision)
        if not held:
            return decision
        if not conn.watched and self.processes_of(conn) is not None:
            # Opened under a policy that bound nothing: its owner as it opened was never looked
            # up, and a socket handed over since would pass as the bound program's (threat 19).
            refused = check_bindings(decision, held, None)
            if refused is decision:
                return decision
            return refused.with_(
                detail=f"{refused.detail}: the connection opened before the policy bound the "
                "rule to executables, so its process was not looked up as it opened; a new "
                "connection will be"
            )
        if conn.owners is not None:  # searched for this connection already: the same owners
            return check_bindings(decision, held, conn.bound_owners())
        process = conn.bound_owners()  # the lookup's answer (never looked up: unknown, refused)
        earlier = process  # as the connection opened: its owner then still counts
        processes = self.processes_of(conn)
        if not wait:
            return check_bindings(decision, held, process)
        # Searched again now, whether or not the search as it opened was complete: a holder that
        # came since counts too (every owner either search saw must run a bound file).
        if process is not None and processes is not None:
            peer = conn.peer or ""
            try:
                process = await asyncio.get_running_loop().run_in_executor(
                    self._pool(conn),
                    functools.partial(processes.attribute, peer, every_owner=True),
                )
            except Exception:
                log.exception("attributing %s failed", peer)
                process = None
            conn.process = process
            _remember(processes, conn)
        conn.owners = every_owner_seen(earlier, process)
        return check_bindings(decision, held, conn.owners)

    def may_inspect(self, conn: Connection, host: str, port: int) -> bool:
        """Whether a CONNECT to ``host:port`` on ``conn`` could be inspected: by the connection's
        policy or, while a credential may still name its sandbox, by any sandbox's policy. (Lets a
        front end that only relays leave such tunnels to an adapter that reads requests.)"""
        try:
            name = canonical_host(host)
        except InvalidHost:
            return False  # refused by the policy step, by whoever takes it
        if not isinstance(name, str):
            return False
        policies = [self.policy_for(conn)]
        if conn.policy is None and not conn.authenticated and self.identities is not None:
            policies += [policy() for policy in self.connections.sandbox_policies.values()]
        return any(policy.index.request_rules(name, port) is not None for policy in policies)

    @staticmethod
    def _inspects(policy: Policy, decision: Decision, port: int) -> bool:
        """(3, at CONNECT) the tunnel's requests are read when any rule for its host and port reads
        requests; decided once, for the tunnel's life."""
        try:
            host = canonical_host(decision.host)
        except InvalidHost:
            return False
        if not isinstance(host, str):
            return False
        return policy.index.request_rules(host, port) is not None

    async def _ask(self, decision: Decision, policy: Policy, request: Request) -> Decision:
        """(6) ask: the approver's answer, or a refusal whenever there is none to be had."""
        if self.approvals is None:
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_UNAVAILABLE,
                detail=f"{decision.detail}; this gate has no approvals configured, so no one "
                "can answer",
            )
        rule = policy.rule(decision.rule)
        try:
            head = request.http
            answer = await self.approvals.answer(
                decision,
                rule,
                self.emitter.emit,
                methods=judged_methods(head) if head is not None else (),
                query=_exact_query(request),
                body=head.body if head is not None else None,
                runs=_runs(request),
                fields=_sent_fields(request),
                unread=_unread(head),
            )
        except Exception as exc:  # a failing approver never lets anything through
            log.exception("approval of %s failed", decision.id)
            answer = decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_UNAVAILABLE,
                detail=f"the approval could not be completed: {type(exc).__name__}",
            )
        if answer.decision is Verdict.ASK or (answer.host, answer.port, answer.kind) != (
            decision.host,
            decision.port,
            decision.kind,
        ):
            # Unresolved, or an answer about something else: never enforce it as an allow.
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.APPROVAL_UNAVAILABLE,
                detail="the approval returned no answer for this request",
            )
        return answer

    def _identify(self, conn: Connection, credential: str | None) -> bool:
        if self.identities is None:
            return True
        if credential is None:
            # Plain HTTP carries the credential on every request (as Basic proxy auth does);
            # requests inside a CONNECT tunnel inherit the identity the CONNECT proved.
            return conn.authenticated or (conn.tunnel is not None and conn.sandbox_id is not None)
        sandbox = self.identities.authenticate(credential)
        if sandbox is None:
            return False
        if conn.sandbox_id is not None and conn.sandbox_id != sandbox.id:
            return False  # one connection, one identity: no switching mid-connection
        self.connections.identified(conn, sandbox.id)
        return True

    @staticmethod
    def _attributed(conn: Connection, request: Request) -> Request:
        if request.client == conn.peer and request.sandbox_id == conn.sandbox_id:
            return request
        return Request(
            request.kind,
            request.host,
            request.port,
            request.method,
            request.path,
            request.sni,
            conn.peer,
            conn.sandbox_id,
            request.qtype,
            request.http,
            request.query,
            request.fields,
        )

    async def _destination(self, decision: Decision, port: int, policy: Policy) -> Decision:
        try:
            dest = await self.destinations.destination(
                canonical_host(decision.host), port, policy.allow_internal
            )
        except DestinationRefused as exc:
            return exc.refusing(decision)
        except InvalidHost as exc:  # the engine canonicalised already; never trust that silently
            return decision.with_(
                decision=Verdict.DENY, reason=Reason.INVALID_HOST, detail=str(exc)
            )
        if dest.address is None:
            return decision
        if self.own is not None and self.own.is_self(dest.address, port):
            return decision.with_(
                decision=Verdict.DENY,
                reason=Reason.INTERNAL_ADDRESS,
                address=dest.address,
                detail=f"{join_authority(dest.address, port)} is this gate's own listener",
            )
        return decision.with_(address=dest.address)

    # -- tunnels ----------------------------------------------------------------------------------

    def admit_tunnel(self, conn: Connection, first: FirstBytes) -> Decision | None:
        """Decide a tunnel's first bytes; None means relay without a further decision (SSH banner,
        or HTTP whose requests are decided one by one). Call only with a settled classification."""
        tunnel = conn.tunnel
        if tunnel is None:
            raise ValueError("admit_tunnel needs an admitted CONNECT")
        if first.protocol is FirstProtocol.HTTP or (
            first.protocol is FirstProtocol.SSH and not conn.inspected
        ):
            return None
        request = Request(
            kind=Kind.TLS,
            host=tunnel.host,
            port=tunnel.port,
            sni=first.sni,
            client=conn.peer,
            sandbox_id=conn.sandbox_id,
        )
        policy = self.policy_for(conn)
        if first.protocol is FirstProtocol.TLS:
            decision = decide(request, policy)
            if decision.decision is Verdict.ASK:
                # The CONNECT was answered already: its ClientHello is checked for the name only.
                decision = decision.with_(
                    decision=tunnel.decision,
                    reason=tunnel.reason,
                    approval=tunnel.approval,
                    decided_by=tunnel.decided_by,
                    grant=tunnel.grant,
                )
            if decision.allowed:
                decision = decision.with_(address=tunnel.address)
        elif first.protocol is FirstProtocol.SSH:
            detail = "this tunnel's requests are inspected, so it must carry TLS, not SSH"
            decision = refuse(request, policy, Reason.NOT_TLS, detail, rule=tunnel.rule)
        else:
            reason = first.reason or Reason.NOT_TLS
            decision = refuse(request, policy, reason, first.detail, rule=tunnel.rule)
        decision = self.emitter.emit(decision)
        if not decision.allowed:
            conn.forget_destinations()
        return decision

    def refuse_upstream(self, conn: Connection, detail: str) -> Decision:
        """The upstream of an inspected tunnel failed TLS verification: recorded as a refusal, and
        nothing more is dialled for this connection (there is no fallback to passthrough)."""
        tunnel = conn.tunnel
        request = Request(
            kind=Kind.TLS,
            host=tunnel.host if tunnel else "-",
            port=tunnel.port if tunnel else None,
            client=conn.peer,
            sandbox_id=conn.sandbox_id,
        )
        rule = tunnel.rule if tunnel else None
        decision = refuse(
            request, self.policy_for(conn), Reason.UPSTREAM_TLS_FAILED, detail, rule=rule
        )
        conn.forget_destinations()
        return self.emitter.emit(decision)

    def refuse_switch(self, conn: Connection, request: Request, detail: str) -> Decision:
        """An upstream switched protocols where :func:`proxy.core.switching.switch_problem` says
        it must not: recorded as a refusal of ``request`` (already admitted), whose connection the
        adapter closes before the switch. Always DENY, in report mode too."""
        request = self._attributed(conn, request)
        return self.emitter.emit(refuse(request, self.policy_for(conn), Reason.UNSUPPORTED, detail))

    # -- the dial ---------------------------------------------------------------------------------

    @staticmethod
    def dial_target(conn: Connection, host: str, port: int) -> str | None:
        """The address to dial for ``host:port`` on this connection, or None: not admitted."""
        key = _dial_key(host)
        if key is None:
            return None
        pinned = conn.pinned.get((key, port))
        if pinned is not None:
            return pinned
        if (key, port) in conn.checked:
            return key
        return None


def _remember(processes: Processes | None, conn: Connection) -> None:
    """(3a) the connection's process, kept by its peer for its decisions' evidence, unless the
    connection has closed meanwhile: a lookup that ends after its connection closed is never kept
    (nothing would forget it, and a later connection from that address would be named by it)."""
    if processes is not None and conn.peer is not None and not conn.closed:
        processes.remember(conn.peer, conn.process, conn)


def _runs(request: Request) -> str | None:
    """What a GraphQL request runs, read as its server reads it (the URL's documents, then a body
    declared JSON): None when that cannot be told (no document, or a held body of another type,
    which a server may read as a form carrying a document of its own)."""
    head = request.http
    if head is None:
        return None
    from proxy.core.bodies import graphql_documents, graphql_summary, is_json
    from proxy.core.requests import url_documents

    in_url = url_documents(head.target)
    if in_url is None:
        return None
    if head.body is None:
        # no body, or one the gate did not hold (not read by any rule, too long, of unknown
        # size): a body it did not read may carry a document of its own
        if head.body_size != 0 or head.body_overflow or not in_url:
            return None
    elif not is_json(head.content_type) or head.content_encoding is not None:
        return None
    documents = graphql_documents(head.body, in_url)
    return None if documents is None else graphql_summary(documents)


def _unread(head: HttpHead | None) -> int | None:
    """The size of a body the gate did not hold (None: unknown, as a chunked one), or 0 when it
    held the body or the request has none. A WebSocket handshake counts as one of unknown size:
    the messages of each channel it opens are not read either."""
    if head is None or head.body is not None:
        return 0
    return None if head.websocket else head.body_size


def _sent_fields(request: Request) -> Sequence[tuple[bytes, bytes]] | None:
    """What an HTTP request sent beside its target, for its approval; a request whose adapter did
    not say is given a field no other request has (it joins no approval)."""
    if request.http is None:
        return None
    if request.fields is None:
        return ((b":unstated", secrets.token_bytes(16)),)
    return request.fields


def _exact_query(request: Request) -> str | None:
    """The request's query as it was sent (None when its target has no ``?``)."""
    if request.http is None:
        return None
    _, mark, query = request.http.target.partition("?")
    return query if mark else None


@functools.lru_cache(maxsize=4096)
def _dial_key(host: str) -> str | None:
    """The canonical spelling ``dial_target`` looks ``host`` up by (None: not a valid host); a
    pure function of the host, asked on every request of a kept-alive connection."""
    try:
        target = canonical_host(host)
    except InvalidHost:
        return None
    return target if isinstance(target, str) else str(target)


def _bare(host: str) -> str:
    """The canonical form of a decision's host (as bindings store it); an invalid one as it is."""
    key = _dial_key(host)
    return host if key is None else key


def _review(policy: Policy, rule: str | None) -> str | None:
    """Who may answer the ``ask`` rule named ``rule`` in ``policy`` (None: no such rule)."""
    found = policy.rule(rule)
    return str(found.review) if found is not None else None


def _screened(decision: Decision) -> bool:
    """Decisions whose destination is resolved and screened: allows, and asks (before anyone is
    asked, so that a grant can never reach an address the gate refuses)."""
    return decision.allowed or decision.decision is Verdict.ASK


__all__ = [
    "Approver",
    "Authenticator",
    "Checkpoint",
    "DecisionSink",
    "Destinations",
    "SelfCheck",
]
