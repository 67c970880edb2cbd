"""The one client of the KV lease protocol: every Acquire and Release a consumer sends.

A producer's KV agent (kv_transfer/agent.py) holds a finished prompt's blocks under a lease
keyed by transfer id. Consumers speak to it in two ways, and both go through here:
* `Acquire` with `extend_s`: pin the lease before a READ (the decode engine's pull thread)
  or keep it alive while the request waits in the decode engine's queue (the decode
  worker's renewer). The answer names the ids still held; a missing one is gone.
* `Release`: the blocks are no longer needed (the load finished, the request was aborted
  before its load, or the frontend gave up before the decode worker took the handle).
  A failed Release is logged and dropped: the producer's lease expiry frees the blocks.

`LeaseClient` is the blocking form (engine threads), `AsyncLeaseClient` the asyncio form
(frontend and decode worker). Both take a function from an agent's address to its stub,
so the callers keep their own channel caches and credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import grpc

from pdserve.rpc import pd_pb2, pd_pb2_grpc

log = logging.getLogger(__name__)

StubOf = Callable[[str], pd_pb2_grpc.KVAgentStub]
RPC_TIMEOUT_S = 5.0   # an agent waits up to 1 s for a lease not added yet


def acquire_request(transfer_ids: Iterable[str], extend_s: float) -> pd_pb2.LeaseRequest:
    return pd_pb2.LeaseRequest(transfer_ids=list(transfer_ids), extend_s=extend_s)


def release_request(transfer_ids: Iterable[str]) -> pd_pb2.LeaseRequest:
    return pd_pb2.LeaseRequest(transfer_ids=list(transfer_ids))


def _release_failed(address: str, ids: list[str], e: grpc.RpcError) -> None:
    log.warning("Release of %d KV lease(s) at %s failed (%s); the producer's lease expiry "
                "frees them", len(ids), address, e.code() if hasattr(e, "code") else e)


class LeaseClient:
    """Blocking Acquire/Release, for threads that may block (never an engine's step)."""

    def __init__(self, stub_of: StubOf, timeout_s: float = RPC_TIMEOUT_S) -> None:
        self.stub_of = stub_of
        self.timeout_s = timeout_s

    def acquire(self, address: str, transfer_ids: Iterable[str],
                extend_s: float) -> frozenset[str]:
        """Pin or extend; the ids the producer still holds. Raises grpc.RpcError."""
        resp = self.stub_of(address).Acquire(acquire_request(transfer_ids, extend_s),
                                             timeout=self.timeout_s)
        return frozenset(resp.held)

    def release(self, address: str, transfer_ids: Iterable[str]) -> bool:
        ids = list(transfer_ids)
        try:
            self.stub_of(address).Release(release_request(ids), timeout=self.timeout_s)
            return True
        except grpc.RpcError as e:
            _release_failed(address, ids, e)
            return False


class AsyncLeaseClient:
    """The asyncio form of LeaseClient, on aio channels."""

    def __init__(self, stub_of: StubOf, timeout_s: float = RPC_TIMEOUT_S) -> None:
        self.stub_of = stub_of
        self.timeout_s = timeout_s

    async def acquire(self, address: str, transfer_ids: Iterable[str],
                      extend_s: float) -> frozenset[str]:
        resp = await self.stub_of(address).Acquire(acquire_request(transfer_ids, extend_s),
                                                   timeout=self.timeout_s)
        return frozenset(resp.held)

    async def release(self, address: str, transfer_ids: Iterable[str]) -> bool:
        ids = list(transfer_ids)
        try:
            await self.stub_of(address).Release(release_request(ids), timeout=self.timeout_s)
            return True
        except grpc.RpcError as e:
            _release_failed(address, ids, e)
            return False


def agent_stubs(channels) -> StubOf:
    """`stub_of` over a pdserve.rpc.Channels cache (asyncio channels)."""
    return lambda address: pd_pb2_grpc.KVAgentStub(channels.get(address))
