"""PyYAML, imported with its pure-Python reader's character pattern compiled at first use.

PyYAML compiles ``Reader.NON_PRINTABLE`` (a negated class over most of Unicode) when ``yaml`` is
imported: about 10 ms, twice that on a slow day, in every gate's and every ``egress run``'s start
(docs/startup.md). Only PyYAML's own parser reads it; policies are parsed by libyaml
(:mod:`proxy.policy.yamlnodes`), which refuses non-printable characters itself. So while ``yaml`` is
imported here, ``re.compile`` hands back, for that one pattern, an object that compiles it when it
is first used (the pure parser, where libyaml is missing, then works as before); every other
pattern is compiled as usual, and ``re.compile`` is put back before this module finishes.

This leans on how PyYAML builds that class attribute: PyYAML is pinned (constraints.txt) and
``tests/proxy/policy/test_yamlimport.py`` fails when an upgrade changes the pattern (the import then
pays for it again, nothing else changes). Modules read PyYAML's names through ``yamlnodes``, which
imports this module first; ruff's banned-api rule (pyproject.toml) refuses ``import yaml`` anywhere
else in the package.
"""

from __future__ import annotations

import re
import sys
from typing import Any

NON_PRINTABLE = "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_compile = re.compile


class DeferredPattern:
    """A compiled pattern made at its first use; any public attribute is the compiled pattern's
    (PyYAML calls ``search`` and reads the match). It is not an ``re.Pattern`` (no isinstance,
    equality or hash of one), which PyYAML never asks for."""

    __slots__ = ("_compiled", "_flags", "_source")

    def __init__(self, source: str, flags: int) -> None:
        self._source = source
        self._flags = flags
        self._compiled: re.Pattern[str] | None = None

    @property
    def compiled(self) -> re.Pattern[str]:
        compiled = self._compiled
        if compiled is None:  # two threads may both compile it: the same pattern either way
            compiled = self._compiled = _compile(self._source, self._flags)
        return compiled

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # a copy or an unpickled one, its slots unset: not the pattern's
            raise AttributeError(name)
        return getattr(self.compiled, name)


def _deferring(pattern: Any, flags: int = 0) -> Any:
    if flags == 0 and pattern.__class__ is str and pattern == NON_PRINTABLE:
        return DeferredPattern(pattern, flags)
    return _compile(pattern, flags)


def _import_yaml() -> None:
    if "yaml" in sys.modules:  # imported before (a tool, a test): nothing to save
        return
    re.compile = _deferring
    try:
        import yaml  # noqa: F401
    finally:
        re.compile = _compile


_import_yaml()
