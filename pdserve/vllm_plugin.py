"""A vLLM general plugin (entry point `vllm.general_plugins`): a quiet wait between steps.

vLLM's engine-core process and its CPU worker processes talk over a shared-memory ring
buffer (with tensor parallelism: at one rank pdserve's engines run the worker inside the
engine core, pdserve/engine.py, and there is no such queue). A reader that finds nothing
new spins on `sched_yield()` for `busy_loop_s` (1 s) after every read before it sleeps on a
notification socket. Engine steps are
shorter than a second, so the engine-core process spins for as long as its worker
computes: measured with `top` during a prefill burst, the prefill engine's
`VLLM::EngineCore` process took 87% of a core while its worker took the other 100%.
On a 2-core host that is the decode engine's core, the frontend's and any new worker's
(an autoscaled replica's imports took 2 minutes).

With PDSERVE_QUIET_WAIT=1 (set by pdserve for its own engines only; other vLLM uses of this
virtualenv are untouched), a reader spins for PDSERVE_WAIT_SPIN_US (default 200 us) after a
read, then polls the notification socket with a timeout of at most PDSERVE_WAIT_POLL_MS
(default 1 ms), and PDSERVE_WAIT_IDLE_POLL_MS (default 10 ms) once nothing was read for
PDSERVE_WAIT_IDLE_AFTER_MS (20 ms). The timeout bounds a lost notification (vLLM
rechecks only every 5 s); the longer one when idle keeps an idle worker from waking 1,000
times a second (measured: about 1 ms of every 20 ms on the decode core during a KV READ).
While this process copies a KV READ (kv_transfer.wakeup.TRANSFERS), a reader neither spins
nor polls at the short interval: the READ's thread shares its core.

The third (PDSERVE_STEP_HOOK=1, pdserve/step_hook.py) times every step, holds prefill
chunks to the running streams' TPOT allowance and reports each step to the worker.

The second patch (PDSERVE_HOLD_WAIT=1) lets an engine core sleep while its requests wait
only on KV transfers (`_register_hold_wait`, kv_transfer/wakeup.py).

PDSERVE_FORK_ENGINE=1 (`bench.compare --vllm-one-process`: the test suite's vLLM servers)
makes vLLM's own server fork its engine processes instead of spawning them
(pdserve/engine_fork.py: `stock_server_forks`).

PDSERVE_IDLE_HELPERS=1 runs torch's gloo socket loops of a one-rank engine under
SCHED_IDLE (`_register_idle_helpers`). PDSERVE_QUICK_EXIT=1 skips the interpreter's last
garbage collection when an engine process exits (`_register_quick_exit`): seconds of
every stop. PDSERVE_CONTINUATION=1
(pdserve/continuation.py) lets a decode engine continue from another engine's first token.

vLLM loads general plugins in the engine-core and worker processes before it creates these
queues (vllm/v1/engine/core.py, vllm/v1/worker/worker_base.py); plugins may be loaded more
than once, and each patch applies once per process behind its switch
(pdserve/patching.py: `switched_once`).
"""

from __future__ import annotations

import logging
import os
import time

from pdserve.patching import switched_once

log = logging.getLogger("vllm.pdserve.plugin")


def register() -> None:
    _register_quick_exit()
    _register_idle_helpers()
    _register_quiet_wait()
    _register_hold_wait()
    from pdserve.step_hook import install   # PDSERVE_STEP_HOOK=1: step budget and samples
    install()
    if os.environ.get("PDSERVE_CORE_SHARE_DIR"):   # cores lent between engines (after: outside)
        from pdserve import core_share
        core_share.install()
    if os.environ.get("PDSERVE_CONTINUATION", "0") == "1":   # (imports torch: only then)
        from pdserve import continuation
        continuation.install()
    if os.environ.get("PDSERVE_FORK_ENGINE", "0") == "1":    # vLLM's own server, quick start
        from pdserve.engine_fork import stock_server_forks
        stock_server_forks()


@switched_once("PDSERVE_QUICK_EXIT")
def _register_quick_exit() -> bool:
    """With PDSERVE_QUICK_EXIT=1 (pdserve's engines): skip the interpreter's last garbage
    collection when an engine process exits. vLLM's worker process spent about 7 s of a
    cluster's 11 s stop in it (py-spy: `gc_collect_main` under finalization), walking
    torch's and transformers' object graphs, only to free memory the OS takes back anyway.
    `gc.freeze()` at exit moves every object to the permanent generation, which that
    collection skips; everything else of shutdown (atexit handlers, vLLM's own teardown)
    has run by then."""
    import atexit
    import gc
    atexit.register(gc.freeze)      # registered early, so it runs after the other handlers
    return True


HELPER_THREADS = ("gloo_tcp_loop",)


def idle_helpers(names: tuple[str, ...] = HELPER_THREADS) -> int:
    """Put this process's threads named `names` under SCHED_IDLE: they run only when
    nothing else on their cores wants to, and never preempt a thread that does. -> how
    many were moved."""
    from pdserve.procs import each_thread
    return each_thread(lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE,
                                                         os.sched_param(0)), names)


