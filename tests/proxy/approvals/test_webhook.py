"""Webhook signatures and secrets."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from proxy.approvals.webhook import WebhookError, load_secret, signature


def test_the_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"type": "approval.pending"}'
    expected = hmac.new(b"k" * 20, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"k" * 20, "1700000000", body) == f"v1={expected}"
    assert signature(b"k" * 20, "1700000001", body) != f"v1={expected}"


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [(b"short", 0o600, "at least 16"), (b"x" * 32, 0o644, "chmod 600")],
)
def test_secrets_must_be_long_and_private(
    tmp_path: Path, content: bytes, mode: int, message: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(WebhookError, match=message):
        load_secret(str(path))
