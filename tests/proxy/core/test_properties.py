"""Properties of canonicalisation and matching over generated input: no input is both invalid and
allowed, and every spelling of one destination decides alike."""

from __future__ import annotations

import functools
import ipaddress
import tempfile
import textwrap
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy

POLICY = """
version: 1
rules:
  - name: names
    hosts: [pypi.org, "*.example.test", "**.tree.test"]
  - name: nets
    cidrs: [203.0.113.0/24, "2001:db8::/32"]
  - name: no-git
    action: deny
    hosts: [git.example.test]
"""


@functools.cache
def policy() -> Policy:
    """Loaded once: hypothesis runs each test body hundreds of times."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "p.yaml"
        path.write_text(textwrap.dedent(POLICY))
        return load_policy(path)


HOSTISH = st.text(
    alphabet=st.sampled_from(
        list("abcdefgpiory.-_:[]%@0123456789xXTESTÜß\u3002\uff0e\x00\r\n \t*")
    ),
    max_size=40,
)


@settings(max_examples=1500)
@given(HOSTISH)
def test_no_input_is_both_invalid_and_allowed(raw: str) -> None:
    decision = decide(Request(Kind.CONNECT, raw, 443), policy())
    try:
        canonical_host(raw)
    except InvalidHost:
        assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.INVALID_HOST)
        return
    if decision.decision is Verdict.ALLOW:
        assert decision.rule in ("names", "nets")


@settings(max_examples=800)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_spelling_decides_alike(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    a, b, c, d = address.packed
    spellings = [
        str(address),
        str(value),
        hex(value),
        f"0{value:o}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
        f"[::ffff:{address}]",
    ]
    results = {
        (d.decision, d.reason, d.rule, d.host)
        for d in (decide(Request(Kind.CONNECT, s, 443), policy()) for s in spellings)
    }
    assert len(results) == 1, results


@settings(max_examples=800)
@given(
    st.lists(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4
    ),
    st.sampled_from(["example.test", "tree.test", "pypi.org", "other.test"]),
)
def test_case_and_trailing_dots_decide_alike(labels: list[str], base: str) -> None:
    name = ".".join([*labels, base])
    spellings = [name, name.upper(), name + ".", name.title(), name.swapcase() + "."]
    results = {
        (d.decision, d.reason, d.rule, d.host)
        for d in (decide(Request(Kind.CONNECT, s, 443), policy()) for s in spellings)
    }
    assert len(results) == 1, results


@settings(max_examples=800)
@given(st.from_regex(r"[a-z]{1,8}", fullmatch=True))
def test_suffix_traps_never_match(label: str) -> None:
    for trap in (
        f"pypi.org.{label}.test",
        f"{label}pypi.org",
        f"{label}example.test",
        f"tree.test{label}",
    ):
        decision = decide(Request(Kind.CONNECT, trap, 443), policy())
        assert decision.decision is Verdict.DENY, trap
