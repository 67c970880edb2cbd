"""The connector's worker half (runs in vLLM's worker process, beside the model runner):
registers the KV cache with NIXL and serves it through the KV agent (kv_transfer/agent.py);
holds the producer's leases; runs the consumer's transfer thread; reports finished and
failed transfers to vLLM each step. Loads by READ (pull.py) and both sides of push
(push_producer.py, push_consumer.py) are mixins sharing this state."""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from kv_transfer import layout as L
from kv_transfer.agent import AgentClients, AgentState, start_agent_server, write_agent_address
from kv_transfer.connector.config import (
    IDLE_STEP_WAIT_S,
    PUSH_POLL_S,
    RPC_TIMEOUT_S,
    ConnectorConfig,
    served_name,
)
from kv_transfer.connector.metadata import PDConnectorMetadata
from kv_transfer.connector.pull import PullConsumer, _Load
from kv_transfer.connector.push_consumer import PushConsumer, _PushWait
from kv_transfer.connector.push_producer import PushProducer
from kv_transfer.connector.ranks import (
    FrontInfo,
    rank_file,
    rank_port,
    read_rank_addresses,
    tp_position,
)
from kv_transfer.peers import PeerLRU
from kv_transfer.push import Offer, OfferTable
from kv_transfer.state import LeaseTable
from kv_transfer.wakeup import Waker, engine_core_pid
from pdserve.lease_client import LeaseClient
from pdserve.rpc import pd_pb2

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("vllm.pdserve.kv_transfer.connector")


