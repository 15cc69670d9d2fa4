"""The approvals console: web pages on the admin listener (:mod:`.handlers`), sessions
(:mod:`.sessions`), templates and one script and stylesheet shipped as package data."""

from proxy.approvals.console.handlers import ConsoleState, routes, settings
from proxy.approvals.console.sessions import Sessions

__all__ = ["ConsoleState", "Sessions", "routes", "settings"]
