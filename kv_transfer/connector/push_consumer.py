"""The connector's push consumer (worker half, its transfer thread): offer this engine's
blocks to the producer, then wait for its notification (which also drives UCX progress for
the producer's WRITEs), its deadline, or a cancel; check the producer's CRC32 when it sends
one.

A mixin of WorkerHalf (kv_transfer/connector/worker_side.py), whose state it shares."""

from __future__ import annotations

import ctypes
import logging
import math
import time

import grpc

from kv_transfer.connector.config import PUSH_POLL_S, RPC_TIMEOUT_S
from kv_transfer.connector.metadata import OfferSpec
from pdserve.rpc import pd_pb2

log = logging.getLogger("vllm.pdserve.kv_transfer.connector")


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


class PushConsumer:
    def _send_offer(self, w: "_PushWait") -> None:
        spec = w.spec
        try:
            fut = self.clients.get(spec.agent_address).Offer.future(pd_pb2.OfferRequest(
                transfer_id=spec.transfer_id, consumer_engine_id=self.cfg.engine_id,
                consumer_agent_address=self.my_address, block_ids=spec.block_ids,
                skip_blocks=spec.skip_blocks, ttl_s=self.cfg.push_ttl_s,
                compat_hash=self.cfg.compat_hash), timeout=RPC_TIMEOUT_S)
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
        w.deadline = time.monotonic() + self.cfg.push_ttl_s
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
                if self.cfg.debug_corrupt == "zero" and not w.cancelled:
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
                        now >= w.deadline + self.cfg.transfer_timeout_s):
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
