"""The managed ceiling: managed denies always win, a local policy may only narrow, report mode and
approvals stay inside it, and every refusal names both files, lines and rules."""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.core.requests import HttpHead
from proxy.policy.managed import load_effective, load_managed, load_with_ceiling, managed_lint
from proxy.policy.model import PolicyError
from proxy.policy.reload import PolicyHolder

MANAGED = """\
version: 1
managed:
  forbid: [allow-internal]
rules:
  - name: org-pypi
    hosts: ["**.pypi.org", files.pythonhosted.org]
    ports: [443]
  - name: org-github
    hosts: [api.github.com]
    methods: [GET, HEAD]
  - name: org-ask
    action: ask
    hosts: [uploads.example.com]
  - name: org-no-paste
    action: deny
    hosts: ["**.pastebin.com"]
  - name: org-no-test-pypi
    action: deny
    hosts: [test.pypi.org]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def managed(tmp_path: Path) -> Path:
    return write(tmp_path, "managed.yaml", MANAGED)


def problems(local: Path, managed: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_with_ceiling(local, managed)
    return [str(p) for p in caught.value.problems]


def test_a_narrower_local_policy_loads_with_the_managed_denies_and_a_combined_version(
    tmp_path: Path, managed: Path
) -> None:
    local = write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        rules:
          - name: pypi
            hosts: [pypi.org, "*.pypi.org"]
          - name: gh-read
            hosts: [api.github.com]
            methods: [GET]
          - name: uploads
            action: ask
            hosts: [uploads.example.com]
        """,
    )
    policy = load_with_ceiling(local, managed)
    assert [r.name for r in policy.rules][-2:] == ["org-no-paste", "org-no-test-pypi"]
    from proxy.policy.loader import load_policy

    assert policy.version not in (load_policy(local).version, load_managed(managed).policy.version)
    assert {f.name for f in policy.files} == {"local.yaml", "managed.yaml"}
    # the managed deny wins over the local allow of *.pypi.org
    denied = decide(Request(Kind.CONNECT, "test.pypi.org", 443), policy)
    assert (denied.decision, denied.rule) == (Verdict.DENY, "org-no-test-pypi")
    allowed = decide(Request(Kind.CONNECT, "www.pypi.org", 443), policy)
    assert allowed.decision is Verdict.ALLOW
    # a managed deny rule holds whatever local rules say, and the ask stays an ask
    ask = decide(Request(Kind.CONNECT, "uploads.example.com", 443), policy)
    assert ask.decision is Verdict.ASK


def test_a_local_allow_outside_the_ceiling_names_both_files_lines_and_rules(
    tmp_path: Path, managed: Path
) -> None:
    local = write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        rules:
          - name: ok
            hosts: [pypi.org]
          - name: anything
            hosts: [evil.example]
          - name: other-port
            hosts: [pypi.org]
            ports: [8443]
          - name: skip-the-question
            hosts: [uploads.example.com]
          - name: gh-write
            hosts: [api.github.com]
            methods: [GET, POST]
          - name: gh-all
            hosts: [api.github.com]
          - name: wider-tree
            hosts: ["**.pythonhosted.org"]
        """,
    )
    found = problems(local, managed)
    assert len(found) == 6, found
    joined = "\n".join(found)
    assert (
        "local.yaml:5: rule 'anything': key 'hosts': evil.example port 443 is outside the "
        in joined
    )
    assert "no rule of the managed policy" in joined and "managed.yaml" in joined
    assert "local.yaml:7: rule 'other-port': key 'hosts': pypi.org port 8443 is outside" in joined
    assert "managed.yaml:5 rule 'org-pypi' covers pypi.org on port 443 only" in joined
    assert "rule 'skip-the-question'" in joined and "a local rule may ask too, not allow" in joined
    assert "rule 'gh-write'" in joined and "methods must be among ['GET', 'HEAD']" in joined
    assert "rule 'gh-all'" in joined and "this rule allows every request" in joined
    assert "rule 'wider-tree'" in joined


def test_the_managed_file_can_forbid_report_mode_internal_ranges_and_inspection_opt_outs(
    tmp_path: Path,
) -> None:
    managed = write(
        tmp_path,
        "managed.yaml",
        """\
        version: 1
        managed:
          forbid: [report-mode, allow-internal, inspection-opt-out]
        rules:
          - name: audited
            hosts: [registry.example]
            inspect: true
        """,
    )
    local = write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        mode: report
        allow_internal: [10.0.0.0/8]
        rules:
          - name: registry
            hosts: [registry.example]
          - name: learning
            hosts: [registry.example]
            inspect: true
            mode: report
        """,
    )
    joined = "\n".join(problems(local, managed))
    assert "key 'mode': report mode is forbidden by the managed policy" in joined
    assert "local.yaml:7: rule 'learning': key 'mode': report mode is forbidden" in joined
    assert "10.0.0.0/8: allow_internal is forbidden by the managed policy" in joined
    assert "rule 'registry'" in joined and "forbids inspection opt-outs" in joined


