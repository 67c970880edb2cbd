"""PDConnector: scheduler half + worker half of our KV connector (vLLM v1 API).

Prefill (kv_producer): a request carrying `pd_remote_decode` keeps its blocks after
it finishes (`request_finished -> delay_free=True`) under a lease; the returned
kv_transfer_params are the handle the decode side needs. The worker half frees the
blocks when the consumer Releases them through our KVAgent gRPC service, or when
the lease expires on the producer's own clock.

Decode (kv_consumer): a request carrying `pd_remote_prefill` + a handle reports the
handle's tokens as an asynchronous external hit. The worker half's transfer thread
pins the lease (Acquire), READs the blocks over UCX (NIXL), and reports the request
finished (or failed -> vLLM recomputes or fails it, per kv_load_failure_policy).
The scheduler half then Releases the producer's blocks, whatever the outcome.

Modules: config.py (ConnectorConfig, parsed once), scheduler_side.py (the scheduler half),
worker_side.py (the worker half) with its mixins pull.py, push_producer.py and
push_consumer.py; metadata.py (what the scheduler half hands the worker half each step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kv_transfer.connector.config import (  # noqa: F401 - re-exported
    ConnectorConfig,
    config_compat_hash,
    lease_margin_s,
    served_name,
)
from kv_transfer.connector.scheduler_side import SchedulerHalf, engine_quiescent  # noqa: F401
from kv_transfer.connector.worker_side import WorkerHalf

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.kv_cache_interface import KVCacheConfig


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self._sched: SchedulerHalf | None = SchedulerHalf(vllm_config, kv_cache_config)
            self._worker: WorkerHalf | None = None
        else:
            self._sched = None
            self._worker = WorkerHalf(vllm_config, kv_cache_config)

    # ---------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._sched.request_finished(request, block_ids)

    def pd_quiescent(self, scheduler) -> bool:
        """pdserve's vLLM plugin: may the engine core sleep until an outside event?"""
        return self._sched is not None and self._sched.quiescent(scheduler)

    # ---------------- worker side
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Runs before the step's forward pass; start_load_kv runs after it. A lease must
        # exist before a fast consumer asks for it, so leases and loads start here.
        super().bind_connector_metadata(connector_metadata)
        self._worker.start_load_kv(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return None  # started in bind_connector_metadata

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        self._worker.save_kv_layer(layer_name)   # push mode: WRITE this layer's blocks now

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids):
        r = self._worker.transfer_results()
        return (r.finished_sending or None), (r.finished_recving or None)

    def get_transfer_results(self, finished_req_ids) -> KVConnectorTransferResults:
        return self._worker.transfer_results()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()


