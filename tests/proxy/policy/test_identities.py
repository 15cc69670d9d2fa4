"""Per-sandbox credentials: parsing the identities file and authenticating proxy Basic auth."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy.policy.identities import Identities, IdentityError, token_digest


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def identities(tmp_path: Path) -> Identities:
    path = tmp_path / "sandboxes.yaml"
    path.write_text(
        "version: 1\n"
        "sandboxes:\n"
        f"  - id: alpha\n    token_sha256: {token_digest('tok-a')}\n    policy: alpha.yaml\n"
        f"  - id: beta\n    token_sha256: {token_digest('tok-b')}\n"
    )
    return Identities.load(path)


def test_valid_credentials_identify_the_sandbox(identities: Identities, tmp_path: Path) -> None:
    alpha = identities.authenticate(basic("alpha", "tok-a"))
    assert alpha is not None and alpha.id == "alpha"
    assert alpha.policy == tmp_path / "alpha.yaml"
    beta = identities.authenticate(basic("beta", "tok-b"))
    assert beta is not None and beta.id == "beta" and beta.policy is None


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        basic("alpha", "tok-b"),  # another sandbox's token cannot claim alpha
        basic("beta", "tok-a"),
        basic("gamma", "tok-a"),
        basic("alpha", ""),
        "Basic " + base64.b64encode(b"alpha").decode(),  # no colon
        "Bearer tok-a",
        "Basic !!!notbase64",
        basic("alpha", "tok-a") + "x",
    ],
)
def test_anything_else_is_refused(identities: Identities, header: str | None) -> None:
    assert identities.authenticate(header) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\nsandboxes: []\n", "version: 1"),
        ("version: 1\nsandboxes: []\n", "non-empty"),
        ("version: 1\nsandboxes:\n  - id: a\n    token_sha256: abc\n", "64 lower-case hex"),
        ("version: 1\nsandboxes:\n  - id: 'a b'\n    token_sha256: " + "a" * 64 + "\n", "'id'"),
        # "$" matches before a trailing newline: the id must be matched whole.
        (
            'version: 1\nsandboxes:\n  - id: "agent-7\\n"\n    token_sha256: ' + "a" * 64 + "\n",
            r"'id' must be .*, not 'agent-7\\n'",
        ),
        (
            "version: 1\nsandboxes:\n  - id: a\n    token_sha256: " + "a" * 64 + "\n    role: x\n",
            "unknown key",
        ),
        (
            "version: 1\nsandboxes:\n" + ("  - id: a\n    token_sha256: " + "a" * 64 + "\n") * 2,
            "duplicate",
        ),
        # nested past the YAML bound: an error naming the file, not a recursion out of the loader
        ("version: 1\nsandboxes: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ],
)
def test_bad_files_refuse_to_load_naming_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(IdentityError, match=message) as info:
        Identities.load(path)
    assert str(path) in str(info.value)
