"""The evidence settings as one typed value, checked once when the gate starts.

Every bad value is an :class:`EvidenceError` naming the flag (or ``OTEL_*`` variable) that set it, before
anything is opened or bound. Imports only the standard library, like :mod:`proxy.evidence.flags`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.core.hosts import parse_endpoint
from proxy.evidence.flags import (
    DEFAULT_FSYNC,
    DEFAULT_MAX_BYTES,
    FsyncPolicy,
    check_journal_settings,
)
from proxy.evidence.otel.endpoint import Protocol, resolve_endpoint
from proxy.evidence.otel.settings import ExporterSettings

if TYPE_CHECKING:
    import argparse


class EvidenceError(ValueError):
    """A bad evidence flag; the message names the flag."""


def parse_hostport(value: str, flag: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` of a listener; port 0 lets the kernel pick one."""
    try:
        return parse_endpoint(value, any_port=True)
    except ValueError as exc:
        raise EvidenceError(
            f"{flag} wants HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464): {value!r}: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class EvidenceConfig:
    journal: Path | None = None
    journal_fsync: FsyncPolicy = DEFAULT_FSYNC
    journal_max_bytes: int = DEFAULT_MAX_BYTES
    audit_required: bool = False
    metrics_listen: tuple[str, int] | None = None  # None: no /metrics listener
    otlp: tuple[str, Protocol] | None = None  # collector URL and protocol; None: no export
    otlp_settings: ExporterSettings = field(default_factory=ExporterSettings)

    def __post_init__(self) -> None:
        try:
            check_journal_settings(self.journal_fsync, self.journal_max_bytes)
        except ValueError as exc:
            raise EvidenceError(str(exc)) from None
        if self.audit_required and self.journal is None:
            raise EvidenceError("--audit-required needs --journal FILE")

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> EvidenceConfig:
        """From the flags :func:`proxy.evidence.flags.add_evidence_arguments` defines, and the
        standard ``OTEL_*`` variables of ``env`` (default: this process's environment)."""
        env = os.environ if env is None else env
        listen = None if args.no_metrics or not args.metrics else parse_hostport(str(args.metrics))
        try:
            otlp = resolve_endpoint(args.otlp_endpoint, args.otlp_protocol, env)
            settings = ExporterSettings.from_env(env) if otlp is not None else ExporterSettings()
        except ValueError as exc:
            raise EvidenceError(str(exc)) from exc
        return cls(
            journal=Path(args.journal) if args.journal else None,
            journal_fsync=args.journal_fsync,
            journal_max_bytes=args.journal_max_bytes,
            audit_required=args.audit_required,
            metrics_listen=listen,
            otlp=otlp,
            otlp_settings=settings,
        )
