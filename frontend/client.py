"""The frontend's view of the cluster: route -> prefill -> decode stream, over gRPC."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdserve.errors import ErrorKind, NoWorkers, PDError, from_grpc_error
from pdserve.rpc import pd_pb2, pd_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[pd_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    kv_transfer: pd_pb2.KVTransferStats | None = None
    num_external_tokens: int = 0


class Channels:
    def __init__(self) -> None:
        self._ch: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._ch.get(address)
        if ch is None:
            ch = self._ch[address] = grpc.aio.insecure_channel(address)
        return ch

    async def close(self) -> None:
        for ch in self._ch.values():
            await ch.close()
        self._ch.clear()


class ClusterClient:
    def __init__(self, scheduler_address: str, route_retries: int = 5) -> None:
        self.channels = Channels()
        self.scheduler = pd_pb2_grpc.SchedulerStub(self.channels.get(scheduler_address))
        self.route_retries = route_retries

    async def route(self, request_id: str, model: str, token_ids: list[int]):
        delay = 0.1
        for attempt in range(self.route_retries + 1):
            try:
                return await self.scheduler.Route(pd_pb2.RouteRequest(
                    request_id=request_id, model=model, token_ids=token_ids), timeout=5)
            except grpc.RpcError as e:
                # the scheduler restarting, or workers re-registering: retry briefly
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.route_retries:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        raise NoWorkers(f"no route: {e.details()}") from None
                    raise from_grpc_error(e, "route") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def list_workers(self) -> pd_pb2.ListWorkersResponse:
        return await self.scheduler.ListWorkers(pd_pb2.ListWorkersRequest(), timeout=2)

    async def release(self, kv: pd_pb2.KVHandle) -> None:
        try:
            await pd_pb2_grpc.KVAgentStub(self.channels.get(kv.agent_address)).Release(
                pd_pb2.LeaseRequest(transfer_ids=[kv.transfer_id]), timeout=5)
        except grpc.RpcError as e:
            log.warning("could not release KV %s (%s); its lease will expire",
                        kv.transfer_id, e.code())

    async def generate(self, request_id: str, model: str, token_ids: list[int],
                       sampling: pd_pb2.SamplingParams,
                       timeout_s: float) -> AsyncIterator[Chunk]:
        route = await self.route(request_id, model, token_ids)
        prefill = pd_pb2_grpc.PrefillWorkerStub(self.channels.get(route.prefill.address))
        try:
            pf = await prefill.Prefill(pd_pb2.PrefillRequest(
                request_id=request_id, token_ids=token_ids, sampling=sampling), timeout=timeout_s)
        except grpc.RpcError as e:
            raise from_grpc_error(e, f"prefill on {route.prefill.worker_id}") from None
        first = Chunk([pf.first_token_id], pf.first_token_text,
                      [pf.first_logprob] if pf.HasField("first_logprob") else [],
                      finish_reason=pf.finish_reason)
        if pf.finish_reason:
            yield first
            return
        kv = pf.kv
        decode = pd_pb2_grpc.DecodeWorkerStub(self.channels.get(route.decode.address))
        stream = None
        started = False
        try:
            yield first
            stream = decode.Generate(pd_pb2.GenerateRequest(
                request_id=request_id, prompt_token_ids=token_ids,
                first_token_id=pf.first_token_id, kv=kv, sampling=sampling), timeout=timeout_s)
            async for msg in stream:
                started = True
                yield Chunk(list(msg.token_ids), msg.text, list(msg.logprobs), msg.finish_reason,
                            msg.kv_transfer if msg.HasField("kv_transfer") else None,
                            msg.num_external_tokens)
        except grpc.RpcError as e:
            if not started:
                await self.release(kv)
            raise from_grpc_error(e, f"decode on {route.decode.worker_id}") from None
        except BaseException:  # client went away (cancel) or a bug: free both sides
            if stream is not None:
                stream.cancel()
            if not started:
                await asyncio.shield(self.release(kv))
            raise

    async def close(self) -> None:
        await self.channels.close()


def to_error(e: Exception) -> PDError:
    if isinstance(e, PDError):
        return e
    return PDError(f"internal error: {type(e).__name__}: {e}", kind=ErrorKind.INTERNAL)
