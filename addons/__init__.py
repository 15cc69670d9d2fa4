"""Thin mitmproxy adapters: translate hook events into core requests and enforce core decisions."""
