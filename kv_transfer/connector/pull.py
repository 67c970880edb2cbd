"""The connector's pull consumer (worker half, its transfer thread): pin the producer's
lease, READ the blocks over NIXL before the lease could end, optionally checksum them, and
lay them out anew when the producer's block size differs (kv_transfer/relayout.py).

A mixin of WorkerHalf (kv_transfer/connector/worker_side.py), whose state it shares: the
configuration `cfg`, the backend, regions and peers, the lock, records and results."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time

import grpc

from kv_transfer import layout as L
from kv_transfer.connector.config import RPC_TIMEOUT_S, lease_margin_s
from kv_transfer.connector.metadata import LoadSpec
from kv_transfer.connector.ranks import Source, slice_descriptors, sources
from kv_transfer.mapping import heads_of_rank
from kv_transfer.state import TransferState, advance
from kv_transfer.wakeup import TRANSFERS
from pdserve.rpc import pd_pb2

log = logging.getLogger("vllm.pdserve.kv_transfer.connector")


class LoadError(RuntimeError):
    """A failed load, with the reason recorded in KVTransferStats.reason and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason



class _Load:
    __slots__ = ("spec", "state", "error")

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.state = TransferState.PENDING
        self.error = ""

    def to(self, new: TransferState) -> None:
        self.state = advance(self.state, new)


