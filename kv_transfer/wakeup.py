"""Wake a vLLM engine core that sleeps while its requests wait only on KV transfers.

While every request of an engine waits on a transfer (a decode engine's loads, a prefill
engine's blocks held under lease), vLLM steps again at once, empty, in a loop: nothing
can change until a transfer ends, but each empty step wakes the engine-core process, its
worker process and the API process (per-step stats). Measured on the 2-core host
(docs/benchmarks.md), those steps took 2-6 ms of every 20-30 ms READ on the reading
engine's core, and the producer's loop kept its core busy for the whole lease.

pdserve's vLLM plugin (pdserve/vllm_plugin.py) instead lets the engine core block on its
input queue while the connector says nothing can progress without an outside event, for
at most `HOLD_WAIT_S`. New requests and aborts arrive on that queue and end the wait at
once; the worker half of the connector ends it when a transfer finishes or a lease is
released, by sending a datagram to the engine core's wake socket (this module), which a
thread there turns into a WAKEUP on the input queue. The bound covers what sends no
wakeup (a lease that expires on the clock).

The socket is an abstract-namespace Unix datagram socket named after the engine core's
pid. Under vLLM's multiprocess executor the worker is a child of the engine core and finds
it by its parent's pid; under the uniprocess executor (pdserve's engines at one rank on
CPU, pdserve/engine.py) the worker runs in the engine-core process itself.
Nothing is created on disk, and a wake to an engine core that is not listening is a
no-op (best effort: the bound still holds).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable

# Nothing that needs a step goes without a wakeup, except a lease expiring on the clock
# (its blocks are then freed up to this much later) and the sweep of stale push offers.
# Each timeout is an empty step: about 2-3 ms of the worker's and engine core's CPU,
# measured, so the bound is not short.
HOLD_WAIT_S = 0.25


def address(pid: int) -> str:
    return f"\0pdserve-engine-wake-{pid}"


def engine_core_pid(executor_backend: object) -> int:
    """The engine core's pid, seen from the worker half of the connector."""
    return os.getpid() if executor_backend == "uni" else os.getppid()


class WakeListener:
    """In the engine-core process: each datagram on our socket calls `on_wake`."""

    def __init__(self, on_wake: Callable[[], None], pid: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address(os.getpid() if pid is None else pid))
        self._on_wake = on_wake
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="pd-engine-wake", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                self.sock.recv(64)
            except OSError:
                return
            if not self._stopped:
                self._on_wake()

    def stop(self) -> None:
        """Stop listening; the socket's name is free once this returns. The shutdown wakes
        the thread's `recv`; a close alone would not, and while that call is in the kernel
        the socket, and so its name, lives on (a new listener for this pid then failed
        with "address already in use" on a busy host)."""
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
        self.sock.close()


class Waker:
    """In a worker process: wake the engine core (our parent process) now."""

    def __init__(self, pid: int | None = None) -> None:
        self.addr = address(os.getppid() if pid is None else pid)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self._lock = threading.Lock()
        self.sent = 0

    def wake(self) -> bool:
        """True when the datagram was delivered to a listener."""
        with self._lock:
            try:
                self.sock.sendto(b"w", self.addr)
            except OSError:   # no listener (plugin off, other executor), or queue full
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        self.sock.close()


class InFlight:
    """How many transfers this process is copying right now (the consumer's READs).

    On one host UCX copies inline on the reading thread (CMA), so the READ is as fast as
    that thread keeps its core. vLLM's worker thread in the same process waits for the
    next step on the core it shares with the reader, polling its notification socket every
    millisecond for a while after each step (pdserve/vllm_plugin.py). Traced on the 2-core
    host (docs/benchmarks.md), it preempted a 2,048-token READ 16 times. While a READ is in
    flight the plugin's wait polls at its idle interval instead: the step notification
    still wakes it at once."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._n > 0

    def __enter__(self) -> "InFlight":
        with self._lock:
            self._n += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._n -= 1


TRANSFERS = InFlight()
