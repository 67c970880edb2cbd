"""The connector's configuration, parsed once from vLLM's config (its
`kv_connector_extra_config`, which pdserve/engine.py fills from pdserve's flags), and the
small pure helpers both halves share. No I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kv_transfer import layout as L

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

RPC_TIMEOUT_S = 5.0
PUSH_POLL_S = 0.0005   # consumer: notification / UCX progress poll while a push is awaited
IDLE_STEP_WAIT_S = 0.02  # consumer: an empty step waits this long at most for a transfer


@dataclass(frozen=True)
class ConnectorConfig:
    """Everything either half reads from its configuration, with the defaults in one place.
    kv_both engines (pdserve's) are producer and consumer at once: a role can change
    without a restart."""
    engine_id: str
    block_size: int
    compat_hash: str
    is_producer: bool = True
    is_consumer: bool = True
    agent_host: str = "127.0.0.1"
    agent_port: int = 0                 # 0: bind any port, publish it in agent_file
    agent_file: str | None = None
    lease_s: float = 30.0
    acquire_extend_s: float = 30.0
    transfer_timeout_s: float = 20.0
    # UCX needs the READ target to make progress (measured: without it a READ hangs).
    # The producer runs NIXL's progress thread with a sleep between polls: ~3% of a
    # core when idle, where the wrapper's default (no sleep) spins a whole core.
    # The consumer initiates its READs and drives their progress itself.
    progress_delay_us: int = 0
    checksum: bool = False              # CRC32 both sides per load (--kv-checksum)
    expect_transport: str = "auto"
    ucx_err_mode: str = "auto"
    # "pull": the consumer READs; "push" WRITEs each layer as it is computed, "push-whole"
    # everything after the last prefill step (kv_transfer/push.py)
    kv_mode: str = "pull"
    push_ttl_s: float = 60.0
    max_peers: int = 64
    # the data plane: "nixl" (UCX), or "loopback" (kv_transfer/backends/loopback.py:
    # engines in one process, with fault injection; for tests of the connector's logic)
    backend: str = "nixl"
    # Test switches, read from the environment, never set in production: the consumer waits
    # this long between pinning the lease and READing (fault-injection tests kill a peer in
    # that window); "zero": destroy the blocks just loaded, to prove the output depends on
    # the transferred bytes (tests/e2e/test_kv_moves.py)
    debug_load_delay_s: float = 0.0
    debug_corrupt: str = ""
    hold_wait: bool = False             # wake a sleeping engine core (kv_transfer/wakeup.py)
    huge_pages: bool = True             # madvise the KV cache for huge pages

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig",
                  kv_cache_config: "KVCacheConfig") -> "ConnectorConfig":
        kvt = vllm_config.kv_transfer_config
        x: dict[str, Any] = dict(kvt.kv_connector_extra_config or {})
        d = cls.__dataclass_fields__
        producer = bool(kvt.is_kv_producer)

        def get(name: str, typ=str, key: str | None = None):
            v = x.get(key or name)
            return d[name].default if v is None else typ(v)

        return cls(
            engine_id=str(x.get("engine_id") or kvt.engine_id),
            block_size=vllm_config.cache_config.block_size,
            compat_hash=config_compat_hash(vllm_config, kv_cache_config),
            is_producer=producer, is_consumer=bool(kvt.is_kv_consumer),
            agent_host=get("agent_host"), agent_port=get("agent_port", int),
            agent_file=x.get("agent_address_file"),
            lease_s=get("lease_s", float), acquire_extend_s=get("acquire_extend_s", float),
            transfer_timeout_s=get("transfer_timeout_s", float),
            progress_delay_us=int(x.get("progress_delay_us", 100000)) if producer else 0,
            checksum=bool(x.get("checksum", False)),
            expect_transport=get("expect_transport"), ucx_err_mode=get("ucx_err_mode"),
            kv_mode=get("kv_mode"), push_ttl_s=get("push_ttl_s", float),
            max_peers=get("max_peers", int), backend=get("backend"),
            debug_load_delay_s=float(os.environ.get("PDSERVE_DEBUG_KV_LOAD_DELAY_S") or 0),
            debug_corrupt=os.environ.get("PDSERVE_DEBUG_CORRUPT_KV", ""),
            hold_wait=os.environ.get("PDSERVE_HOLD_WAIT") == "1",
            huge_pages=os.environ.get("PDSERVE_KV_HUGE_PAGES", "1") == "1")


def lease_margin_s(extend_s: float) -> float:
    """How long before the lease's end a READ must be over: never read after expiry."""
    return min(1.0, 0.1 * extend_s)


def config_compat_hash(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> str:
    """Compatibility hash both halves can compute from the engine config alone."""
    mc = vllm_config.model_config
    specs = []
    # the model's KV heads, not a tensor-parallel rank's share: engines of different TP
    # degrees exchange KV too (kv_transfer/connector/ranks.py); at TP 1 they are the same
    for g in kv_cache_config.kv_cache_groups:
        s = g.kv_cache_spec
        heads = mc.get_total_num_kv_heads() if hasattr(s, "num_kv_heads") else ""
        specs.append(f"{type(s).__name__}:{heads}x"
                     f"{getattr(s, 'head_size', '')}:{s.dtype}:{len(g.layer_names)}")
    # not the block size: a consumer reads from producers of another block size too
    # (kv_transfer/relayout.py); the handle and the handshake carry it
    return L.compat_hash(Path(mc.model).name, str(mc.dtype), specs)


def served_name(model_config) -> str:
    """The name clients ask for (the scheduler routes by it): vLLM's served model name,
    else the model directory's name."""
    name = getattr(model_config, "served_model_name", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or Path(model_config.model).name)
