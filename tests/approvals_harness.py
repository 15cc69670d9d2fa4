"""A real ``egress serve`` with approvals (admin API, token files), and the answering commands.

Used by the end-to-end approval tests: every request goes through the real gate process, every answer
through the real ``egress approve``/``deny`` commands and the admin API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.policy.identities import new_token, token_digest
from tests.harness import CurlResult, clean_env, curl, waited_for, written_lines
from tests.proxy.app.test_serve import Serve

if TYPE_CHECKING:
    import requests

    from tests.dnsfake import FakeDns
    from tests.harness import Upstream

REPO = Path(__file__).resolve().parents[1]
WAIT = 20.0


def write_tokens(directory: Path, *names: str) -> tuple[Path, dict[str, Path]]:
    """An --admin-tokens file (mode 0600) for ``names``, and each person's own token file."""
    lines = ["version: 1", "admins:"]
    own: dict[str, Path] = {}
    for name in names:
        token = new_token()
        lines += [f"  - name: {name}", f"    token_sha256: {token_digest(token)}"]
        path = directory / f"{name}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        own[name] = path
    tokens = directory / "admin-tokens.yaml"
    tokens.write_text("\n".join(lines) + "\n")
    tokens.chmod(0o600)
    return tokens, own


class ApprovalGate:
    """``egress serve`` with ``--admin``; ``admin`` is the admin API's base URL."""

    def __init__(
        self, policy: Path, nameserver: str, directory: Path, *extra: str, admin_port: int = 0
    ) -> None:
        self.directory = directory
        self.tokens, self.token_files = write_tokens(directory, "alice", "bob")
        self.log = directory / "decisions.jsonl"
        self.serve = Serve(
            "--policy", str(policy), "--nameserver", nameserver,
            "--admin", f"127.0.0.1:{admin_port}", "--admin-tokens", str(self.tokens),
            "--state-dir", str(directory / "state"), "--decision-log", str(self.log),
            *extra,
        )  # fmt: skip
        self.port = self.serve.port
        self.admin = self.serve.info["admin"]
        self.proxy = f"http://127.0.0.1:{self.port}"

    def egress(self, *args: str, who: str = "alice") -> subprocess.CompletedProcess[str]:
        env = clean_env(
            EGRESS_ADMIN_URL=self.admin, EGRESS_ADMIN_TOKEN_FILE=str(self.token_files[who])
        )
        return subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", *args],
            cwd=REPO, capture_output=True, text=True, timeout=WAIT + 10, env=env,
        )  # fmt: skip

    def pending(self) -> list[dict[str, Any]]:
        result = self.egress("approvals", "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_pending(self, count: int = 1) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]]:
            found = self.pending()
            return found if len(found) >= count else []

        return waited_for(
            enough, f"{count} pending approval(s)", WAIT, interval=0.1
        )  # runs the CLI

    def decisions(self) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in written_lines(self.log) if line]
        return [r for r in records if r.get("event") == "egress.decision"]

    def event_stream(self, session: requests.Session, who: str = "alice") -> requests.Response:
        """The admin API's event stream (approvals, reloads and decisions), opened as ``who``."""
        token = self.token_files[who].read_text().strip()
        return session.get(
            f"{self.admin}/v1/events?decisions=1",
            headers={"Authorization": f"Bearer {token}"},
            stream=True,
            timeout=(5, 30),
        )

    def stop(self) -> int:
        return self.serve.stop()


class Background:
    """A blocking client call in a thread: start it, answer the approval, then ``result()``."""

    def __init__(self, call: Callable[[], CurlResult]) -> None:
        self._result: CurlResult | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], CurlResult]) -> None:
        self._result = call()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = WAIT + 15) -> CurlResult:
        self._thread.join(timeout)
        assert self._result is not None, "the client did not finish"
        return self._result


def fetch(url: str, proxy: str, *args: str, timeout: float = WAIT + 10) -> Background:
    return Background(lambda: curl(url, proxy, *args, timeout=timeout))


def repo_gate(tmp_path: Path, fake_dns: FakeDns, upstream: Upstream, policy: str) -> ApprovalGate:
    """An :class:`ApprovalGate` whose ``policy`` (formatted with ``port``, the upstream's) governs
    ``repo.test``, which resolves to the loopback upstream."""
    fake_dns.set("repo.test", "A", ["127.0.0.1"])
    path = tmp_path / "policy.yaml"
    path.write_text(policy.format(port=upstream.port))
    directory = tmp_path / "gate"
    directory.mkdir()
    return ApprovalGate(path, fake_dns.nameserver, directory)


def repo_url(upstream: Upstream, path: str) -> str:
    return f"http://repo.test:{upstream.port}{path}"
