"""Frozen configuration per process. Built from CLI flags only at the entry point."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.latency import KEEP


def data_dir() -> Path:
    """Where converted models and other generated data live (outside the repo)."""
    base = os.environ.get("PDSERVE_DATA_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pdserve"


def step_switches() -> tuple[bool, int, float]:
    """Step-model switches for comparisons, read by engines and the scheduler alike:
    PDSERVE_STEP_MIXED=0 leaves the mixed step's own term out of the step model
    (pdserve/latency.py); PDSERVE_STEP_FLOOR is the least prompt tokens a step beside
    streams computes (pdserve/step_budget.py `floor_tokens`, 1 when unset);
    PDSERVE_STEP_KEEP is the half-lives a kind of step fades for after its last one
    (`StepModel`'s `keep`, latency.KEEP when unset; 0: every kind fades for good)."""
    mixed = os.environ.get("PDSERVE_STEP_MIXED", "1") != "0"
    try:
        least = max(0, int(os.environ.get("PDSERVE_STEP_FLOOR", "1")))
    except ValueError:
        least = 1
    try:
        keep = max(0.0, float(os.environ.get("PDSERVE_STEP_KEEP", KEEP)))
    except ValueError:
        keep = KEEP
    return mixed, least, keep


def id_list(spec: str) -> list[str]:
    """ "0,2-3" -> ["0", "2", "3"]: the list syntax of CPU and device ids."""
    ids: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        a, _, b = part.partition("-")
        ids += [str(i) for i in range(int(a), int(b) + 1)] if b else [a]
    return ids


def late_streams_yield() -> bool:
    """Do streams whose first token missed its TTFT SLO give up their TPOT slack
    (pdserve/step_budget.py, `Stream.late`)? On unless PDSERVE_LATE_STREAMS=keep (read by
    the frontend, which dates each request's first token, and by the scheduler, which
    predicts from it; for comparisons)."""
    return os.environ.get("PDSERVE_LATE_STREAMS", "yield") != "keep"


def late_prefill_remote() -> bool:
    """Does a request predicted to get its first token after its TTFT SLO whatever the
    option have its prompt computed on a prefill worker where it can be (scheduler/adaptive.py
    `ranked`)? On unless PDSERVE_LATE_PREFILL=local (the choice before it, for comparisons:
    the sooner computed, often the decode engine)."""
    return os.environ.get("PDSERVE_LATE_PREFILL", "remote") != "local"


def whole_alone() -> bool:
    """Does a local prompt computed alone go in whole steps where its `alone` chunks would
    end after its TTFT SLO and whole steps would not (pdserve/step_budget.py
    `whole_alone`)? Read by the engines, which step so, and the scheduler, which predicts
    it. Off unless PDSERVE_WHOLE_ALONE=1."""
    return os.environ.get("PDSERVE_WHOLE_ALONE", "0") == "1"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512_BF16 or AMX-BF16; Arm: BF16).
    Without it, torch's bf16 matmul falls back to scalar code: measured on an AVX2-only
    host, 1 GFLOP/s bf16 against 38 fp32 (docs/design.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True   # unknown: keep vLLM's usual bf16
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU's features in /proc/cpuinfo's text (x86 `flags`, Arm `Features` lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return flags


def resolve_dtype(dtype: str) -> str:
    """`auto`: the model's own dtype on GPUs (vLLM decides); on CPUs bfloat16 where the CPU
    computes it natively, else float32 (about 40x faster than emulated bf16 there)."""
    if dtype != "auto":
        return dtype
    try:
        import torch
        if torch.cuda.is_available():
            return "auto"
    except ImportError:
        pass
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    served_model_name: str = ""
    dtype: str = "auto"             # resolve_dtype: bf16 where the CPU computes it natively
    max_model_len: int = 2048
    block_size: int = 128
    kv_cache_bytes: int = 1 << 30
    # cores for this engine's compute threads ("0", "1", "0-1"); VLLM_CPU_OMP_THREADS_BIND
    cpu_cores: str = "0"
    max_num_seqs: int = 32
    # one chunk covers a whole prompt: prefill arithmetic then matches a colocated run
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = True
    seed: int = 0
    # vLLM engine arguments the user gave by vLLM's names (pdserve/vllm_args.py):
    # AsyncEngineArgs field -> value, applied over the settings above
    vllm: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


KV_MODES = ("pull", "push", "push-whole")


@dataclass(frozen=True)
class KVTransferConfig:
    lease_s: float = 30.0            # how long a producer holds unacknowledged blocks
    acquire_extend_s: float = 30.0   # consumer's renewal when it starts reading
    transfer_timeout_s: float = 20.0 # consumer gives up (and recomputes or fails) after this
    load_failure_policy: str = "recompute"  # "recompute" | "fail"
    progress_delay_us: int = 100000  # producer's UCX progress thread: longest wait for an event
    # transport a peer pair should use: auto (shm on one host, rdma between hosts with an
    # RDMA device), nvlink, rdma, shm, tcp, none; a worse one is a loud warning + metric
    expect_transport: str = "auto"
    # UCX endpoint error handling: auto (none for KV in host memory: shared-memory RMA;
    # peer for GPU memory), peer, none (kv_transfer/backends/nixl.py)
    ucx_err_mode: str = "auto"
    checksum: bool = False           # debug: CRC32 of every transfer on both sides, compared
    mode: str = "pull"               # pull | push (layer-pipelined WRITE) | push-whole
    push_ttl_s: float = 60.0         # push: how long a decode engine waits for the WRITEs


@dataclass(frozen=True)
class WorkerConfig:
    role: str                         # "prefill" | "decode" | "mixed": its first role
    worker_id: str
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    scheduler_address: str = "127.0.0.1:50051"
    kv_agent_port: int = 0            # 0: the engine's KV agent binds a free port
    kv: KVTransferConfig = field(default_factory=KVTransferConfig)
    heartbeat_s: float = 1.0
    # SIGTERM: deregister, then wait up to this long for running requests and the KV
    # blocks held for decode workers to finish before the engine stops
    drain_timeout_s: float = 60.0
    # the TPOT the engine's step budget protects for running streams (0: no budget)
    tpot_slo_ms: float = 100.0
    # the TTFT SLO, for what a landing stream may wait (pdserve/step_hook.py; 0: unknown)
    ttft_slo_ms: float = 0.0


@dataclass(frozen=True)
class FrontendConfig:
    model: str                        # tokenizer / chat template source
    served_model_name: str
    max_model_len: int = 2048
    host: str = "127.0.0.1"
    port: int = 8000
    scheduler_address: str = "127.0.0.1:50051"
    request_timeout_s: float = 600.0
    ttft_slo_ms: float = 2000.0       # goodput: requests within both SLOs
    tpot_slo_ms: float = 100.0
    kv_mode: str = "pull"             # the workers' --kv-mode: how a request is handed over
    api_keys: tuple[str, ...] = ()    # Bearer keys for /v1 (frontend/security.py); none: open
    protect_metrics: bool = False     # /metrics and /sd/targets need a key too
    allowed_origins: tuple[str, ...] = ()   # CORS
    max_body_bytes: int = 8 << 20     # 413 past this, before parsing (0: no limit)
    max_inflight: int = 512           # 429 past this many generation requests in progress
    expose_routing: bool = False      # x-pdserve-route, kv_transfer in responses (debugging)
    enable_prompt_tokens_details: bool = False   # usage.prompt_tokens_details, as vLLM's flag
    enable_force_include_usage: bool = False     # usage in every stream's chunks, as vLLM's flag
    enable_auto_tool_choice: bool = False   # tool_choice "auto" (frontend/tools.py), as vLLM
    tool_call_parser: str = ""              # vLLM's tool parser for "auto", by its name
    reasoning_parser: str = ""              # vLLM's reasoning parser (frontend/reasoning.py)
    chat_template: str = ""                 # instead of the model's (the template's text)
    trust_request_chat_template: bool = False   # requests may bring their own template
    default_chat_template_kwargs: dict = field(default_factory=dict)   # under requests'
    # the model's default sampling parameters, as vLLM's server takes them
    # (frontend/gen_config.py): auto (its generation_config.json), vllm (none) or a folder
    generation_config: str = "auto"
    override_generation_config: dict = field(default_factory=dict)
