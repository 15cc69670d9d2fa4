"""Exit codes of the ``egress`` commands, part of the interface: 0 success or allow, 1 deny or
problems found, 2 a usage or load error. (``egress run`` exits with its command's status instead.)"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def fail(*lines: str) -> int:
    """Print each line as an error and return the exit status for it."""
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_ERROR
