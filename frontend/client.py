"""The frontend's view of the cluster: route -> prefill -> decode stream, over gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdserve import metrics as M
from pdserve.config import late_streams_yield
from pdserve.errors import ErrorKind, NoWorkers, Overloaded, PDError, from_grpc_error
from pdserve.kept_first import release_after
from pdserve.lease_client import AsyncLeaseClient, agent_stubs
from pdserve.rpc import Channels, pd_pb2, pd_pb2_grpc
from pdserve.sampling import first_text_sent, stop_reason_from_wire

log = logging.getLogger(__name__)

# a Route may wait in the scheduler for its worker (late binding, scheduler/holding.py);
# the scheduler bounds the wait by this deadline
ROUTE_TIMEOUT_S = 120.0


def release_at(t0: float, ttft_slo_s: float) -> float:
    """When a first token kept for its stream goes out anyway (`t0`: the request's arrival)."""
    return t0 + release_after(ttft_slo_s)


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[pd_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    kv_transfer: pd_pb2.KVTransferStats | None = None
    num_external_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens the prefilling engine found in its cache
    route: str = ""              # on the first chunk: "<mode>:<reason> prefill=.. decode=.."
    # on the first chunk, when asked: the prompt's logprobs, tokens 1..n-1
    prompt_logprobs: list[pd_pb2.TokenLogprob] = field(default_factory=list)
    # the first token's text not sent yet: it may begin a stop string (the decode worker
    # sends it, or cuts it: decode_worker/stops.py)
    held: str = ""
    # vLLM's stop_reason, on the last chunk: the stop string matched or the stop token id
    stop_reason: str | int | None = None


class WorkerFailed(Exception):
    """A worker became unreachable before it produced anything for this request."""

    def __init__(self, worker_id: str, role: str, err: grpc.RpcError) -> None:
        super().__init__(f"{role} worker {worker_id}: {err.code().name} {err.details()}")
        self.worker_id, self.role, self.err = worker_id, role, err


def _route_str(r: pd_pb2.RouteResponse) -> str:
    """The x-pdserve-route header: the option taken, why, and the latency model's view."""
    mode = "local" if r.mode == pd_pb2.ROUTE_MODE_LOCAL else "disagg"
    p = f" prefill={r.prefill.worker_id}" if r.HasField("prefill") else ""
    out = f"{mode}:{r.reason}{p} decode={r.decode.worker_id} predicted_cached={r.cached_tokens}"
    if r.predicted_ttft_ms > 0:
        out += (f" predicted_ttft_ms={r.predicted_ttft_ms:.0f}"
                f" predicted_tpot_ms={r.predicted_tpot_ms:.1f} chunk={r.chunk_tokens}")
    if r.held_ms > 0:
        out += f" held_ms={r.held_ms:.0f}"
    if r.joined:
        out += " joined=queued_step"
    if r.hold_first_token:
        out += " first=with_stream"
    if r.runner_up:
        out += f"; runner_up: {r.runner_up}"
    return out


def _to_chunk(msg: pd_pb2.GenerateResponse) -> Chunk:
    return Chunk(list(msg.token_ids), msg.text, list(msg.logprobs), msg.finish_reason,
                 msg.kv_transfer if msg.HasField("kv_transfer") else None,
                 msg.num_external_tokens, cached_tokens=msg.num_cached_tokens,
                 prompt_logprobs=list(msg.prompt_logprobs),
                 stop_reason=stop_reason_from_wire(msg))


def _worker_down(e: grpc.RpcError) -> bool:
    """A killed or vanished worker: the connection is refused or reset (UNAVAILABLE), or
    the worker's server ended the call as it stopped (CANCELLED: a call this frontend
    cancels raises asyncio.CancelledError, never this status)."""
    return e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class ClusterClient:
    """Route -> prefill -> decode, with the booking reported back to the scheduler.

    Failures: a worker that is down before it produced anything for the request is
    excluded and the request is placed again (at most `max_attempts` placements). A
    decode worker that fails before its first message is replaced too: the prompt is
    prefilled again (a prefix-cache hit on the prefill worker) and the new decode
    worker continues from the first token the client already has. A decode worker that
    dies mid-stream ends the request with an error (no silent duplicate tokens)."""

    def __init__(self, scheduler_address: str, route_wait_s: float = 15.0,
                 max_attempts: int = 3, kv_mode: str = "pull", creds=None,
                 ttft_slo_s: float = 0.0) -> None:
        self.push = kv_mode.startswith("push")
        self.ttft_slo_s = ttft_slo_s      # a kept first token goes by release_at()
        self.late_yield = late_streams_yield()
        self.channels = Channels(creds)     # the frontend's token on every internal call
        self.leases = AsyncLeaseClient(agent_stubs(self.channels))
        self.scheduler = pd_pb2_grpc.SchedulerStub(self.channels.get(scheduler_address))
        self.route_wait_s = route_wait_s
        self.max_attempts = max_attempts
        self._bg: set[asyncio.Task] = set()

    async def route(self, request_id: str, model: str, token_ids: list[int],
                    exclude: list[str] | None = None, max_tokens: int = 0):
        """Route; while the scheduler restarts or no worker is registered (UNAVAILABLE),
        retry with backoff for up to `route_wait_s`."""
        delay = 0.1
        deadline = time.monotonic() + self.route_wait_s
        while True:
            try:
                return await self.scheduler.Route(pd_pb2.RouteRequest(
                    request_id=request_id, model=model, token_ids=token_ids,
                    exclude_workers=exclude or [], max_tokens=max_tokens),
                    timeout=ROUTE_TIMEOUT_S)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:    # admission control
                    after = dict(e.trailing_metadata() or ()).get("retry-after", "1")
                    raise Overloaded(e.details(), retry_after_s=float(after)) from None
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_grpc_error(e, "route") from None
                if time.monotonic() + delay > deadline:
                    raise NoWorkers(f"no route: {e.details()}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def report(self, booking_id: str, phase: int, ttft_s: float = 0.0, tpot_s: float = 0.0,
               output_tokens: int = 0, kv: pd_pb2.KVTransferStats | None = None,
               first_gap_s: float = 0.0, first_held_s: float = 0.0) -> None:
        """Tell the scheduler (in the background; a lost report expires on its own). The
        latencies feed the autoscaling planner and the latency model's error; a pull
        transfer's READ time feeds its transfer model (not the whole load: that includes
        a first-time handshake)."""
        ok = kv is not None and kv.status == "ok" and kv.mode != "push"

        async def send():
            try:
                await self.scheduler.Report(pd_pb2.ReportRequest(
                    booking_id=booking_id, phase=phase, ttft_ms=ttft_s * 1e3,
                    tpot_ms=tpot_s * 1e3, output_tokens=output_tokens,
                    kv_bytes=kv.bytes if ok else 0,
                    kv_seconds=(kv.read_seconds or kv.seconds) if ok else 0.0,
                    first_gap_ms=first_gap_s * 1e3, first_held_ms=first_held_s * 1e3),
                    timeout=5)
            except grpc.RpcError as e:
                log.debug("report %s failed: %s", booking_id, e.code())
        t = asyncio.get_running_loop().create_task(send())
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def list_workers(self) -> pd_pb2.ListWorkersResponse:
        return await self.scheduler.ListWorkers(pd_pb2.ListWorkersRequest(), timeout=2)

    async def release(self, kv: pd_pb2.KVHandle) -> None:
        await self.leases.release(kv.agent_address, [kv.transfer_id])

    async def generate(self, request_id: str, model: str, token_ids: list[int],
                       sampling: pd_pb2.SamplingParams,
                       timeout_s: float) -> AsyncIterator[Chunk]:
        exclude: list[str] = []
        first: Chunk | None = None      # the first token, once the client has it
        t0 = time.perf_counter()
        # when the client's first token is due: a stream whose first token came later
        # keeps no TPOT slack on its decode engine (pdserve/step_budget.py)
        due = time.time() + self.ttft_slo_s if self.ttft_slo_s > 0 and self.late_yield else 0.0
        t_first = t_second = 0.0
        t_ready = 0.0      # a kept first token: when it was computed
        ntok = 0
        kv = None
        deadline = time.monotonic() + timeout_s     # the whole request's, over every attempt
        for attempt in range(self.max_attempts):
            timeout_s = deadline - time.monotonic()
            if timeout_s <= 0:
                raise PDError(f"request deadline passed after {attempt} placements",
                              kind=ErrorKind.TIMEOUT)
            route = await self.route(request_id, model, token_ids, exclude, sampling.max_tokens)
            phase = pd_pb2.PHASE_FAILED
            pulled = False
            if not t_first:     # a kept first token that never went out is gone with it
                t_ready = 0.0

            def ready(booking=route.booking_id) -> None:
                nonlocal t_ready
                t_ready = time.perf_counter()    # the prefill worker is done with it
                self.report(booking, pd_pb2.PHASE_PREFILL_DONE)
            try:
                if route.mode == pd_pb2.ROUTE_MODE_LOCAL:
                    gen = self._local(route, request_id, token_ids, sampling, timeout_s, first,
                                      due)
                elif (self.push and first is None and sampling.max_tokens >= 2
                      and not sampling.HasField("prompt_logprobs")):
                    # (push: the decode engine samples the first token; the prompt's
                    # logprobs come from the prefill engine's answer, by pull)
                    gen = self._disagg_push(route, request_id, token_ids, sampling,
                                            timeout_s, due)
                else:
                    pulled = first is None      # the client's second token comes after a pull
                    gen = self._disagg(route, request_id, token_ids, sampling, timeout_s, first,
                                       due)
                    if pulled and route.hold_first_token and self.ttft_slo_s > 0:
                        gen = _kept_first(gen, release_at(t0, self.ttft_slo_s), ready)
                async for c in gen:
                    if c.token_ids and not t_first:
                        t_first = time.perf_counter()
                        if not t_ready:     # (a kept one was reported when computed)
                            self.report(route.booking_id, pd_pb2.PHASE_PREFILL_DONE,
                                        ttft_s=t_first - t0)
                    elif c.token_ids and not t_second:
                        t_second = time.perf_counter()
                    if first is None and route.mode != pd_pb2.ROUTE_MODE_LOCAL:
                        first = c
                    ntok += len(c.token_ids)
                    kv = c.kv_transfer or kv
                    yield c
                phase = pd_pb2.PHASE_DONE
                return
            except WorkerFailed as e:
                if attempt + 1 == self.max_attempts:
                    raise PDError(f"request failed after {attempt + 1} placements: {e}",
                                  kind=ErrorKind.WORKER_UNAVAILABLE) from None
                log.warning("%s; placing request %s again", e, request_id)
                M.ROUTE_RETRIES.labels(e.role).inc()
                exclude.append(e.worker_id)
            finally:
                done = phase == pd_pb2.PHASE_DONE and ntok > 1
                tpot = (time.perf_counter() - t_first) / (ntok - 1) if done else 0.0
                start = t_ready or t_first
                gap = t_second - start if done and pulled and t_second else 0.0
                kept = t_first - t_ready if t_ready and t_first else 0.0
                self.report(route.booking_id, phase, tpot_s=tpot, output_tokens=ntok, kv=kv,
                            first_gap_s=gap, first_held_s=kept,
                            ttft_s=t_first - t0 if t_ready and t_first else 0.0)

    async def _local(self, route, request_id, token_ids, sampling, timeout_s,
                     first: Chunk | None, due: float = 0.0):
        """The decode worker prefills itself; after a failed decode worker, from the prompt
        and the first token the client already has."""
        if first is not None:
            token_ids = list(token_ids) + first.token_ids
            rest = pd_pb2.SamplingParams()
            rest.CopyFrom(sampling)
            rest.max_tokens -= 1
            rest.min_tokens = max(0, rest.min_tokens - 1)
            rest.ClearField("prompt_logprobs")      # the client has them already
            sampling = rest
        decode = pd_pb2_grpc.DecodeWorkerStub(self.channels.get(route.decode.address))
        stream = decode.Generate(pd_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=token_ids, sampling=sampling,
            local_prefill=True,
            first_token_text=(first.text + first.held) if first is not None else "",
            first_text_sent=len(first.text) if first is not None else 0,
            ttft_due_unix=due), timeout=timeout_s)
        started = False
        try:
            async for msg in stream:
                c = _to_chunk(msg)
                if not started:
                    c.route = _route_str(route)
                started = True
                yield c
        except grpc.RpcError as e:
            if not started and _worker_down(e):
                raise WorkerFailed(route.decode.worker_id, "decode", e) from None
            raise from_grpc_error(e, f"decode on {route.decode.worker_id}") from None
        except BaseException:
            stream.cancel()
            raise

    async def _disagg(self, route, request_id, token_ids, sampling, timeout_s,
                      first: Chunk | None, due: float = 0.0):
        """`first` set: the client already has the first token (a retry); continue from it."""
        prefill = pd_pb2_grpc.PrefillWorkerStub(self.channels.get(route.prefill.address))
        try:
            pf = await prefill.Prefill(pd_pb2.PrefillRequest(
                request_id=request_id, token_ids=token_ids, sampling=sampling),
                timeout=timeout_s)
        except grpc.RpcError as e:
            if _worker_down(e):
                raise WorkerFailed(route.prefill.worker_id, "prefill", e) from None
            raise from_grpc_error(e, f"prefill on {route.prefill.worker_id}") from None
        if first is not None:    # a retry: the client already has its first token
            self.report(route.booking_id, pd_pb2.PHASE_PREFILL_DONE)
        if first is None:
            text = pf.first_token_text
            n = first_text_sent(text, sampling.stop, bool(pf.finish_reason),
                                sampling.include_stop_str_in_output)
            first = Chunk([pf.first_token_id], text[:n],
                          [pf.first_logprob] if pf.HasField("first_logprob") else [],
                          finish_reason=pf.finish_reason, cached_tokens=pf.num_cached_tokens,
                          route=_route_str(route), prompt_logprobs=list(pf.prompt_logprobs),
                          held=text[n:], stop_reason=stop_reason_from_wire(pf))
            if pf.finish_reason:
                yield first
                return
            yield first
        elif not pf.HasField("kv"):   # cannot happen: it finished the first time
            raise PDError("retry found the request already finished", kind=ErrorKind.INTERNAL)
        kv = pf.kv
        decode = pd_pb2_grpc.DecodeWorkerStub(self.channels.get(route.decode.address))
        stream = None
        started = False
        try:
            stream = decode.Generate(pd_pb2.GenerateRequest(
                request_id=request_id, prompt_token_ids=token_ids,
                first_token_id=first.token_ids[0], kv=kv, sampling=sampling,
                first_token_text=first.text + first.held, first_text_sent=len(first.text),
                ttft_due_unix=due), timeout=timeout_s)
            async for msg in stream:
                started = True
                yield _to_chunk(msg)
        except grpc.RpcError as e:
            if not started:
                await self.release(kv)
                if _worker_down(e):
                    raise WorkerFailed(route.decode.worker_id, "decode", e) from None
            raise from_grpc_error(e, f"decode on {route.decode.worker_id}") from None
        except BaseException:  # client went away (cancel) or a bug: free both sides
            if stream is not None:
                stream.cancel()
            if not started:
                await asyncio.shield(self.release(kv))
            raise

    async def _disagg_push(self, route, request_id, token_ids, sampling, timeout_s,
                           due: float = 0.0):
        """Push: the decode worker allocates the prompt's blocks and offers them to the
        prefill engine, which WRITEs the KV into them while it computes; the decode engine
        then samples the first token itself. Both calls start together."""
        decode = pd_pb2_grpc.DecodeWorkerStub(self.channels.get(route.decode.address))
        prefill = pd_pb2_grpc.PrefillWorkerStub(self.channels.get(route.prefill.address))
        stream = decode.Generate(pd_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=token_ids, sampling=sampling,
            push=pd_pb2.KVPush(transfer_id=request_id,
                               agent_address=route.prefill.agent_address,
                               ticket=route.push_ticket), ttft_due_unix=due),
            timeout=timeout_s)
        pf_call = prefill.Prefill(pd_pb2.PrefillRequest(
            request_id=request_id, token_ids=token_ids, sampling=sampling, push=True),
            timeout=timeout_s)
        pf_task = asyncio.ensure_future(pf_call)
        started = False
        try:
            it = stream.__aiter__()
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                if not pf_task.done():
                    await asyncio.wait({nxt, pf_task}, return_when=asyncio.FIRST_COMPLETED)
                    # a prefill that failed before the decode worker produced anything:
                    # give up on this placement now (the decode worker would only wait
                    # for WRITEs that will never come). Once tokens flow, its KV is in.
                    if (not started and pf_task.done() and not pf_task.cancelled()
                            and pf_task.exception() is not None and not nxt.done()):
                        nxt.cancel()
                        raise pf_task.exception()
                try:
                    msg = await nxt
                except StopAsyncIteration:
                    break
                c = _to_chunk(msg)
                if not started:
                    c.route = _route_str(route)
                    if pf_task.done() and not pf_task.exception():
                        c.cached_tokens = pf_task.result().num_cached_tokens
                started = True
                if msg.finish_reason and c.kv_transfer is not None:
                    c.kv_transfer = _merge_push(c.kv_transfer, await _result(pf_task))
                yield c
        except grpc.RpcError as e:
            which, ref = (("prefill", route.prefill) if pf_task.done() and
                          pf_task.exception() is e else ("decode", route.decode))
            if not started and _worker_down(e):
                raise WorkerFailed(ref.worker_id, which, e) from None
            raise from_grpc_error(e, f"{which} on {ref.worker_id}") from None
        finally:
            stream.cancel()
            if not pf_task.done():
                pf_call.cancel()     # the prefill worker frees what it kept
            elif (not pf_task.cancelled() and pf_task.exception() is None
                  and pf_task.result().HasField("kv")):
                # the engine's blocks, kept for a pull nobody makes in push mode: the
                # consumer releases them after a push; after a refused one (incompatible
                # layouts, the decode engine recomputed) nobody else would (a second
                # release is a no-op)
                await asyncio.shield(self.release(pf_task.result().kv))

    async def close(self) -> None:
        for t in list(self._bg):
            try:
                await asyncio.wait_for(t, 2)
            except (asyncio.TimeoutError, Exception):
                pass
        await self.channels.close()


