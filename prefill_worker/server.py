"""Prefill worker: runs the prompt with max_tokens=1 and returns the first token + a KV handle.

The blocks stay held under a lease (our connector's producer half) until the decode
worker releases them, or the lease expires. When the request is already complete
after one token (max_tokens=1, EOS, a stop string), we release the lease ourselves.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc

from kv_transfer.handle import KVHandle, prefill_params
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
from pdserve.worker import ENGINE_DEAD, INPUT_ERRORS, WorkerRuntime, now, validate_prompt

log = logging.getLogger(__name__)

class PrefillServicer(pd_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        # Test switch: each prefill waits this long before it reaches the engine, so a
        # decode worker's push offer is outstanding for that long (tests/e2e/test_push.py).
        # Never set in production. Read here, not at import: a process forked from a
        # zygote imported this module with the zygote's environment (pdserve/zygote.py).
        self.debug_delay_s = float(os.environ.get("PDSERVE_DEBUG_PREFILL_DELAY_S") or 0)

    async def Prefill(self, request, context):
        sp = request.sampling
        err = validate_prompt(request.token_ids, self.rt.cfg.engine.max_model_len,
                              max(sp.max_tokens, 1))
        if err:
            M.WORKER_REQUESTS.labels("prefill", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        t0 = now()
        # push: a decode worker offers blocks; our engine WRITEs into them
        kvp_in = prefill_params(request.request_id if request.push else "")
        params = to_vllm(sp, max_tokens=1, kv_transfer_params=kvp_in, computes_prompt=True)
        final = None
        first_ids: list[int] = []
        text = ""
        lps: list = []
        plps = None
        ntok = len(request.token_ids)
        self.rt.prefill_tokens += ntok       # reported as load in heartbeats
        self.rt.inflight += 1
        try:
            if self.debug_delay_s:   # test switch: a slow prefill (push-mode fault tests)
                await asyncio.sleep(self.debug_delay_s)
            async for out in self.rt.engine.generate(
                    engine_prompt(list(request.token_ids), sp), params, request.request_id,
                    **reasoning_args(sp)):
                c = out.outputs[0]
                first_ids += c.token_ids
                text += c.text
                if c.logprobs:
                    lps += c.logprobs
                plps = plps or out.prompt_logprobs
                final = out
        except ENGINE_DEAD:
            await self.rt.abort_engine_dead(context, "prefill")
        except INPUT_ERRORS as e:  # vLLM input validation (token ids out of range, ...)
            M.WORKER_REQUESTS.labels("prefill", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except asyncio.CancelledError:
            # the caller went away; if the engine had already finished, it holds the blocks
            # for a decode worker that will never come: free them now, not at lease expiry
            M.WORKER_REQUESTS.labels("prefill", "cancelled").inc()
            if final is not None and final.finished and final.kv_transfer_params:
                await asyncio.shield(self._release(
                    KVHandle.from_params(final.kv_transfer_params)))
            raise
        finally:
            self.rt.prefill_tokens -= ntok
            self.rt.inflight -= 1
        if final is None or not first_ids:
            M.WORKER_REQUESTS.labels("prefill", "error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "engine returned no token")
        M.PREFILL_SECONDS.observe(now() - t0)
        c = final.outputs[0]
        kvp = final.kv_transfer_params
        if c.finish_reason == "error":
            await self.rt.abort_engine_failed(context, "prefill", sp.HasField("structured"))
        finish = ""
        if sp.max_tokens <= 1 or c.finish_reason == "stop":
            finish = "stop" if c.finish_reason == "stop" else "length"
        resp = pd_pb2.PrefillResponse(
            first_token_id=first_ids[0], first_token_text=text, finish_reason=finish,
            num_prompt_tokens=len(request.token_ids),
            num_cached_tokens=final.num_cached_tokens or 0)
        if finish == "stop" and (why := stop_reason_to_wire(c.stop_reason)) is not None:
            resp.stop_reason.CopyFrom(why)
        if sp.logprobs >= 0 and lps:
            resp.first_logprob.CopyFrom(logprobs_to_wire(
                first_ids, lps, sp.logprobs, every=bool(sp.logprob_token_ids))[0])
        if sp.HasField("prompt_logprobs"):
            resp.prompt_logprobs.extend(prompt_logprobs_to_wire(
                request.token_ids, plps, sp.prompt_logprobs))
        if request.push:
            rec = await self._push_record(request.request_id)
            if rec is not None:
                resp.push.CopyFrom(rec)
        if kvp:
            handle = KVHandle.from_params(kvp)
            if finish or context.cancelled():
                await self._release(handle)  # nobody will read these blocks
            else:
                resp.kv.CopyFrom(handle.to_proto())
                # only this cluster's producers make handles a decode worker loads from
                auth.sign_handle(self.rt.creds, resp.kv, request.token_ids, sp.cache_salt)
        elif not finish:
            M.WORKER_REQUESTS.labels("prefill", "error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "engine kept no KV for the request")
        M.WORKER_REQUESTS.labels("prefill", "ok").inc()
        return resp

    async def _push_record(self, tid: str) -> pd_pb2.KVTransferStats | None:
        """The engine's record of the WRITEs it pushed for this request (there when the
        decode worker's offer came before the prompt was complete)."""
        try:
            rec = (await self.rt.agent_stats(pop=[tid])).records.get(tid)
        except grpc.RpcError:
            return None
        if rec is None:
            return None
        if rec.status == "ok":
            M.KV_PUSH_SECONDS.observe(rec.read_seconds)
            M.KV_PUSH_EXPOSED_SECONDS.observe(rec.exposed_seconds)
            M.KV_BYTES.observe(rec.bytes)
        else:
            M.KV_FAILURES.labels(rec.reason or "error").inc()
        return rec

    async def _release(self, handle: KVHandle) -> None:
        try:
            await self.rt._agent.Release(pd_pb2.LeaseRequest(transfer_ids=[handle.transfer_id]),
                                         timeout=5)
        except grpc.RpcError as e:
            log.warning("releasing unused KV %s failed (%s); the lease will expire",
                        handle.transfer_id, e.code())

    async def Status(self, request, context):
        return await self.rt.status()

