"""agent-egress core: policy, decisions, destination checks, telemetry, CLI and launcher.

Nothing in this package imports mitmproxy; the adapters live in ``addons/``.
"""

__version__ = "0.1.0"