async def _result(task) -> pd_pb2.PrefillResponse | None:
    try:
        return await asyncio.wait_for(asyncio.shield(task), 5)
    except (Exception, asyncio.TimeoutError):   # noqa: BLE001 - the figures are optional
        return None


def _merge_push(dec: pd_pb2.KVTransferStats, pf: pd_pb2.PrefillResponse | None
                ) -> pd_pb2.KVTransferStats:
    """The decode worker's record (status, reason, wait) with the prefill worker's WRITE
    figures (bytes, WRITE time, exposed part, descriptors)."""
    out = pd_pb2.KVTransferStats()
    out.CopyFrom(dec)
    if pf is not None and pf.HasField("push") and pf.push.status == "ok":
        p = pf.push
        out.bytes, out.read_seconds, out.prep_seconds = p.bytes, p.read_seconds, p.prep_seconds
        out.descriptors, out.writes, out.exposed_seconds = p.descriptors, p.writes, \
            p.exposed_seconds
        out.post_seconds = p.post_seconds
    return out


def to_error(e: Exception) -> PDError:
    if isinstance(e, PDError):
        return e
    return PDError(f"internal error: {type(e).__name__}: {e}", kind=ErrorKind.INTERNAL)


async def _kept_first(gen: AsyncIterator[Chunk], release_at: float, ready):
    """A remote prefill's chunks with its first token kept until the decode worker's first
    one, or until `release_at` (perf_counter), whichever comes first
    (RouteResponse.hold_first_token): the handoff then falls in the client's TTFT, not in
    its TPOT. `ready()` is called when the first token is computed. Should the decode
    worker fail before its first token, the client never had one: the request is placed
    again from the start."""
    it = gen.__aiter__()
    nxt = None
    try:
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        ready()
        nxt = asyncio.ensure_future(it.__anext__())
        await asyncio.wait({nxt}, timeout=max(0.0, release_at - time.perf_counter()))
        if nxt.done():
            try:
                c = nxt.result()       # a failure raises here, before the first token
            except StopAsyncIteration:
                nxt = None
                yield first
                return
            nxt = None
            yield first
            yield c
            nxt = asyncio.ensure_future(it.__anext__())
        else:
            yield first                 # its deadline: it waits no longer
        while True:
            try:
                c = await nxt
            except StopAsyncIteration:
                nxt = None
                return
            nxt = None
            yield c
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()                # the decode stream's own cleanup frees its KV
            await asyncio.wait({nxt})
        await gen.aclose()
