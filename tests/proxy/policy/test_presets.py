"""The shipped allowlists: they load, every host says why it is there, the default is narrow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import decide
from proxy.policy.loader import lint_files, load_policy
from proxy.policy.model import Action, Mode, PatternKind
from proxy.policy.presets import ENV_VAR, is_preset_name, list_presets, preset_path, presets_dir

REPO_PRESETS = Path(__file__).resolve().parents[3] / "allowlists"
EXPECTED = {
    "default",
    "pypi",
    "npm",
    "github",
    "gitlab",
    "crates",
    "go",
    "rubygems",
    "maven",
    "debian",
    "ubuntu",
    "conda",
    "huggingface",
}
PRESETS = sorted(EXPECTED)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_presets_dir_is_the_repository_allowlists() -> None:
    assert presets_dir().resolve() == REPO_PRESETS
    assert set(list_presets()) >= EXPECTED


def test_env_var_moves_the_presets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text("version: 1\n", encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert presets_dir() == tmp_path
    assert preset_path("mine") == tmp_path / "mine.yaml"
    assert list_presets() == ["mine"]


@pytest.mark.parametrize(
    ("name", "ok"),
    [("pypi", True), ("my-preset_2", True), ("PyPI", False), ("a.yaml", False), ("../x", False)],
)
def test_preset_names(name: str, ok: bool) -> None:
    assert is_preset_name(name) is ok
    if not ok:
        with pytest.raises(ValueError):
            preset_path(name)


def test_every_preset_lints_clean() -> None:
    paths = [REPO_PRESETS / f"{name}.yaml" for name in PRESETS]
    assert [str(p) for p in lint_files(paths)] == []


@pytest.mark.parametrize("name", PRESETS)
def test_every_host_says_why(name: str) -> None:
    """Each entry of a `hosts` list carries a trailing comment explaining what needs it."""
    lines = (REPO_PRESETS / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    node = yaml.compose("\n".join(lines), Loader=yaml.SafeLoader)
    assert node is not None
    entries = 0
    for key, value in node.value:
        if key.value != "rules":
            continue
        for rule in value.value:
            for rule_key, rule_value in rule.value:
                if rule_key.value != "hosts":
                    continue
                for item in rule_value.value:
                    line = lines[item.start_mark.line]
                    assert "#" in line.split(str(item.value), 1)[1], f"{name}: {line.strip()}"
                    entries += 1
    if name == "default":
        assert entries == 0  # only includes; each include line is commented too
        for raw in lines:
            if raw.strip().startswith("- "):
                assert "#" in raw, raw
    else:
        assert entries > 0


@pytest.mark.parametrize(
    "name", sorted(n for n in EXPECTED if (REPO_PRESETS / f"{n}-readonly.yaml").exists())
)
def test_a_full_preset_names_its_read_only_variant(name: str) -> None:
    """A preset whose hosts also take writes says so in its header and points to the variant that
    refuses them; it never calls itself read only."""
    text = (REPO_PRESETS / f"{name}.yaml").read_text(encoding="utf-8")
    header = text.split("\nversion:", 1)[0]
    assert f"{name}-readonly" in header
    assert "read only" not in str(yaml.safe_load(text)["description"]).lower()


def test_the_go_preset_says_the_mirror_fetches_from_any_host() -> None:
    """proxy.golang.org and sum.golang.org take no uploads, but they fetch a module path they have
    not seen from its origin host: a request for a made-up path reaches whoever runs that host. The
    preset and the default policy that includes it say so, rather than calling the mirror write-free."""
    header = (REPO_PRESETS / "go.yaml").read_text(encoding="utf-8").split("\nversion:", 1)[0]
    assert "go-get=1" in header and "any host" in header
    default = (REPO_PRESETS / "default.yaml").read_text(encoding="utf-8")
    line = next(raw for raw in default.splitlines() if raw.strip().startswith("- go "))
    assert "any host" in line


@pytest.mark.parametrize("name", sorted(EXPECTED - {"default"}))
def test_presets_are_narrow(name: str) -> None:
    policy = load_policy(REPO_PRESETS / f"{name}.yaml")
    assert policy.mode is Mode.ENFORCE
    assert policy.allow_internal == ()
    assert policy.rules
    for rule in policy.rules:
        assert rule.action is Action.ALLOW
        assert not rule.cidrs
        allowed_ports = {80, 443} if name in ("debian", "ubuntu") else {443}
        assert rule.ports is not None and rule.ports <= allowed_ports, rule.name
        for pattern in rule.hosts:
            if pattern.kind is not PatternKind.EXACT:
                # The one wildcard shipped: Ubuntu's mirror network, signed archives only.
                assert (name, str(pattern)) == ("ubuntu", "*.archive.ubuntu.com")


def test_default_includes_registries_and_vcs() -> None:
    policy = load_policy(REPO_PRESETS / "default.yaml")
    names = {rule.name for rule in policy.rules}
    assert {"pypi", "npm", "crates", "go", "rubygems", "maven-central", "github", "gitlab"} <= names
    assert policy.files[0].name == "default.yaml"


DEFAULT_CASES = [
    ("pypi.org", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("files.pythonhosted.org", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("registry.npmjs.org", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("github.com", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("codeload.github.com", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("proxy.golang.org", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("static.crates.io", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("repo.maven.apache.org", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    ("pypi.org", 80, Verdict.DENY, Reason.PORT_NOT_ALLOWED),
    ("github.com", 22, Verdict.DENY, Reason.PORT_NOT_ALLOWED),
    ("example.com", 443, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("upload.pypi.org", 443, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("gist.github.com", 443, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("pypi.org.evil.com", 443, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("deb.debian.org", 80, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("huggingface.co", 443, Verdict.DENY, Reason.NO_MATCHING_RULE),
    ("169.254.169.254", 80, Verdict.DENY, Reason.NO_MATCHING_RULE),
]


@pytest.mark.parametrize(("host", "port", "verdict", "reason"), DEFAULT_CASES)
def test_default_policy_decisions(host: str, port: int, verdict: Verdict, reason: Reason) -> None:
    policy = load_policy(REPO_PRESETS / "default.yaml")
    decision = decide(Request(Kind.CONNECT, host, port), policy)
    assert (decision.decision, decision.reason) == (verdict, reason)


@pytest.mark.parametrize(
    ("preset", "host", "port"),
    [
        ("debian", "deb.debian.org", 80),
        ("debian", "security.debian.org", 443),
        ("ubuntu", "archive.ubuntu.com", 80),
        ("ubuntu", "eu-west-1.ec2.archive.ubuntu.com", 80),
        ("conda", "conda.anaconda.org", 443),
        ("huggingface", "huggingface.co", 443),
        ("huggingface", "cas-bridge.xethub.hf.co", 443),
        ("gitlab", "gitlab.com", 443),
        ("rubygems", "index.rubygems.org", 443),
    ],
)
def test_opt_in_presets_allow_their_hosts(preset: str, host: str, port: int) -> None:
    policy = load_policy(REPO_PRESETS / f"{preset}.yaml")
    assert decide(Request(Kind.CONNECT, host, port), policy).decision is Verdict.ALLOW
    assert decide(Request(Kind.CONNECT, "example.com", port), policy).decision is Verdict.DENY


def test_a_user_policy_can_include_presets_by_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "version: 1\nmode: report\ninclude: [pypi, debian]\n"
        "rules:\n  - name: internal-mirror\n    hosts: [mirror.corp.example.com]\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert [r.name for r in policy.rules] == ["internal-mirror", "pypi", "debian"]
    assert policy.mode is Mode.REPORT
