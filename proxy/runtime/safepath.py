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
    own root (a checkout run in place), put it back last, after the standard library and
    site-packages, so the gate's packages stay importable but nothing there shadows a library."""
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
    if here is not None and here == root and root not in sys.path:
        sys.path.append(root)
