"""The per-user gate's side: which runs' policies it serves, and whose summary a decision counts in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from proxy.app import user_gate
from proxy.app.user_gate import NOBODY, Run, RunPolicies, RunSinks
from proxy.attribution.stamp import SandboxFacts, Stamped
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.policy.model import Mode
from proxy.sandbox.summary import SummarySink
from proxy.sandbox.usergate import CODE, policy_check

OLD = 3600 * 10**9  # ns
ALLOWING = "version: 1\nrules:\n  - {name: registry, hosts: [pypi.org]}\n"


def _runs() -> RunPolicies:
    return RunPolicies(gate=None, inner_attach=None, trust={"state": "/s", "trust": ["/ca"]})


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_policy_it_serves_is_answered_with_what_the_sandbox_must_trust(tmp_path: Path) -> None:
    path = _write(tmp_path, ALLOWING)
    answer = _runs().check(policy_check(str(path), None))
    assert answer == {
        "ok": True,
        "inspects": False,
        "frozen": [str(path.resolve())],  # the policy file: the sandbox must not rewrite it
        "binds": False,  # no rule bound to executables: user namespaces stay open inside
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
    assert answer["ok"] is True and answer["frozen"] == ["/usr/bin/git", str(path.resolve())]
    assert answer["binds"] is True  # the sandbox is built to refuse user namespaces


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


def test_a_loaded_policy_is_reused_until_its_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(user_gate, "RACY_NS", -OLD)  # files written now count as long unchanged
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
    facts = SandboxFacts(0, None)
    sink = RunSinks(
        {
            "sbx-mine": Run(mine, Stamped(None, facts), None),
            "sbx-theirs": Run(theirs, Stamped(None, facts), None),
        }
    )

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


def _refused_hand_off(tmp_path: Path, frozen: list[str], refusal: str) -> None:
    """A hand-off under a policy that binds git's executable, with the sandbox built to keep
    ``frozen`` read-only: refused with ``refusal`` in its message, and nothing registered."""
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
        "frozen": [each.replace("{policy}", str(path.resolve())) for each in frozen],
        "peer_uid": os.getuid(),
        "gate_warnings": [],
    }
    with pytest.raises(HandoffError, match=refusal):
        asyncio.run(runs.attach("sbx-refused", {}, request))
    assert policies == {} and runs.attached == {}


def test_a_hand_off_whose_policy_binds_a_file_the_sandbox_may_rewrite_is_refused(
    tmp_path: Path,
) -> None:
    """The check named the bound files and the launcher kept them read-only; a policy edited in
    between to bind another file is refused, and nothing is registered for the sandbox."""
    _refused_hand_off(tmp_path, [], "/usr/bin/git")  # the sandbox was built with nothing frozen


def test_a_hand_off_whose_policy_binds_executables_needs_a_sandbox_without_user_namespaces(
    tmp_path: Path,
) -> None:
    """A process in a user namespace of its own can name any file as its executable (prctl
    PR_SET_MM_MAP): a sandbox not built to refuse them (an older launcher, a policy edited since
    the check to bind a rule) is refused, and nothing is registered for it."""
    _refused_hand_off(tmp_path, ["/usr/bin/git", "{policy}"], "user namespaces")


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


def test_a_policy_rewritten_in_place_with_its_old_size_and_time_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same size, inode and modification time set back (``touch -r``, ``cp -p``): the change
    time tells, which no one can set back."""
    path = _write(tmp_path, ALLOWING)
    monkeypatch.setattr(user_gate, "RACY_NS", -OLD)  # remembered though written just now
    runs = _runs()
    before = os.stat(path)
    assert any(r.name == "registry" for r in runs.load(policy_check(str(path), None)).rules)
    with open(path, "r+") as out:  # the same inode, the same size
        out.write(ALLOWING.replace("registry", "narrowed"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_ino == before.st_ino
    assert [r.name for r in runs.load(policy_check(str(path), None)).rules] == ["narrowed"]


def test_a_run_naming_another_presets_directory_gets_its_own_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, ALLOWING)
    monkeypatch.setenv("EGRESS_PRESETS_DIR", str(tmp_path / "theirs"))
    check = policy_check(str(path), None)
    monkeypatch.delenv("EGRESS_PRESETS_DIR")
    answer = _runs().check(check)
    assert answer["ok"] is False and "EGRESS_PRESETS_DIR" in answer["fallback"]
    assert _runs().check(policy_check(str(path), None))["ok"] is True


@pytest.mark.parametrize("name", ["SSL_CERT_FILE", "SSL_CERT_DIR", "EGRESS_EVENT_LOOP"])
def test_a_run_whose_environment_would_start_another_gate_gets_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """What the gate trusts upstream (OpenSSL reads these) or which loop it runs on is fixed when
    it starts: a run that would have its own gate start otherwise is not served by this one."""
    path = _write(tmp_path, ALLOWING)
    monkeypatch.setenv(name, "asyncio" if name == "EGRESS_EVENT_LOOP" else str(tmp_path / "ca"))
    check = policy_check(str(path), None)
    monkeypatch.delenv(name)
    answer = _runs().check(check)
    assert answer["ok"] is False and name in answer["fallback"]


@pytest.mark.parametrize("swapped", ["policy", "include", "managed"])
def test_a_policy_file_whose_symlink_is_repointed_is_read_again(
    tmp_path: Path, swapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Releases deployed by re-pointing a symlink (``ln -sfn``, a ConfigMap's ``..data``): every
    file read is unchanged, only which file a name leads to is not. The narrower release must be
    what the next run gets, as its own gate would read it."""
    old = "version: 1\nrules:\n  - {name: old, hosts: [pypi.org, evil.test]}\n"
    new = "version: 1\nrules:\n  - {name: new, hosts: [pypi.org]}\n"
    managed_old = "version: 1\nmanaged: {}\nrules:\n  - {name: m, hosts: [pypi.org, evil.test]}\n"
    managed_new = "version: 1\nmanaged: {}\nrules:\n  - {name: m, hosts: [pypi.org]}\n"
    releases = tmp_path / "releases"
    releases.mkdir()
    for name, text in (("v1.yaml", old), ("v2.yaml", new), ("m1.yaml", managed_old)):
        _write(releases, text, name)
    _write(releases, managed_new, "m2.yaml")
    config = tmp_path / "config"
    config.mkdir()
    if swapped == "include":
        top = _write(config, "version: 1\ninclude: [team.yaml]\nrules: []\n", "policy.yaml")
        link = config / "team.yaml"
    else:
        top = config / "policy.yaml"
        link = top if swapped == "policy" else config / "managed.yaml"
        if swapped == "managed":
            _write(config, old, "policy.yaml")
    managed = config / "managed.yaml" if swapped == "managed" else None
    first, second = ("m1.yaml", "m2.yaml") if swapped == "managed" else ("v1.yaml", "v2.yaml")
    link.symlink_to(releases / first)
    config.chmod(0o555)  # the link where a command cannot re-point it (else no run is served)
    monkeypatch.setattr(user_gate, "RACY_NS", -OLD)  # remembered though written just now
    runs = _runs()
    check = policy_check(str(top), str(managed) if managed else None)
    assert runs.check(check)["ok"] is True
    config.chmod(0o755)  # the operator's release
    staged = config / "staged"
    staged.symlink_to(releases / second)
    os.replace(staged, link)  # ln -sfn: the name now leads to the narrower release
    config.chmod(0o555)
    if swapped == "managed":  # the local policy no longer fits under the ceiling
        answer = runs.check(check)
        assert answer["ok"] is False and "evil.test" in " ".join(answer["error"])
    else:
        hosts = {str(p) for r in runs.load(check).rules for p in r.hosts}
        assert hosts == {"pypi.org"}


def test_a_policy_only_a_private_gate_can_serve_falls_back_every_time(tmp_path: Path) -> None:
    """The second run with the same file (loaded and remembered by the first check) too."""
    path = _write(tmp_path, "version: 1\nrules:\n  - {name: held, action: ask, hosts: [a.test]}\n")
    runs = _runs()
    for _ in range(2):
        answer = runs.check(policy_check(str(path), None))
        assert answer["ok"] is False and "asks for approvals" in answer["fallback"]


def test_an_unchanged_policy_is_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, ALLOWING)
    loads = []
    real = RunPolicies._load_files

    def counting(local: str | None, managed: str | None) -> Any:
        loads.append(local)
        return real(local, managed)

    monkeypatch.setattr(RunPolicies, "_load_files", staticmethod(counting))
    monkeypatch.setattr(user_gate, "RACY_NS", -OLD)  # files written now count as long unchanged
    runs = _runs()
    for _ in range(3):
        assert runs.check(policy_check(str(path), None))["ok"] is True
    assert len(loads) == 1


def test_a_policy_that_never_finishes_loading_holds_up_no_other_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose policy is on a hung mount: its own check waits, another run's does not. (A FIFO
    named as a policy is refused outright: see the next test.)"""
    import threading

    hung = _write(tmp_path, ALLOWING, "hung.yaml")
    other = _write(tmp_path, ALLOWING)
    release = threading.Event()
    started = threading.Event()
    real = RunPolicies._load_files

    def loading(local: str | None, managed: str | None) -> Any:
        if local == str(hung):
            started.set()
            release.wait(30)
        return real(local, managed)

    monkeypatch.setattr(RunPolicies, "_load_files", staticmethod(loading))
    runs = _runs()
    stuck = threading.Thread(target=runs.check, args=(policy_check(str(hung), None),), daemon=True)
    stuck.start()
    assert started.wait(30)
    answers: list[dict[str, Any]] = []
    free = threading.Thread(
        target=lambda: answers.append(runs.check(policy_check(str(other), None))), daemon=True
    )
    try:
        free.start()
        free.join(30)
        assert answers and answers[0]["ok"] is True
    finally:
        release.set()
        stuck.join(30)
        free.join(30)


def test_a_fifo_named_as_a_policy_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    answer = _runs().check(policy_check(str(fifo), None))  # returns: nothing waits for a writer
    assert answer["ok"] is False and "not a regular file" in " ".join(answer["error"])


def test_a_policy_replaced_while_it_loads_is_not_remembered_as_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file changes after it was read and before its attributes are noted: the remembered
    policy would be the old one under the new file's attributes, for every later run."""
    path = _write(tmp_path, ALLOWING)
    narrowed = "version: 1\nrules: []\n"
    real = RunPolicies._load_files
    swapped: list[bool] = []

    def load_then_replace(local: str | None, managed: str | None) -> Any:
        policy = real(local, managed)
        if not swapped:
            swapped.append(True)
            staged = tmp_path / "staged.yaml"
            staged.write_text(narrowed)
            os.replace(staged, path)  # an editor's save, a deploy
        return policy

    monkeypatch.setattr(RunPolicies, "_load_files", staticmethod(load_then_replace))
    runs = _runs()
    assert [r.name for r in runs.load(policy_check(str(path), None)).rules] == ["registry"]
    assert runs.load(policy_check(str(path), None)).rules == ()


def test_the_background_import_is_frozen_only_once_it_ended_and_nobody_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A freeze with a connection open would keep that connection's cycles for ever."""
    import asyncio

    settled: list[str] = []
    monkeypatch.setattr(user_gate, "gate_settled", lambda: settled.append("settled"))

    async def looks() -> list[str]:
        warming: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        open_now = [0]
        settle = user_gate._Settle(warming, lambda: open_now[0])
        settle.look(0)  # still importing
        warming.set_result(None)
        settle.look(1)  # a launcher attached
        open_now[0] = 1
        settle.look(0)  # a connection still open
        assert settled == []
        open_now[0] = 0
        settle.look(0)  # quiet: settles
        settle.look(0)  # once only
        return settled

    assert asyncio.run(looks()) == ["settled"]
