"""Decisions are immutable records with one JSON form shared by every sink."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict


def test_to_dict_omits_unset_fields_and_renders_enums_as_strings() -> None:
    d = Decision(
        Verdict.REPORT, Reason.NO_MATCHING_RULE, None, Kind.HTTP, "h.test", 80, "v", "report"
    )
    out = d.to_dict()
    assert (
        out["decision"] == "report"
        and out["reason"] == "no-matching-rule"
        and out["kind"] == "http"
    )
    assert "rule" not in out and "sni" not in out
    assert set(out) == {
        "decision",
        "reason",
        "kind",
        "host",
        "port",
        "policy_version",
        "mode",
        "id",
        "ts",
    }
    assert d.allowed  # report mode lets traffic through


def test_decisions_are_frozen_and_with_makes_a_changed_copy() -> None:
    d = Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.decision = Verdict.DENY  # type: ignore[misc]
    denied = d.with_(decision=Verdict.DENY, reason=Reason.INTERNAL_ADDRESS)
    assert not denied.allowed and d.allowed
    assert denied.id == d.id  # the same decision, now enforced differently


def test_ids_are_unique() -> None:
    ids = {
        Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.DNS, "h", None, "v", "enforce").id
        for _ in range(1000)
    }
    assert len(ids) == 1000
