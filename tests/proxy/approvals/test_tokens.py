"""Admin tokens: digests only, a private file, every entry compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.approvals.tokens import AdminTokens, TokenError
from proxy.policy.identities import new_token, token_digest


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_each_token_names_its_owner(tmp_path: Path) -> None:
    alice, bob = new_token(), new_token()
    tokens = AdminTokens.load(
        write(
            tmp_path,
            "version: 1\nadmins:\n"
            f"  - name: alice\n    token_sha256: {token_digest(alice)}\n"
            f"  - name: chat-bot\n    token_sha256: {token_digest(bob)}\n",
        )
    )
    assert tokens.authenticate(f"Bearer {alice}") == "alice"
    assert tokens.authenticate(f"bearer  {bob} ") == "chat-bot"
    for header in (None, "", "Bearer", f"Basic {alice}", f"Bearer {alice}x", "Bearer " + "0" * 43):
        assert tokens.authenticate(header) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_a_file_others_can_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(
        tmp_path, f"version: 1\nadmins:\n  - name: a\n    token_sha256: {'a' * 64}\n", mode
    )
    with pytest.raises(TokenError, match="chmod 600"):
        AdminTokens.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\nadmins: []\n", "version: 1"),
        ("version: 1\nadmins: []\n", "non-empty"),
        ("version: 1\nadmins:\n  - name: a\n    token_sha256: abc\n", "64 lower-case hex"),
        (f"version: 1\nadmins:\n  - name: 'a b'\n    token_sha256: {'a' * 64}\n", "'name'"),
        (
            f"version: 1\nadmins:\n  - name: a\n    token_sha256: {'a' * 64}\n"
            f"  - name: a\n    token_sha256: {'b' * 64}\n",
            "duplicate",
        ),
        (f"version: 1\nadmins:\n  - name: a\n    token: {'a' * 64}\n", "expected a mapping"),
        # nested past the YAML bound: an error naming the file, not a recursion out of the loader
        ("version: 1\nadmins: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ],
)
def test_problems_name_the_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message) as info:
        AdminTokens.load(write(tmp_path, text))
    assert str(tmp_path / "tokens.yaml") in str(info.value)
