"""The connector's push producer (worker half): a consumer offers its blocks (the agent's
Offer RPC); in `--kv-mode push` each layer's blocks are WRITten as the forward pass computes
them (save_kv_layer), waited for at the end of the step (wait_for_save), and the consumer
is notified once the prompt is complete; a request that finished before its offer came is
pushed whole. Offer state is pure (kv_transfer/push.py).

A mixin of WorkerHalf (kv_transfer/connector/worker_side.py), whose state it shares."""

from __future__ import annotations

import logging
import time

from kv_transfer import layout as L
from kv_transfer.push import Offer, OfferState, chunk_blocks
from pdserve.rpc import pd_pb2

log = logging.getLogger("vllm.pdserve.kv_transfer.connector")


class PushProducer:
    def _offer(self, req: pd_pb2.OfferRequest) -> tuple[bool, str]:
        """A consumer offers its blocks (agent gRPC thread). A request that finished
        before the offer came is pushed whole, here and now."""
        tid = req.transfer_id
        if req.compat_hash and req.compat_hash != self.cfg.compat_hash:
            return False, f"incompatible KV: {req.compat_hash} != {self.cfg.compat_hash}"
        eid = req.consumer_engine_id
        try:
            peer = self._ensure_peer(eid, req.consumer_agent_address)
        except Exception as e:  # noqa: BLE001 - refused, with the reason
            return False, f"handshake with {req.consumer_agent_address} failed: {e}"
        if self.remote_block_size[eid] != self.cfg.block_size:
            # a WRITE lands in the consumer's blocks as they are: no relayout in push
            return False, (f"incompatible KV: block size {self.remote_block_size[eid]} at "
                           f"the consumer, {self.cfg.block_size} here (pull reads across sizes)")
        o = Offer(tid, peer, eid, [int(b) for b in req.block_ids], int(req.skip_blocks),
                  time.monotonic() + (req.ttl_s or self.cfg.push_ttl_s))
        with self.lock:
            if not self.offers.add(o):
                return False, "duplicate or cancelled offer"
            late = self._finished_push.pop(tid, None)
        if late is not None:
            self._push_whole(o, *late)
            self._complete(o, *late)
        self._wake()
        return True, ""

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
        if not self._step or self.cfg.kv_mode != "push":
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
                blocks = chunk_blocks(ch.start, ch.end, self.cfg.block_size, o.skip, len(o.blocks))
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
        deadline = time.monotonic() + self.cfg.transfer_timeout_s
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
                            ch.start, ch.end, self.cfg.block_size, o.skip, len(o.blocks))):
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
            blocks = chunk_blocks(0, num_prompt, self.cfg.block_size, o.skip, len(o.blocks))
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

    def _complete(self, o: Offer, src_ids: list[int], num_prompt: int) -> None:
        """The prompt is complete: tell the consumer (ok once every WRITE landed), free our
        blocks (the consumer never reads them), keep the record for the prefill worker.
        --kv-checksum: the notification carries the CRC32 of the source blocks pushed,
        computed before they are freed."""
        crc = ""
        if self.cfg.checksum and o.state == OfferState.OPEN:
            from kv_transfer.integrity import crc32_of
            blocks = chunk_blocks(0, num_prompt, self.cfg.block_size, o.skip, len(o.blocks))
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

