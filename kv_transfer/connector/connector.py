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
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kv_transfer import layout as L
from kv_transfer.agent import (
    AgentClients,
    AgentState,
    read_agent_address,
    start_agent_server,
    write_agent_address,
)
from kv_transfer.connector.metadata import (
    P_DONE,
    P_REMOTE_DECODE,
    P_REMOTE_PREFILL,
    LoadSpec,
    PDConnectorMetadata,
)
from kv_transfer.state import LeaseTable, TransferState, advance
from pdserve.rpc import pd_pb2

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# under vLLM's logger tree: the engine process formats these with the worker's role prefix
log = logging.getLogger("vllm.pdserve.kv_transfer.connector")

RPC_TIMEOUT_S = 5.0


class LoadError(RuntimeError):
    """A failed load, with the reason recorded in KVTransferStats.reason and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def lease_margin_s(extend_s: float) -> float:
    """How long before the lease's end a READ must be over: never read after expiry."""
    return min(1.0, 0.1 * extend_s)


def _extra(vllm_config: "VllmConfig") -> dict[str, Any]:
    return dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})


def config_compat_hash(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> str:
    """Compatibility hash both halves can compute from the engine config alone."""
    mc = vllm_config.model_config
    specs = []
    for g in kv_cache_config.kv_cache_groups:
        s = g.kv_cache_spec
        specs.append(f"{type(s).__name__}:{getattr(s, 'num_kv_heads', '')}x"
                     f"{getattr(s, 'head_size', '')}:{s.dtype}:{len(g.layer_names)}")
    return L.compat_hash(Path(mc.model).name, str(mc.dtype),
                         vllm_config.cache_config.block_size, specs)


def served_name(model_config) -> str:
    """The name clients ask for (the scheduler routes by it): vLLM's served model name,
    else the model directory's name."""
    name = getattr(model_config, "served_model_name", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or Path(model_config.model).name)


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self._sched: _SchedulerHalf | None = _SchedulerHalf(vllm_config, kv_cache_config)
            self._worker: _WorkerHalf | None = None
        else:
            self._sched = None
            self._worker = _WorkerHalf(vllm_config, kv_cache_config)

    # ---------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self._sched.build_connector_meta()

    def update_connector_output(self, connector_output) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._sched.request_finished(request, block_ids)

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
        return None  # consumers pull after the request finishes; nothing to push per layer

    def wait_for_save(self) -> None:
        return None

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


# ====================================================================== scheduler half

class _Releaser:
    """Sends Release to producers off the scheduler's thread; never blocks a step."""

    def __init__(self, clients: AgentClients) -> None:
        self.clients = clients
        self.q: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.t = threading.Thread(target=self._run, name="pd-releaser", daemon=True)
        self.t.start()

    def release(self, address: str, transfer_id: str) -> None:
        self.q.put((address, transfer_id))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            batch: dict[str, list[str]] = {item[0]: [item[1]]}
            while True:  # coalesce what is already queued
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.q.put(None)
                    break
                batch.setdefault(more[0], []).append(more[1])
            for address, ids in batch.items():
                try:
                    self.clients.get(address).Release(
                        pd_pb2.LeaseRequest(transfer_ids=ids), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as e:
                    # the producer's lease expiry frees the blocks anyway
                    log.warning("Release of %d lease(s) at %s failed: %s", len(ids), address,
                                e.code() if hasattr(e, "code") else e)

    def stop(self) -> None:
        self.q.put(None)
        self.t.join(timeout=5)


class _SchedulerHalf:
    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        x = _extra(vllm_config)
        self.is_producer = vllm_config.kv_transfer_config.is_kv_producer
        self.block_size = vllm_config.cache_config.block_size
        self.engine_id = str(x.get("engine_id") or vllm_config.kv_transfer_config.engine_id)
        self._agent_host = str(x.get("agent_host", "127.0.0.1"))
        self._agent_port = int(x.get("agent_port", 0))
        self._agent_file = x.get("agent_address_file")
        self._agent_address = ""
        self.lease_s = float(x.get("lease_s", 30.0))
        self.compat_hash = config_compat_hash(vllm_config, kv_cache_config)
        self._local_hit: dict[str, int] = {}
        self._loads: list[LoadSpec] = []
        self._loading: dict[str, tuple[str, str]] = {}  # req id -> (agent address, transfer id)
        self._new_leases: dict[str, int] = {}
        self._releaser = _Releaser(AgentClients())

    @property
    def agent_address(self) -> str:
        """The KV agent's address: configured, or published by the worker half (it binds
        port 0, so no other process can take the port between choosing and binding)."""
        if not self._agent_address:
            if self._agent_port:
                self._agent_address = f"{self._agent_host}:{self._agent_port}"
            else:
                self._agent_address = read_agent_address(self._agent_file)
        return self._agent_address

    # -- consumer
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        p = request.kv_transfer_params
        if not p or not p.get(P_REMOTE_PREFILL) or p.get(P_DONE):
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        count = int(p["num_tokens"]) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        p = request.kv_transfer_params
        if not p or not p.get(P_REMOTE_PREFILL) or p.get(P_DONE):
            return
        p[P_DONE] = True
        local_hit = self._local_hit.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            # everything was in our own prefix cache: the producer's copy is not needed
            self._releaser.release(p["agent_address"], p["transfer_id"])
            return
        n_blocks = L.blocks_for_tokens(int(p["num_tokens"]), self.block_size)
        first = local_hit // self.block_size
        local_ids = list(blocks.get_block_ids()[0][first:n_blocks])
        remote_ids = [int(b) for b in p["block_ids"][first:n_blocks]]
        self._loads.append(LoadSpec(
            req_id=request.request_id, transfer_key=str(p.get("transfer_key", "")),
            transfer_id=p["transfer_id"], engine_id=p["engine_id"],
            agent_address=p["agent_address"], compat_hash=p.get("compat_hash", ""),
            local_block_ids=local_ids, remote_block_ids=remote_ids,
            num_tokens=num_external_tokens))
        self._loading[request.request_id] = (p["agent_address"], p["transfer_id"])

    def update_connector_output(self, connector_output) -> None:
        for req_id in connector_output.finished_recving or ():
            src = self._loading.pop(req_id, None)
            if src is not None:
                self._releaser.release(*src)

    # -- both
    def build_connector_meta(self) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(loads=self._loads, leases=self._new_leases)
        self._loads, self._new_leases = [], {}
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]):
        from vllm.v1.request import RequestStatus

        p = request.kv_transfer_params
        if not p:
            return False, None
        if p.get(P_REMOTE_PREFILL):
            self._local_hit.pop(request.request_id, None)
            if not p.get(P_DONE):
                # aborted before it was ever scheduled: free the producer's blocks
                p[P_DONE] = True
                self._releaser.release(p["agent_address"], p["transfer_id"])
            # else: release follows finished_recving (vLLM delays our free until then)
            return False, None
        if not p.get(P_REMOTE_DECODE) or not self.is_producer:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED) or not block_ids:
            return False, None  # aborted prefill: nothing to hand over
        self._new_leases[request.request_id] = len(block_ids)
        return True, {
            "transfer_id": request.request_id,
            "engine_id": self.engine_id,
            "agent_address": self.agent_address,
            "block_ids": list(block_ids),
            "num_tokens": request.num_computed_tokens,
            "compat_hash": self.compat_hash,
            "lease_expires_unix": time.time() + self.lease_s,
        }

    def shutdown(self) -> None:
        self._releaser.stop()


