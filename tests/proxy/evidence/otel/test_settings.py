"""The standard exporter variables: read once, the logs signal's own first, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.evidence.otel.settings import DEFAULT_TIMEOUT, ExporterSettings


def test_nothing_set_means_plain_defaults() -> None:
    assert ExporterSettings.from_env({}) == ExporterSettings(timeout=DEFAULT_TIMEOUT)


def test_the_logs_variables_win_over_the_general_ones(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-general=1",
        "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "x-tenant=fleet%201,Authorization=Bearer abc",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate",
        "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "GZIP",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca),
        "OTEL_EXPORTER_OTLP_TIMEOUT": "7",
        "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    settings = ExporterSettings.from_env(env)
    assert dict(settings.headers) == {"x-tenant": "fleet 1", "authorization": "Bearer abc"}
    assert settings.compression == "gzip"
    assert settings.certificate == str(ca)
    assert settings.timeout == 2.5
    assert settings.insecure is True
    assert ExporterSettings.from_env(env, timeout=1.0).timeout == 1.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "brotli"}, "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "5s"}, "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT"),
        (
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
        (
            {"OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY": "/nonexistent/k"},
            "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY",
        ),
    ],
)
def test_a_value_that_cannot_be_used_is_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExporterSettings.from_env(env)
