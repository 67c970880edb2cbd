"""Cores lent between the CPU engines of one host: a step of prompt tokens also computes on
the core of an engine that has nothing to do.

A static split gives each engine its own core, so a long prompt computes on one core while
the other engine's core may stand idle (a decode engine between bursts, a prefill engine
while the prompts are local). vLLM's colocated engine computes the same prompt on both
cores. Here each engine keeps its own core ("home") and may borrow the others for a step:

* an engine holds its home cores' locks (`flock` on a file per core in a folder the
  launcher makes) for as long as it has unfinished requests, from the first step it
  schedules to the step after which none is left;
* a step that computes at least `min_tokens` prompt tokens, on an engine that hands no
  finished prompt's KV over (whose decode engine is about to start it), tries the other
  cores' locks without waiting; each one it gets is a core of an engine with no request:
  the step runs with one OpenMP thread more per core (the engine core process's thread is
  allowed those cores too), and gives them back when it is over;
* an engine that gets a request while its core is lent waits for that step to end before
  it schedules (at most one step; a lock is never waited for while holding another engine's
  lock, so the waits cannot form a cycle, and the kernel drops the locks of a process that
  dies).

Borrowed steps are left out of the engine's step-model fit and its reports (they are
faster than the model of one engine's cores says): pdserve/step_hook.py reads the
scheduler's `_pd_borrowed` (cores borrowed for the step) and only traces them.

**Off by default.** Two A/B runs (docs/benchmarks.md, "Eighty-sixth run") found no gain:
under load the decode engine is seldom without a stream, so steps rarely borrow, and when
one does, a request that reaches the lender meanwhile waits for the whole step (a cap on
lent steps' tokens did not change that). Kept for comparisons:
`bench.matrix --variant 'pdserve-share=PDSERVE_CORE_SHARE=1'`.

Switched on by PDSERVE_CORE_SHARE_DIR (the lock folder) and PDSERVE_CORE_SHARE_CORES (every
engine's core on the host, "0,1"), which `pdserve serve` sets where PDSERVE_CORE_SHARE=1
and each engine computes on a core of its own; the engine's home cores are its vLLM
binding (VLLM_CPU_OMP_THREADS_BIND). PDSERVE_CORE_SHARE_MIN_TOKENS (default 256): the
least prompt tokens a step borrows for; PDSERVE_CORE_SHARE_MAX_TOKENS (default 0: none):
the most prompt tokens a step on lent cores computes (its cores are then taken before the
step is scheduled, and given back untouched if it turns out smaller than the least).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterable

from pdserve.config import id_list
from pdserve.patching import scheduled

log = logging.getLogger("vllm.pdserve.cores")

DIR_ENV, CORES_ENV = "PDSERVE_CORE_SHARE_DIR", "PDSERVE_CORE_SHARE_CORES"
MIN_ENV, MAX_ENV = "PDSERVE_CORE_SHARE_MIN_TOKENS", "PDSERVE_CORE_SHARE_MAX_TOKENS"
MIN_TOKENS = 256


def parse_cores(spec: str) -> frozenset[int] | None:
    """"0,2-3" -> {0, 2, 3}; None for an empty spec or a binding per rank ("0|1"), whose
    ranks keep their own threads."""
    if not spec or "|" in spec or spec in ("auto", "all", "nobind"):
        return None
    return frozenset(int(c) for c in id_list(spec))


def worth_borrowing(prompt_tokens: int, min_tokens: int) -> bool:
    return min_tokens > 0 and prompt_tokens >= min_tokens


def handing_over(known: int, running: int, waiting: int) -> bool:
    """Whether some request the engine knows is neither running nor waiting: finished,
    with its KV kept for a decode engine to read (a prefill engine's handoff). That engine
    is about to start the request: a step that borrowed its core would make it wait."""
    return known > running + waiting


class CoreShare:
    """One engine's side. `set_threads`/`set_affinity` are torch's thread count and the
    calling thread's affinity (injected: the tests run without an engine)."""

    def __init__(self, folder: str, cores: Iterable[int], home: frozenset[int],
                 set_threads: Callable[[int], None],
                 set_affinity: Callable[[frozenset[int]], None],
                 min_tokens: int = MIN_TOKENS, max_tokens: int = 0) -> None:
        self.folder, self.home = folder, frozenset(home)
        self.others = sorted(set(cores) - self.home)
        self.set_threads, self.set_affinity = set_threads, set_affinity
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.holding = False
        self.borrowed: list[int] = []
        self.applied = False          # the borrowed cores have a thread of ours
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, core: int) -> int:
        if self._pid != os.getpid():       # forked: locks are per open file, open our own
            self._fds, self._pid = {}, os.getpid()
            self.holding, self.borrowed, self.applied = False, [], False
        fd = self._fds.get(core)
        if fd is None:
            fd = os.open(os.path.join(self.folder, f"core-{core}.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds[core] = fd
        return fd

    def hold_home(self) -> None:
        """Before a step: our cores back (waiting for a step that borrowed one to end)."""
        if self.holding and self._pid == os.getpid():
            return
        for c in sorted(self.home):
            fcntl.flock(self._fd(c), fcntl.LOCK_EX)
        self.holding = True

    def release_home(self) -> None:
        """No request left: the other engines may borrow our cores."""
        if not self.holding:
            return
        for c in sorted(self.home):
            fcntl.flock(self._fd(c), fcntl.LOCK_UN)
        self.holding = False

    def take(self) -> bool:
        """The idle engines' cores, locked without waiting (no thread moves yet)."""
        if not self.borrowed:
            for c in self.others:
                try:
                    fcntl.flock(self._fd(c), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self.borrowed.append(c)
        return bool(self.borrowed)

    def borrow(self, prompt_tokens: int) -> int:
        """For a step of `prompt_tokens` prompt tokens: the idle engines' cores (those
        `take` got, else taken now), with a thread on each; none for a step too small to
        gain (given back). The cores the step computes on."""
        if self.applied or not self.others:
            return len(self.home) + len(self.borrowed)
        if not worth_borrowing(prompt_tokens, self.min_tokens):
            self.give_back()
            return len(self.home)
        if self.take():
            self.set_affinity(self.home | frozenset(self.borrowed))
            self.set_threads(len(self.home) + len(self.borrowed))
            self.applied = True
        return len(self.home) + len(self.borrowed)

    def give_back(self) -> None:
        """After the step: one thread per home core again, the borrowed cores unlocked."""
        if self.applied:
            self.set_threads(len(self.home))
            self.set_affinity(self.home)
            self.applied = False
        for c in self.borrowed:
            fcntl.flock(self._fd(c), fcntl.LOCK_UN)
        self.borrowed = []


def _prompt_work(sched) -> bool:
    return bool(sched.waiting) or any(r.num_computed_tokens < r.num_prompt_tokens
                                      for r in sched.running)


def from_env() -> CoreShare | None:
    folder = os.environ.get(DIR_ENV, "")
    cores = parse_cores(os.environ.get(CORES_ENV, ""))
    home = parse_cores(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    if not folder or not cores or not home or not home <= cores or home == cores:
        return None
    import torch

    set_threads = torch._C.set_num_threads    # vLLM's CPU worker stubs torch.set_num_threads

    def set_affinity(cpus: frozenset[int]) -> None:
        os.sched_setaffinity(0, cpus)         # this thread: the one that runs the model

    return CoreShare(folder, cores, home, set_threads, set_affinity,
                     int(os.environ.get(MIN_ENV, MIN_TOKENS)),
                     int(os.environ.get(MAX_ENV, 0)))


def install() -> bool:
    """Wrap vLLM's `Scheduler.schedule` and `update_from_output` (outside the step hook's
    wrappers) where the environment switches sharing on."""
    share = from_env()
    if share is None:
        return False
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return False
    if getattr(Scheduler.schedule, "_pd_cores", False):
        return True
    orig_schedule, orig_update = Scheduler.schedule, Scheduler.update_from_output

    def schedule(self, *args, **kwargs):
        share.hold_home()
        handing = handing_over(len(self.requests), *self.get_request_counts())
        config = self.scheduler_config
        full = config.max_num_batched_tokens
        if share.max_tokens and not handing and _prompt_work(self) and share.take():
            # a step on lent cores computes at most max_tokens prompt tokens: the lender
            # waits for it to end if a request comes
            config.max_num_batched_tokens = min(full, share.max_tokens + len(self.running))
        try:
            out = orig_schedule(self, *args, **kwargs)
        finally:
            config.max_num_batched_tokens = full
        prompt = sum(n for r, n, before in scheduled(out, self.requests)
                     if before < r.num_prompt_tokens)
        self._pd_borrowed = share.borrow(0 if handing else prompt) - len(share.home)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        try:
            return orig_update(self, scheduler_output, model_runner_output)
        finally:
            share.give_back()
            self._pd_borrowed = 0
            if not self.has_unfinished_requests():
                share.release_home()

    schedule._pd_cores = True
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    log.info("core sharing: home cores %s, may borrow %s for steps of %d+ prompt tokens",
             sorted(share.home), share.others, share.min_tokens)
    return True


def shared_cores(engine_cores: list[str], gpus: bool, autoscale: bool) -> str:
    """The cores a host's engines may lend each other ("0,1"), or "" where sharing stays
    off: not asked for (PDSERVE_CORE_SHARE=1), GPU engines, an autoscaler that may start
    engines on the same cores, fewer than two engines, or engines whose cores overlap or
    are bound per rank."""
    if os.environ.get("PDSERVE_CORE_SHARE", "0") != "1" or gpus or autoscale:
        return ""
    sets = [parse_cores(c) for c in engine_cores]
    if len(sets) < 2 or any(s is None for s in sets):
        return ""
    union: set[int] = set()
    for s in sets:
        if union & s:
            return ""
        union |= s
    return ",".join(map(str, sorted(union)))
