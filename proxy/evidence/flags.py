"""The evidence flags, kept apart from the sinks they configure.

Every ``egress`` command builds its parser before doing anything; importing the sinks here would load
OpenTelemetry and prometheus-client (~100 ms) even for ``egress --help`` or ``egress run -- true``.
This module imports nothing at run time (argparse only for annotations: a gate's journal reads its
defaults here, and `egress run` reads its line without argparse), and the sinks import their
defaults from it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import argparse
    from typing import Literal

__all__ = [
    "DEFAULT_FSYNC",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_METRICS",
    "FSYNC_POLICIES",
    "MIN_JOURNAL_BYTES",
    "FsyncPolicy",
    "add_evidence_arguments",
    "check_journal_settings",
]

DEFAULT_METRICS = "127.0.0.1:9464"
if TYPE_CHECKING:
    FsyncPolicy = Literal["always", "interval", "never"]
else:
    FsyncPolicy = str  # at run time only a name: `egress run` does not import typing
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "interval", "never")
DEFAULT_FSYNC: FsyncPolicy = "interval"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MIN_JOURNAL_BYTES = 1024


def check_journal_settings(fsync: str, max_bytes: int) -> None:
    """ValueError naming the flag, for the journal and the evidence config alike."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"--journal-fsync must be one of {', '.join(FSYNC_POLICIES)}: {fsync!r}")
    if max_bytes < MIN_JOURNAL_BYTES:
        raise ValueError(f"--journal-max-bytes must be at least {MIN_JOURNAL_BYTES}: {max_bytes}")


def add_evidence_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evidence (audit journal, OpenTelemetry, Prometheus)")
    group.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export an OTel event per decision to this OTLP collector "
        "(default: $OTEL_EXPORTER_OTLP_LOGS_ENDPOINT / $OTEL_EXPORTER_OTLP_ENDPOINT; off if unset)",
    )
    group.add_argument(
        "--otlp-protocol",
        choices=("grpc", "http"),
        help="OTLP transport (default: $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc for port 4317, "
        "else http/protobuf)",
    )
    group.add_argument(
        "--journal", metavar="FILE", help="append every decision to this hash-chained audit journal"
    )
    group.add_argument(
        "--journal-fsync",
        choices=FSYNC_POLICIES,
        default=DEFAULT_FSYNC,
        help="when journal writes are flushed to disk (default: %(default)s, at most 0.25 s later)",
    )
    group.add_argument(
        "--journal-max-bytes",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="rotate the journal when it would grow past N bytes (default: %(default)s)",
    )
    group.add_argument(
        "--audit-required",
        action="store_true",
        help="deny new connections while the journal cannot be written",
    )
    group.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=DEFAULT_METRICS,
        help="serve Prometheus /metrics here (default: %(default)s)",
    )
    group.add_argument(
        "--no-metrics", action="store_true", help="do not serve Prometheus metrics at all"
    )