@switched_once("PDSERVE_IDLE_HELPERS")
def _register_idle_helpers() -> bool:
    """With PDSERVE_IDLE_HELPERS=1 (pdserve's engines): once an engine core of one rank is
    up, its gloo socket loops run under SCHED_IDLE. vLLM creates about a dozen gloo groups
    even for one rank, and torch gives each a thread that waits on epoll with a 10 ms
    timeout: measured on an idle engine, 13 threads woke 99 times a second each, about
    1,300 wake-ups a second on the engine's own core, each one able to preempt its
    compute thread mid-step. With one rank those loops carry no traffic (no peer, no
    socket). With tensor or data parallelism they do, and are left alone."""
    try:
        from vllm.v1.engine.core import EngineCoreProc
    except ImportError:
        return False
    orig = EngineCoreProc.run_busy_loop

    def run_busy_loop(self):
        pc = getattr(getattr(self, "vllm_config", None), "parallel_config", None)
        if pc is not None and pc.world_size == 1 and pc.data_parallel_size == 1:
            log.debug("%d gloo socket loops under SCHED_IDLE", idle_helpers())
        return orig(self)

    EngineCoreProc.run_busy_loop = run_busy_loop
    return True


@switched_once("PDSERVE_QUIET_WAIT")
def _register_quiet_wait() -> bool:
    try:
        from vllm.distributed.device_communicators import shm_broadcast as sb
    except ImportError:  # a vLLM without it: nothing to do
        return False
    cls = getattr(sb, "SpinCondition", None)
    if cls is None or not hasattr(cls, "wait"):
        return False
    spin_s = float(os.environ.get("PDSERVE_WAIT_SPIN_US", "200")) / 1e6
    poll_ms = max(1, int(os.environ.get("PDSERVE_WAIT_POLL_MS", "1")))
    idle_poll_ms = max(poll_ms, int(os.environ.get("PDSERVE_WAIT_IDLE_POLL_MS", "10")))
    idle_after_s = float(os.environ.get("PDSERVE_WAIT_IDLE_AFTER_MS", "20")) / 1e3
    sched_yield = sb.sched_yield
    from kv_transfer.wakeup import TRANSFERS

    def wait(self, timeout_ms: int | None = None) -> None:
        now = time.monotonic()
        reading = bool(TRANSFERS)
        if now <= self.last_read + spin_s and not reading:
            sched_yield()
            return
        # idle for a while (an engine core asleep while only KV transfers are pending,
        # or no requests), or a READ in flight in this process whose thread shares our
        # core: poll less often, the notification still wakes us at once
        p = poll_ms if now <= self.last_read + idle_after_s and not reading else idle_poll_ms
        t = p if timeout_ms is None else min(timeout_ms, p)
        events = dict(self.poller.poll(timeout=t))
        if self.local_notify_socket in events:
            # CONFLATE: one pending notification at most
            self.local_notify_socket.recv(flags=sb.zmq.NOBLOCK, copy=False)

    cls.wait = wait
    log.debug("quiet shm wait: spin %.0f us, poll %d ms", spin_s * 1e6, poll_ms)
    return True


@switched_once("PDSERVE_HOLD_WAIT")
def _register_hold_wait() -> bool:
    """With PDSERVE_HOLD_WAIT=1 (set by pdserve for its engines): an engine core whose
    requests all wait on KV transfers blocks on its input queue instead of stepping empty
    in a loop, until a new request, a wakeup from the connector's worker half, or
    kv_transfer.wakeup.HOLD_WAIT_S (kv_transfer/wakeup.py has the why and the measurements).
    Only engines whose KV connector answers `pd_quiescent` are affected."""
    try:
        from vllm.v1.engine.core import EngineCoreProc
        from vllm.v1.engine import EngineCoreRequestType
    except ImportError:
        return False
    orig = getattr(EngineCoreProc, "_process_input_queue", None)
    wakeup_type = getattr(EngineCoreRequestType, "WAKEUP", None)
    if orig is None or wakeup_type is None:
        return False
    import queue

    from kv_transfer.wakeup import HOLD_WAIT_S, WakeListener

    def _process_input_queue(self) -> None:
        conn = getattr(getattr(self, "scheduler", None), "connector", None)
        quiescent = getattr(conn, "pd_quiescent", None)
        if quiescent is None:
            return orig(self)
        if getattr(self, "_pd_wake", None) is None:   # first loop: before any transfer
            q = self.input_queue
            self._pd_wake = WakeListener(lambda: q.put_nowait((wakeup_type, None)))
        if (not getattr(self, "engines_running", False) and not getattr(self, "batch_queue",
                                                                        None)
                and self.input_queue.empty() and quiescent(self.scheduler)):
            try:
                self._handle_client_request(*self.input_queue.get(timeout=HOLD_WAIT_S))
            except queue.Empty:
                pass
        return orig(self)

    EngineCoreProc._process_input_queue = _process_input_queue
    log.debug("hold wait: engine cores block while only KV transfers are pending")
    return True
