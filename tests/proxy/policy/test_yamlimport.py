"""PyYAML imported with its pure reader's character pattern compiled at first use: nothing else
changes (the pure parser still refuses control characters, ``re.compile`` is the standard one
again), and a PyYAML upgrade that changes the pattern fails here instead of silently costing the
start-up again."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import fresh_python

FRESH = """
import json, re, sys
standard = re.compile
from proxy.policy import yamlnodes
import yaml.reader
from proxy.policy.yamlimport import DeferredPattern, NON_PRINTABLE
held = yaml.reader.Reader.NON_PRINTABLE
out = {
    "deferred": isinstance(held, DeferredPattern),
    "compiled_at_import": getattr(held, "_compiled", "n/a") is not None,
    "re_compile_restored": re.compile is standard,
    "pattern_in_pyyaml": held.pattern == NON_PRINTABLE,
}
try:
    yaml.reader.Reader("a\\x07b")
    out["control_refused"] = False
except yaml.reader.ReaderError as exc:
    out["control_refused"] = "special characters are not allowed" in str(exc)
yaml.reader.Reader("caf\\u00e9 \\U0001F600\\ttab")  # printable text, astral plane included
out["libyaml_composes"] = yamlnodes.compose("a: [1, 2]\\n") is not None
print(json.dumps(out))
"""


REPO = Path(__file__).resolve().parents[3]


def _run(code: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(fresh_python(code, cwd=REPO).splitlines()[-1])
    return result


def test_pyyaml_imports_without_compiling_its_pure_readers_pattern() -> None:
    seen = _run(FRESH)
    assert seen == {
        "deferred": True,
        "compiled_at_import": False,
        "re_compile_restored": True,
        "pattern_in_pyyaml": True,
        "control_refused": True,
        "libyaml_composes": True,
    }, "PyYAML's Reader.NON_PRINTABLE changed: update proxy/policy/yamlimport.NON_PRINTABLE"


def test_pyyaml_imported_before_is_left_as_it_is() -> None:
    seen = _run("import yaml\n" + FRESH)
    assert seen["deferred"] is False and seen["control_refused"] is True
    assert seen["re_compile_restored"] is True and seen["libyaml_composes"] is True
