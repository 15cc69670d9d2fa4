"""Sources and the store: values read at start (or the start fails, naming the source and never a
value), a changed file picked up on use, commands re-run on refresh, old values still scrubbed."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest

from proxy.core.credentials import Binding, Delivery
from proxy.credentials.loader import Declaration
from proxy.credentials.sandbox import provide
from proxy.credentials.sources import Source, SourceError
from proxy.credentials.store import CredentialStore

TOKEN = "ghp_" + "T" * 36


def declaration(source: Source, name: str = "github", **kwargs: object) -> Declaration:
    binding = Binding(
        name,
        frozenset({("github.com", 443), ("ghe.example", 8443)}),
        Delivery(header="authorization", basic=True, basic_username="x-access-token"),
    )
    return Declaration(binding, source, **kwargs)  # type: ignore[arg-type]


def secret(tmp_path: Path, value: str, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def test_a_changed_file_is_picked_up_and_the_old_value_still_scrubbed(tmp_path: Path) -> None:
    path = secret(tmp_path, TOKEN)
    store = CredentialStore([declaration(Source("file", path=str(path)))])
    placeholder = store.issue("sbx-1")["github"]
    assert store.value("github") == TOKEN
    rotated = "ghp_" + "U" * 36
    path.write_text(rotated + "\n" + " " * 3)  # another size: a new stamp
    assert store.value("github") == rotated
    pairs = store.scrub_pairs("sbx-1")
    assert pairs[:2] == [(rotated, placeholder), (TOKEN, placeholder)]
    # then both values' encoded forms (Basic credentials' base64), each to the placeholder's
    encoded = base64.b64encode(f"me:{TOKEN}".encode()).decode()
    assert any(real in encoded for real, _ in pairs[2:])
    path.unlink()  # gone: the last good value stays
    assert store.value("github") == rotated


def test_a_command_is_run_again_on_refresh(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("1")
    script = (
        "import pathlib,sys; p=pathlib.Path(sys.argv[1]); n=int(p.read_text()); "
        "p.write_text(str(n+1)); print('sk-' + 'k'*40 + str(n))"
    )
    source = Source("command", argv=(sys.executable, "-c", script, str(counter)))
    store = CredentialStore([declaration(source)])
    first = store.value("github")
    assert store.value("github") == first  # not re-run on use
    assert store.refresh() == ["github"]
    assert store.value("github") != first and store.value("github").endswith("2")


def test_a_failing_refresh_keeps_the_value(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    script = f"import os,sys; sys.exit(3 if os.path.exists({str(marker)!r}) else print('tok-x'))"
    store = CredentialStore([declaration(Source("command", argv=(sys.executable, "-c", script)))])
    marker.write_text("")
    assert store.refresh() == []
    assert store.value("github") == "tok-x"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (Source("env", env="EGRESS_TEST_UNSET_VARIABLE"), "is not set"),
        (Source("command", argv=("false",)), "exited with status 1"),
        (Source("command", argv=("/nonexistent/egress-test",)), "could not run"),
    ],
)
def test_an_unreadable_source_stops_the_start(source: Source, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        CredentialStore([declaration(source)])


def test_file_sources_must_be_private_and_one_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="readable or writable by group or others"):
        CredentialStore([declaration(Source("file", path=str(secret(tmp_path, TOKEN, 0o644))))])
    two = secret(tmp_path, f"{TOKEN}\nsecond")
    with pytest.raises(SourceError, match="more than one line") as info:
        CredentialStore([declaration(Source("file", path=str(two)))])
    assert TOKEN not in str(info.value)


def test_a_command_that_fails_never_shows_its_output() -> None:
    # the token is built when the command runs: only its output could show it
    script = "import sys; t = 'ghp_' + 'T' * 36; print(t); print(t, file=sys.stderr); sys.exit(2)"
    with pytest.raises(SourceError) as info:
        CredentialStore([declaration(Source("command", argv=(sys.executable, "-c", script)))])
    assert TOKEN not in str(info.value)


def test_what_the_sandbox_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRESS_TEST_GH", TOKEN)
    gh = declaration(Source("env", env="EGRESS_TEST_GH"), env=("GH_TOKEN",), git=True)
    npm_path = secret(tmp_path, "npm_" + "N" * 36)
    npm = declaration(Source("file", path=str(npm_path)), name="npm", env=("NPM_TOKEN",),
                      npmrc=True)  # fmt: skip
    provided = provide(CredentialStore([gh, npm]), "sbx-1", "/etc/egress/credentials.yaml")
    assert provided.hidden == ("/etc/egress/credentials.yaml", str(npm_path))
    env = provided.apply_to(
        {"EGRESS_TEST_GH": TOKEN, "OLD": f"Bearer {TOKEN}", "GIT_CONFIG_COUNT": "1",
         "GIT_CONFIG_KEY_0": "a.b", "GIT_CONFIG_VALUE_0": "c", "PATH": "/bin",
         "HOME": str(tmp_path)}
    )  # fmt: skip
    assert "EGRESS_TEST_GH" not in env and "OLD" not in env and env["PATH"] == "/bin"
    ph = provided.placeholders["github"]
    assert env["GH_TOKEN"] == ph and env["NPM_TOKEN"] == provided.placeholders["npm"]
    npmrc = Path(env["NPM_CONFIG_USERCONFIG"]).read_text().splitlines()
    assert npmrc == [
        f"//ghe.example:8443/:_authToken={provided.placeholders['npm']}",
        f"//github.com/:_authToken={provided.placeholders['npm']}",
    ]
    assert os.stat(env["NPM_CONFIG_USERCONFIG"]).st_mode & 0o777 == 0o600
    provided.cleanup()
    assert not Path(env["NPM_CONFIG_USERCONFIG"]).exists()
    assert env["GIT_CONFIG_COUNT"] == "5" and env["GIT_CONFIG_KEY_0"] == "a.b"
    keys = [env[f"GIT_CONFIG_KEY_{i}"] for i in range(1, 5)]
    assert keys == [
        "credential.https://ghe.example:8443.helper",
        "credential.https://ghe.example:8443.helper",
        "credential.https://github.com.helper",
        "credential.https://github.com.helper",
    ]
    assert env["GIT_CONFIG_VALUE_1"] == "" and ph in env["GIT_CONFIG_VALUE_2"]
    assert all(TOKEN not in value for value in env.values())


def test_the_sandbox_gets_no_variable_holding_a_value_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable holding the value base64-encoded (git's ``http.extraheader`` as ``Authorization:
    Basic ...``, a value encoded on its own, URL-safe) hands the value over as surely as one holding
    it in clear: none reaches the sandbox; the rest of the environment does."""
    monkeypatch.setenv("EGRESS_TEST_GH", TOKEN)
    gh = declaration(Source("env", env="EGRESS_TEST_GH"), env=("GH_TOKEN",))
    provided = provide(CredentialStore([gh]), "sbx-1", "/etc/egress/credentials.yaml")
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    given = {
        "EXTRAHEADER": f"AUTHORIZATION: basic {basic}",
        "ALONE": base64.b64encode(TOKEN.encode()).decode(),
        "URLSAFE": base64.urlsafe_b64encode(f"u:{TOKEN}".encode()).decode(),
        "PATH": "/bin",
        "SHORT": "dG9r",  # no encoded form is searched for that short
    }
    env = provided.apply_to(given)
    assert {name for name in given if name in env} == {"PATH", "SHORT"}
