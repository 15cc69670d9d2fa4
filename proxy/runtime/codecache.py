"""Generated code compiled once per install instead of once per process.

A dataclass gets its ``__init__``, ``__repr__``, ``__eq__``, ``__hash__`` and, frozen, its
``__setattr__`` and ``__delattr__`` as source text that ``dataclasses`` compiles with ``exec`` when
the class is defined: about 1 ms a class on the development VM, most of it the compiler, and a
private gate defines some forty before its sandbox's command may run. The text depends only on the
class's fields and options, so what it compiles to can be kept like a module's bytecode:
:func:`install` gives ``dataclasses`` an ``exec`` that takes the code object for a text from a
table compiled ahead of time, and compiles the text as ``exec`` would when it is not there. The
functions are the same either way: the table holds what the compiler made of each text, compiled
with the same flags. :func:`compiled` serves the code the package generates itself
(``proxy.core.frozen``, ``proxy.evidence.record_json``) the same way.

``python -m proxy.runtime.codecache`` imports every module of ``proxy`` and ``addons`` and writes
the table (``make venv``, the Dockerfile and ``make bench`` run it) next to the package's bytecode,
in ``proxy/__pycache__``, where it is trusted as that bytecode is: it is read only when root or this
user owns it and nobody else may write it, and only when this very interpreter wrote it, at the same
optimisation level (``sys.version`` and ``-O`` are in its header, the bytecode tag in its name). A
missing, stale or unreadable table costs the time it was meant to save and nothing else; a class
whose text is not in it is compiled as before.

``dataclasses`` calling the name ``exec`` in its own module is how CPython 3.12 and 3.13 build the
methods, not a documented interface: ``tests/proxy/runtime/test_codecache.py`` fails when this
interpreter's ``dataclasses`` stops doing so (the table would then just never be used). Only the
programs' entry points install the table (``egress`` commands other than ``run``, and ``egress run``
before a private gate loads its policy), so importing the package changes nothing in a host
program.
"""

from __future__ import annotations

import builtins
import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = os.path.join(_PACKAGE, "__pycache__", f"generated-code.{sys.implementation.cache_tag}.bin")
_HEADER = f"agent-egress generated code\n{sys.version}\n-O{sys.flags.optimize}\n".encode()
_OWN = ("proxy.", "addons.")
_CODE = type(compile("", "<string>", "exec"))

_table: dict[str, bytes] = {}
"""Source text -> marshalled code object."""
_recorded: dict[str, bytes] | None = None
"""While :func:`record` is on: the texts this process compiled or took from the table."""
stats = {"hits": 0, "misses": 0}


def load(path: str = FILE) -> dict[str, bytes]:
    """The table at ``path``; empty when there is none, when root or this user does not own it or
    someone else may write it, or when another interpreter wrote it."""
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())  # the file read, not whatever the path names later
            if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
                return {}
            data = stream.read()
    except OSError:
        return {}
    if not data.startswith(_HEADER):
        return {}
    try:
        table = marshal.loads(data[len(_HEADER) :])
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if type(k) is str and type(v) is bytes}


def compiled(source: str, *, keep: bool = True) -> Any:
    """``source`` compiled as ``exec`` compiles a string for a module without ``__future__`` imports,
    taken from the table when it is there; ``keep``: a text :func:`write` should store."""
    blob = _table.get(source)
    if blob is not None:
        try:
            code = marshal.loads(blob)
        except (EOFError, ValueError, TypeError):
            code = None
        if type(code) is _CODE:
            stats["hits"] += 1
            if keep and _recorded is not None:
                _recorded[source] = blob
            return code
    stats["misses"] += 1
    code = compile(source, "<string>", "exec", dont_inherit=True)
    if keep and _recorded is not None:
        _recorded[source] = marshal.dumps(code)
    return code


def _exec(source: Any, globals: Any = None, locals: Any = None, /, **kwargs: Any) -> None:
    """``exec`` for ``dataclasses``: a text it generates is looked up, anything else passed on."""
    if type(source) is str and type(globals) is dict and not kwargs:
        keep = str(globals.get("__name__", "")).startswith(_OWN)
        builtins.exec(compiled(source, keep=keep), globals, locals)
    else:
        builtins.exec(source, globals, locals, **kwargs)


def install(path: str = FILE) -> None:
    """Read the table (once) and let ``dataclasses`` use it."""
    import dataclasses

    if getattr(dataclasses, "exec", None) is _exec:
        return
    _table.update(load(path))
    dataclasses.exec = _exec  # type: ignore[attr-defined]


def installed() -> bool:
    dataclasses = sys.modules.get("dataclasses")
    return dataclasses is not None and getattr(dataclasses, "exec", None) is _exec


def record() -> None:
    """From now on keep every text of the package compiled or looked up, for :func:`write`."""
    global _recorded
    _recorded = {}


def write(path: str = FILE) -> int:
    """Write what was kept since :func:`record` to ``path`` (replaced atomically, mode 0644);
    return the number of texts."""
    table = dict(sorted((_recorded or {}).items()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)  # a temporary left by a crash is written over
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as stream:
            stream.write(_HEADER + marshal.dumps(table))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return len(table)


def warm(path: str = FILE) -> int:
    """Import every module of the package with recording on and write the table; the number of
    texts."""
    import importlib
    import pkgutil

    record()
    install()
    root = os.path.dirname(_PACKAGE)
    for package in ("proxy", "addons"):
        directory = os.path.join(root, package)
        for module in pkgutil.walk_packages([directory], prefix=f"{package}."):
            if not module.name.endswith(".__main__"):
                try:
                    importlib.import_module(module.name)
                except ImportError as exc:  # an optional dependency: compiled at run time
                    print(
                        f"proxy.runtime.codecache: {module.name} not imported: {exc}",
                        file=sys.stderr,
                    )
    return write(path)


def main(path: str = FILE) -> int:
    """Write the table; a table that cannot be written is said and is not an error (``make venv``
    and the image go on): without it every class is compiled at start, as it was before."""
    try:
        count = warm(path)
    except OSError as exc:
        print(f"proxy.runtime.codecache: not written, {path}: {exc}", file=sys.stderr)
        return 0
    print(f"{path}: {count} generated code objects")
    return 0


if __name__ == "__main__":
    # Run the module's imported copy: its table is the one the package's generators record into.
    import importlib

    raise SystemExit(importlib.import_module("proxy.runtime.codecache").main())
