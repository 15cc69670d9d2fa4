"""The envelope shared by the gate's small YAML files (identities, admin tokens):

    version: 1
    <key>:
      - ...

``entries`` checks it once, with the same wording for every file, and hands back the list; each file then
checks its own entries.
"""

from __future__ import annotations

from pathlib import Path


def entries(data: object, path: Path, key: str, error: type[Exception]) -> list[object]:
    """The non-empty list under ``key`` of a ``version: 1`` mapping with no other keys; else ``error``."""
    if not isinstance(data, dict) or data.get("version") != 1:
        raise error(f"{path}: expected a mapping with 'version: 1'")
    unknown = set(data) - {"version", key}
    if unknown:
        raise error(f"{path}: unknown key(s) {sorted(unknown)}")
    found = data.get(key)
    if not isinstance(found, list) or not found:
        raise error(f"{path}: '{key}' must be a non-empty list")
    return found
