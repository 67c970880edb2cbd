"""KVAgent: the gRPC service our connector runs inside each vLLM engine process.

It carries the NIXL handshake (agent metadata + registered regions + layout, with a
compatibility check) and the lease protocol (Acquire before reading, Release when
done). The bytes themselves move over UCX. A sync gRPC server on its own threads:
the engine process has no asyncio loop of ours.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from typing import Callable

import grpc

from pdserve import auth
from pdserve.rpc import pd_pb2, pd_pb2_grpc

log = logging.getLogger("vllm.pdserve." + __name__)


# no caller holds our blocks longer than this per call, whatever it asks for
MAX_HOLD_S = 300.0


def _seconds(context, value: float, cap: float, what: str) -> float:
    if not 0 <= value < float("inf"):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be >= 0, got {value}")
    return min(value, cap)


class AgentState:
    """What the servicer reads and updates; owned by the connector's worker half."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.info: pd_pb2.AgentInfo | None = None
        self.compat_hash = ""
        self.acquire: Callable[[list[str], float], tuple[list[str], list[str]]] | None = None
        self.release: Callable[[list[str]], tuple[list[str], list[str]]] | None = None
        self.stats: Callable[[list[str]], pd_pb2.AgentStats] | None = None
        # rank 0 of a tensor-parallel engine: every rank's agent address, in rank order
        # (raises LookupError while one has not started)
        self.ranks: Callable[[], list[str]] | None = None
        # debug mode only: CRC32 of spans of our registered KV (None: refused)
        self.checksum: Callable[[list[tuple[int, int]]], int | None] | None = None
        # push mode (producer): a consumer's offer -> (accepted, reason); cancels
        self.offer: Callable[[pd_pb2.OfferRequest], tuple[bool, str]] | None = None
        self.cancel: Callable[[list[str]], tuple[list[str], list[str]]] | None = None
        # what a caller may ask for: a lease extension, an offer's life (seconds)
        self.max_extend_s = MAX_HOLD_S
        self.max_ttl_s = MAX_HOLD_S


class KVAgentServicer(pd_pb2_grpc.KVAgentServicer):
    def __init__(self, state: AgentState) -> None:
        self.state = state

    def GetAgentInfo(self, request, context):
        info = self.state.info
        if info is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "KV caches not registered yet")
        if request.peer_compat_hash and request.peer_compat_hash != self.state.compat_hash:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"incompatible KV: peer {request.peer_compat_hash} != "
                          f"{self.state.compat_hash} ({info.layout.model}, {info.layout.dtype}, "
                          f"block {info.layout.block_size}, {info.layout.layout})")
        if self.state.ranks is not None:
            try:
                addresses = self.state.ranks()
            except (LookupError, OSError, ValueError) as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            info = pd_pb2.AgentInfo.FromString(info.SerializeToString())
            info.rank_addresses[:] = addresses
        return info

    def Acquire(self, request, context):
        if self.state.acquire is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine holds no KV leases")
        ids = list(request.transfer_ids)
        extend_s = _seconds(context, request.extend_s, self.state.max_extend_s, "extend_s")
        # A lease is added one engine step after the prefill output left; tolerate
        # a consumer that is faster than that.
        deadline = time.monotonic() + 1.0
        while True:
            held, missing = self.state.acquire(ids, extend_s)
            if not missing or time.monotonic() > deadline:
                return pd_pb2.LeaseResponse(held=held, missing=missing)
            time.sleep(0.002)

    def Release(self, request, context):
        if self.state.release is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine holds no KV leases")
        held, missing = self.state.release(list(request.transfer_ids))
        return pd_pb2.LeaseResponse(held=held, missing=missing)

    def Checksum(self, request, context):
        if self.state.checksum is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "KV checksums are off on this engine (--kv-checksum)")
        if len(request.addrs) != len(request.lengths):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "addrs and lengths differ in length")
        crc = self.state.checksum(list(zip(request.addrs, request.lengths)))
        if crc is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "span outside the registered KV regions")
        return pd_pb2.ChecksumResponse(crc32=crc)

    def Offer(self, request, context):
        if self.state.offer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine pushes no KV")
        if not request.transfer_id or not request.block_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offer needs a transfer id and blocks")
        if request.skip_blocks > len(request.block_ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "skip_blocks exceeds the blocks")
        request.ttl_s = _seconds(context, request.ttl_s, self.state.max_ttl_s, "ttl_s")
        ok, reason = self.state.offer(request)
        return pd_pb2.OfferResponse(accepted=ok, reason=reason)

    def Cancel(self, request, context):
        if self.state.cancel is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine pushes no KV")
        cancelled, busy = self.state.cancel(list(request.transfer_ids))
        return pd_pb2.CancelResponse(cancelled=cancelled, busy=busy)

    def Stats(self, request, context):
        if self.state.stats is None:
            return pd_pb2.AgentStats()
        return self.state.stats(list(request.pop_transfer_ids))


def start_agent_server(state: AgentState, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvagent"),
                         options=[("grpc.so_reuseport", 0)],
                         interceptors=auth.server_interceptors(auth.from_env(auth.WORKER),
                                                               aio=False))
    pd_pb2_grpc.add_KVAgentServicer_to_server(KVAgentServicer(state), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"KV agent could not bind {host}:{port}")
    server.start()
    log.info("KV agent listening on %s:%d", host, bound)
    return server, bound


def write_agent_address(path: str, address: str) -> None:
    """Publish the address the agent bound (port 0: no race between choosing and binding)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, path)


def read_agent_address(path: str | None, timeout_s: float = 60.0) -> str:
    if not path:
        raise RuntimeError("KV connector: neither agent_port nor agent_address_file is set")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"KV agent address not published in {path}") from None
            time.sleep(0.05)


class AgentClients:
    """Cached channels to peers' KV agents (thread-safe), the least recently used closed
    past `max_channels` (a restarted peer comes back on a new port)."""

    def __init__(self, max_channels: int = 256) -> None:
        self._lock = threading.Lock()
        self._stubs: dict[str, pd_pb2_grpc.KVAgentStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self.max = max_channels
        self.creds = auth.from_env(auth.WORKER)

    def get(self, address: str) -> pd_pb2_grpc.KVAgentStub:
        with self._lock:
            stub = self._stubs.pop(address, None)
            if stub is None:
                while len(self._stubs) >= self.max:
                    old = next(iter(self._stubs))
                    del self._stubs[old]
                    self._channels.pop(old).close()
                self._channels[address] = auth.channel(address, self.creds)
                stub = pd_pb2_grpc.KVAgentStub(self._channels[address])
            self._stubs[address] = stub     # most recently used last
            return stub

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()
