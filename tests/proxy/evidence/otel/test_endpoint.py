"""Where export goes: flags first, then the standard OTEL_EXPORTER_OTLP_* variables."""

from __future__ import annotations

import pytest

from proxy.evidence.otel.endpoint import resolve_endpoint


def test_endpoint_resolution_from_flags_and_environment() -> None:
    assert resolve_endpoint(None, None, env={}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert resolve_endpoint(None, None, env=env) == ("http://c:4317", "grpc")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    assert resolve_endpoint(None, None, env=env) == ("http://c:4318/v1/logs", "http")
    env = {
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:9/custom",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "x",
    }
    assert resolve_endpoint(None, "http", env=env) == ("http://c:9/custom", "http")
    # flags win over the environment
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert resolve_endpoint("http://d:4318", "http", env=env) == ("http://d:4318/v1/logs", "http")
    assert resolve_endpoint("http://d:4318/v1/logs", None, env={}) == (
        "http://d:4318/v1/logs",
        "http",
    )
    with pytest.raises(ValueError, match="--otlp-protocol"):
        resolve_endpoint("http://d:1", "thrift", env={})


def test_otel_sdk_disabled_turns_export_off() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}
    assert resolve_endpoint(None, None, env=env) is None
    assert resolve_endpoint("http://d:4318", "http", env=env) is None
    env["OTEL_SDK_DISABLED"] = "false"
    assert resolve_endpoint(None, None, env=env) == ("http://c:4317", "grpc")