# ====================================================================== worker half

class _Load:
    __slots__ = ("spec", "state", "error")

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.state = TransferState.PENDING
        self.error = ""

    def to(self, new: TransferState) -> None:
        self.state = advance(self.state, new)


class _WorkerHalf:
    MAX_RECORDS = 10000

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        x = _extra(vllm_config)
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.is_producer = vllm_config.kv_transfer_config.is_kv_producer
        self.engine_id = str(x.get("engine_id") or vllm_config.kv_transfer_config.engine_id)
        self.agent_host = str(x.get("agent_host", "127.0.0.1"))
        self.agent_port = int(x.get("agent_port", 0))
        self.agent_file = x.get("agent_address_file")
        self.lease_s = float(x.get("lease_s", 30.0))
        self.acquire_extend_s = float(x.get("acquire_extend_s", 30.0))
        self.transfer_timeout_s = float(x.get("transfer_timeout_s", 20.0))
        # UCX needs the READ target to make progress (measured: without it a READ hangs).
        # The producer runs NIXL's progress thread with a sleep between polls: ~3% of a
        # core when idle, where the wrapper's default (no sleep) spins a whole core.
        # The consumer initiates its READs and drives their progress itself.
        self.progress_delay_us = (int(x.get("progress_delay_us", 1000)) if self.is_producer
                                  else 0)
        self.compat_hash = config_compat_hash(vllm_config, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self.checksum = bool(x.get("checksum", False))   # debug: CRC32 both sides per load
        # Test switch: the consumer waits this long between pinning the lease and READing
        # (fault-injection tests kill a peer in that window). Never set in production.
        self.debug_load_delay_s = float(os.environ.get("PDSERVE_DEBUG_KV_LOAD_DELAY_S") or 0)
        # Debug/test switch: zero the blocks just loaded, to prove the output depends on
        # the transferred bytes (tests/e2e/test_kv_moves.py). Never set in production.
        self.debug_corrupt = os.environ.get("PDSERVE_DEBUG_CORRUPT_KV", "")
        if self.debug_corrupt:
            log.warning("PDSERVE_DEBUG_CORRUPT_KV=%s: loaded KV blocks will be destroyed",
                        self.debug_corrupt)

        self.lock = threading.Lock()
        self.leases = LeaseTable()
        self.regions: list[L.Region] = []
        self.layouts: list[str] = []
        self.backend = None
        self.server = None
        self.clients = AgentClients()
        self.remote_regions: dict[str, list[L.Region]] = {}
        # the transport each producer's connection really uses (kv_transfer/transport.py)
        self.peer_transports: dict[str, pd_pb2.PeerTransport] = {}
        self.expect_transport = str(x.get("expect_transport", "auto"))
        self._done: list[tuple[str, bool]] = []       # consumer: (req id, ok)
        self._pending = 0
        self.records: OrderedDict[str, pd_pb2.KVTransferStats] = OrderedDict()
        self.bytes_total = 0
        self._q: queue.Queue[_Load | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- registration
    def register_kv_caches(self, kv_caches: dict) -> None:
        from kv_transfer.backends.nixl import NixlBackend, lock_memory

        num_blocks = self.kv_cache_config.num_blocks
        seen: set[int] = set()
        for t in kv_caches.values():
            tensors = t if isinstance(t, (list, tuple)) else [t]
            for tt in tensors:
                key = (tt.data_ptr(), tuple(tt.shape))
                if key in seen:
                    continue
                seen.add(key)
                self.regions += L.regions_from_strides(
                    tt.data_ptr(), list(tt.shape), list(tt.stride()), tt.element_size(),
                    num_blocks)
                self.layouts.append(L.describe_layout(list(tt.shape), list(tt.stride()),
                                                      str(tt.dtype), num_blocks))
        device = next(iter(kv_caches.values()))
        device = (device[0] if isinstance(device, (list, tuple)) else device).device
        mem_type = "VRAM" if device.type == "cuda" else "DRAM"
        self.device_id = device.index or 0
        spans = self.spans = L.registration_spans(self.regions)
        if mem_type == "DRAM":
            lock_memory(spans)  # resident KV: READs never fault (docs/benchmarks.md)
        log_dir = os.path.dirname(self.agent_file) if self.agent_file else None
        self.backend = NixlBackend(f"{self.engine_id}-{os.getpid()}", mem_type,
                                   progress_delay_us=self.progress_delay_us,
                                   log_dir=log_dir or tempfile.gettempdir())
        self.backend.register(spans, self.device_id)

        r0 = self.regions[0]
        mc = self.vllm_config.model_config
        info = pd_pb2.AgentInfo(
            engine_id=self.engine_id, agent_name=self.backend.name,
            nixl_metadata=self.backend.metadata,
            layout=pd_pb2.KVLayout(
                model=served_name(mc), dtype=str(mc.dtype), block_size=self.block_size,
                num_layers=len(kv_caches), block_bytes=r0.block_bytes,
                layout=self.layouts[0], compat_hash=self.compat_hash),
            layers=[pd_pb2.LayerRegion(base_addr=r.base_addr, block_stride=r.block_stride,
                                       num_blocks=r.num_blocks) for r in self.regions])
        st = AgentState()
        st.info, st.compat_hash = info, self.compat_hash
        st.stats = self._stats
        if self.is_producer:
            st.acquire = self._acquire
            st.release = self._release
            if self.checksum:
                st.checksum = self._checksum
        self.server, port = start_agent_server(st, self.agent_host, self.agent_port)
        if self.agent_file:
            write_agent_address(self.agent_file, f"{self.agent_host}:{port}")
        log.info("KV connector (%s) engine=%s: %d layers, %d regions, block %d bytes, "
                 "layout %s, compat %s", "producer" if self.is_producer else "consumer",
                 self.engine_id, len(kv_caches), len(self.regions), r0.block_bytes,
                 self.layouts[0], self.compat_hash)
        if not self.is_producer:
            self._thread = threading.Thread(target=self._transfer_loop, name="pd-kv-load",
                                            daemon=True)
            self._thread.start()

    # -- producer: lease protocol (called on the agent's gRPC threads)
    def _acquire(self, ids: list[str], extend_s: float):
        with self.lock:
            return self.leases.acquire(ids, time.monotonic(), extend_s or self.acquire_extend_s)

    def _release(self, ids: list[str]):
        with self.lock:
            return self.leases.release(ids, time.monotonic())

    def _checksum(self, spans: list[tuple[int, int]]) -> int | None:
        from kv_transfer.integrity import crc32_of, inside
        return crc32_of(spans) if inside(spans, self.spans) else None

    def _stats(self, pop: list[str]) -> pd_pb2.AgentStats:
        with self.lock:
            records = {k: self.records.pop(k) for k in pop if k in self.records}
            return pd_pb2.AgentStats(
                leases_held=len(self.leases), loads_pending=self._pending,
                leases_expired_total=self.leases.expired_total, bytes_total=self.bytes_total,
                records=records, peers=list(self.peer_transports.values()))

    # -- every step
    def start_load_kv(self, meta: PDConnectorMetadata) -> None:
        if not isinstance(meta, PDConnectorMetadata):
            return
        if meta.leases:
            now = time.monotonic()
            with self.lock:
                for tid, n in meta.leases.items():
                    self.leases.add(tid, now, self.lease_s, n)
        for spec in meta.loads:
            with self.lock:
                self._pending += 1
            self._q.put(_Load(spec))

    def transfer_results(self) -> KVConnectorTransferResults:
        res = KVConnectorTransferResults()
        if self.is_producer:
            if self.backend is not None and not self.progress_delay_us and len(self.leases):
                self.backend.progress()  # no progress thread: progress from the step loop
            with self.lock:
                released, expired = self.leases.take_finished(time.monotonic())
            for tid in expired:
                log.warning("KV lease %s expired before the consumer released it; "
                            "freeing its blocks", tid)
            res.finished_sending = released | expired
        else:
            with self.lock:
                done, self._done = self._done, []
            for req_id, ok in done:
                res.finished_recving.add(req_id)
                if not ok:
                    res.failed_recving.add(req_id)
        return res

    # -- consumer: the transfer thread
    def _transfer_loop(self) -> None:
        while True:
            load = self._q.get()
            if load is None:
                return
            t0 = time.perf_counter()
            rec = pd_pb2.KVTransferStats(tokens=load.spec.num_tokens)
            try:
                self._load_one(load, rec)
                load.to(TransferState.DONE)
            except Exception as e:  # noqa: BLE001 - every failure is reported, never raised
                load.error = f"{type(e).__name__}: {e}"
                load.state = TransferState.FAILED
                rec.reason = getattr(e, "reason", "") or (
                    "peer_unreachable" if isinstance(e, grpc.RpcError) else "error")
                log.error("KV load of %s (transfer %s from %s) failed (%s): %s",
                          load.spec.req_id, load.spec.transfer_id, load.spec.agent_address,
                          rec.reason, load.error)
            rec.seconds = time.perf_counter() - t0
            ok = load.state == TransferState.DONE
            rec.status = "ok" if ok else "failed"
            nbytes = rec.bytes if ok else 0
            with self.lock:
                self._pending -= 1
                self.bytes_total += nbytes
                if load.spec.transfer_key:
                    self.records[load.spec.transfer_key] = rec
                    while len(self.records) > self.MAX_RECORDS:
                        self.records.popitem(last=False)
                self._done.append((load.spec.req_id, ok))

    def _load_one(self, load: _Load, rec: pd_pb2.KVTransferStats) -> None:
        """Pin the lease, READ the blocks before the lease could end, optionally checksum.
        Fills `rec`; raises on any failure (the caller reports it)."""
        spec = load.spec
        load.to(TransferState.ACQUIRING)
        if spec.compat_hash and spec.compat_hash != self.compat_hash:
            raise LoadError("incompatible", f"incompatible KV handle: {spec.compat_hash} != "
                            f"{self.compat_hash}")
        stub = self.clients.get(spec.agent_address)
        if not self.backend.has_remote(spec.engine_id):
            info = stub.GetAgentInfo(pd_pb2.AgentInfoRequest(peer_compat_hash=self.compat_hash),
                                     timeout=RPC_TIMEOUT_S)
            if info.engine_id != spec.engine_id:
                raise RuntimeError(f"agent at {spec.agent_address} is engine {info.engine_id}, "
                                   f"expected {spec.engine_id}")
            self.remote_regions[spec.engine_id] = [
                L.Region(x.base_addr, x.block_stride, self.regions[i].block_bytes, x.num_blocks)
                for i, x in enumerate(info.layers)]
            self.backend.ensure_remote(spec.engine_id, info.nixl_metadata)
        remote_agent = self.backend._remotes[spec.engine_id]
        # The lease runs until at least t_pin + acquire_extend_s on the producer's clock
        # (its Acquire starts after t_pin): the READ must be over well before that.
        t_pin = time.monotonic()
        lease = stub.Acquire(pd_pb2.LeaseRequest(transfer_ids=[spec.transfer_id],
                                                 extend_s=self.acquire_extend_s),
                             timeout=RPC_TIMEOUT_S)
        if spec.transfer_id not in lease.held:
            raise LoadError("lease_expired",
                            f"lease {spec.transfer_id} expired or unknown at the producer")
        if self.debug_load_delay_s:
            time.sleep(self.debug_load_delay_s)
        load.to(TransferState.TRANSFERRING)
        runs = L.block_runs(spec.local_block_ids, spec.remote_block_ids)
        ldescs, rdescs = L.transfer_descriptors(self.regions, self.remote_regions[spec.engine_id],
                                                runs, self.device_id, self.device_id)
        rec.bytes, rec.descriptors = sum(d[1] for d in ldescs), len(ldescs)
        budget = (t_pin + self.acquire_extend_s - lease_margin_s(self.acquire_extend_s)
                  - time.monotonic())
        if budget <= 0:
            raise LoadError("lease_expired", f"lease {spec.transfer_id} would end before the "
                            "READ could finish; not reading")
        t_read = time.perf_counter()
        try:
            rec.prep_seconds = self.backend.read(remote_agent, ldescs, rdescs,
                                                 min(self.transfer_timeout_s, budget))
        except Exception as e:
            # the peer may be gone or restarted: redo the handshake next time
            self.backend.forget_remote(spec.engine_id)
            self.remote_regions.pop(spec.engine_id, None)
            what = f"{type(e).__name__} {e}".lower()
            reason = ("timeout" if "timed out" in what else
                      "peer_unreachable" if "disconnect" in what or "remote" in what else
                      "error")
            raise LoadError(reason, f"{type(e).__name__}: {e}") from e
        rec.read_seconds = time.perf_counter() - t_read
        if spec.engine_id not in self.peer_transports:
            self._note_transport(spec)
        if self.debug_corrupt == "zero":
            for addr, length, _ in ldescs:
                ctypes.memset(addr, 0, length)
        if self.checksum:   # while the lease still holds the producer's blocks
            from kv_transfer.integrity import crc32_of
            mine = crc32_of((a, n) for a, n, _ in ldescs)
            theirs = stub.Checksum(pd_pb2.ChecksumRequest(
                addrs=[d[0] for d in rdescs], lengths=[d[1] for d in rdescs]),
                timeout=RPC_TIMEOUT_S).crc32
            if mine != theirs:
                raise LoadError("checksum_mismatch", f"KV of {spec.transfer_id}: CRC32 "
                                f"{mine:08x} here, {theirs:08x} at the producer")
            rec.checksummed = True

    def _note_transport(self, spec: LoadSpec) -> None:
        """After the first READ from a producer: which transport UCX really used for it.
        Logged once per peer; a worse one than expected is a loud warning (and a metric)."""
        from kv_transfer import transport as T

        host = spec.agent_address.rsplit(":", 1)[0]
        local = host in ("127.0.0.1", "localhost", "::1", self.agent_host,
                         socket.gethostname())
        scope = "intra-node" if local else "inter-node"
        cfg = self.backend.endpoint_configs().get(scope)
        actual = cfg.transport if cfg else "none"
        if self.expect_transport == "auto":
            expected = T.default_expectation(scope, bool(os.path.isdir(
                "/sys/class/infiniband") and os.listdir("/sys/class/infiniband")))
        else:
            expected = self.expect_transport if self.expect_transport != "none" else ""
        bad = cfg is not None and T.fallback(actual, expected)
        pt = pd_pb2.PeerTransport(engine_id=spec.engine_id, transport=actual,
                                  detail=cfg.describe() if cfg else "unknown (UCX log off)",
                                  expected=expected, fallback=bad)
        with self.lock:
            self.peer_transports[spec.engine_id] = pt
        if bad:
            log.warning("KV TRANSPORT FALLBACK: transfers from %s (%s, %s) use %s, expected "
                        "%s: %s. Check UCX_TLS / UCX_NET_DEVICES and the RDMA/NVLink setup "
                        "(docs/deployment.md)", spec.engine_id, spec.agent_address, scope,
                        actual.upper(), expected, pt.detail)
        else:
            log.info("KV transport from %s (%s, %s): %s", spec.engine_id, spec.agent_address,
                     scope, pt.detail)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=5)
        if self.server is not None:
            self.server.stop(grace=0.5)
        self.clients.close()
        if self.backend is not None:
            self.backend.close()
