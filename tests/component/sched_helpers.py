"""Helpers for tests of the scheduler's gRPC server: the server itself, a worker's
registration, engine steps as a heartbeat carries them, and a poll until a condition holds."""

import asyncio
import contextlib

import grpc

from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.server import create_server


@contextlib.asynccontextmanager
async def serving(cfg):
    """The scheduler's gRPC server on loopback (cfg's port 0): (a stub, its servicer)."""
    server, port, svc = await create_server(cfg)
    await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pd_pb2_grpc.SchedulerStub(ch), svc
    finally:
        await ch.close()
        await server.stop(0)


def reg(wid, role, running=0, compat="h"):
    return pd_pb2.RegisterRequest(
        worker_id=wid, role=role, address=f"127.0.0.1:{hash(wid) % 1000 + 1000}",
        agent_address="127.0.0.1:1", layout=pd_pb2.KVLayout(model="m", compat_hash=compat),
        load=pd_pb2.WorkerLoad(running=running))


def steps(n, prefill=0, decode=0, ctx=0, seconds=0.1):
    return [pd_pb2.StepSample(seconds=seconds, prefill_tokens=prefill,
                              prefill_attn=prefill * prefill / 2, decode_seqs=decode,
                              decode_ctx=ctx) for _ in range(n)]


async def wait_for(cond, poll_s=0.01):
    while not cond():
        await asyncio.sleep(poll_s)
