"""Child processes that die with their parent, for the launcher and the local actuator.

A child runs in a new session (its own process group, so its vLLM engine-core
grandchildren can be signalled with it) and gets PR_SET_PDEATHSIG: the kernel sends it
SIGTERM when its parent dies. The child sets that itself, at start-up
(`die_with_parent`, called by `pdserve.cli.main`), from PDSERVE_PARENT_PID: forking a
process that runs gRPC threads and then running Python in the child (a `preexec_fn`)
crashed the child with SIGSEGV (measured, from the scheduler).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PARENT_ENV = "PDSERVE_PARENT_PID"


def spawn(argv: list[str], env: dict[str, str | None] | None = None):
    """`argv` with our environment updated by `env` (a None value removes a variable): a
    `subprocess.Popen`, or, for `python -m pdserve.cli ...` where PDSERVE_ZYGOTE names a
    running zygote, a child it forked with its imports done (pdserve/zygote.py, the same
    calls)."""
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    zygote = full.get("PDSERVE_ZYGOTE", "")
    if zygote and argv[:3] == [sys.executable, "-m", "pdserve.cli"]:
        from pdserve import zygote as Z

        try:
            return Z.fork_cli(zygote, argv[3:], full)
        except OSError as e:    # gone, or not up yet: a new interpreter, as without one
            print(f"pdserve: zygote {zygote} unavailable ({e}); starting {argv[3:4]} "
                  "as a new process", file=sys.stderr)
    return subprocess.Popen(argv, start_new_session=True,
                            env={**full, PARENT_ENV: str(os.getpid())})


def die_with_parent() -> None:
    """In a child started by `spawn`: SIGTERM when the parent dies; exit if it already has.
    The variable is removed, so the child's own children do not inherit it."""
    want = os.environ.pop(PARENT_ENV, "")
    if not want:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != int(want):
        sys.exit("parent process gone before start-up")


def crash_tracebacks() -> None:
    """A fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT: a crash in native code, a
    library's abort) writes the Python stack of every thread to stderr, which the
    launcher's log keeps, before the process dies as it would have. For this process, the
    engine cores forked from it (a fork keeps the handlers) and processes spawned from it
    (`PYTHONFAULTHANDLER`, inherited). Without it an engine core that died in native code
    left not one line in the log (a prefill engine, 170 ms after the decode engine it had
    served KV to was killed, in one suite run on 2026-12-05)."""
    import faulthandler

    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def freeze_heap() -> int:
    """Once a serving process is up: collect, then move every object it holds to the
    garbage collector's permanent generation, which later collections skip (what vLLM's
    server does after its start, `vllm.utils.gc_utils.freeze_gc_heap`). A process that has
    imported vLLM, torch and transformers tracks about a million objects; each collection
    of the oldest generation walks them all, in the middle of whatever the event loop was
    doing. PDSERVE_GC_FREEZE=0 leaves the heap as it is. Returns the objects frozen."""
    import gc

    if os.environ.get("PDSERVE_GC_FREEZE", "1") != "1":
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


SERVING_CPUS_ENV = "PDSERVE_SERVING_CPUS"
START_CPUS_ENV = "PDSERVE_START_CPUS"


def _cpus(name: str) -> set[int]:
    """The cores an environment variable lists ("0,1"); empty when unset or not numbers."""
    try:
        return {int(c) for c in os.environ.get(name, "").split(",") if c.strip()}
    except ValueError:
        return set()


def widen_for_start() -> set[int] | None:
    """At a pdserve process's start: run on the cores PDSERVE_START_CPUS lists (the
    launcher's own) while starting up. A process the scheduler's autoscaler spawns, or
    its zygote forks, inherits the scheduler's pin to the serving cores, and a worker
    importing vLLM and starting its engine on one core is slow (two on one core: ready in
    41 s instead of 24, above); `pin_serving` moves it back once it is up. -> the cores
    set, or None (not asked, already there, or not allowed)."""
    cpus = _cpus(START_CPUS_ENV)
    if not cpus or cpus == os.sched_getaffinity(0):
        return None
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:     # cores this process may not use (another cgroup): stay as we are
        return None
    return cpus


def each_thread(act, names: tuple[str, ...] | None = None) -> int:
    """`act(tid)` for every thread of this process (only those whose name is one of
    `names`, when given). -> how many it succeeded for: a thread that ended meanwhile, or
    a call the kernel refused, is skipped."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            if names is not None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() not in names:
                        continue
            act(int(tid))
            n += 1
        except OSError:
            continue
    return n


def pin_serving() -> set[int] | None:
    """In a frontend, scheduler or worker that `pdserve serve --serving-cores` started: move
    every thread of this process to the cores PDSERVE_SERVING_CPUS lists ("0,1"), once its
    start-up is over (a worker's engine forked and bound to its own cores already; threads
    started later inherit the pin). Start-up itself runs on every core: pinned from the
    start, two workers importing vLLM on one core made a cluster ready in 41 s instead of
    24 on a 2-core host. -> the cores, or None (not asked, or none of them allowed)."""
    cpus = _cpus(SERVING_CPUS_ENV)
    if not cpus:
        return None
    # none moved: cores this process may not use
    return cpus if each_thread(lambda tid: os.sched_setaffinity(tid, cpus)) else None
