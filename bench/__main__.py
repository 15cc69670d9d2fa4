"""``python -m bench``: the one table (``bench/table.py``); ``python -m bench NAME...``: those modules.

Modules are discovered rather than listed so a new ``bench/<topic>.py`` with a ``main()`` can be run by
name without touching this file. One failing benchmark does not hide the others' numbers.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import bench


def discover() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")]
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    wanted = set(argv if argv is not None else sys.argv[1:]) or {"table"}
    failed: list[str] = []
    for name in discover():
        if wanted and name not in wanted:
            continue
        try:
            module = importlib.import_module(f"bench.{name}")
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        entry = getattr(module, "main", None)
        if not callable(entry):
            continue
        print(f"== bench.{name}", flush=True)
        started = time.perf_counter()
        try:
            status = entry()
        except Exception:
            traceback.print_exc()
            status = 1
        print(f"== bench.{name}: {time.perf_counter() - started:.1f} s", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
