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
import math
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
    P_PUSH,
    P_REMOTE_DECODE,
    P_REMOTE_PREFILL,
    LoadSpec,
    OfferSpec,
    PDConnectorMetadata,
    PushChunk,
)
from kv_transfer.peers import PeerLRU
from kv_transfer.push import Offer, OfferState, OfferTable, chunk_blocks
from kv_transfer.state import LeaseTable, TransferState, advance
from kv_transfer.wakeup import TRANSFERS, Waker
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
PUSH_POLL_S = 0.0005   # consumer: notification / UCX progress poll while a push is awaited
IDLE_STEP_WAIT_S = 0.02  # consumer: an empty step waits this long at most for a transfer


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


def engine_quiescent(sched, own_work: bool, waiting_for_kv) -> bool:
    """True when no step of vLLM's scheduler `sched` can make progress until an outside
    event: the connector has nothing to hand to its worker half (`own_work` False),
    nothing runs or has just finished, and every waiting request waits on a KV load that
    has not finished (status `waiting_for_kv`; a finished load keeps that status until the
    next step admits the request); other requests left are finished ones whose blocks the
    producer holds under lease. The engine core may then sleep (pdserve's vLLM plugin)
    until a new request, a wakeup from the worker half (a transfer ended, a lease was
    released: kv_transfer/wakeup.py) or a short bound. Conservative: anything unexpected
    answers False, and vLLM steps as it would without us. Pure."""
    if own_work:
        return False
    try:
        if (sched.running or sched.finished_req_ids or not sched.requests
                or sched.finished_recving_kv_req_ids):   # loaded: the next step admits them
            return False
        waiting = list(sched.waiting) + list(getattr(sched, "kv_holding_waiting", ()))
    except (AttributeError, TypeError):   # another vLLM's scheduler: do as it does
        return False
    return all(r.status == waiting_for_kv for r in waiting)


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
        # push mode
        self._offers: list[OfferSpec] = []
        self._cancels: list[str] = []
        self._push_prompt: dict[str, int] = {}        # producer: req id -> prompt tokens
        self._push_blocks: dict[str, list[int]] = {}  # producer: req id -> blocks so far
        self._push_tid: dict[str, str] = {}           # producer: req id -> transfer id
        # set once pdserve's vLLM plugin asks `quiescent`: the engine core then sleeps
        # while only transfers are pending, and the worker half's idle-step wait is moot
        self.hold_wait = False

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
        if p and p.get(P_PUSH) and p.get(P_REMOTE_DECODE) and self.is_producer:
            self._push_prompt[request.request_id] = request.num_prompt_tokens
            # the engine adds a suffix to the caller's request id; offers use the caller's
            self._push_tid[request.request_id] = str(p.get("transfer_id") or
                                                     request.request_id)
            return 0, False
        if not p or not p.get(P_REMOTE_PREFILL) or p.get(P_DONE):
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        # pull: the handle's tokens; push: the whole prompt (vLLM recomputes its last
        # token to sample the first output token here)
        total = request.num_prompt_tokens if p.get(P_PUSH) else int(p["num_tokens"])
        count = total - num_computed_tokens
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
        first = local_hit // self.block_size
        if p.get(P_PUSH):
            n_blocks = L.blocks_for_tokens(request.num_prompt_tokens, self.block_size)
            self._offers.append(OfferSpec(
                req_id=request.request_id, transfer_key=str(p.get("transfer_key", "")),
                transfer_id=p["transfer_id"], agent_address=p["agent_address"],
                block_ids=list(blocks.get_block_ids()[0][:n_blocks]), skip_blocks=first,
                num_tokens=num_external_tokens))
            self._loading[request.request_id] = (p["agent_address"], p["transfer_id"])
            return
        num_tokens = int(p["num_tokens"])
        local_ids = list(blocks.get_block_ids()[0][
            first:L.blocks_for_tokens(num_tokens, self.block_size)])
        # the producer's blocks holding tokens [local_hit, num_tokens): the same blocks
        # when both block sizes agree, else those the relayout reads (kv_transfer/relayout.py)
        src_bs = int(p.get("block_size") or self.block_size)
        remote_ids = [int(b) for b in p["block_ids"][
            local_hit // src_bs:L.blocks_for_tokens(num_tokens, src_bs)]]
        self._loads.append(LoadSpec(
            req_id=request.request_id, transfer_key=str(p.get("transfer_key", "")),
            transfer_id=p["transfer_id"], engine_id=p["engine_id"],
            agent_address=p["agent_address"], compat_hash=p.get("compat_hash", ""),
            local_block_ids=local_ids, remote_block_ids=remote_ids,
            num_tokens=num_external_tokens, src_block_size=src_bs, first_token=local_hit,
            end_token=num_tokens))
        self._loading[request.request_id] = (p["agent_address"], p["transfer_id"])

    def update_connector_output(self, connector_output) -> None:
        for req_id in connector_output.finished_recving or ():
            src = self._loading.pop(req_id, None)
            if src is not None:
                self._releaser.release(*src)

    # -- both
    def build_connector_meta(self, so=None) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(loads=self._loads, leases=self._new_leases,
                                   offers=self._offers, cancels=self._cancels,
                                   pushes=self._push_chunks(so) if so is not None else [],
                                   idle=(so is not None and not self.hold_wait
                                         and not so.total_num_scheduled_tokens))
        self._loads, self._new_leases, self._offers, self._cancels = [], {}, [], []
        return meta

    def _push_chunks(self, so) -> list[PushChunk]:
        """Producer: the prompt tokens each push request computes in this step."""
        if not self._push_prompt:
            return []
        out = []
        for r in so.scheduled_new_reqs:
            n = self._push_prompt.get(r.req_id)
            if n is None:
                continue
            blocks = self._push_blocks[r.req_id] = list(r.block_ids[0])
            end = r.num_computed_tokens + so.num_scheduled_tokens.get(r.req_id, 0)
            # from token 0: blocks this engine had cached are pushed in this step too
            out.append(PushChunk(r.req_id, self._push_tid[r.req_id], list(blocks), 0,
                                 min(end, n), n))
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            n = self._push_prompt.get(rid)
            if n is None:
                continue
            new = c.new_block_ids[i]
            if rid in c.resumed_req_ids:
                self._push_blocks[rid] = list(new[0]) if new else []
            elif new:
                self._push_blocks.setdefault(rid, []).extend(new[0])
            start = c.num_computed_tokens[i]
            if start >= n:
                continue
            end = start + so.num_scheduled_tokens.get(rid, 0)
            out.append(PushChunk(rid, self._push_tid[rid], list(self._push_blocks.get(rid, [])),
                                 start, min(end, n), n))
        return out

    def request_finished(self, request: "Request", block_ids: list[int]):
        from vllm.v1.request import RequestStatus

        p = request.kv_transfer_params
        if not p:
            return False, None
        if p.get(P_REMOTE_PREFILL):
            self._local_hit.pop(request.request_id, None)
            if (p.get(P_PUSH) and p.get(P_DONE) and request.request_id in self._loading
                    and request.status == RequestStatus.FINISHED_ABORTED):
                # aborted while the producer may still WRITE into its blocks: the worker
                # half cancels the offer; vLLM keeps the blocks until it reports back
                self._cancels.append(request.request_id)
            if not p.get(P_DONE):
                # aborted before it was ever scheduled: free the producer's blocks
                p[P_DONE] = True
                self._releaser.release(p["agent_address"], p["transfer_id"])
            # else: release follows finished_recving (vLLM delays our free until then)
            return False, None
        if not p.get(P_REMOTE_DECODE) or not self.is_producer:
            return False, None
        self._push_prompt.pop(request.request_id, None)
        self._push_blocks.pop(request.request_id, None)
        self._push_tid.pop(request.request_id, None)
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
            "block_size": self.block_size,
            "lease_expires_unix": time.time() + self.lease_s,
        }

    def quiescent(self, sched) -> bool:
        """May the engine core sleep until an outside event? (engine_quiescent)"""
        from vllm.v1.request import RequestStatus

        self.hold_wait = True   # the plugin asks: the worker half need not wait in steps
        own = bool(self._loads or self._new_leases or self._offers or self._cancels
                   or self._push_prompt)
        return engine_quiescent(sched, own, RequestStatus.WAITING_FOR_REMOTE_KVS)

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


class _PushWait:
    """Consumer, push mode: an offer sent, waiting for the producer's notification."""

    def __init__(self, spec: OfferSpec) -> None:
        self.spec = spec
        self.t0 = time.perf_counter()
        self.deadline = math.inf
        self.next_try = 0.0
        self.cancelled = False
        self.reason = ""
        self.rec = pd_pb2.KVTransferStats(mode="push", tokens=spec.num_tokens)


class _WorkerHalf:
    MAX_RECORDS = 10000

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        x = _extra(vllm_config)
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        # kv_both (pdserve's engines): both halves; a role can change without a restart
        self.is_producer = vllm_config.kv_transfer_config.is_kv_producer
        self.is_consumer = vllm_config.kv_transfer_config.is_kv_consumer
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
        self.remote_block_size: dict[str, int] = {}
        # bounded: peers idle past any lease (MAX_HOLD_S) and transfer are forgotten
        self.peers = PeerLRU(max_peers=int(x.get("max_peers", 64)),
                             idle_s=max(600.0, 2 * self.transfer_timeout_s))
        # CPU KV tensor behind each region (one region per layer), for the relayout
        # between block sizes; a staging buffer the relayout READs land in (grows)
        self.region_tensors: list = []
        self._staging = None
        self._staging_reg = None
        # the transport each producer's connection really uses (kv_transfer/transport.py)
        self.peer_transports: dict[str, pd_pb2.PeerTransport] = {}
        self.expect_transport = str(x.get("expect_transport", "auto"))
        self.ucx_err_mode = str(x.get("ucx_err_mode", "auto"))
        self._done: list[tuple[str, bool]] = []       # consumer: (req id, ok)
        self._done_evt = threading.Event()             # set when _done gains an entry
        # wakes the engine core when it sleeps while only transfers are pending
        self._waker = Waker() if os.environ.get("PDSERVE_HOLD_WAIT") == "1" else None
        self._idle_step = False
        self._pending = 0
        self.records: OrderedDict[str, pd_pb2.KVTransferStats] = OrderedDict()
        self.bytes_total = 0
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        # push mode (kv_transfer/push.py): "push" WRITEs each layer as it is computed,
        # "push-whole" everything after the last prefill step; "pull": the consumer READs
        self.kv_mode = str(x.get("kv_mode", "pull"))
        self.push_ttl_s = float(x.get("push_ttl_s", 60.0))
        self.offers = OfferTable()
        self.layer_regions: dict[str, list[int]] = {}
        self._step: list = []                          # producer: this step's PushChunks
        self._step_writes: list[tuple[Offer, Any]] = []
        self._step_layers: dict[str, int] = {}         # transfer id -> layers posted this step
        self._push_recs: dict[str, pd_pb2.KVTransferStats] = {}
        self._push_t0: dict[str, float] = {}
        self._finished_push: dict[str, tuple[list[int], int]] = {}  # awaiting a late offer
        self._req_of: dict[str, str] = {}              # producer: transfer id -> req id
        self._next_sweep = 0.0
        self._handshake_lock = threading.Lock()
        self._awaiting: dict[str, _PushWait] = {}      # consumer: offers sent, no notif yet
        self._cancelling: dict[str, _PushWait] = {}
        self.my_address = ""

    # -- registration
    def register_kv_caches(self, kv_caches: dict) -> None:
        from kv_transfer.backends.nixl import NixlBackend, advise_huge_pages, lock_memory

        num_blocks = self.kv_cache_config.num_blocks
        seen: dict[tuple, list[int]] = {}
        for name, t in kv_caches.items():
            tensors = t if isinstance(t, (list, tuple)) else [t]
            mine: list[int] = []
            for tt in tensors:
                key = (tt.data_ptr(), tuple(tt.shape))
                if key in seen:
                    mine += seen[key]
                    continue
                new = L.regions_from_strides(
                    tt.data_ptr(), list(tt.shape), list(tt.stride()), tt.element_size(),
                    num_blocks)
                seen[key] = list(range(len(self.regions), len(self.regions) + len(new)))
                mine += seen[key]
                self.regions += new
                self.region_tensors += [tt if len(new) == 1 else None] * len(new)
                self.layouts.append(L.describe_layout(list(tt.shape), list(tt.stride()),
                                                      str(tt.dtype), num_blocks))
            self.layer_regions[name] = mine
        device = next(iter(kv_caches.values()))
        device = (device[0] if isinstance(device, (list, tuple)) else device).device
        mem_type = "VRAM" if device.type == "cuda" else "DRAM"
        self.device_id = device.index or 0
        spans = self.spans = L.registration_spans(self.regions)
        if mem_type == "DRAM":
            if os.environ.get("PDSERVE_KV_HUGE_PAGES", "1") == "1":
                advise_huge_pages(spans)  # fewer pages for CMA to pin and walk per copy
            lock_memory(spans)  # resident KV: READs never fault (docs/benchmarks.md)
        log_dir = os.path.dirname(self.agent_file) if self.agent_file else None
        self.backend = NixlBackend(f"{self.engine_id}-{os.getpid()}", mem_type,
                                   progress_delay_us=self.progress_delay_us,
                                   log_dir=log_dir or tempfile.gettempdir(),
                                   err_mode=self.ucx_err_mode)
        self.backend.register(spans, self.device_id)
        # every block of every layer, prepared once; transfers pick blocks by index
        self.backend.prep_blocks(L.block_descs(self.regions, self.device_id))

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
            if self.kv_mode.startswith("push"):   # a pull engine refuses offers at once
                st.offer = self._offer
                st.cancel = self._cancel
        self.server, port = start_agent_server(st, self.agent_host, self.agent_port)
        self.my_address = f"{self.agent_host}:{port}"
        if self.agent_file:
            write_agent_address(self.agent_file, f"{self.agent_host}:{port}")
        log.info("KV connector (%s) engine=%s: %d layers, %d regions, block %d bytes, "
                 "layout %s, compat %s",
                 "+".join(r for r, on in (("producer", self.is_producer),
                                          ("consumer", self.is_consumer)) if on),
                 self.engine_id, len(kv_caches), len(self.regions), r0.block_bytes,
                 self.layouts[0], self.compat_hash)
        if self.is_consumer:
            self._thread = threading.Thread(target=self._transfer_loop, name="pd-kv-load",
                                            daemon=True)
            self._thread.start()

    # -- producer: lease protocol (called on the agent's gRPC threads)
    def _acquire(self, ids: list[str], extend_s: float):
        with self.lock:
            return self.leases.acquire(ids, time.monotonic(), extend_s or self.acquire_extend_s)

    def _release(self, ids: list[str]):
        with self.lock:
            held, missing = self.leases.release(ids, time.monotonic())
        if held:
            self._wake()   # the engine core frees the blocks on its next step
        return held, missing

    def _wake(self) -> None:
        """Something the scheduler must see happened: wake its engine core if it sleeps
        (kv_transfer/wakeup.py)."""
        if self._waker is not None:
            self._waker.wake()

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
        for ospec in meta.offers:
            with self.lock:
                self._pending += 1
            self._q.put(_PushWait(ospec))
        for req_id in meta.cancels:
            self._q.put(("cancel", req_id))
        self._idle_step = meta.idle
        self._step = list(meta.pushes) if self.kv_mode.startswith("push") else []
        for ch in self._step:
            self._req_of[ch.transfer_id] = ch.req_id

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
            if self._req_of and (released or expired):
                gone = released | expired
                with self.lock:
                    for t in [t for t, r in self._req_of.items() if r in gone]:
                        del self._req_of[t]
                        self._finished_push.pop(t, None)
            if self.offers.offers and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + 0.5
                self._sweep_offers()
            res.finished_sending = released | expired
        if self.is_consumer:
            if self._idle_step and self._pending and not self._done:
                # Every request of this engine waits for KV, so vLLM would step again at
                # once, empty, in a loop: its engine core and this worker's main thread
                # then share the engine's core with the transfer thread's copy (measured:
                # the READ's wall time twice its CPU time). Wait for the transfer instead,
                # a bounded while (new requests and aborts wait at most that long).
                self._done_evt.wait(IDLE_STEP_WAIT_S)
            with self.lock:
                done, self._done = self._done, []
                self._done_evt.clear()
            for req_id, ok in done:
                res.finished_recving.add(req_id)
                if not ok:
                    res.failed_recving.add(req_id)
        return res

    # -- consumer: the transfer thread
    def _transfer_loop(self) -> None:
        while True:
            busy = bool(self._awaiting or self._cancelling)
            try:
                item = self._q.get(timeout=PUSH_POLL_S) if busy else self._q.get()
            except queue.Empty:
                item = ()
            if item is None:
                return
            if isinstance(item, _PushWait):
                self._send_offer(item)
            elif isinstance(item, tuple) and item:
                self._cancel_push(item[1])
            elif isinstance(item, _Load):
                self._pull(item)
            if self._awaiting or self._cancelling:
                self._poll_push()

    def _pull(self, load: _Load) -> None:
        t0 = time.perf_counter()
        rec = pd_pb2.KVTransferStats(tokens=load.spec.num_tokens, mode="pull")
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
                self._keep_record(load.spec.transfer_key, rec)
            self._done.append((load.spec.req_id, ok))
            self._done_evt.set()
        self._wake()

    def _keep_record(self, key: str, rec: pd_pb2.KVTransferStats) -> None:
        """Under self.lock: keep a transfer's record until its worker pops it (bounded)."""
        self.records[key] = rec
        while len(self.records) > self.MAX_RECORDS:
            self.records.popitem(last=False)

    def _load_one(self, load: _Load, rec: pd_pb2.KVTransferStats) -> None:
        """Pin the lease, READ the blocks before the lease could end, optionally checksum.
        Fills `rec`; raises on any failure (the caller reports it)."""
        spec = load.spec
        load.to(TransferState.ACQUIRING)
        if spec.compat_hash and spec.compat_hash != self.compat_hash:
            raise LoadError("incompatible", f"incompatible KV handle: {spec.compat_hash} != "
                            f"{self.compat_hash}")
        stub = self.clients.get(spec.agent_address)
        remote_agent = self._ensure_peer(spec.engine_id, spec.agent_address)
        rbs = self.remote_block_size[spec.engine_id]
        if spec.src_block_size and spec.src_block_size != rbs:
            raise LoadError("incompatible", f"handle says block size {spec.src_block_size}, "
                            f"the producer's agent {rbs}")
        relayout = rbs != self.block_size
        if relayout:
            self._check_relayout(rbs)
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
        remote = self.remote_regions[spec.engine_id]
        if relayout:   # READ the producer's blocks as they are into staging
            local = self._staging_regions(len(spec.remote_block_ids), remote[0].block_bytes)
            runs = L.block_runs(range(len(spec.remote_block_ids)), spec.remote_block_ids)
        else:
            local = self.regions
            lids, rids = L.sort_pairs(spec.local_block_ids, spec.remote_block_ids)
            runs = L.block_runs(lids, rids)
            regs = range(len(self.regions))
            lidx = L.block_indices(regs, self.regions[0].num_blocks, lids)
            ridx = L.block_indices(regs, remote[0].num_blocks, rids)
        rec.bytes = len(remote) * len(spec.remote_block_ids) * remote[0].block_bytes
        rec.descriptors = L.merged_count(runs, local, remote)
        budget = (t_pin + self.acquire_extend_s - lease_margin_s(self.acquire_extend_s)
                  - time.monotonic())
        if budget <= 0:
            raise LoadError("lease_expired", f"lease {spec.transfer_id} would end before the "
                            "READ could finish; not reading")
        t_read, cpu_read = time.perf_counter(), time.thread_time()
        try:
            timeout = min(self.transfer_timeout_s, budget)
            with TRANSFERS:   # vLLM's waiting worker thread keeps off our core meanwhile
                if relayout:
                    rec.prep_seconds = self.backend.read(
                        remote_agent, *L.transfer_descriptors(local, remote, runs), timeout)
                else:
                    rec.prep_seconds = self.backend.xfer_blocks(
                        "READ", spec.engine_id, lidx, ridx, timeout)
        except Exception as e:
            # the peer may be gone or restarted: redo the handshake next time
            with self._handshake_lock:
                self._forget_peer(spec.engine_id)
            what = f"{type(e).__name__} {e}".lower()
            reason = ("timeout" if "timed out" in what else
                      "peer_unreachable" if "disconnect" in what or "remote" in what else
                      "error")
            raise LoadError(reason, f"{type(e).__name__}: {e}") from e
        rec.read_seconds = time.perf_counter() - t_read
        rec.read_cpu_seconds = time.thread_time() - cpu_read
        if spec.engine_id not in self.peer_transports:
            self._note_transport(spec)
        if self.debug_corrupt or self.checksum:
            ldescs, rdescs = L.transfer_descriptors(local, remote, runs)
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
        if relayout:
            t0 = time.perf_counter()
            self._relayout(spec, rbs, remote[0].block_bytes)
            rec.relayout_seconds = time.perf_counter() - t0

    # -- consumer: pull between different block sizes (kv_transfer/relayout.py)
    def _check_relayout(self, rbs: int) -> None:
        from kv_transfer.relayout import KNOWN_ISAS
        shapes_ok = all(t is not None and t.device.type == "cpu" and t.dim() == 4
                        and t.shape[2] == self.block_size for t in self.region_tensors)
        if not shapes_ok or self.block_size % 16 or rbs % 16:
            raise LoadError("incompatible", f"block size {rbs} at the producer, "
                            f"{self.block_size} here: relayout is implemented for vLLM's CPU "
                            "KV layout only")
        t = self.region_tensors[0]
        isa = self._isa(t, rbs)
        if isa not in KNOWN_ISAS:
            raise LoadError("incompatible", f"block size {rbs} at the producer, "
                            f"{self.block_size} here: CPU attention ISA {isa} packs blocks "
                            "in a way the relayout does not know")

    @staticmethod
    def _isa(t, block_size: int) -> str:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        return _get_attn_isa(t.dtype, block_size, t.shape[3] // 2)

    def _staging_regions(self, n: int, block_bytes: int) -> list[L.Region]:
        """Room for `n` source blocks of every layer, layer-major, in a registered staging
        buffer (grown by doubling; mlocked; registered with NIXL beside the KV cache)."""
        import numpy as np

        from kv_transfer.backends.nixl import lock_memory
        need = len(self.regions) * n * block_bytes
        if self._staging is None or self._staging.nbytes < need:
            size = max(need, 2 * (self._staging.nbytes if self._staging is not None else 0),
                       64 << 20)
            if self._staging is not None:
                self.backend.deregister_extra(self._staging_reg)
            self._staging = np.zeros(size, dtype=np.uint8)
            lock_memory([(self._staging.ctypes.data, size)])
            self._staging_reg = self.backend.register_extra(
                [(self._staging.ctypes.data, size)], self.device_id)
            log.info("KV relayout staging buffer: %.0f MiB", size / 2**20)
        base = self._staging.ctypes.data
        return [L.Region(base + i * n * block_bytes, block_bytes, block_bytes, n)
                for i in range(len(self.regions))]

    def _relayout(self, spec: LoadSpec, rbs: int, block_bytes: int) -> None:
        """Lay the staged source blocks (`block_bytes` each, layer-major, as
        `_staging_regions` placed them) out into this engine's blocks, layer by layer."""
        import torch

        from kv_transfer.relayout import relayout_layer
        n = len(spec.remote_block_ids)
        # the request's logical blocks from 0 (those before first_token are ours already)
        dst_ids = [-1] * (spec.first_token // self.block_size) + list(spec.local_block_ids)
        t0 = self.region_tensors[0]
        src_isa, dst_isa = self._isa(t0, rbs), self._isa(t0, self.block_size)
        staged = torch.from_numpy(self._staging)
        per_layer = n * block_bytes
        for i, t in enumerate(self.region_tensors):
            layer = staged[i * per_layer:(i + 1) * per_layer].view(t.dtype).view(n, t.shape[1], -1)
            relayout_layer(layer, t, rbs, spec.first_token // rbs, dst_ids, self.block_size,
                           spec.first_token, spec.end_token, src_isa, dst_isa)

    # ------------------------------------------------------------------ push: producer
    def _offer(self, req: pd_pb2.OfferRequest) -> tuple[bool, str]:
        """A consumer offers its blocks (agent gRPC thread). A request that finished
        before the offer came is pushed whole, here and now."""
        tid = req.transfer_id
        if req.compat_hash and req.compat_hash != self.compat_hash:
            return False, f"incompatible KV: {req.compat_hash} != {self.compat_hash}"
        eid = req.consumer_engine_id
        try:
            peer = self._ensure_peer(eid, req.consumer_agent_address)
        except Exception as e:  # noqa: BLE001 - refused, with the reason
            return False, f"handshake with {req.consumer_agent_address} failed: {e}"
        if self.remote_block_size[eid] != self.block_size:
            # a WRITE lands in the consumer's blocks as they are: no relayout in push
            return False, (f"incompatible KV: block size {self.remote_block_size[eid]} at "
                           f"the consumer, {self.block_size} here (pull reads across sizes)")
        o = Offer(tid, peer, eid, [int(b) for b in req.block_ids], int(req.skip_blocks),
                  time.monotonic() + (req.ttl_s or self.push_ttl_s))
        with self.lock:
            if not self.offers.add(o):
                return False, "duplicate or cancelled offer"
            late = self._finished_push.pop(tid, None)
        if late is not None:
            self._push_whole(o, *late)
            self._complete(o, *late)
        self._wake()
        return True, ""

    def _ensure_peer(self, eid: str, address: str) -> str:
        """The NIXL name of the peer engine `eid` (its KV agent at `address`); the first
        time, the handshake: its metadata and registered regions. Consumers call it before
        a READ, producers when an offer comes (first offers from one consumer may come
        together: one handshake at a time)."""
        with self._handshake_lock:
            for old in self.peers.touch(eid, time.monotonic()):
                log.info("forgetting peer engine %s (idle; %d peers known)", old,
                         len(self.peers))
                self._forget_peer(old)
            if not self.backend.has_remote(eid):
                info = self.clients.get(address).GetAgentInfo(
                    pd_pb2.AgentInfoRequest(peer_compat_hash=self.compat_hash),
                    timeout=RPC_TIMEOUT_S)
                if info.engine_id != eid:
                    raise RuntimeError(f"agent at {address} is engine {info.engine_id}, "
                                       f"expected {eid}")
                rbs = info.layout.block_size or self.block_size
                regions = self.remote_regions[eid] = [
                    L.Region(x.base_addr, x.block_stride,
                             self.regions[i].block_bytes * rbs // self.block_size,
                             x.num_blocks) for i, x in enumerate(info.layers)]
                self.remote_block_size[eid] = rbs
                self.backend.ensure_remote(eid, info.nixl_metadata)
                self.backend.prep_blocks(L.block_descs(regions, self.device_id), eid)
            return self.backend._remotes[eid]

    def _forget_peer(self, eid: str) -> None:
        """Drop what we know of peer engine `eid` (under the handshake lock): the next
        transfer with it shakes hands again."""
        self.peers.forget(eid)
        self.backend.forget_remote(eid)
        self.remote_regions.pop(eid, None)
        self.remote_block_size.pop(eid, None)

    def _cancel(self, ids: list[str]) -> tuple[list[str], list[str]]:
        with self.lock:
            cancelled, busy = self.offers.cancel(ids, time.monotonic())
            for tid in cancelled:
                if self._finished_push.pop(tid, None) is not None:   # nobody will take them
                    self.leases.release([self._req_of.get(tid, tid)], time.monotonic())
        self._wake()
        return cancelled, busy

    def _rec(self, tid: str) -> pd_pb2.KVTransferStats:
        rec = self._push_recs.get(tid)
        if rec is None:
            rec = self._push_recs[tid] = pd_pb2.KVTransferStats(mode="push")
        return rec

    def _post_write(self, o: Offer, blocks: range, src: list[int], regs: list[int]):
        """Post one WRITE of logical `blocks` of the given regions; returns its handle."""
        t0 = time.perf_counter()
        mine, theirs = [src[b] for b in blocks], [o.blocks[b] for b in blocks]
        rremote = self.remote_regions[o.engine_id]
        h, prep = self.backend.post_blocks(
            "WRITE", o.engine_id, L.block_indices(regs, self.regions[0].num_blocks, mine),
            L.block_indices(regs, rremote[0].num_blocks, theirs))
        with self.lock:
            rec = self._rec(o.transfer_id)
            self._push_t0.setdefault(o.transfer_id, t0)
            # posting runs on the engine's thread: it counts as exposed, not hidden
            posting = time.perf_counter() - t0
            rec.exposed_seconds += posting
            rec.post_seconds += posting
            rec.bytes += len(regs) * len(mine) * self.regions[0].block_bytes
            rec.descriptors += L.merged_count(L.block_runs(mine, theirs),
                                              [self.regions[i] for i in regs],
                                              [rremote[i] for i in regs])
            rec.writes += 1
            rec.prep_seconds += prep
        return h

    def save_kv_layer(self, layer_name: str) -> None:
        """Push mode, forward thread: WRITE this layer's blocks of every push request of
        the step whose offer is here (and nothing before it was missed)."""
        if not self._step or self.kv_mode != "push":
            return
        regs = self.layer_regions.get(layer_name)
        if not regs:
            return
        now = time.monotonic()
        for ch in self._step:
            with self.lock:
                o = self.offers.writable(ch.transfer_id, now)
                if o is None or o.written_upto < ch.start:
                    continue    # no offer yet, or it came late: pushed whole at the end
                blocks = chunk_blocks(ch.start, ch.end, self.block_size, o.skip, len(o.blocks))
                if not blocks:
                    continue
                self.offers.begin(o)
            try:
                self._step_writes.append((o, self._post_write(o, blocks, ch.block_ids, regs)))
            except Exception as e:  # noqa: BLE001 - never raise into the forward pass
                log.error("push WRITE of %s (layer %s) failed: %s", ch.transfer_id, layer_name, e)
                with self.lock:
                    self.offers.end(o, False, "write_failed")
                continue
            self._step_layers[ch.transfer_id] = self._step_layers.get(ch.transfer_id, 0) + 1

    def _wait_writes(self, writes: list) -> None:
        """Wait for a step's WRITEs under one deadline: a consumer that died or hangs costs
        the step at most one --transfer-timeout-s, however many layers were posted."""
        deadline = time.monotonic() + self.transfer_timeout_s
        for o, h in writes:
            ok, reason = True, ""
            try:
                self.backend.wait(h, max(deadline - time.monotonic(), 0.001),
                                  f"WRITE to {o.engine_id}")
            except Exception as e:  # noqa: BLE001
                ok, reason = False, ("timeout" if "timed out" in str(e) else "peer_unreachable")
                log.error("push WRITE of %s failed: %s", o.transfer_id, e)
            finally:
                self.backend.release(h)
            with self.lock:
                self.offers.end(o, ok, reason)

    def wait_for_save(self) -> None:
        """Push mode, end of the step's forward pass: wait for its WRITEs (the exposed part
        of the transfer); a request whose prompt is complete is pushed whole if its layers
        were not all written, then the consumer is notified."""
        if not self._step:
            return
        chunks, self._step = self._step, []
        writes, self._step_writes = self._step_writes, []
        t0 = time.perf_counter()
        self._wait_writes(writes)
        exposed = time.perf_counter() - t0
        n_layers = len(self.layer_regions)
        layers, self._step_layers = self._step_layers, {}
        for ch in chunks:
            with self.lock:
                o = self.offers.offers.get(ch.transfer_id)
                if o is None:
                    if ch.last:   # the offer may still come: push it then
                        self._finished_push[ch.transfer_id] = (list(ch.block_ids), ch.num_prompt)
                    continue
                if o.state == OfferState.OPEN and o.written_upto >= ch.start and (
                        layers.get(ch.transfer_id, 0) == n_layers or not chunk_blocks(
                            ch.start, ch.end, self.block_size, o.skip, len(o.blocks))):
                    o.written_upto = ch.end
                if ch.transfer_id in layers:
                    self._rec(ch.transfer_id).exposed_seconds += exposed
            if not ch.last or o.state == OfferState.DONE:
                continue
            if o.state == OfferState.OPEN and o.written_upto < ch.end:
                self._push_whole(o, ch.block_ids, ch.num_prompt)
            self._complete(o, ch.block_ids, ch.num_prompt)

    def _push_whole(self, o: Offer, block_ids: list[int], num_prompt: int) -> None:
        """Every layer of every block in one WRITE, waited for (exposed entirely)."""
        with self.lock:
            if self.offers.writable(o.transfer_id, time.monotonic()) is None:
                return
            self.offers.begin(o)
        try:
            blocks = chunk_blocks(0, num_prompt, self.block_size, o.skip, len(o.blocks))
            h = self._post_write(o, blocks, block_ids, list(range(len(self.regions))))
        except Exception as e:  # noqa: BLE001
            log.error("push of %s failed: %s", o.transfer_id, e)
            with self.lock:
                self.offers.end(o, False, "write_failed")
            return
        t0 = time.perf_counter()
        self._wait_writes([(o, h)])
        with self.lock:
            self._rec(o.transfer_id).exposed_seconds += time.perf_counter() - t0
            if o.state == OfferState.OPEN:
                o.written_upto = num_prompt

    def _block_spans(self, ids: list[int], blocks: range) -> list[tuple[int, int]]:
        """(addr, length) of logical `blocks` (physical `ids`) in every region, region-major:
        the order both sides of a push checksum them in."""
        return [(r.base_addr + ids[b] * r.block_stride, r.block_bytes)
                for r in self.regions for b in blocks]

    def _complete(self, o: Offer, src_ids: list[int], num_prompt: int) -> None:
        """The prompt is complete: tell the consumer (ok once every WRITE landed), free our
        blocks (the consumer never reads them), keep the record for the prefill worker.
        --kv-checksum: the notification carries the CRC32 of the source blocks pushed,
        computed before they are freed."""
        crc = ""
        if self.checksum and o.state == OfferState.OPEN:
            from kv_transfer.integrity import crc32_of
            blocks = chunk_blocks(0, num_prompt, self.block_size, o.skip, len(o.blocks))
            crc = (f":crc={crc32_of(self._block_spans(src_ids, blocks)):08x}"
                   f":{blocks.start}:{blocks.stop}")
        with self.lock:
            ok = self.offers.finish(o)
            rec = self._push_recs.pop(o.transfer_id, None) or pd_pb2.KVTransferStats(
                mode="push")
            t0 = self._push_t0.pop(o.transfer_id, None)
            if t0 is not None:
                rec.read_seconds = time.perf_counter() - t0
            rec.status = "ok" if ok else "failed"
            rec.reason = "" if ok else (o.reason or "error")
            self._keep_record(o.transfer_id, rec)
            if ok:
                self.bytes_total += rec.bytes
            self.leases.release([self._req_of.get(o.transfer_id, o.transfer_id)],
                                time.monotonic())
        if o.state == OfferState.CANCELLED:
            return
        try:
            self.backend.send_notif(o.peer, f"{o.transfer_id}:ok{crc}" if ok
                                    else f"{o.transfer_id}:fail:{rec.reason}")
        except Exception as e:  # noqa: BLE001 - the consumer's deadline covers it
            log.warning("push notification for %s failed: %s", o.transfer_id, e)

    def _sweep_offers(self) -> None:
        with self.lock:
            failed = self.offers.sweep(time.monotonic())
            # records of pushes whose prefill never completed (aborted on this side)
            for o in failed:
                self._push_recs.pop(o.transfer_id, None)
                self._push_t0.pop(o.transfer_id, None)
                if o.transfer_id not in self._finished_push:
                    self._req_of.pop(o.transfer_id, None)
        for o in failed:
            log.warning("push offer %s expired before its prompt was computed", o.transfer_id)
            try:
                self.backend.send_notif(o.peer, f"{o.transfer_id}:fail:offer_expired")
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ push: consumer
    def _send_offer(self, w: "_PushWait") -> None:
        spec = w.spec
        try:
            fut = self.clients.get(spec.agent_address).Offer.future(pd_pb2.OfferRequest(
                transfer_id=spec.transfer_id, consumer_engine_id=self.engine_id,
                consumer_agent_address=self.my_address, block_ids=spec.block_ids,
                skip_blocks=spec.skip_blocks, ttl_s=self.push_ttl_s,
                compat_hash=self.compat_hash), timeout=RPC_TIMEOUT_S)
            # the producer's first offer from us makes it connect to us over UCX, which
            # needs our progress: keep progressing while it answers
            while not fut.done():
                self.backend.progress()
                time.sleep(PUSH_POLL_S)
            resp = fut.result()
        except grpc.RpcError as e:
            reason = ("incompatible" if e.code() == grpc.StatusCode.FAILED_PRECONDITION
                      else "peer_unreachable")    # e.g. the producer runs --kv-mode pull
            return self._push_done(w, False, reason, f"Offer failed: {e.code()} {e.details()}")
        if not resp.accepted:
            reason = "incompatible" if "incompatible" in resp.reason else "error"
            return self._push_done(w, False, reason, f"offer refused: {resp.reason}")
        # the producer posts no WRITE after t_offer + ttl on its clock (it got the offer
        # after we sent it, before we got the answer): past this, nothing can land
        w.deadline = time.monotonic() + self.push_ttl_s
        self._awaiting[spec.transfer_id] = w

    def _poll_push(self) -> None:
        """Notifications (this also drives UCX progress for the producer's WRITEs),
        deadlines, and cancels waiting for the producer."""
        for msg in self.backend.notifs():
            tid, _, status = msg.partition(":")
            w = self._awaiting.pop(tid, None) or self._cancelling.pop(tid, None)
            if w is None:
                continue
            if status == "ok" or status.startswith("ok:crc="):
                if self.debug_corrupt == "zero" and not w.cancelled:
                    for addr, length in self._block_spans(list(w.spec.block_ids), range(
                            w.spec.skip_blocks, len(w.spec.block_ids))):
                        ctypes.memset(addr, 0, length)
                if not w.cancelled and status != "ok" and not self._push_checksum(w, status):
                    continue
                self._push_done(w, not w.cancelled, "" if not w.cancelled else "aborted", "")
            else:
                reason = status.split(":", 1)[1] if ":" in status else "error"
                self._push_done(w, False, reason, f"producer: {status}")
        now = time.monotonic()
        for tid, w in list(self._awaiting.items()):
            if now >= w.deadline:
                del self._awaiting[tid]
                w.reason = "timeout"
                self._cancelling[tid] = w
        for tid, w in list(self._cancelling.items()):
            if now < w.next_try:
                continue
            try:
                r = self.clients.get(w.spec.agent_address).Cancel(
                    pd_pb2.LeaseRequest(transfer_ids=[tid]), timeout=1.0)
                if tid in r.cancelled:
                    del self._cancelling[tid]
                    self._push_done(w, False, w.reason, "cancelled at the producer")
                else:
                    w.next_try = now + 0.02          # WRITEs in flight: ask again
            except grpc.RpcError as e:
                # a dead producer (connection refused) writes nothing any more; otherwise
                # wait until no WRITE of its could still land
                if (e.code() == grpc.StatusCode.UNAVAILABLE or
                        now >= w.deadline + self.transfer_timeout_s):
                    del self._cancelling[tid]
                    self._push_done(w, False, "peer_unreachable",
                                    f"Cancel failed ({e.code().name})")
                else:
                    w.next_try = now + 0.5

    def _push_checksum(self, w: "_PushWait", status: str) -> bool:
        """--kv-checksum on the producer: compare its CRC32 of the pushed blocks with ours
        (region-major, the same logical blocks). A mismatch fails the push (recompute or
        fail, per policy); a consumer without --kv-checksum checks anyway: it was asked."""
        from kv_transfer.integrity import crc32_of
        _, theirs, start, stop = status.split(":")
        spans = self._block_spans(list(w.spec.block_ids), range(int(start), int(stop)))
        mine = crc32_of(spans)
        if mine != int(theirs.removeprefix("crc="), 16):
            self._push_done(w, False, "checksum_mismatch", f"KV of {w.spec.transfer_id}: CRC32 "
                            f"{mine:08x} here, {theirs.removeprefix('crc=')} at the producer")
            return False
        w.rec.checksummed = True
        return True

    def _cancel_push(self, req_id: str) -> None:
        for tid, w in list(self._awaiting.items()):
            if w.spec.req_id == req_id:
                del self._awaiting[tid]
                w.cancelled, w.reason = True, "aborted"
                self._cancelling[tid] = w

    def _push_done(self, w: "_PushWait", ok: bool, reason: str, error: str) -> None:
        spec = w.spec
        rec = w.rec
        rec.seconds = time.perf_counter() - w.t0
        rec.status = "ok" if ok else "failed"
        rec.reason = "" if ok else reason
        if ok:
            r0 = self.regions[0]
            n = len(spec.block_ids) - spec.skip_blocks
            rec.bytes = n * r0.block_bytes * len(self.regions)
        elif error:
            log.log(logging.INFO if w.cancelled else logging.ERROR,
                    "KV push of %s (transfer %s from %s) %s (%s): %s", spec.req_id,
                    spec.transfer_id, spec.agent_address,
                    "given up" if w.cancelled else "failed", reason, error)
        with self.lock:
            self._pending -= 1
            self.bytes_total += rec.bytes
            if spec.transfer_key and not w.cancelled:   # nobody asks for an aborted one
                self._keep_record(spec.transfer_key, rec)
            self._done.append((spec.req_id, ok))
            self._done_evt.set()
        self._wake()

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
        if self._waker is not None:
            self._waker.close()
        if self.backend is not None:
            self.backend.close()