def test_local_internal_ranges_must_lie_inside_the_managed_ones(tmp_path: Path) -> None:
    managed = write(
        tmp_path,
        "managed.yaml",
        "version: 1\nallow_internal: [10.20.0.0/16]\nrules:\n  - {name: a, hosts: [a.example]}\n",
    )
    inside = write(tmp_path, "in.yaml", "version: 1\nallow_internal: [10.20.1.0/24]\nrules: []\n")
    outside = write(tmp_path, "out.yaml", "version: 1\nallow_internal: [10.0.0.0/8]\nrules: []\n")
    assert load_with_ceiling(inside, managed).allow_internal
    assert any("10.0.0.0/8 is not inside" in p for p in problems(outside, managed))


def test_report_mode_learns_inside_the_ceiling_only(tmp_path: Path, managed: Path) -> None:
    local = write(tmp_path, "local.yaml", "version: 1\nmode: report\nrules: []\n")
    policy = load_with_ceiling(local, managed)
    inside = decide(Request(Kind.CONNECT, "www.pypi.org", 443), policy)
    assert (inside.decision, inside.reason) == (Verdict.REPORT, Reason.NO_MATCHING_RULE)
    outside = decide(Request(Kind.CONNECT, "evil.example", 443), policy)
    assert (outside.decision, outside.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)
    assert outside.detail is not None and "outside the managed policy" in outside.detail
    denied = decide(Request(Kind.CONNECT, "x.pastebin.com", 443), policy)
    assert (denied.decision, denied.reason) == (Verdict.DENY, Reason.DENIED_BY_RULE)
    dns = decide(Request(Kind.DNS, "evil.example", None, qtype="A"), policy)
    assert dns.decision is Verdict.DENY
    # a request the managed rule's conditions refuse stays refused in report mode
    local.write_text(
        "version: 1\nmode: report\nrules:\n  - {name: gh, hosts: [api.github.com], methods: [GET]}\n"
    )
    policy = load_with_ceiling(local, managed)
    post = Request(Kind.REQUEST, "api.github.com", 443, "POST", "/x", http=HttpHead("POST", "/x"))
    assert decide(post, policy).decision is Verdict.DENY
    head = Request(Kind.REQUEST, "api.github.com", 443, "HEAD", "/x", http=HttpHead("HEAD", "/x"))
    assert decide(head, policy).decision is Verdict.REPORT


def test_a_managed_file_that_does_not_load_refuses_everything(tmp_path: Path) -> None:
    local = write(tmp_path, "local.yaml", "version: 1\nrules: []\n")
    bad = {
        "syntax.yaml": "version: 1\nrules: [\n",
        "report.yaml": "version: 1\nmode: report\nrules: []\n",
        "rule-report.yaml": "version: 1\nrules:\n  - {name: a, hosts: [a.example], mode: report}\n",
        "forbid.yaml": "version: 1\nmanaged:\n  forbid: [everything]\nrules: []\n",
        "key.yaml": "version: 1\nmanaged:\n  colour: red\nrules: []\n",
    }
    for name, text in bad.items():
        path = write(tmp_path, name, text)
        with pytest.raises(PolicyError) as caught:
            load_with_ceiling(local, path)
        assert all(name in str(p) for p in caught.value.problems), (name, caught.value.problems)
    with pytest.raises(PolicyError, match="cannot read the managed policy"):
        load_with_ceiling(local, tmp_path / "missing.yaml")
    # the managed: section belongs to managed files only
    with pytest.raises(PolicyError, match="key 'managed': unknown key"):
        load_effective(
            write(tmp_path, "m-local.yaml", "version: 1\nmanaged: {}\nrules: []\n"), None
        )


