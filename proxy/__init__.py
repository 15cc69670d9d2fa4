"""agent-egress: everything that is not a mitmproxy adapter, a package per layer (core, policy,
destinations, evidence, sandbox, app).

Only ``proxy.app``, which wires the program together, imports mitmproxy or the adapters in ``addons/``
(``tests/test_architecture.py`` holds every other module to that).
"""

__version__ = "0.1.0"