class WorkerHalf(PullConsumer, PushProducer, PushConsumer):
    MAX_RECORDS = 10000

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        self.cfg = cfg = ConnectorConfig.from_vllm(vllm_config, kv_cache_config)
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        if cfg.debug_corrupt:
            log.warning("PDSERVE_DEBUG_CORRUPT_KV=%s: loaded KV blocks will be destroyed",
                        cfg.debug_corrupt)
        self.lock = threading.Lock()
        self.leases = LeaseTable()
        self.regions: list[L.Region] = []
        self.layouts: list[str] = []
        self.backend = None
        self.server = None
        self.clients = AgentClients()
        self.lease_client = LeaseClient(self.clients.get, RPC_TIMEOUT_S)
        self.remote_regions: dict[str, list[L.Region]] = {}
        self.remote_block_size: dict[str, int] = {}
        # bounded: peers idle past any lease (MAX_HOLD_S) and transfer are forgotten
        self.peers = PeerLRU(max_peers=self.cfg.max_peers,
                             idle_s=max(600.0, 2 * self.cfg.transfer_timeout_s))
        # CPU KV tensor behind each region (one region per layer), for the relayout
        # between block sizes; a staging buffer the relayout READs land in (grows)
        self.region_tensors: list = []
        self._staging = None
        self._staging_reg = None
        # the transport each producer's connection really uses (kv_transfer/transport.py)
        self.peer_transports: dict[str, pd_pb2.PeerTransport] = {}
        self._done: list[tuple[str, bool]] = []       # consumer: (req id, ok)
        self._done_evt = threading.Event()             # set when _done gains an entry
        # wakes the engine core when it sleeps while only transfers are pending
        self._waker = None
        if self.cfg.hold_wait:
            self._waker = Waker(engine_core_pid(
                vllm_config.parallel_config.distributed_executor_backend))
        self._idle_step = False
        self._pending = 0
        self.records: OrderedDict[str, pd_pb2.KVTransferStats] = OrderedDict()
        self.bytes_total = 0
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        # push mode (kv_transfer/push.py)
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
        # tensor parallelism (kv_transfer/connector/ranks.py): this rank of the engine's
        # group; a rank other than 0 reports prompts as sent at once (`_follow`); rank 0
        # of each producer engine we read from tells us its ranks (`fronts`); one block's
        # shape after the block dim, where its heads are, and how many it holds
        self.tp_rank, self.tp_size = 0, 1
        self._follow: set[str] = set()
        self.fronts: dict[str, FrontInfo] = {}
        self.block_inner: list[int] = []
        self.head_axis: int | None = None
        self.elem = 0
        self.local_heads = self.total_heads = 0


    def register_kv_caches(self, kv_caches: dict) -> None:
        from kv_transfer.backends.nixl import NixlBackend, advise_huge_pages, lock_memory

        num_blocks = self.kv_cache_config.num_blocks
        self._shard_shape(kv_caches, num_blocks)
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
            if self.cfg.huge_pages:
                advise_huge_pages(spans)  # fewer pages for CMA to pin and walk per copy
            lock_memory(spans)  # resident KV: READs never fault (docs/benchmarks.md)
        log_dir = os.path.dirname(self.cfg.agent_file) if self.cfg.agent_file else None
        backend = NixlBackend
        if self.cfg.backend == "loopback":   # in-process, for tests of the logic only
            from kv_transfer.backends.loopback import LoopbackBackend as backend
        rank = f"-r{self.tp_rank}" if self.tp_size > 1 else ""
        self.backend = backend(f"{self.cfg.engine_id}-{os.getpid()}{rank}", mem_type,
                               progress_delay_us=self.cfg.progress_delay_us,
                               log_dir=log_dir or tempfile.gettempdir(),
                               err_mode=self.cfg.ucx_err_mode)
        self.backend.register(spans, self.device_id)
        # every block of every layer, prepared once; transfers pick blocks by index
        self.backend.prep_blocks(L.block_descs(self.regions, self.device_id))

        r0 = self.regions[0]
        mc = self.vllm_config.model_config
        info = pd_pb2.AgentInfo(
            engine_id=self.cfg.engine_id, agent_name=self.backend.name,
            nixl_metadata=self.backend.metadata,
            layout=pd_pb2.KVLayout(
                model=served_name(mc), dtype=str(mc.dtype), block_size=self.cfg.block_size,
                num_layers=len(kv_caches), block_bytes=r0.block_bytes,
                layout=self.layouts[0], compat_hash=self.cfg.compat_hash),
            layers=[pd_pb2.LayerRegion(base_addr=r.base_addr, block_stride=r.block_stride,
                                       num_blocks=r.num_blocks) for r in self.regions])
        info.tp_size, info.tp_rank = self.tp_size, self.tp_rank
        info.total_kv_heads, info.local_kv_heads = self.total_heads, self.local_heads
        st = AgentState()
        st.info, st.compat_hash = info, self.cfg.compat_hash
        st.stats = self._stats
        if self.tp_size > 1 and self.tp_rank == 0:
            st.ranks = lambda: read_rank_addresses(self.cfg.agent_file or "",
                                                   self.cfg.agent_host, self.cfg.agent_port,
                                                   self.tp_size)
        if self.cfg.is_producer and self.cfg.checksum:
            st.checksum = self._checksum
        if self.cfg.is_producer and self.tp_rank == 0:   # the engine's leases are rank 0's
            st.acquire = self._acquire
            st.release = self._release
            if self.cfg.kv_mode.startswith("push"):   # a pull engine refuses offers at once
                st.offer = self._offer
                st.cancel = self._cancel
        self.server, port = start_agent_server(st, self.cfg.agent_host,
                                               rank_port(self.cfg.agent_port, self.tp_rank))
        self.my_address = f"{self.cfg.agent_host}:{port}"
        if self.cfg.agent_file:
            write_agent_address(rank_file(self.cfg.agent_file, self.tp_rank), self.my_address)
        log.info("KV connector (%s) engine=%s rank %d/%d: %d layers, %d regions, block %d bytes, "
                 "layout %s, compat %s",
                 "+".join(r for r, on in (("producer", self.cfg.is_producer),
                                          ("consumer", self.cfg.is_consumer)) if on),
                 self.cfg.engine_id, self.tp_rank, self.tp_size, len(kv_caches),
                 len(self.regions), r0.block_bytes,
                 self.layouts[0], self.cfg.compat_hash)
        if self.cfg.is_consumer:
            self._thread = threading.Thread(target=self._transfer_loop, name="pd-kv-load",
                                            daemon=True)
            self._thread.start()


    def _shard_shape(self, kv_caches: dict, num_blocks: int) -> None:
        """This rank's place in its TP group, and its KV shard's heads: how many, and
        which dimension of a block holds them (kv_transfer/mapping.py: head_axis)."""
        from kv_transfer.mapping import head_axis
        self.tp_rank, self.tp_size = tp_position(self.vllm_config)
        if self.tp_size > 1 and self.cfg.kv_mode != "pull":
            raise ValueError(f"--kv-mode {self.cfg.kv_mode} needs tensor parallel size 1 "
                             f"(this engine has {self.tp_size}); use pull")
        groups = self.kv_cache_config.kv_cache_groups
        self.local_heads = int(getattr(groups[0].kv_cache_spec, "num_kv_heads", 0)
                               if groups else 0)
        total = getattr(self.vllm_config.model_config, "get_total_num_kv_heads", None)
        self.total_heads = int(total()) if total and self.local_heads else self.local_heads
        t = next(iter(kv_caches.values()))
        t = t[0] if isinstance(t, (list, tuple)) else t
        shape = list(t.shape)
        self.block_inner = shape[shape.index(num_blocks) + 1:]
        self.elem = t.element_size()
        try:
            self.head_axis = head_axis(self.block_inner, self.local_heads,
                                       head_major=t.device.type == "cpu")
        except ValueError as e:     # loads between different TP degrees are refused
            log.info("KV heads not found in the block shape (%s): head slices off", e)
            self.head_axis = None

    # -- producer: lease protocol (called on the agent's gRPC threads)
    def _acquire(self, ids: list[str], extend_s: float):
        with self.lock:
            return self.leases.acquire(ids, time.monotonic(), extend_s or self.cfg.acquire_extend_s)

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
        if meta.leases and self.tp_rank > 0:     # rank 0 holds them (ranks.py)
            self._follow.update(meta.leases)
        elif meta.leases:
            now = time.monotonic()
            with self.lock:
                for tid, n in meta.leases.items():
                    self.leases.add(tid, now, self.cfg.lease_s, n)
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
        self._step = list(meta.pushes) if self.cfg.kv_mode.startswith("push") else []
        for ch in self._step:
            self._req_of[ch.transfer_id] = ch.req_id

    def transfer_results(self) -> KVConnectorTransferResults:
        res = KVConnectorTransferResults()
        if self.cfg.is_producer:
            if self.backend is not None and not self.cfg.progress_delay_us and len(self.leases):
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
            if self._follow:
                res.finished_sending |= self._follow
                self._follow = set()
        if self.cfg.is_consumer:
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

    def _keep_record(self, key: str, rec: pd_pb2.KVTransferStats) -> None:
        """Under self.lock: keep a transfer's record until its worker pops it (bounded)."""
        self.records[key] = rec
        while len(self.records) > self.MAX_RECORDS:
            self.records.popitem(last=False)

    def _ensure_peer(self, eid: str, address: str, key: str = "") -> str:
        """The NIXL name of the peer engine `eid` (its KV agent at `address`; `key`: the
        name we keep it under, one per tensor-parallel rank, ranks.py); the first time,
        the handshake: its metadata and registered regions, and for its rank 0 its ranks
        (`fronts`). Consumers call it before a READ, producers when an offer comes (first
        offers from one consumer may come together: one handshake at a time)."""
        key = key or eid
        with self._handshake_lock:
            for old in self.peers.touch(key, time.monotonic()):
                log.info("forgetting peer engine %s (idle; %d peers known)", old,
                         len(self.peers))
                self._forget_peer(old)
            if not self.backend.has_remote(key):
                info = self.clients.get(address).GetAgentInfo(
                    pd_pb2.AgentInfoRequest(peer_compat_hash=self.cfg.compat_hash),
                    timeout=RPC_TIMEOUT_S)
                if info.engine_id != eid:
                    raise RuntimeError(f"agent at {address} is engine {info.engine_id}, "
                                       f"expected {eid}")
                rbs = info.layout.block_size or self.cfg.block_size
                # a block of another rank's shard holds its own number of heads
                heads = ((info.local_kv_heads, self.local_heads)
                         if info.local_kv_heads and self.local_heads else (1, 1))
                regions = self.remote_regions[key] = [
                    L.Region(x.base_addr, x.block_stride,
                             self.regions[i].block_bytes * rbs // self.cfg.block_size
                             * heads[0] // heads[1], x.num_blocks)
                    for i, x in enumerate(info.layers)]
                self.remote_block_size[key] = rbs
                if info.tp_rank == 0:
                    n = max(1, info.tp_size)
                    self.fronts[key] = FrontInfo(
                        n, tuple(info.rank_addresses) if n > 1 else (address,),
                        info.total_kv_heads or self.total_heads)
                self.backend.ensure_remote(key, info.nixl_metadata)
                self.backend.prep_blocks(L.block_descs(regions, self.device_id), key)
            return self.backend._remotes[key]

    def _forget_peer(self, eid: str) -> None:
        """Drop what we know of peer engine `eid` (under the handshake lock): the next
        transfer with it shakes hands again."""
        self.peers.forget(eid)
        self.backend.forget_remote(eid)
        self.remote_regions.pop(eid, None)
        self.remote_block_size.pop(eid, None)
        self.fronts.pop(eid, None)

    def _block_spans(self, ids: list[int], blocks: range) -> list[tuple[int, int]]:
        """(addr, length) of logical `blocks` (physical `ids`) in every region, region-major:
        the order both sides of a push checksum them in."""
        return [(r.base_addr + ids[b] * r.block_stride, r.block_bytes)
                for r in self.regions for b in blocks]

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