def test_a_reload_cannot_widen_past_the_ceiling_nor_survive_a_narrower_one(
    tmp_path: Path, managed: Path
) -> None:
    local = write(tmp_path, "local.yaml", "version: 1\nrules:\n  - {name: p, hosts: [pypi.org]}\n")
    holder = PolicyHolder(
        local,
        load_with_ceiling(local, managed),
        load=functools.partial(load_with_ceiling, managed_path=managed),
    )
    before = holder()
    local.write_text("version: 1\nrules:\n  - {name: p, hosts: [pypi.org, evil.example]}\n")
    assert holder.reload() is False and holder() is before
    local.write_text("version: 1\nrules:\n  - {name: p, hosts: [pypi.org]}\n")
    managed.write_text(MANAGED.replace('"**.pypi.org", ', ""))  # the organisation narrows
    assert holder.reload() is False and holder() is before
    assert holder.last_reload is not None
    assert any("rule 'p'" in p and "outside the managed" in p for p in holder.last_reload.problems)
    managed.write_text(MANAGED)
    assert holder.reload() is True


def test_lint_with_managed_reports_the_same_problems(tmp_path: Path, managed: Path) -> None:
    local = write(tmp_path, "local.yaml", "version: 1\nrules:\n  - {name: e, hosts: [e.example]}\n")
    found = [str(p) for p in managed_lint(managed, [local])]
    assert len(found) == 1 and "rule 'e'" in found[0] and "managed" in found[0]


BOUND_MANAGED = """
version: 1
rules:
  - name: org-git
    hosts: [git.example.com]
    executables: [/usr/bin/git]
"""


def test_a_managed_rule_bound_to_executables_binds_the_local_rules_under_it(
    tmp_path: Path,
) -> None:
    """An organisation that lets only git reach a host is not widened by a local rule that lets
    every process reach it, nor one bound to another executable."""
    bound = write(tmp_path, "managed.yaml", BOUND_MANAGED)
    local = write(
        tmp_path, "local.yaml", "version: 1\nrules:\n  - {name: g, hosts: [git.example.com]}\n"
    )
    found = problems(local, bound)
    assert len(found) == 1 and "rule 'g'" in found[0] and "only for /usr/bin/git" in found[0]
    local.write_text(
        "version: 1\nrules:\n  - {name: g, hosts: [git.example.com], executables: [/usr/bin/curl]}\n"
    )
    assert len(problems(local, bound)) == 1
    local.write_text(
        "version: 1\nrules:\n"
        "  - {name: g, hosts: [git.example.com], executables: [/usr/bin/git, /usr/bin/curl]}\n"
    )
    assert len(problems(local, bound)) == 1
    local.write_text(
        "version: 1\nrules:\n  - {name: g, hosts: [git.example.com], executables: [/usr/bin/git]}\n"
    )
    assert load_with_ceiling(local, bound).rules[0].name == "g"
    assert [str(p) for p in managed_lint(bound, [local])] == []


def test_a_local_ask_cannot_hand_a_managed_human_question_to_the_reviewer(
    tmp_path: Path, managed: Path
) -> None:
    """The managed ``org-ask`` rule asks a person (``review`` defaults to human): a local ask rule
    under it that lets the automated reviewer answer would let a program (one that reads
    sandbox-controlled request data) grant what the organisation wanted a person to decide."""
    local = write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        rules:
          - name: uploads-auto
            action: ask
            review: auto
            hosts: [uploads.example.com]
        """,
    )
    found = problems(local, managed)
    assert len(found) == 1, found
    assert "rule 'uploads-auto'" in found[0]
    assert "managed.yaml:11 rule 'org-ask' asks a person" in found[0]
    # asking a person, as the managed rule does, loads; so does review: auto under a managed allow
    write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        rules:
          - name: uploads-human
            action: ask
            hosts: [uploads.example.com]
          - name: pypi-auto
            action: ask
            review: auto
            hosts: [pypi.org]
        """,
    )
    assert load_with_ceiling(local, managed).rules[0].name == "uploads-human"


NESTED_MANAGED = """\
version: 1
rules:
  - name: org-example
    hosts: ["**.example.com"]
    cidrs: [203.0.113.0/24]
  - name: org-ask-secret
    action: ask
    hosts: [secret.example.com]
    cidrs: [203.0.113.5/32]
  - name: org-git-only
    hosts: [git.example.com]
    executables: [/usr/bin/git]
"""


