"""Decisions are immutable records with one JSON form shared by every sink."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict, new_id
from tests.harness import fresh_python


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


def test_ids_are_128_random_bits_each_handed_out_once_across_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [new_id() for _ in range(2_000)], range(8)))
    ids = [each for batch in batches for each in batch]
    assert len(set(ids)) == len(ids)
    assert all(len(each) == 32 and int(each, 16) >= 0 for each in ids)


FORKING = """
import os
from proxy.core.decision import new_id

new_id()  # the parent now holds unused ids
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.write(write, "".join(new_id() for _ in range(300)).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read, "rb") as pipe:
    print(pipe.read().decode())
os.waitpid(child, 0)
print("".join(new_id() for _ in range(300)))
"""


def test_a_forked_worker_never_repeats_its_parents_ids() -> None:
    """Ids are read from the system 256 at a time: a child must not hand out the parent's unused
    ones (a process of its own: forking the test runner's threads is not safe)."""
    theirs_text, ours_text = fresh_python(FORKING).split()
    theirs = {theirs_text[at : at + 32] for at in range(0, len(theirs_text), 32)}
    ours = {ours_text[at : at + 32] for at in range(0, len(ours_text), 32)}
    assert len(theirs) == len(ours) == 300
    assert not theirs & ours
