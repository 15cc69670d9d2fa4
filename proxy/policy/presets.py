"""Where shipped allowlist presets live, so `include: [pypi]` means the same file everywhere.

Presets are plain policy files in the repository's ``allowlists/`` directory. A deployment that installs
the package elsewhere (a container image, a wheel) points ``EGRESS_PRESETS_DIR`` at its copy; nothing
else decides where a bare include name resolves, so a policy cannot be redirected by the working
directory it happens to be loaded from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import proxy

ENV_VAR = "EGRESS_PRESETS_DIR"

# A bare lower-case word is a preset name; anything with a dot, slash or upper case is a path.
PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def presets_dir() -> Path:
    """The directory bare include names resolve in (read on every call: tests and CLIs may set it)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured)
    return Path(proxy.__file__).resolve().parent.parent / "allowlists"


def is_preset_name(name: str) -> bool:
    return PRESET_NAME.fullmatch(name) is not None


def preset_path(name: str) -> Path:
    """The file a preset name refers to; raises ValueError for anything that is not a preset name."""
    if not is_preset_name(name):
        raise ValueError(f"{name!r} is not a preset name (lower-case letters, digits, '-' and '_')")
    return presets_dir() / f"{name}.yaml"


def list_presets() -> list[str]:
    """Names of the presets that exist, sorted, for `--help` texts and tests."""
    directory = presets_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml") if is_preset_name(p.stem))
