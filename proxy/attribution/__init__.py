"""Who made a connection: the sandboxed process behind a client socket, the agent's context, the trace.

Pure parts (``procnet``, ``argv``, ``process``, ``traceparent``, ``context``) parse and shape what
the I/O part (``procfs``) reads from ``/proc``; ``stamp`` puts the facts on every decision.
"""
