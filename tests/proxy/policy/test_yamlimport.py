"""PyYAML imported with its pure reader's character pattern compiled at first use: nothing else
changes (the pure parser still refuses control characters, ``re.compile`` is the standard one
again), libyaml's parsing never compiles it, whichever module of the gate imports PyYAML first, and
a PyYAML upgrade that changes the pattern fails here instead of silently costing the start again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import fresh_python

REPO = Path(__file__).resolve().parents[3]

CHECK = """
import json, re, sys
standard = re.compile
import {first}
from proxy.policy import yamlnodes
import yaml.reader
from proxy.policy.yamlimport import DeferredPattern
held = yaml.reader.Reader.NON_PRINTABLE
out = {{
    "deferred": isinstance(held, DeferredPattern),
    "compiled_at_import": getattr(held, "_compiled", "n/a") is not None,
    "re_compile_restored": re.compile is standard,
}}
out["libyaml_composes"] = yamlnodes.compose("a: [1, 2]\\nb: caf\\u00e9\\n") is not None
out["compiled_by_libyaml"] = getattr(held, "_compiled", "n/a") is not None
try:
    yaml.reader.Reader("a\\x07b")
    out["control_refused"] = False
except yaml.reader.ReaderError as exc:
    out["control_refused"] = "special characters are not allowed" in str(exc)
yaml.reader.Reader("caf\\u00e9 \\U0001F600\\ttab")  # printable text, astral plane included
print(json.dumps(out))
"""

EXPECTED = {
    "deferred": True,
    "compiled_at_import": False,
    "re_compile_restored": True,
    "libyaml_composes": True,
    "compiled_by_libyaml": False,
    "control_refused": True,
}


def _run(first: str) -> dict[str, object]:
    out = fresh_python(CHECK.format(first=first), cwd=REPO)
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "first",
    [
        "proxy.policy.yamlnodes",
        "proxy.policy.managed",  # what a private gate's start imports
        "proxy.credentials.loader",
        "proxy.approvals.tokens",
        "proxy.app.serve",
    ],
)
def test_pyyaml_imports_without_compiling_its_pure_readers_pattern(first: str) -> None:
    assert _run(first) == EXPECTED, (
        "PyYAML's Reader.NON_PRINTABLE is compiled at import: if PyYAML changed the pattern, "
        "update proxy/policy/yamlimport.NON_PRINTABLE; else a module imports yaml directly"
    )


def test_pyyaml_imported_before_is_left_as_it_is() -> None:
    seen = _run("yaml")
    assert seen["deferred"] is False and seen["control_refused"] is True
    assert seen["re_compile_restored"] is True and seen["libyaml_composes"] is True


def test_a_deferred_pattern_copied_or_pickled_still_searches() -> None:
    """Copying looks up dunder names on an object whose slots may be unset: they are never
    forwarded to the pattern, so that lookup cannot recurse."""
    import copy
    import pickle

    from proxy.policy.yamlimport import DeferredPattern

    pattern = DeferredPattern("[^a]", 0)
    for each in (pattern, copy.copy(pattern), copy.deepcopy(pattern)):
        assert each.search("ax") is not None and each.search("aa") is None
    restored = pickle.loads(pickle.dumps(pattern))
    assert restored.search("ax") is not None and restored.pattern == "[^a]"
