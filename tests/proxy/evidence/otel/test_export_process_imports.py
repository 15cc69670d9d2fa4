"""The export process starts with every gate that keeps a journal and exports OTLP, a private gate's
included: it must not load what it never uses (the metrics registry with its HTTP server, the policy
loader with YAML), which was a third of its start-up CPU on the 2 cores it shares with the gate."""

from __future__ import annotations

from pathlib import Path

from tests.harness import fresh_python

ROOT = Path(__file__).resolve().parents[4]


def test_the_export_process_loads_no_registry_and_no_policy_code() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import proxy.evidence.otel.__main__;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prometheus_client', 'yaml')"
        " or m.startswith(('proxy.policy', 'proxy.evidence.metrics', 'http.server'))))"
    )
    assert fresh_python(code, str(ROOT)).strip() == "[]"