class PullConsumer:
    """Loads by READ (the default, `--kv-mode pull`)."""

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

    def _load_one(self, load: _Load, rec: pd_pb2.KVTransferStats) -> None:
        """Pin the lease, READ the blocks before the lease could end, optionally checksum.
        Fills `rec`; raises on any failure (the caller reports it)."""
        spec = load.spec
        load.to(TransferState.ACQUIRING)
        if spec.compat_hash and spec.compat_hash != self.cfg.compat_hash:
            raise LoadError("incompatible", f"incompatible KV handle: {spec.compat_hash} != "
                            f"{self.cfg.compat_hash}")
        self._ensure_peer(spec.engine_id, spec.agent_address)
        try:
            srcs = sources(spec.engine_id, self.fronts[spec.engine_id], self.tp_rank,
                           self.tp_size, self.total_heads)
        except (ValueError, IndexError) as e:     # heads or ranks that do not fit ours
            raise LoadError("incompatible", f"tensor-parallel shards do not match: {e}") from e
        if any(s.slices for s in srcs) and self.head_axis is None:
            raise LoadError("incompatible", "the producer's tensor-parallel degree differs "
                            "and this engine's KV block shape has no heads dimension")
        for src in srcs:
            self._ensure_peer(spec.engine_id, src.address, src.key)
        rbs = self.remote_block_size[srcs[0].key]
        if spec.src_block_size and spec.src_block_size != rbs:
            raise LoadError("incompatible", f"handle says block size {spec.src_block_size}, "
                            f"the producer's agent {rbs}")
        relayout = rbs != self.cfg.block_size
        if relayout and any(s.slices for s in srcs):
            raise LoadError("incompatible", f"block size {rbs} at the producer, "
                            f"{self.cfg.block_size} here, and another tensor-parallel degree")
        if relayout:
            self._check_relayout(rbs)
        # The lease runs until at least t_pin + acquire_extend_s on the producer's clock
        # (its Acquire starts after t_pin): the READ must be over well before that.
        t_pin = time.monotonic()
        held = self.lease_client.acquire(spec.agent_address, [spec.transfer_id],
                                         self.cfg.acquire_extend_s)
        if spec.transfer_id not in held:
            raise LoadError("lease_expired",
                            f"lease {spec.transfer_id} expired or unknown at the producer")
        if self.cfg.debug_load_delay_s:
            time.sleep(self.cfg.debug_load_delay_s)
        load.to(TransferState.TRANSFERRING)
        budget = (t_pin + self.cfg.acquire_extend_s - lease_margin_s(self.cfg.acquire_extend_s)
                  - time.monotonic())
        if budget <= 0:
            raise LoadError("lease_expired", f"lease {spec.transfer_id} would end before the "
                            "READ could finish; not reading")
        deadline = time.monotonic() + min(self.cfg.transfer_timeout_s, budget)
        t_read, cpu_read = time.perf_counter(), time.thread_time()
        reads = [(src, self._read(spec, src, relayout, deadline, rec)) for src in srcs]
        rec.read_seconds = time.perf_counter() - t_read
        rec.read_cpu_seconds = time.thread_time() - cpu_read
        if spec.engine_id not in self.peer_transports:
            self._note_transport(spec)
        for src, (ldescs, rdescs) in reads:
            if self.cfg.debug_corrupt == "zero":
                for addr, length, _ in ldescs:
                    ctypes.memset(addr, 0, length)
            if self.cfg.checksum:   # while the lease still holds the producer's blocks
                from kv_transfer.integrity import crc32_of
                mine = crc32_of((a, n) for a, n, _ in ldescs)
                theirs = self.clients.get(src.address).Checksum(pd_pb2.ChecksumRequest(
                    addrs=[d[0] for d in rdescs], lengths=[d[1] for d in rdescs]),
                    timeout=RPC_TIMEOUT_S).crc32
                if mine != theirs:
                    raise LoadError("checksum_mismatch", f"KV of {spec.transfer_id}: CRC32 "
                                    f"{mine:08x} here, {theirs:08x} at the producer")
                rec.checksummed = True
        if relayout:
            t0 = time.perf_counter()
            self._relayout(spec, rbs, self.remote_regions[srcs[0].key][0].block_bytes)
            rec.relayout_seconds = time.perf_counter() - t0

    def _read(self, spec: LoadSpec, src: Source, relayout: bool, deadline: float,
              rec: pd_pb2.KVTransferStats) -> tuple[list, list]:
        """READ what `src` (one producer rank) holds of the prompt: its whole blocks, or
        the head slices this rank needs (ranks.py). -> the descriptor lists it moved."""
        remote = self.remote_regions[src.key]
        remote_agent = self.backend._remotes[src.key]
        rids = spec.remote_block_ids
        if not relayout:    # pairs (in relayout the block counts differ: staging first)
            lids, rids = L.sort_pairs(spec.local_block_ids, spec.remote_block_ids)
        if src.slices:
            front_heads = len(heads_of_rank(src.rank, self.fronts[spec.engine_id].tp_size,
                                            self.total_heads))
            ldescs, rdescs = slice_descriptors(
                self.regions, remote, list(zip(lids, rids)), self.block_inner,
                self.head_axis, self.elem, front_heads, src.slices, self.device_id)
            rec.descriptors += len(ldescs)
        elif relayout:   # READ the producer's blocks as they are into staging
            local = self._staging_regions(len(spec.remote_block_ids), remote[0].block_bytes)
            runs = L.block_runs(range(len(spec.remote_block_ids)), spec.remote_block_ids)
            ldescs, rdescs = L.transfer_descriptors(local, remote, runs)
            rec.descriptors += L.merged_count(runs, local, remote)
        else:
            runs = L.block_runs(lids, rids)
            rec.descriptors += L.merged_count(runs, self.regions, remote)
            ldescs = rdescs = None
        rec.bytes += sum(n for _, n, _ in rdescs) if rdescs is not None else (
            len(remote) * len(rids) * remote[0].block_bytes)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise LoadError("lease_expired", f"lease {spec.transfer_id} would end before the "
                            "READ could finish; not reading")
        try:
            with TRANSFERS:   # vLLM's waiting worker thread keeps off our core meanwhile
                if ldescs is not None:
                    rec.prep_seconds += self.backend.read(remote_agent, ldescs, rdescs, timeout)
                else:
                    regs = range(len(self.regions))
                    rec.prep_seconds += self.backend.xfer_blocks(
                        "READ", src.key, L.block_indices(regs, self.regions[0].num_blocks, lids),
                        L.block_indices(regs, remote[0].num_blocks, rids), timeout)
        except Exception as e:
            # the peer may be gone or restarted: redo the handshake next time
            with self._handshake_lock:
                self._forget_peer(src.key)
            what = f"{type(e).__name__} {e}".lower()
            reason = ("timeout" if "timed out" in what else
                      "peer_unreachable" if "disconnect" in what or "remote" in what else
                      "error")
            raise LoadError(reason, f"{type(e).__name__}: {e}") from e
        if ldescs is None and (self.cfg.debug_corrupt or self.cfg.checksum):
            ldescs, rdescs = L.transfer_descriptors(self.regions, remote, L.block_runs(lids, rids))
        return ldescs or [], rdescs or []

    # -- consumer: pull between different block sizes (kv_transfer/relayout.py)
    def _check_relayout(self, rbs: int) -> None:
        from kv_transfer.relayout import KNOWN_ISAS
        shapes_ok = all(t is not None and t.device.type == "cpu" and t.dim() == 4
                        and t.shape[2] == self.cfg.block_size for t in self.region_tensors)
        if not shapes_ok or self.cfg.block_size % 16 or rbs % 16:
            raise LoadError("incompatible", f"block size {rbs} at the producer, "
                            f"{self.cfg.block_size} here: relayout is implemented for vLLM's CPU "
                            "KV layout only")
        t = self.region_tensors[0]
        isa = self._isa(t, rbs)
        if isa not in KNOWN_ISAS:
            raise LoadError("incompatible", f"block size {rbs} at the producer, "
                            f"{self.cfg.block_size} here: CPU attention ISA {isa} packs blocks "
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
        dst_ids = [-1] * (spec.first_token // self.cfg.block_size) + list(spec.local_block_ids)
        t0 = self.region_tensors[0]
        src_isa, dst_isa = self._isa(t0, rbs), self._isa(t0, self.cfg.block_size)
        staged = torch.from_numpy(self._staging)
        per_layer = n * block_bytes
        for i, t in enumerate(self.region_tensors):
            layer = staged[i * per_layer:(i + 1) * per_layer].view(t.dtype).view(n, t.shape[1], -1)
            relayout_layer(layer, t, rbs, spec.first_token // rbs, dst_ids, self.cfg.block_size,
                           spec.first_token, spec.end_token, src_isa, dst_isa)


    def _note_transport(self, spec: LoadSpec) -> None:
        """After the first READ from a producer: which transport UCX really used for it.
        Logged once per peer; a worse one than expected is a loud warning (and a metric)."""
        from kv_transfer import transport as T

        host = spec.agent_address.rsplit(":", 1)[0]
        local = host in ("127.0.0.1", "localhost", "::1", self.cfg.agent_host,
                         socket.gethostname())
        scope = "intra-node" if local else "inter-node"
        cfg = self.backend.endpoint_configs().get(scope)
        actual = cfg.transport if cfg else "none"
        if self.cfg.expect_transport == "auto":
            expected = T.default_expectation(scope, bool(os.path.isdir(
                "/sys/class/infiniband") and os.listdir("/sys/class/infiniband")))
        else:
            expected = self.cfg.expect_transport if self.cfg.expect_transport != "none" else ""
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
