"""The working directory off the front of the import path, as ``python -P`` would have kept it.

``python -m proxy.app.cli`` puts the directory it was started in first on ``sys.path``. A gate imports
some modules only when they are first needed, after its command is running (dnspython at the first DNS
question, h11 at the first response only it reads, mitmproxy at the first request it serves), and that
command can write to the directory: a ``dns/`` package it leaves there would run in the gate, outside
the sandbox. The ``egress`` script and ``python -P`` never add the directory.
"""

from __future__ import annotations

import os
import sys


def drop_working_directory() -> None:
    """Remove the working directory from the front of ``sys.path``; when it is this installation's
    own root (a checkout run in place) and no other entry provides its packages, put it back last,
    after the standard library and site-packages, so the gate's packages stay importable but
    nothing there shadows a library."""
    if sys.flags.safe_path or not sys.path:
        return
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # a deleted working directory: then "" or its old path resolves to nothing
        here = None
    first = sys.path[0]
    if first != "" and os.path.realpath(first) != here:
        return
    del sys.path[0]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if here is not None and here == root and root not in sys.path and not _elsewhere("addons"):
        sys.path.append(root)


def _elsewhere(package: str) -> bool:
    """Whether another import path entry provides ``package`` (the environment's links to the
    checkout's packages, ``scripts/link-packages``): then the checkout itself need not be on it."""
    return any(p and os.path.isfile(os.path.join(p, package, "__init__.py")) for p in sys.path)


def drop_environment_path() -> None:
    """Remove the ``PYTHONPATH`` entries from ``sys.path`` unless they hold a module already
    loaded (the installation itself, run from there). They come before the standard library and
    site-packages, and they are the command's: ``PYTHONPATH=src egress run -- CMD`` names the
    agent's own source, where a ``dns/`` package it wrote would run in the gate at the first DNS
    question, outside the sandbox. Dropped, they are neither imported from nor kept read-only in
    the sandbox (the agent goes on writing its source)."""
    if sys.flags.ignore_environment or not os.environ.get("PYTHONPATH"):
        return
    named = {os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p}
    loaded = [
        os.path.abspath(f)
        for m in list(sys.modules.values())
        if (f := getattr(m, "__file__", None))
    ]
    kept = []
    for entry in sys.path:
        path = os.path.abspath(entry) if entry else ""
        if path in named and not any(f.startswith(path.rstrip("/") + "/") for f in loaded):
            continue
        kept.append(entry)
    sys.path[:] = kept
