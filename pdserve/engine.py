"""Build an in-process vLLM engine (AsyncLLM) with our KV connector attached.

Core binding and the KV cache size are always explicit (see docs/design.md): two
engines left on `auto` both pin core 0, and the default KV size of one engine does
not leave room for a second.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from pdserve.config import EngineConfig, KVTransferConfig

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_engine_env(cfg: EngineConfig) -> None:
    """Environment read by the engine-core process that vLLM spawns."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_cores
    # the KV size comes from kv_cache_memory_bytes; an inherited env value would override it
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_args(cfg: EngineConfig, kv_role: str | None = None,
                kv_extra: dict[str, Any] | None = None):
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
    return AsyncEngineArgs(
        model=cfg.model, served_model_name=cfg.model_name, dtype=cfg.dtype,
        max_model_len=cfg.max_model_len, block_size=cfg.block_size,
        kv_cache_memory_bytes=cfg.kv_cache_bytes, enforce_eager=True,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
        kv_transfer_config=kvt, disable_log_stats=False)


@dataclass
class LoadSnapshot:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


def make_load_logger(snapshot: LoadSnapshot):
    """A vLLM stat logger factory that copies scheduler load into `snapshot`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _LoadLogger


def build_engine(cfg: EngineConfig, kv_role: str | None, kv_extra: dict[str, Any] | None,
                 snapshot: LoadSnapshot | None = None):
    from vllm.v1.engine.async_llm import AsyncLLM

    set_engine_env(cfg)
    args = engine_args(cfg, kv_role, kv_extra)
    loggers = [make_load_logger(snapshot)] if snapshot is not None else None
    log.info("starting vLLM engine: model=%s dtype=%s cores=%s kv=%.2f GiB role=%s",
             cfg.model, cfg.dtype, cfg.cpu_cores, cfg.kv_cache_bytes / 2**30, kv_role)
    return AsyncLLM.from_engine_args(args, stat_loggers=loggers)


def kv_extra(engine_id: str, agent_host: str, agent_port: int, kv: KVTransferConfig,
             agent_address_file: str = "") -> dict:
    """agent_port 0: the connector binds a free port and publishes it in agent_address_file."""
    return {"engine_id": engine_id, "agent_host": agent_host, "agent_port": agent_port,
            "agent_address_file": agent_address_file,
            "lease_s": kv.lease_s, "acquire_extend_s": kv.acquire_extend_s,
            "transfer_timeout_s": kv.transfer_timeout_s,
            "load_failure_policy": kv.load_failure_policy,
            "progress_delay_us": kv.progress_delay_us}
