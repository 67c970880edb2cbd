"""Build an in-process vLLM engine (AsyncLLM) with our KV connector attached.

Core binding and the KV cache size are always explicit (see docs/design.md): two
engines left on `auto` both pin core 0, and the default KV size of one engine does
not leave room for a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from pdserve.config import EngineConfig, KVTransferConfig, id_list, resolve_dtype

log = logging.getLogger(__name__)

CONTINUATION_PROCESSOR = "pdserve.continuation:FirstTokenPenalties"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_engine_env(cfg: EngineConfig) -> None:
    """Environment read by the engine-core process that vLLM spawns."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(
        cfg.cpu_cores, int(cfg.vllm.get("tensor_parallel_size") or 1))
    # the KV size comes from kv_cache_memory_bytes; an inherited env value would override it
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # engine-core <-> worker queue: a short spin, then sleep (pdserve/vllm_plugin.py)
    os.environ.setdefault("PDSERVE_QUIET_WAIT", "1")
    # an engine whose requests all wait on KV transfers sleeps until one ends
    # (kv_transfer/wakeup.py)
    os.environ.setdefault("PDSERVE_HOLD_WAIT", "1")
    # a decode engine counts the prefill engine's first token as output, for penalties and
    # seeded sampling (pdserve/continuation.py)
    os.environ.setdefault("PDSERVE_CONTINUATION", "1")
    # engine processes skip the interpreter's last garbage collection at exit
    # (pdserve/vllm_plugin.py; seconds of every stop)
    os.environ.setdefault("PDSERVE_QUICK_EXIT", "1")
    # torch's idle gloo socket loops (one engine rank) run only when the core is free
    # (pdserve/vllm_plugin.py)
    os.environ.setdefault("PDSERVE_IDLE_HELPERS", "1")


def load_patches() -> None:
    """pdserve's vLLM patches (pdserve/vllm_plugin.py), now that the environment that
    turns them on is set. vLLM loads general plugins once per process, and its argument
    parser does so when it is built (`AsyncEngineArgs.add_cli_args`): a worker given any
    vLLM engine argument (`--reasoning-parser`, ...) had loaded them while parsing its
    command line, before this environment existed, and its engine core, forked from it,
    never loaded them again. Its engines ran without the step hook (no step budget, no
    step samples) and without continuation (measured: seeded sampling differed from
    vLLM's after the first token). Each patch installs once, so a second call is a no-op."""
    from pdserve import vllm_plugin

    vllm_plugin.register()


def omp_bind(cores: str, tp: int) -> str:
    """vLLM's CPU binding (one core list per tensor-parallel rank, "|" between ranks) from
    an engine's cores: "0,1" at TP 2 gives "0|1", "0-3" gives "0,1|2,3"; fewer cores than
    ranks are shared ("0" at TP 2: "0|0"). A binding with "|" is taken as given."""
    if tp <= 1 or "|" in cores:
        return cores
    ids = id_list(cores)
    if len(ids) < tp:
        return "|".join(ids[r % len(ids)] for r in range(tp))
    per, extra = divmod(len(ids), tp)
    out, i = [], 0
    for r in range(tp):
        n = per + (r < extra)
        out.append(",".join(ids[i:i + n]))
        i += n
    return "|".join(out)


def engine_args(cfg: EngineConfig, kv_role: str | None = None,
                kv_extra: dict[str, Any] | None = None, events_dir: str | None = None):
    """events_dir: publish KV cache events on ipc sockets there (see pdserve/kv_events.py)."""
    from vllm.config import KVEventsConfig
    from vllm.config import KVTransferConfig as VKVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kvt = None
    if kv_role is not None:
        kvt = VKVTransferConfig(
            kv_connector="PDConnector", kv_connector_module_path="kv_transfer.connector",
            kv_role=kv_role, kv_buffer_device="cpu",
            kv_load_failure_policy=(kv_extra or {}).get("load_failure_policy", "recompute"),
            engine_id=(kv_extra or {}).get("engine_id"),
            kv_connector_extra_config=dict(kv_extra or {}))
    kve = None
    if events_dir is not None:
        ep, rep = event_endpoints(events_dir)
        kve = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=ep,
                             replay_endpoint=rep)
    base = dict(
        model=cfg.model, served_model_name=cfg.model_name, dtype=resolve_dtype(cfg.dtype),
        max_model_len=cfg.max_model_len, block_size=cfg.block_size,
        kv_cache_memory_bytes=cfg.kv_cache_bytes, enforce_eager=default_eager(),
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
        disable_log_stats=False)
    # what the user gave by vLLM's names wins; the connector and event stream are ours,
    # and so is the continuation's logits processor, beside any the user names
    procs = list(cfg.vllm.get("logits_processors") or [])
    if CONTINUATION_PROCESSOR not in procs:
        procs.append(CONTINUATION_PROCESSOR)
    return AsyncEngineArgs(**{**base, **cfg.vllm, "kv_transfer_config": kvt,
                              "kv_events_config": kve, "logits_processors": procs})


