"""A uvicorn server for an ASGI app in a thread on loopback (port 0), for component tests
that need a real HTTP socket. Not a test module."""

from __future__ import annotations

import threading
import time

import uvicorn


def serve(app, **config) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Start `app`; returns the server, its thread and its port once it accepts."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           **config))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    return server, t, server.servers[0].sockets[0].getsockname()[1]


def stop(server: uvicorn.Server, t: threading.Thread) -> None:
    server.should_exit = True
    t.join(timeout=10)
