"""The sandbox launcher: runs a command in network namespaces whose only route is the gate.

``HTTP_PROXY`` alone is a request, not a boundary. Here the command runs in its own user, network,
mount and PID namespaces holding only loopback; the gate's proxy and DNS listeners are sockets created
*inside* that network namespace and handed to the gate process (see ``docs/sandbox.md``).

Constants below are shared with ``deploy/`` and checked by ``tests/test_deploy.py``.
"""

from __future__ import annotations

SANDBOX_LOOPBACK = "127.0.0.1"
DEFAULT_PROXY_PORT = 3128  # what the sandbox sees as its proxy: http://127.0.0.1:3128
DEFAULT_DNS_PORT = 53  # the DNS gate inside the sandbox (UDP and TCP), named by /etc/resolv.conf
EXIT_SETUP_FAILED = 125  # like `env`/`docker run`: the launcher failed, the command never ran
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
