"""vLLM's engine processes forked instead of spawned, each bound as a spawned one would be.

vLLM's CPU platform asks for spawn, which imports vLLM, torch and transformers again in
every new process: 13-19 s of CPU per engine on a 2-core AVX2 host, about 40% of its start.
A fork inherits them.

Spawn is there for OpenMP: a spawned process reads its binding from the environment when
it loads OpenMP, and a forked one has loaded it already, in its parent, with the parent's
settings. So the child binds itself first thing after the fork (an `os.register_at_fork`
hook, armed only inside `fork_engine_processes`): its thread pinned to its cores, torch's
intra-op threads set to their number; the OpenMP threads it starts later inherit the pin.
The parent keeps its own affinity and threads (pinning it for the fork instead would also
pin the threads vLLM's client starts meanwhile). The parent has run no parallel region (it
computes nothing), so the child has no OpenMP thread pool to inherit.

* One rank (the uniprocess executor): the engine core computes, and binds to the cores
  given.
* Ranks (vLLM's multiprocess executor, one engine core per node): the engine core only
  schedules and keeps the parent's binding. It forks one worker per rank in turn, each
  inside vLLM's `OMPProcessManager.configure_omp_envs` for that rank, which writes the
  rank's cores to OMP_PLACES for a spawned child to read. That context is wrapped
  (`_bind_ranks`): the worker forked inside it binds to the rank's cores. A spawn runs no
  fork hook and still reads its environment.

pdserve's engines use it (`pdserve.engine.forked_core`); `PDSERVE_ENGINE_FORK=0` keeps
vLLM's spawn. vLLM's own OpenAI server uses it where PDSERVE_FORK_ENGINE=1 is set
(`stock_server_forks`, through pdserve's vLLM plugin: the test suite's ground-truth
servers, `bench.compare --vllm-one-process`).
"""

from __future__ import annotations

import contextlib
import os

_CHILD_BINDING: frozenset[int] | None = None     # cores a child forked now binds to
_ARMED = False


@contextlib.contextmanager
def fork_engine_processes(config, cores: frozenset[int] | None):
    """Engine processes vLLM starts inside this context are forked: at one rank the engine
    core binds to `cores` (None: left as this process is), with ranks each rank worker to
    its own. Data parallelism (an engine core per DP rank) and other executors keep
    spawn, as does `PDSERVE_ENGINE_FORK=0`."""
    global _CHILD_BINDING
    parallel = config.parallel_config
    backend = parallel.distributed_executor_backend
    if os.environ.get("PDSERVE_ENGINE_FORK", "1") != "1" or backend not in ("uni", "mp") \
            or (backend == "mp" and not _fork_ranks(parallel)):
        yield
        return
    _arm_child_binding()
    if backend == "mp":
        _bind_ranks()
    method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    _CHILD_BINDING = cores if backend == "uni" else None
    try:
        yield
    finally:
        _CHILD_BINDING = None
        if method is None:
            os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
        else:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = method


def stock_server_forks() -> None:
    """vLLM's own server (the API server process's `launch_core_engines`) forks its engine
    core, bound to this process's cores as a spawned one inherits them (a server started
    under `taskset -c 1` computes on core 1 at one thread), and its rank workers as
    above. Installed by pdserve's vLLM plugin where PDSERVE_FORK_ENGINE=1."""
    from vllm.v1.engine import core_client

    original = core_client.launch_core_engines
    if getattr(original, "_pdserve", False):
        return

    @contextlib.contextmanager
    def launch_core_engines(vllm_config, *args, **kwargs):
        cores = frozenset(os.sched_getaffinity(0))
        with fork_engine_processes(vllm_config, cores), \
                original(vllm_config, *args, **kwargs) as launched:
            yield launched

    launch_core_engines._pdserve = True
    core_client.launch_core_engines = launch_core_engines


def _arm_child_binding() -> None:
    global _ARMED
    if not _ARMED:
        os.register_at_fork(after_in_child=bind_forked_child)
        _ARMED = True


def _fork_ranks(parallel) -> bool:
    """Ranks fork on vLLM's CPU platform, one engine core per node (no data parallelism)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and int(getattr(parallel, "data_parallel_size", 1)) == 1


def _bind_ranks() -> None:
    """Wrap vLLM's `OMPProcessManager.configure_omp_envs` (once per process; inherited by
    the engine core forked after): a process forked inside it binds to the rank's cores
    (`cpu_lists[local_rank]`, the list the wrapped context writes to OMP_PLACES)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    original = OMPProcessManager.configure_omp_envs
    if getattr(original, "_pdserve", False):
        return

    @contextlib.contextmanager
    def configure_omp_envs(self, rank: int, local_rank: int):
        global _CHILD_BINDING
        with original(self, rank, local_rank):
            lists = getattr(self, "cpu_lists", None)
            if getattr(self, "skip_setup", True) or not lists:
                yield
                return
            _CHILD_BINDING = frozenset(int(c) for c in lists[local_rank])
            try:
                yield
            finally:
                _CHILD_BINDING = None

    configure_omp_envs._pdserve = True
    OMPProcessManager.configure_omp_envs = configure_omp_envs


def bind_forked_child() -> None:
    """In a process just forked inside `fork_engine_processes`: bind to its cores."""
    global _CHILD_BINDING
    cores, _CHILD_BINDING = _CHILD_BINDING, None
    if not cores:
        return
    import torch

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