@pytest.mark.parametrize(
    ("rule", "host", "nearest"),
    [
        ("{name: l, hosts: [secret.example.com]}", "secret.example.com", "org-ask-secret"),
        ("{name: l, hosts: ['*.example.com']}", "secret.example.com", "org-ask-secret"),
        ("{name: l, hosts: ['**.example.com']}", "secret.example.com", "org-ask-secret"),
        ("{name: l, cidrs: [203.0.113.5/32]}", "203.0.113.5", "org-ask-secret"),
        ("{name: l, cidrs: [203.0.113.0/24]}", "203.0.113.5", "org-ask-secret"),
        ("{name: l, hosts: [git.example.com]}", "git.example.com", "org-git-only"),
        ("{name: l, action: ask, hosts: ['*.example.com']}", "git.example.com", "org-git-only"),
    ],
)
def test_a_broader_managed_allow_does_not_stand_in_for_a_narrower_managed_ask_or_binding(
    tmp_path: Path, rule: str, host: str, nearest: str
) -> None:
    """The gate decides a name by its most specific rule: under the managed policy alone
    ``secret.example.com`` (and 203.0.113.5) asks a person and ``git.example.com`` lets only git
    through, though ``**.example.com`` (and 203.0.113.0/24) is allowed. A local allow that the
    broader managed rule covers would decide those names itself, without the question or the
    binding, so it is outside the ceiling."""
    managed = write(tmp_path, "managed.yaml", NESTED_MANAGED)
    local = write(tmp_path, "local.yaml", f"version: 1\nrules:\n  - {rule}\n")
    alone = decide(Request(host=host, port=443, kind=Kind.CONNECT), load_managed(managed).policy)
    assert alone.decision is not Verdict.ALLOW or alone.rule == "org-git-only"
    found = problems(local, managed)
    assert len(found) == 1 and f"rule '{nearest}'" in found[0], found


def test_rules_inside_the_narrower_managed_ones_still_load(tmp_path: Path) -> None:
    """The control: a local rule that asks where the managed policy asks and binds where it binds,
    or names only hosts and networks the broad managed rule decides, loads; so does a local allow
    for a name a more specific managed allow decides under a broader managed ask."""
    managed = write(tmp_path, "managed.yaml", NESTED_MANAGED)
    local = write(
        tmp_path,
        "local.yaml",
        """\
        version: 1
        rules:
          - name: ask-all
            action: ask
            hosts: ["**.example.com"]
            cidrs: [203.0.113.0/24]
            executables: [/usr/bin/git]
          - {name: git, hosts: [git.example.com], executables: [/usr/bin/git]}
          - {name: ask-secret, action: ask, hosts: [secret.example.com], cidrs: [203.0.113.4/30]}
          - {name: www, hosts: [www.example.com, "*.www.example.com"], cidrs: [203.0.113.8/29]}
        """,
    )
    loaded = load_with_ceiling(local, managed)
    www = decide(Request(host="a.www.example.com", port=443, kind=Kind.CONNECT), loaded)
    assert (www.decision, www.rule) == (Verdict.ALLOW, "www")
    asks = write(
        tmp_path,
        "asks.yaml",
        """\
        version: 1
        rules:
          - {name: org-ask-all, action: ask, hosts: ["**.example.com"]}
          - {name: org-www, hosts: [www.example.com]}
        """,
    )
    local.write_text("version: 1\nrules:\n  - {name: www, hosts: [www.example.com]}\n")
    assert load_with_ceiling(local, asks).rules[0].name == "www"


@pytest.mark.parametrize("secret", ["ask", "deny"])
def test_a_wide_local_rule_loads_where_a_narrower_local_rule_decides_the_managed_names(
    tmp_path: Path, secret: str
) -> None:
    """The gate decides a name by the local policy's most specific rule: a local wildcard allow
    is held to the managed ask and binding below it only where it is what decides those names.
    Where a local ask or deny for ``secret.example.com`` and a bound rule for ``git.example.com``
    decide them, the wildcard loads, and the effective policy stays inside the ceiling."""
    managed = write(tmp_path, "managed.yaml", NESTED_MANAGED)
    local = write(
        tmp_path,
        "local.yaml",
        f"""\
        version: 1
        rules:
          - {{name: wide, hosts: ["*.example.com"], cidrs: [203.0.113.0/24]}}
          - {{name: secret, action: {secret}, hosts: [secret.example.com], cidrs: [203.0.113.5/32]}}
          - {{name: git, hosts: [git.example.com], executables: [/usr/bin/git]}}
        """,
    )
    loaded = load_with_ceiling(local, managed)
    decided = decide(Request(host="secret.example.com", port=443, kind=Kind.CONNECT), loaded)
    assert decided.rule == "secret" and not decided.allowed
    other = decide(Request(host="a.example.com", port=443, kind=Kind.CONNECT), loaded)
    assert (other.decision, other.rule) == (Verdict.ALLOW, "wide")
    local.write_text(local.read_text().replace("  - {name: secret", "  # {name: secret"))
    with pytest.raises(PolicyError, match="org-ask-secret"):  # the wildcard decides it again
        load_with_ceiling(local, managed)
