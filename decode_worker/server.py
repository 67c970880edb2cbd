"""Decode worker: loads the prompt's KV over UCX (our connector, consumer half) and streams.

The engine sees `prompt + [first token]`: the prompt's KV arrives by transfer (an
asynchronous external hit of exactly len(prompt) tokens) and only the first token,
sampled by the prefill worker, is computed here. A client that goes away cancels
the stream; vLLM then aborts the request and our connector frees both sides' blocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from decode_worker.leases import LeaseRenewer
from decode_worker.stops import StopAcrossFirst
from kv_transfer.handle import KVHandle, push_params
from pdserve import auth, metrics as M
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from pdserve.sampling import (
    engine_prompt,
    logprobs_to_wire,
    prompt_logprobs_to_wire,
    stop_reason_to_wire,
    reasoning_args,
    to_vllm,
)
from pdserve.worker import ENGINE_DEAD, INPUT_ERRORS, WorkerRuntime, validate_prompt

log = logging.getLogger(__name__)


class DecodeServicer(pd_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.active: dict[str, asyncio.Task] = {}
        self.renewer = LeaseRenewer(rt.cfg.kv.lease_s, rt.creds)

    async def Generate(self, request, context):
        received = time.time()     # the client has the first token (the frontend relays it)
        sp = request.sampling
        err = validate_prompt(request.prompt_token_ids, self.rt.cfg.engine.max_model_len,
                              sp.max_tokens)
        local = request.local_prefill
        if err is None and not local and not request.HasField("push") and sp.max_tokens < 2:
            err = "decode needs max_tokens >= 2 (the prefill worker produced the first token)"
        push = request.HasField("push")
        if err is None and push and not (request.push.transfer_id and
                                         request.push.agent_address):
            err = "push needs the transfer id and the producer's KV agent address"
        if err is None and not local and not push and not request.kv.transfer_id:
            err = "missing KV handle"
        if err:
            M.WORKER_REQUESTS.labels("decode", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        # no caller makes us load KV from, or offer blocks to, an address of its choosing:
        # push needs the scheduler's ticket for the producer, pull a handle a producer of
        # this cluster signed for this prompt, used once
        why = ("" if local else auth.check_push(self.rt.creds, request.push) if push else
               auth.check_handle(self.rt.creds, request.kv, request.prompt_token_ids,
                                 self.rt.handles_used, time.time(), sp.cache_salt))
        if why:
            M.WORKER_REQUESTS.labels("decode", "refused").inc()
            log.warning("request %s: %s", request.request_id, why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        rid = request.request_id
        due = request.ttft_due_unix if math.isfinite(request.ttft_due_unix) else 0.0
        # the first token came from another engine (a pull, or a retry's local prefill of
        # prompt plus first token): stop strings are checked here, across it
        continues = not push and (not local or bool(request.first_token_text))
        across = bool(sp.stop) and continues
        if local:   # conditional disaggregation: the whole request runs here
            ids = list(request.prompt_token_ids)
            # a retry continues from the first token the client has (the prompt's last):
            # penalties and a seed count it as output (pdserve/continuation.py)
            retry = bool(request.first_token_text)
            params = to_vllm(sp, max_tokens=sp.max_tokens, computes_prompt=True,
                             engine_stops=not across, first_token=ids[-1] if retry else None,
                             ttft_due=due)
            M.LOCAL_PREFILLS.inc()
        elif push:   # the prompt's KV is written into our blocks; the first token is ours
            ids = list(request.prompt_token_ids)
            params = to_vllm(sp, max_tokens=sp.max_tokens, kv_transfer_params=push_params(
                rid, request.push.transfer_id, request.push.agent_address), ttft_due=due)
        else:
            ids = list(request.prompt_token_ids) + [request.first_token_id]
            params = to_vllm(sp, max_tokens=sp.max_tokens - 1, generated=1,
                             first_token=request.first_token_id, engine_stops=not across,
                             kv_transfer_params=KVHandle.from_proto(request.kv).load_params(
                                 rid, first_token_at=received), ttft_due=due)
        self.active[rid] = asyncio.current_task()
        self.rt.inflight += 1
        finished = False
        first = True
        loaded = asyncio.Event()   # the engine produced output: the KV load is over
        renew = (None if local or push else
                 asyncio.create_task(self.renewer.hold(request.kv, loaded)))
        stops = (StopAcrossFirst(sp.stop, request.first_token_text, request.first_text_sent,
                                 params.min_tokens, sp.include_stop_str_in_output,
                                 ids[-1], self._decoder()) if across else None)
        gen = self.rt.engine.generate(engine_prompt(ids, sp), params, rid,
                                      **reasoning_args(sp, continues=continues))
        # the transfer's record, asked of the KV agent (in the engine-core process) as soon
        # as the load is over, so that the last token does not wait on that call: on a
        # saturated host it added ~2 ms to the last gap at the median, more in the tail
        # (docs/design.md, "Control plane")
        record: asyncio.Task | None = None
        try:
            async for out in gen:
                loaded.set()
                if record is None and not local:
                    record = asyncio.create_task(self._transfer_record(rid))
                c = out.outputs[0]
                text, token_ids, stopped = c.text, list(c.token_ids), False
                if stops is not None:
                    text, stopped, keep = stops.step(c.text, token_ids, out.finished)
                    token_ids = token_ids[:keep]
                msg = pd_pb2.GenerateResponse(token_ids=token_ids, text=text)
                if first and local:
                    msg.num_cached_tokens = out.num_cached_tokens or 0
                    if sp.HasField("prompt_logprobs"):
                        msg.prompt_logprobs.extend(prompt_logprobs_to_wire(
                            ids, out.prompt_logprobs, sp.prompt_logprobs))
                first = False
                if sp.logprobs >= 0 and c.logprobs:
                    msg.logprobs.extend(logprobs_to_wire(token_ids, c.logprobs, sp.logprobs,
                                                         bool(sp.logprob_token_ids)))
                if out.finished and c.finish_reason == "error":
                    await self.rt.abort_engine_failed(context, "decode", sp.HasField("structured"))
                if out.finished or stopped:
                    msg.finish_reason = "stop" if stopped else (c.finish_reason or "stop")
                    why = stop_reason_to_wire(stops.matched if stopped else c.stop_reason)
                    if why is not None:
                        msg.stop_reason.CopyFrom(why)
                    rec = None if record is None else await record
                    if rec is not None:
                        msg.kv_transfer.CopyFrom(rec)
                        msg.num_external_tokens = rec.tokens if rec.status == "ok" else 0
                    finished = True
                yield msg
                if stopped:     # a stop string across the first token: the engine stops too
                    break
            M.WORKER_REQUESTS.labels("decode", "ok").inc()
        except ENGINE_DEAD:
            await self.rt.abort_engine_dead(context, "decode")
        except INPUT_ERRORS as e:
            M.WORKER_REQUESTS.labels("decode", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except asyncio.CancelledError:
            M.WORKER_REQUESTS.labels("decode", "cancelled").inc()
            raise
        finally:
            await gen.aclose()      # aborts the engine's request if it is still running
            loaded.set()
            if renew is not None:
                renew.cancel()
            self.active.pop(rid, None)
            self.rt.inflight -= 1
            if record is not None:
                await record       # done or nearly: it also drops an aborted one's record
            elif not finished and not local:
                await self._transfer_record(rid)  # drop the record of an aborted request

    def _decoder(self):
        """The engine's tokenizer's decode (None: the engine runs without one)."""
        tok = getattr(self.rt.engine, "tokenizer", None)
        return None if tok is None else tok.decode

    async def _transfer_record(self, rid: str) -> pd_pb2.KVTransferStats | None:
        try:
            st = await self.rt.agent_stats(pop=[rid])
        except grpc.RpcError:
            return None
        rec = st.records.get(rid)
        if rec is None:
            return None
        if rec.status == "ok" and rec.mode == "push":
            # the bytes and WRITE times are the prefill worker's figures; here the wait
            # covers the prefill itself
            M.KV_EXTERNAL_TOKENS.inc(rec.tokens)
            if rec.checksummed:
                M.KV_CHECKSUMS.labels("ok").inc()
        elif rec.status == "ok":
            M.KV_BYTES.observe(rec.bytes)
            M.KV_SECONDS.observe(rec.seconds)
            M.KV_DESCRIPTORS.observe(rec.descriptors)
            if rec.seconds > 0:
                M.KV_GBPS.observe(rec.bytes / rec.seconds / 1e9)
            M.KV_EXTERNAL_TOKENS.inc(rec.tokens)
            if rec.checksummed:
                M.KV_CHECKSUMS.labels("ok").inc()
        else:
            M.KV_FAILURES.labels(rec.reason or "error").inc()
            if rec.reason == "checksum_mismatch":
                M.KV_CHECKSUMS.labels("mismatch").inc()
            if self.rt.cfg.kv.load_failure_policy == "recompute":
                M.KV_RECOMPUTES.inc()
        return rec

    async def Abort(self, request, context):
        task = self.active.get(request.request_id)
        if task is not None:
            task.cancel()
        return pd_pb2.AbortResponse(found=task is not None)

    async def Status(self, request, context):
        return await self.rt.status()

