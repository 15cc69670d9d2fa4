"""The peers installed from the npm registry (``BENCH_PEERS=1``): OpenAI Codex's sandbox and Anthropic's
sandbox-runtime (srt). Each row either runs the same client inside the peer's own sandbox command
with an allowlist for the upstream, or says precisely why it could not run here."""

from __future__ import annotations

import shutil

from bench.table import Config


def _missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def codex_row() -> Config:
    return Config("Codex sandbox + network proxy (Rust)", [], None, unavailable=_why("codex"))


def srt_row() -> Config:
    return Config("srt (Node, bwrap + socat)", [], None, unavailable=_why("srt"))


def _why(tool: str) -> str:
    missing = _missing("npm", "bwrap", "socat")
    if missing:
        return f"needs {', '.join(missing)} (Debian: apt-get install bubblewrap socat; npm)"
    return f"{tool}: not wired into this harness yet"
