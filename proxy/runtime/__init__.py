"""What every long-running egress process shares: its event loop."""
