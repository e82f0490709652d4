"""A sim server running in a thread, shared by the sim and end-to-end tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sim.server import SimServer


@contextmanager
def running_sim(env_id: str = "HalfCheetah-v5", bind: str = "tcp://127.0.0.1:*", **kwargs) -> Iterator[SimServer]:
    """A SimServer serving in a thread; always stopped and closed, even when the test fails."""
    server = SimServer(env_id, bind=bind, **kwargs)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
        server.close()
        assert not thread.is_alive(), "sim did not stop"
