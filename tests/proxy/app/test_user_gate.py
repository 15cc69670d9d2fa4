"""The per-user gate's side: which runs' policies it serves, and whose summary a decision counts in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from proxy.app.user_gate import NOBODY, RunPolicies, Summaries
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.policy.model import Mode
from proxy.sandbox.summary import SummarySink
from proxy.sandbox.usergate import CODE, policy_check

ALLOWING = "version: 1\nrules:\n  - {name: registry, hosts: [pypi.org]}\n"


def _runs() -> RunPolicies:
    return RunPolicies(gate=None, inner_attach=None, trust={"state": "/s", "trust": ["/ca"]})


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_policy_it_serves_is_answered_with_what_the_sandbox_must_trust(tmp_path: Path) -> None:
    answer = _runs().check(policy_check(str(_write(tmp_path, ALLOWING)), None))
    assert answer == {
        "ok": True,
        "inspects": False,
        "frozen": [],
        "state": "/s",
        "trust": ["/ca"],
    }
    inspecting = _write(tmp_path, "version: 1\ninclude: [github-readonly]\nrules: []\n", "i.yaml")
    answer = _runs().check(policy_check(str(inspecting), None))
    assert answer["ok"] is True and answer["inspects"] is True


def test_the_default_policy_is_the_shipped_preset() -> None:
    answer = _runs().check(policy_check(None, None))
    assert answer["ok"] is True


def test_a_policy_with_ask_rules_falls_back_to_a_private_gate(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\nrules:\n  - {name: held, action: ask, hosts: [a.test]}\n")
    answer = _runs().check(policy_check(str(path), None))
    assert answer["ok"] is False and "asks for approvals" in answer["fallback"]
    assert f"{path}:3:" in answer["fallback"]


def test_the_files_rules_are_bound_to_are_named_for_the_sandbox_to_keep_read_only(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "version: 1\nrules:\n  - {name: git, hosts: [git.test], executables: [/usr/bin/git]}\n",
    )
    answer = _runs().check(policy_check(str(path), None))
    assert answer["ok"] is True and answer["frozen"] == ["/usr/bin/git"]


def test_a_broken_policy_is_answered_with_its_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\nrules:\n  - {name: x, hosts: [a.test], bogus: 1}\n")
    answer = _runs().check(policy_check(str(path), None))
    assert answer["ok"] is False
    assert any(line.startswith(f"{path}:3") and "bogus" in line for line in answer["error"])


def test_a_missing_policy_is_an_error_not_a_default(tmp_path: Path) -> None:
    answer = _runs().check(policy_check(str(tmp_path / "absent.yaml"), None))
    assert answer["ok"] is False and "cannot read" in " ".join(answer["error"])


def test_the_managed_ceiling_applies(tmp_path: Path) -> None:
    managed = _write(
        tmp_path,
        "version: 1\nmanaged:\n  ceiling: true\nrules:\n  - {name: only, hosts: [pypi.org]}\n",
        "managed.yaml",
    )
    wider = _write(tmp_path, "version: 1\nrules:\n  - {name: wide, hosts: [evil.test]}\n")
    answer = _runs().check(policy_check(str(wider), str(managed)))
    assert answer["ok"] is False and "error" in answer


@pytest.mark.parametrize(
    "body",
    [
        {"path": "relative.yaml", "managed": None, "code": CODE},
        {"path": None, "managed": 7, "code": CODE},
        {"path": None, "managed": None, "code": "/another/installation/proxy"},
        {"path": None, "managed": None},
    ],
)
def test_a_request_it_cannot_trust_is_not_served(body: dict[str, Any]) -> None:
    answer = _runs().check(body)
    assert answer["ok"] is False and answer["fallback"]


def test_a_loaded_policy_is_reused_until_its_file_changes(tmp_path: Path) -> None:
    path = _write(tmp_path, ALLOWING)
    runs = _runs()
    body = policy_check(str(path), None)
    first = runs.load(body)
    assert runs.load(body) is first
    path.write_text(ALLOWING.replace("pypi.org", "files.pythonhosted.org"))
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    second = runs.load(body)
    assert second is not first
    assert [r.hosts for r in second.rules] != [r.hosts for r in first.rules]


def test_an_edit_that_breaks_a_cached_policy_is_reported_not_hidden(tmp_path: Path) -> None:
    path = _write(tmp_path, ALLOWING)
    runs = _runs()
    body = policy_check(str(path), None)
    runs.load(body)
    path.write_text("version: 1\nrules: [\n")
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert runs.check(body)["ok"] is False


def test_the_gates_own_listener_serves_nobody() -> None:
    assert NOBODY.rules == ()
    assert NOBODY.index.request_rules("pypi.org", 443) is None


def test_a_decision_counts_only_in_its_own_sandboxs_summary() -> None:
    mine, theirs = SummarySink(), SummarySink()
    sink = Summaries({"sbx-mine": mine, "sbx-theirs": theirs})

    def decision(sandbox: str | None, verdict: Verdict) -> Decision:
        return Decision(
            kind=Kind.HTTP,
            host="pypi.org",
            port=443,
            decision=verdict,
            reason=Reason.ALLOWED_BY_RULE if verdict is Verdict.ALLOW else Reason.NO_MATCHING_RULE,
            rule=None,
            policy_version="1",
            mode=Mode.ENFORCE,
            sandbox_id=sandbox,
        )

    sink.record(decision("sbx-mine", Verdict.ALLOW))
    sink.record(decision("sbx-theirs", Verdict.DENY))
    sink.record(decision(None, Verdict.DENY))  # the gate's own listener: nobody's
    sink.record(decision("sbx-gone", Verdict.DENY))
    assert (mine.allowed, sum(mine.refused.values())) == (1, 0)
    assert (theirs.allowed, sum(theirs.refused.values())) == (0, 1)


def test_a_hand_off_whose_policy_binds_a_file_the_sandbox_may_rewrite_is_refused(
    tmp_path: Path,
) -> None:
    """The check named the bound files and the launcher kept them read-only; a policy edited in
    between to bind another file is refused, and nothing is registered for the sandbox."""
    import asyncio
    from types import SimpleNamespace

    from proxy.sandbox.handoff import HandoffError

    path = _write(
        tmp_path,
        "version: 1\nrules:\n  - {name: git, hosts: [git.test], executables: [/usr/bin/git]}\n",
    )
    policies: dict[str, Any] = {}
    gate = SimpleNamespace(
        checkpoint=SimpleNamespace(
            connections=SimpleNamespace(sandbox_policies=policies), sandbox_processes={}
        )
    )
    runs = RunPolicies(gate=gate, inner_attach=None)
    request = {
        "policy": policy_check(str(path), None),
        "frozen": [],  # what the sandbox was built with
        "peer_uid": os.getuid(),
        "gate_warnings": [],
    }
    with pytest.raises(HandoffError, match="/usr/bin/git"):
        asyncio.run(runs.attach("sbx-edited", {}, request))
    assert policies == {} and runs.summaries == {} and runs.stamps == {}


def test_the_runs_facts_come_from_the_kernel_and_a_checked_context() -> None:
    from proxy.app.user_gate import _facts
    from proxy.sandbox.handoff import HandoffError

    trace = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    facts = _facts({"peer_uid": 0, "context": {"task": "t1"}, "traceparent": trace})
    assert facts.user_id == 0 and dict(facts.context) == {"task": "t1"}
    assert facts.trace is not None and facts.trace.trace_id == "a" * 32
    assert _facts({"peer_uid": 0, "traceparent": "not-a-trace"}).trace is None
    with pytest.raises(HandoffError, match="context"):
        _facts({"peer_uid": 0, "context": {"bad key": "\x1b[31m"}})
