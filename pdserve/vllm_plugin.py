"""A vLLM general plugin (entry point `vllm.general_plugins`): a quiet wait between steps.

vLLM's engine-core process and its CPU worker process talk over a shared-memory ring
buffer. A reader that finds nothing new spins on `sched_yield()` for `busy_loop_s`
(1 s) after every read before it sleeps on a notification socket. Engine steps are
shorter than a second, so the engine-core process spins for as long as its worker
computes: measured with `top` during a prefill burst, the prefill engine's
`VLLM::EngineCore` process took 87% of a core while its worker took the other 100%.
On a 2-core host that is the decode engine's core, the frontend's and any new worker's
(an autoscaled replica's imports took 2 minutes).

With PDSERVE_QUIET_WAIT=1 (set by pdserve for its own engines only; other vLLM uses of this
virtualenv are untouched), a reader spins for PDSERVE_WAIT_SPIN_US (default 200 us) after a
read, then polls the notification socket with a timeout of at most PDSERVE_WAIT_POLL_MS
(default 1 ms). The short timeout also bounds a lost notification (vLLM rechecks only
every 5 s) to about a millisecond. vLLM loads general plugins in the engine-core and
worker processes before it creates these queues (vllm/v1/engine/core.py,
vllm/v1/worker/worker_base.py); plugins may be loaded more than once, so this is
idempotent.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("vllm.pdserve.plugin")

_PATCHED = False


def register() -> None:
    global _PATCHED
    if _PATCHED or os.environ.get("PDSERVE_QUIET_WAIT", "0") != "1":
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast as sb
    except ImportError:  # a vLLM without it: nothing to do
        return
    cls = getattr(sb, "SpinCondition", None)
    if cls is None or not hasattr(cls, "wait"):
        return
    spin_s = float(os.environ.get("PDSERVE_WAIT_SPIN_US", "200")) / 1e6
    poll_ms = max(1, int(os.environ.get("PDSERVE_WAIT_POLL_MS", "1")))
    sched_yield = sb.sched_yield

    def wait(self, timeout_ms: int | None = None) -> None:
        if time.monotonic() <= self.last_read + spin_s:
            sched_yield()
            return
        t = poll_ms if timeout_ms is None else min(timeout_ms, poll_ms)
        events = dict(self.poller.poll(timeout=t))
        if self.local_notify_socket in events:
            # CONFLATE: one pending notification at most
            self.local_notify_socket.recv(flags=sb.zmq.NOBLOCK, copy=False)

    cls.wait = wait
    _PATCHED = True
    log.debug("quiet shm wait: spin %.0f us, poll %d ms", spin_s * 1e6, poll_ms)