def default_eager() -> bool:
    """Eager on CPU (torch.compile costs about a minute at start there and was no faster),
    CUDA graphs on GPU. `--enforce-eager` / `--no-enforce-eager` override it."""
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True


def event_endpoints(events_dir: str) -> tuple[str, str]:
    return f"ipc://{events_dir}/kv-events", f"ipc://{events_dir}/kv-events-replay"


@dataclass
class LoadSnapshot:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    ttft_ms: float = 0.0      # EWMAs over the engine's own per-token timings
    tpot_ms: float = 0.0
    num_blocks: int = 0
    max_num_seqs: int = 0

    def observe(self, ttfts: list[float], itls: list[float]) -> None:
        for t in ttfts:
            self.ttft_ms = _ewma(self.ttft_ms, t * 1e3)
        for t in itls:
            self.tpot_ms = _ewma(self.tpot_ms, t * 1e3)


def _ewma(old: float, x: float, alpha: float = 0.1) -> float:
    return x if not old else (1 - alpha) * old + alpha * x


def make_load_logger(snapshot: LoadSnapshot):
    """A vLLM stat logger factory that copies scheduler load into `snapshot`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.vllm_config = vllm_config
            snapshot.max_num_seqs = vllm_config.scheduler_config.max_num_seqs

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            if not snapshot.num_blocks:
                snapshot.num_blocks = self.vllm_config.cache_config.num_gpu_blocks or 0
            if iteration_stats is not None:
                snapshot.observe(iteration_stats.time_to_first_tokens_iter,
                                 iteration_stats.inter_token_latencies_iter)
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _LoadLogger


def one_process(args) -> bool:
    """Run vLLM's worker inside its engine-core process (the uniprocess executor), as vLLM
    does on a GPU at one rank: on CPU at one rank, unless the user chose an executor.
    vLLM's CPU platform otherwise always runs the multiprocess executor, because only it
    sets the OpenMP binding before a process starts; `build_engine` sets that binding for
    the engine-core process instead. One process and one import of vLLM fewer per engine."""
    from vllm.platforms import current_platform

    return (current_platform.is_cpu() and args.distributed_executor_backend is None
            and int(args.tensor_parallel_size or 1) == 1
            and int(args.pipeline_parallel_size or 1) == 1
            and int(args.data_parallel_size or 1) == 1)


def engine_config(args):
    """vLLM's config from the engine arguments, with the uniprocess executor where
    `one_process` says so."""
    from vllm.utils.system_utils import set_env_var

    if not one_process(args):
        return args.create_engine_config()
    args.distributed_executor_backend = "uni"
    # vLLM's CPU platform turns "uni" into "mp" unless this reads 0; it is read while the
    # config is built, and AsyncLLM runs its engine core in its own process either way
    with set_env_var("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
        return args.create_engine_config()


def build_engine(cfg: EngineConfig, kv_role: str | None, kv_extra: dict[str, Any] | None,
                 snapshot: LoadSnapshot | None = None, events_dir: str | None = None):
    from vllm.utils.ompmultiprocessing import OMPProcessManager
    from vllm.v1.engine.async_llm import AsyncLLM

    set_engine_env(cfg)
    load_patches()
    args = engine_args(cfg, kv_role, kv_extra, events_dir)
    config = engine_config(args)
    loggers = [make_load_logger(snapshot)] if snapshot is not None else None
    opts = dict(enable_log_requests=args.enable_log_requests,
                disable_log_stats=args.disable_log_stats)
    log.info("starting vLLM engine: model=%s dtype=%s cores=%s kv=%.2f GiB role=%s "
             "executor=%s", cfg.model, args.dtype, cfg.cpu_cores, cfg.kv_cache_bytes / 2**30,
             kv_role, config.parallel_config.distributed_executor_backend)
    # one process: the engine-core process computes, so it starts with rank 0's OpenMP
    # binding, set the way vLLM's multiprocess executor sets it for its worker (this
    # process's own OpenMP runtime read its environment when torch loaded: it stays unbound)
    binding = (OMPProcessManager(config).configure_omp_envs(rank=0, local_rank=0)
               if config.parallel_config.distributed_executor_backend == "uni"
               else contextlib.nullcontext())
    with binding, forked_core(cfg, config):
        return AsyncLLM.from_vllm_config(config, stat_loggers=loggers, **opts)


@contextlib.contextmanager
def forked_core(cfg: EngineConfig, config):
    """vLLM's engine processes forked from this one instead of spawned (pdserve/
    engine_fork.py): at one rank (the uniprocess executor, `one_process`) the engine core,
    bound to the engine's cores; with ranks the engine core and each rank's worker, bound
    to the rank's. `PDSERVE_ENGINE_FORK=0` keeps vLLM's spawn."""
    from pdserve.engine_fork import fork_engine_processes

    one = config.parallel_config.distributed_executor_backend == "uni"   # else "0|1": ranks
    cores = frozenset(int(c) for c in id_list(cfg.cpu_cores)) if cfg.cpu_cores and one \
        else None
    with fork_engine_processes(config, cores):
        yield


def kv_extra(engine_id: str, agent_host: str, agent_port: int, kv: KVTransferConfig,
             agent_address_file: str = "") -> dict:
    """agent_port 0: the connector binds a free port and publishes it in agent_address_file."""
    return {"engine_id": engine_id, "agent_host": agent_host, "agent_port": agent_port,
            "agent_address_file": agent_address_file,
            "lease_s": kv.lease_s, "acquire_extend_s": kv.acquire_extend_s,
            "transfer_timeout_s": kv.transfer_timeout_s,
            "load_failure_policy": kv.load_failure_policy,
            "progress_delay_us": kv.progress_delay_us,
            "expect_transport": kv.expect_transport, "ucx_err_mode": kv.ucx_err_mode,
            "checksum": kv.checksum,
            "kv_mode": kv.mode, "push_ttl_s": kv.push_ttl_s}


def warm_compiled_ops() -> None:
    """Compile here the kernel vLLM's sampler builds with torch.compile on first use: the
    rank of each sampled (or prompt) token among its logprobs (`batched_count_greater_than`,
    Inductor). An engine pays it at its first request with logprobs: 2.2-2.7 s of one core
    on a 2-core AVX512 host, most of a tiny-model worker's warm-up. A process forked from
    this one, and the engine cores forked from that (`forked_core`), inherit the compiled
    code: the zygote (pdserve/zygote.py) calls this once, so that no worker it forks
    compiles it again (measured: that first call takes 0.001 s in a child at one thread).

    Shaped as the sampler calls it: float32 logprobs, the batch dimension unbacked, and two
    vocabulary sizes, so that dimension is dynamic and any model's fits. Run at one thread
    and left at none: Dynamo guards on the thread count (an engine at one core matches; at
    more, a cheap recompile from Inductor's cache, ~0.1 s), and a process that ran an
    OpenMP team cannot fork safely (a child's first parallel region can hang in libgomp);
    with one thread no team is started."""
    import torch
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for vocab in (1000, 1001):
                logprobs = torch.zeros(2, vocab)
                picked = logprobs.gather(-1, torch.zeros(2, 1, dtype=torch.long))
                torch._dynamo.decorators.mark_unbacked(logprobs, 0)
                torch._dynamo.decorators.mark_unbacked(picked, 0)
                batched_count_greater_than(logprobs, picked)
    finally:
        torch.set_num_threads(threads)
