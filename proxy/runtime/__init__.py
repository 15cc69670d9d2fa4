"""What every long-running egress process shares: its event loop, its socket helpers and the
generated code compiled once per install (``codecache``)."""
