"""The scheduler as a real gRPC server on loopback port 0."""

import asyncio

import grpc
import pytest

from pdserve.config import SchedulerConfig
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.service import create_server


@pytest.fixture
async def sched():
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=0.5)
    server, port, svc = await create_server(cfg)
    await server.start()
    reaper = asyncio.create_task(svc.reap_forever())
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield pd_pb2_grpc.SchedulerStub(ch)
    reaper.cancel()
    await ch.close()
    await server.stop(0)


def reg(wid, role, running=0, compat="h"):
    return pd_pb2.RegisterRequest(
        worker_id=wid, role=role, address=f"127.0.0.1:{hash(wid) % 1000 + 1000}",
        agent_address="127.0.0.1:1", layout=pd_pb2.KVLayout(model="m", compat_hash=compat),
        load=pd_pb2.WorkerLoad(running=running))


async def test_route_needs_both_roles_then_picks_least_loaded(sched):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=[1]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    await sched.Register(reg("p1", pd_pb2.ROLE_PREFILL, running=5))
    await sched.Register(reg("p2", pd_pb2.ROLE_PREFILL, running=0))
    await sched.Register(reg("d1", pd_pb2.ROLE_DECODE))
    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=[1, 2]))
    assert (r.prefill.worker_id, r.decode.worker_id) == ("p2", "d1")
    ws = await sched.ListWorkers(pd_pb2.ListWorkersRequest())
    assert {w.worker_id: w.inflight for w in ws.workers} == {"p1": 0, "p2": 1, "d1": 1}


async def test_missed_heartbeats_drop_worker_and_heartbeat_asks_to_reregister(sched):
    await sched.Register(reg("p1", pd_pb2.ROLE_PREFILL))
    await sched.Register(reg("d1", pd_pb2.ROLE_DECODE))
    for _ in range(8):   # keep d1 alive, let p1 go silent
        hb = await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="d1"))
        assert hb.known
        await asyncio.sleep(0.1)
    ws = await sched.ListWorkers(pd_pb2.ListWorkersRequest())
    assert [w.worker_id for w in ws.workers] == ["d1"]
    hb = await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="p1"))
    assert not hb.known                     # the worker re-registers on this answer


async def test_bad_register_is_invalid_argument(sched):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sched.Register(pd_pb2.RegisterRequest(worker_id="x"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deregister(sched):
    await sched.Register(reg("p1", pd_pb2.ROLE_PREFILL))
    await sched.Deregister(pd_pb2.DeregisterRequest(worker_id="p1"))
    assert not (await sched.ListWorkers(pd_pb2.ListWorkersRequest())).workers
