"""The worker process: one rank's end of the socket, the wire protocol, the built-in engine hooks.

Standard library, msgpack and pluggy only (tests/test_worker_imports.py).
"""
