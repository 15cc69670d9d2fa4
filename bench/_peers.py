"""The peers from the npm registry (``BENCH_PEERS=1``): OpenAI Codex's sandbox with its network proxy,
and Anthropic's sandbox-runtime (``srt``). Each runs the same client inside its own sandbox command,
with an allowlist holding only the loopback upstream; the client uses the proxy the peer puts in the
sandbox's environment. A row that cannot run says precisely why.

Installed into ``~/.cache/egress-bench`` (Codex refuses a home under /tmp for its helper links): the
npm packages, and from Debian what they need (bubblewrap, socat, ripgrep) when running as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.table import Config

CACHE = Path.home() / ".cache" / "egress-bench"
PACKAGES = ("@openai/codex", "@anthropic-ai/sandbox-runtime")
DEBIAN = {"bwrap": "bubblewrap", "socat": "socat", "rg": "ripgrep", "squid": "squid"}
# Debian's hook that keeps installed daemons from starting
POLICY_RC = Path("/usr/sbin/policy-rc.d")
CODEX_CONFIG = """\
default_permissions = "bench"

[features]
network_proxy = true

[permissions.bench.filesystem]
":root" = "read"

[permissions.bench.network]
enabled = true
allow_local_binding = true
domains = { "127.0.0.1" = "allow" }
"""
SRT_SETTINGS = {
    "network": {"allowedDomains": ["127.0.0.1"], "deniedDomains": []},
    "filesystem": {"denyRead": [], "allowWrite": ["/tmp"], "denyWrite": []},
}


def _install() -> str:
    """Install what the peers need; an empty string, or why they cannot run."""
    missing = [pkg for tool, pkg in DEBIAN.items() if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return f"needs {' '.join(missing)} (apt-get install {' '.join(missing)})"
        why = _apt_install(missing)
        if why:
            return why
    if shutil.which("npm") is None:
        return "needs npm (apt-get install npm)"
    bins = CACHE / "npm" / "node_modules" / ".bin"
    if not ((bins / "codex").exists() and (bins / "srt").exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE / "npm"),
             *PACKAGES],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            return f"npm install failed: {proc.stderr.strip()[-200:]}"
    return ""


_INSTALLED: list[str] = []


def install_peers() -> str:
    """Install the peers once per run (squid's row needs it before the npm rows are built); an
    empty string, or why they cannot run."""
    if not _INSTALLED:
        _INSTALLED.append(_install())
    return _INSTALLED[0]


def _apt_install(packages: list[str]) -> str:
    """apt-get install, with the packages' daemons (squid's) kept from starting: the bench runs its
    own squid on loopback and stops it by its PID. An empty string, or why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    created = not POLICY_RC.exists()
    if created:
        POLICY_RC.write_text("#!/bin/sh\n# written by the bench while it runs apt-get\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:  # a fresh machine's package lists may be stale: read them again
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    finally:
        if created:
            POLICY_RC.unlink(missing_ok=True)
    if proc.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-200:]}"
    return ""


def peer_configs() -> list[Config]:
    codex_name = "Codex sandbox + network proxy (Rust)"
    srt_name = "srt (Node, bwrap + socat)"
    why = install_peers()
    if why:
        return [
            Config(codex_name, [], None, unavailable=why),
            Config(srt_name, [], None, unavailable=why),
        ]
    bins = CACHE / "npm" / "node_modules" / ".bin"
    home = CACHE / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(CODEX_CONFIG)
    settings = CACHE / "srt-settings.json"
    settings.write_text(json.dumps(SRT_SETTINGS))
    codex = [str(bins / "codex"), "sandbox", "--"]
    srt = [str(bins / "srt"), "--settings", str(settings), "--"]
    env = {"CODEX_HOME": str(home)}
    return [
        Config(codex_name, codex, "env", start=[*codex, "true"], env=env),
        Config(srt_name, srt, "env", start=[*srt, "true"]),
    ]


def versions() -> str:
    bins = CACHE / "npm" / "node_modules" / ".bin"
    out = []
    for tool in ("codex", "srt"):
        try:
            proc = subprocess.run(
                [str(bins / tool), "--version"], capture_output=True, text=True, timeout=30
            )
            out.append(f"{tool} {proc.stdout.strip().split()[-1]}")
        except (OSError, IndexError, subprocess.SubprocessError):
            continue
    return ", ".join(out)
