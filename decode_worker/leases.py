"""Keep the producer's lease alive while a request waits in the decode engine.

A prefill worker holds a finished prompt's blocks for `lease_s`. If the decode engine's
queue is long, the request may not start loading before that; the decode worker
therefore renews the lease (an Acquire with `extend_s`) every `every_s` until the engine
has produced the request's first output (the load is over) or the request ended. A
renewal that finds the lease gone stops: the load will then see the lease missing and
recompute or fail per policy, never read freed blocks.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve import metrics as M
from pdserve.lease_client import AsyncLeaseClient, agent_stubs
from pdserve.rpc import Channels, pd_pb2

log = logging.getLogger(__name__)


class LeaseRenewer:
    def __init__(self, lease_s: float, creds=None) -> None:
        self.extend_s = lease_s
        self.every_s = max(0.2, lease_s / 3)
        self.channels = Channels(creds)
        self.leases = AsyncLeaseClient(agent_stubs(self.channels))

    async def hold(self, kv: pd_pb2.KVHandle, done: asyncio.Event) -> None:
        """Renew `kv`'s lease until `done` is set (or the lease is found gone)."""
        while True:
            try:
                await asyncio.wait_for(done.wait(), self.every_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                held = await self.leases.acquire(kv.agent_address, [kv.transfer_id],
                                                 self.extend_s)
            except grpc.RpcError as e:
                M.KV_LEASE_RENEWALS.labels("error").inc()
                log.warning("renewing KV lease %s at %s failed: %s", kv.transfer_id,
                            kv.agent_address, e.code())
                continue
            if done.is_set():
                return
            if kv.transfer_id in held:
                M.KV_LEASE_RENEWALS.labels("ok").inc()
            else:
                M.KV_LEASE_RENEWALS.labels("lost").inc()
                log.warning("KV lease %s at %s is gone while its request waits here; the "
                            "load will recompute or fail", kv.transfer_id, kv.agent_address)
                return
