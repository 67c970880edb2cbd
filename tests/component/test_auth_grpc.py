"""Internal auth on real gRPC servers on loopback: the scheduler (asyncio) and a KV agent
(threads), each with the cluster secret in its environment."""

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv_transfer.agent import MAX_HOLD_S, AgentState, start_agent_server
from pdserve import auth
from scheduler.config import SchedulerConfig
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.server import create_server

SECRET = auth.new_secret()


def creds(role):
    ring = auth.Keyring(SECRET)
    return auth.Credentials(ring.token(role), ring)


@pytest.fixture
async def sched(monkeypatch):
    monkeypatch.setenv(auth.ENV_SECRET, SECRET)
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=30)
    server, port, svc = await create_server(cfg)
    await server.start()
    chans = {}

    def stub(role):
        """None: no credential; a role: ours; ("other", creds): those."""
        if role not in chans:
            addr = f"127.0.0.1:{port}"
            chans[role] = (grpc.aio.insecure_channel(addr) if role is None else
                           auth.aio_channel(addr, role[1] if isinstance(role, tuple)
                                            else creds(role)))
        return pd_pb2_grpc.SchedulerStub(chans[role])
    yield stub, chans
    for ch in chans.values():
        await ch.close()
    await server.stop(0)


def reg(wid, address):
    return pd_pb2.RegisterRequest(
        worker_id=wid, role=pd_pb2.ROLE_PREFILL, address=address, agent_address=address,
        layout=pd_pb2.KVLayout(model="m", compat_hash="h"))


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code()


async def test_the_scheduler_refuses_callers_without_credentials_or_the_right_role(sched):
    stub, chans = sched
    anon = stub(None)
    assert await code_of(anon.ListWorkers(pd_pb2.ListWorkersRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(anon.Register(reg("p1", "127.0.0.1:1"))) == \
        grpc.StatusCode.UNAUTHENTICATED

    async def events():
        yield pd_pb2.KVEventBatch(worker_id="p1", snapshot=True, stored=[1, 2])
    assert await code_of(anon.KVEvents(events())) == grpc.StatusCode.UNAUTHENTICATED
    # another cluster's secret is no credential here
    ring = auth.Keyring(auth.new_secret())
    stranger = stub(("other", auth.Credentials(ring.token(auth.ADMIN), ring)))
    assert await code_of(stranger.ListWorkers(pd_pb2.ListWorkersRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    fe = stub(auth.FRONTEND)
    assert await code_of(fe.Register(reg("p1", "127.0.0.1:1"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(fe.Drain(pd_pb2.DrainRequest(worker_id="p1", drain=True))) == \
        grpc.StatusCode.PERMISSION_DENIED
    w = stub(auth.WORKER)
    await w.Register(reg("p1", "127.0.0.1:1"))
    assert (await w.KVEvents(events())).batches == 1     # a stream of requests: token too
    assert [x.worker_id for x in (await fe.ListWorkers(pd_pb2.ListWorkersRequest())).workers] \
        == ["p1"]
    # health checks carry no token (Kubernetes' probes) and say only SERVING
    h = await health_pb2_grpc.HealthStub(chans[None]).Check(health_pb2.HealthCheckRequest())
    assert h.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_live_worker_id_cannot_be_registered_from_another_address(sched):
    stub, _ = sched
    w = stub(auth.WORKER)
    await w.Register(reg("p1", "127.0.0.1:1"))
    assert await code_of(w.Register(reg("p1", "10.9.9.9:1"))) == grpc.StatusCode.ALREADY_EXISTS
    await w.Register(reg("p1", "127.0.0.1:1"))        # the worker itself, again: fine
    ws = (await stub(auth.ADMIN).ListWorkers(pd_pb2.ListWorkersRequest())).workers
    assert [(x.worker_id, x.address) for x in ws] == [("p1", "127.0.0.1:1")]
    r = await stub(auth.FRONTEND).Report(pd_pb2.ReportRequest(
        booking_id="nobody", phase=pd_pb2.PHASE_DONE, ttft_ms=1e6, tpot_ms=1e6))
    assert not r.known                                  # an unknown booking: ignored


@pytest.fixture
def agent(monkeypatch):
    monkeypatch.setenv(auth.ENV_SECRET, SECRET)
    st = AgentState()
    asked = []

    def acquire(ids, extend_s):
        asked.append(extend_s)
        return ids, []
    st.acquire = acquire
    server, port = start_agent_server(st, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}", asked
    server.stop(0)


def test_the_kv_agent_takes_calls_from_workers_only_and_caps_what_they_ask(agent):
    address, asked = agent
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pd_pb2_grpc.KVAgentStub(ch).GetAgentInfo(pd_pb2.AgentInfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with auth.channel(address, creds(auth.FRONTEND)) as ch:
        with pytest.raises(grpc.RpcError) as e:   # region addresses are for workers only
            pd_pb2_grpc.KVAgentStub(ch).GetAgentInfo(pd_pb2.AgentInfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with auth.channel(address, creds(auth.WORKER)) as ch:
        stub = pd_pb2_grpc.KVAgentStub(ch)
        with pytest.raises(grpc.RpcError) as e:   # through the check: not registered yet
            stub.GetAgentInfo(pd_pb2.AgentInfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.Acquire(pd_pb2.LeaseRequest(transfer_ids=["t"], extend_s=1e9), timeout=5)
        assert asked == [MAX_HOLD_S]
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(grpc.RpcError) as e:
                stub.Acquire(pd_pb2.LeaseRequest(transfer_ids=["t"], extend_s=bad), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
