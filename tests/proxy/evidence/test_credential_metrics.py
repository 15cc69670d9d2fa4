"""Credential uses and misuse counted per declared name; nothing else becomes a label value."""

from __future__ import annotations

from proxy.core.decision import Reason, Verdict
from proxy.evidence.metrics import Metrics
from tests.proxy.evidence.test_metrics import dec, sample

NAME = "egress_credential_uses_total"


def test_uses_and_misuse_per_declared_name() -> None:
    m = Metrics()
    m.credentials_loaded(["github", "npm"])
    assert sample(m, NAME, credential="npm", outcome="misuse") == 0.0  # present from the start
    m.record(dec().with_(credential="github"))
    m.record(dec().with_(credential="github,npm"))
    m.record(dec(Verdict.DENY, reason=Reason.CREDENTIAL_MISUSE).with_(credential="npm"))
    m.record(dec(Verdict.DENY, reason=Reason.REQUEST_NOT_ALLOWED).with_(credential="github"))
    m.record(dec().with_(credential="forged\nname"))
    assert sample(m, NAME, credential="github", outcome="used") == 2.0
    assert sample(m, NAME, credential="npm", outcome="used") == 1.0
    assert sample(m, NAME, credential="npm", outcome="misuse") == 1.0
    assert sample(m, NAME, credential="github", outcome="refused") == 1.0
    assert sample(m, NAME, credential="other", outcome="used") == 1.0
    assert b"forged" not in m.exposition()
