"""The program: the ``egress`` commands, ``egress serve`` and the demo, wired from every layer."""
