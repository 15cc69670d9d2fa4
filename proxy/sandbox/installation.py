"""The gate's own installation, kept read-only inside every sandbox.

The launcher and every gate it starts run Python from this installation outside the sandbox: the
next ``egress run`` reads the virtual environment's ``.pth`` files before it does anything, and a
gate imports modules late, while a command runs. A command running as the installation's owner (a
virtual environment the user created, ``pipx``, a checkout) could otherwise plant a ``.pth`` file,
rewrite a module or replace the ``egress`` script, and the next run would execute it outside any
sandbox, with the host's network. So what this interpreter runs from is bind-mounted read-only into
the sandbox: the virtual environment, each entry of the import path, the gate's own packages, the
interpreter and its shared library.

An import-path entry that holds the working directory (a checkout run in place, where the agent
works) is not frozen whole: its ``proxy`` and ``addons`` packages are, and it comes after the
standard library and site-packages on the path (see :mod:`proxy.runtime.safepath`).
"""

from __future__ import annotations

import os
import sys

_OWN_PACKAGES = ("proxy", "addons")


def installation_paths(working_dirs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What the sandbox must not write, outermost paths only (a nested path is covered by the
    recursive bind of its parent). ``working_dirs``: directories the command works in; an import
    path entry that is one of them or holds one is left writable (the gate's own packages, kept
    read-only wherever they are, are the part of it the gate runs)."""
    try:
        cwd = os.getcwd()
    except OSError:  # a deleted working directory: it holds no import path entry
        cwd = ""
    here = [_real(d) for d in (cwd, *working_dirs) if d]
    found: list[str] = []
    if sys.prefix != sys.base_prefix:  # a virtual environment: all of it is the installation
        found.append(_real(sys.prefix))
    root = os.path.dirname(os.path.dirname(os.path.dirname(_real(__file__))))  # holds `proxy`
    for entry in sys.path:
        if not entry:
            continue
        path = _real(entry)
        if not any(within(w, path) for w in here):
            found.append(path)
    found += [os.path.join(root, name) for name in _OWN_PACKAGES]
    interpreter = _real(sys.executable)
    found.append(interpreter)
    found += _shared_libraries(sys.base_prefix)
    existing = [p for p in dict.fromkeys(found) if os.path.lexists(p)]
    return _outermost(existing)


def _shared_libraries(prefix: str) -> list[str]:
    """The interpreter's ``libpythonX.Y.so*`` of a prefix of its own (pyenv, /opt, a build): a
    system prefix's libraries belong to the system, which the user cannot write."""
    lib = os.path.join(prefix, "lib")
    stem = f"libpython{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        names = os.listdir(lib)
    except OSError:
        return []
    return [_real(os.path.join(lib, n)) for n in sorted(names) if n.startswith(stem)]


def _outermost(paths: list[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(paths, key=len):
        if not any(within(path, k) for k in kept):
            kept.append(path)
    return tuple(sorted(kept))


def within(path: str, parent: str) -> bool:
    """``path`` is ``parent`` or below it (both absolute, resolved)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


__all__ = ["installation_paths", "within"]
