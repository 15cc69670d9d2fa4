"""Credentials the sandbox never holds: the secrets file, value sources, the run-time store and
what a sandbox is given instead (placeholders, git and npm configuration)."""
