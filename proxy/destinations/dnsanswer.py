"""What the DNS gate answers: each query decided, and a name the policy does not allow never queried.


DNS is a channel out of the sandbox even when no connection is allowed: ``<data>.attacker.example``
reaches the attacker's name server through any recursive resolver. So a name is decided *before*
anything is sent upstream, and a name the policy does not allow never produces an upstream query.

Answers, by case (every query is exactly one decision, emitted through the shared ``Emitter``; the
*returned* decision is enforced):

- A/AAAA for an allowed name: resolved upstream through :class:`proxy.destinations.resolver.Resolver`, every address
  checked against the internal ranges (unless ``allow_internal`` opens them); internal addresses are
  removed; TTLs clamped to the resolver's floor and ceiling. The answer is flattened to address records
  owned by the question name: CNAME targets are not revealed and need no decision of their own.
- A name the policy does not allow: **NXDOMAIN**, no upstream query. NXDOMAIN rather than REFUSED
  because stub resolvers fail fast and cache it, while REFUSED makes glibc and others retry other
  servers and report a temporary failure that agents retry in a loop.
- Only internal addresses: NOERROR with an empty answer (NODATA) and a deny ``internal-address``.
  NODATA rather than NXDOMAIN because the name does exist and its other address family may be fine.
- HTTPS/SVCB/CNAME for an allowed name: NODATA, no upstream query. HTTPS/SVCB records carry ECH
  configurations (ECH is refused by the gate) and address hints that would bypass the A/AAAA check;
  a CNAME answer would name a host the policy never looked at. Clients fall back to A/AAAA.
- Any other type (TXT, ANY, NULL, MX, ...) or class: REFUSED, ``dns-type-refused``, no upstream query.
- Invalid names (bad labels, escapes, IP literals as names): REFUSED, ``invalid-host``.
- Upstream SERVFAIL/timeout: SERVFAIL and a deny ``dns-failure``; never a guess.
- Malformed packets: FORMERR when a header can be read, else dropped; responses and non-QUERY opcodes
  are dropped / NOTIMP. None of these reach upstream or carry a name to decide on.

The upstream query is built afresh by the resolver: only the question name and type leave the box,
never the client's id, flags or EDNS options (ECS, cookies, padding), which could carry data too.

When the query uses EDNS, refusals carry an Extended DNS Error (RFC 8914) with the decision id and
reason, so ``dig`` shows a human why. Sizes and concurrency are bounded (threat 13).

This module holds dnspython's side of the gate and is imported by :mod:`proxy.destinations.dnsgate`
at the first query, off the event loop: a sandbox that never resolves a name (its clients use the
proxy, which resolves for them) never pays for the import.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from proxy.core.decision import Decision, Kind, Reason, Request
from proxy.core.destination import screen
from proxy.core.engine import decide, refuse
from proxy.core.hosts import InvalidHost, canonical_host

if TYPE_CHECKING:
    from proxy.destinations.dnsgate import DnsGate

__all__ = ["Answerer"]

log = logging.getLogger(__name__)

ADDRESS_TYPES = {dns.rdatatype.A: "A", dns.rdatatype.AAAA: "AAAA"}
NODATA_TYPES = frozenset({dns.rdatatype.HTTPS, dns.rdatatype.SVCB, dns.rdatatype.CNAME})

# The answer a denied query gets, by reason; anything not listed (audit-unavailable, ...) is REFUSED.
_DENY_RCODE = {
    Reason.NO_MATCHING_RULE: dns.rcode.NXDOMAIN,
    Reason.DENIED_BY_RULE: dns.rcode.NXDOMAIN,
    Reason.PORT_NOT_ALLOWED: dns.rcode.NXDOMAIN,
    Reason.INTERNAL_ADDRESS: dns.rcode.NOERROR,  # empty answer
    Reason.DNS_FAILURE: dns.rcode.SERVFAIL,
}
_EDE_CODE = {
    Reason.DNS_FAILURE: dns.edns.EDECode.NETWORK_ERROR,
    Reason.DNS_TYPE_REFUSED: dns.edns.EDECode.NOT_SUPPORTED,
    Reason.INVALID_HOST: dns.edns.EDECode.OTHER,
}
_EDE_TEXT_MAX = 300


class Answerer:
    """Answers the queries a :class:`~proxy.destinations.dnsgate.DnsGate` receives, with the gate's
    policy, resolver, emitter and sandbox as they are at each query."""

    def __init__(self, gate: DnsGate) -> None:
        self._gate = gate

    async def handle(self, wire: bytes, client: str, transport: str) -> bytes | None:
        """Answer one query in wire format (its size already bounded by the gate); None means send
        nothing (unparseable or not a query)."""
        if not _one_question(wire):
            return _formerr(wire)
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            return None  # a response: answering it could start a loop between two servers
        if query.opcode() != dns.opcode.QUERY:
            return _finish(_response(query, dns.rcode.NOTIMP), query, transport)
        if len(query.question) != 1:
            return _finish(_response(query, dns.rcode.FORMERR), query, transport)
        try:
            response = await self._answer(query, client)
        except Exception:  # fail closed: a bug answers SERVFAIL, never an unchecked answer
            log.exception("DNS gate failed on a query from %s", client)
            response = _response(query, dns.rcode.SERVFAIL)
        return _finish(response, query, transport)

    async def _answer(self, query: dns.message.Message, client: str) -> dns.message.Message:
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        policy = self._gate.policy()
        raw = question.name.to_text(omit_final_dot=True)
        request = Request(
            kind=Kind.DNS, host=raw, qtype=qtype, client=client, sandbox_id=self._gate.sandbox_id
        )
        try:
            target = canonical_host(raw)
            if not isinstance(target, str):
                raise InvalidHost(f"{target} is an IP address, not a name to resolve")
        except InvalidHost as exc:
            return self._refused(query, refuse(request, policy, Reason.INVALID_HOST, str(exc)))
        request = Request(
            kind=Kind.DNS, host=target, qtype=qtype, client=client, sandbox_id=self._gate.sandbox_id
        )
        if question.rdclass != dns.rdataclass.IN:
            detail = f"DNS class {dns.rdataclass.to_text(question.rdclass)} is not answered"
            return self._refused(query, refuse(request, policy, Reason.DNS_TYPE_REFUSED, detail))
        if question.rdtype not in ADDRESS_TYPES and question.rdtype not in NODATA_TYPES:
            detail = f"DNS {qtype} queries are refused; only A and AAAA are answered"
            return self._refused(query, refuse(request, policy, Reason.DNS_TYPE_REFUSED, detail))

        decision = decide(request, policy)
        others = self._gate.also() if self._gate.also is not None else []
        for other in others:  # a shared listener: every policy the asker may be under
            if not decision.allowed:
                break
            refusal = decide(request, other)
            if not refusal.allowed:
                decision = refusal.with_(
                    detail=f"{refusal.detail}; this DNS listener is shared by sandboxes, so a "
                    f"name is answered only where every one of their policies allows it "
                    f"(policy {other.version})"
                )
        if not decision.allowed:
            return self._refused(query, decision)  # no upstream query for names not allowed
        rdtype_text = ADDRESS_TYPES.get(question.rdtype)
        if rdtype_text is None:  # HTTPS / SVCB / CNAME: see the module docstring
            emitted = self._gate.emitter.emit(
                decision.with_(detail=f"{target} allowed; {qtype} answered empty (A/AAAA only)")
            )
            return _response(query) if emitted.allowed else self._deny_response(query, emitted)

        lookup = await self._gate.resolver.lookup(target, "A" if rdtype_text == "A" else "AAAA")
        if lookup.failure is not None:
            refusal = refuse(
                request,
                policy,
                Reason.DNS_FAILURE,
                f"resolving {target} {qtype} failed: {lookup.failure}",
                rule=decision.rule,
            )
            return self._refused(query, refusal)
        good, bad = screen(lookup.addresses, policy.allow_internal)
        for other in others:  # an internal range only one of them opens is no one's answer
            good, more = screen(good, other.allow_internal)
            bad += more
        if bad and not good:
            address, why = bad[0]
            refusal = refuse(
                request,
                policy,
                Reason.INTERNAL_ADDRESS,
                f"{target} resolves to {address} ({why})",
                rule=decision.rule,
            ).with_(address=address)
            return self._refused(query, refusal)
        if bad:
            removed = ", ".join(f"{a} ({why})" for a, why in bad)
            decision = decision.with_(
                detail=f"{decision.detail}; internal answers removed: {removed}"
            )
        emitted = self._gate.emitter.emit(decision)
        if not emitted.allowed:
            return self._deny_response(query, emitted)
        response = _response(query, dns.rcode.NXDOMAIN if lookup.nxdomain else dns.rcode.NOERROR)
        if good:
            ttl = int(
                min(max(lookup.ttl, self._gate.resolver.min_ttl), self._gate.resolver.max_ttl)
            )
            rrset = dns.rrset.from_text_list(
                question.name,
                ttl,
                dns.rdataclass.IN,
                question.rdtype,
                good[: self._gate.max_answers],
            )
            response.answer.append(rrset)
        return response

    def _refused(self, query: dns.message.Message, decision: Decision) -> dns.message.Message:
        """Emit a deny and answer it. Emitting can only make a decision stricter, so the denial
        stands whatever comes back; the returned one names the reason actually recorded."""
        emitted = self._gate.emitter.emit(decision)
        return self._deny_response(query, emitted if not emitted.allowed else decision)

    def _deny_response(self, query: dns.message.Message, decision: Decision) -> dns.message.Message:
        rcode = _DENY_RCODE.get(decision.reason, dns.rcode.REFUSED)
        response = _response(query, rcode)
        if query.edns >= 0:
            code = _EDE_CODE.get(decision.reason, dns.edns.EDECode.BLOCKED)
            text = f"egress {decision.reason} ({decision.id}): {decision.detail or ''}"
            text = text[:_EDE_TEXT_MAX].encode("ascii", "backslashreplace").decode("ascii")
            response.use_edns(0, payload=1232, options=[dns.edns.EDEOption(code, text)])
        return response


def _response(query: dns.message.Message, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    response = dns.message.make_response(query, recursion_available=True, our_payload=1232)
    response.set_rcode(dns.rcode.Rcode(rcode))
    return response


def _finish(response: dns.message.Message, query: dns.message.Message, transport: str) -> bytes:
    """Wire form within the client's size limit; too big for UDP means TC set and no answer."""
    limit = 65535
    if transport == "udp":
        limit = max(512, min(query.payload, 4096)) if query.edns >= 0 else 512
    try:
        return bytes(response.to_wire(max_size=limit))
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return bytes(response.to_wire(max_size=limit))


def _one_question(wire: bytes) -> bool:
    """Whether the header counts what a query holds: one question, no answer or authority records,
    at most one additional (EDNS's OPT). Read before the message is parsed: dnspython reads every
    record a message counts, and a 4 KiB "query" can carry hundreds (each named by a two-byte
    pointer to a 253-character name: ~70 ms of the event loop, where a query takes ~0.1 ms)."""
    if len(wire) < 12:
        return True  # (too short to count anything: parsed, and refused, as it is)
    return (
        wire[4:6] == b"\x00\x01"
        and wire[6:10] == b"\x00\x00\x00\x00"
        and int.from_bytes(wire[10:12], "big") <= 1
    )


def _formerr(wire: bytes) -> bytes | None:
    """FORMERR echoing the query id, when there is a header to echo and it is not a response."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR
    response.set_rcode(dns.rcode.FORMERR)
    return bytes(response.to_wire())
