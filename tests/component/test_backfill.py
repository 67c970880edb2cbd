"""Late binding's backfill (`--hold-order backfill`, scheduler/holding.py) on the scheduler
as a real gRPC server on loopback port 0."""

import asyncio

import grpc
import pytest

from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.config import AutoscaleConfig, SchedulerConfig
from scheduler.holding import Gate
from scheduler.server import create_server
from tests.component.sched_helpers import reg, steps, wait_for


def test_the_gate_names_the_workers_wanted_ahead():
    """What a later request must leave alone: the workers the requests ahead of it chose,
    late ones aside (they step aside for it anyway)."""
    g = Gate()
    a, b, c = g.enter("m"), g.enter("m"), g.enter("m")
    g.want.update({a: "p", b: "d"})
    assert g.wanted_ahead("m", a) == set()
    assert g.wanted_ahead("m", c) == {"p", "d"}
    g._late.add(b)
    assert g.wanted_ahead("m", c) == {"p"}
    g.leave("m", a)
    assert g.wanted_ahead("m", c) == set() and a not in g.want


@pytest.mark.parametrize("order", ["deadline", "backfill"])
async def test_a_short_prompt_goes_ahead_to_a_free_decode_engine(order):
    """TTFT SLO 20 s. p prefills a (about 3.5 s); b, as long, waits for p (the decode
    engine d would take 30 s for it); c, 16 tokens, is best computed on d at once. In
    deadline order c waits behind b until p frees; with backfill it goes now, local on d,
    and b keeps p."""
    from scheduler.planner import PlannerConfig, PoolPolicy
    from scheduler.policy import PlacementConfig
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=30.0,
                          placement=PlacementConfig(admit_ttft_factor=0.0, hold_order=order),
                          autoscale=AutoscaleConfig(planner=PlannerConfig(
                              prefill=PoolPolicy(target_ms=20000))))
    server, port, svc = await create_server(cfg)
    await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    sched = pd_pb2_grpc.SchedulerStub(ch)
    try:
        await sched.Register(reg("p", pd_pb2.ROLE_PREFILL))
        await sched.Register(reg("d", pd_pb2.ROLE_DECODE))
        decode = steps(20, decode=1, ctx=500, seconds=0.03)
        await sched.Heartbeat(pd_pb2.HeartbeatRequest(
            worker_id="p", steps=steps(20, prefill=512, seconds=3.0)
            + steps(20, prefill=64, seconds=0.4) + decode))
        await sched.Heartbeat(pd_pb2.HeartbeatRequest(      # d prefills ten times slower
            worker_id="d", steps=steps(20, prefill=512, seconds=30.0)
            + steps(20, prefill=64, seconds=4.0) + decode))

        def route(i, n):
            return asyncio.ensure_future(sched.Route(pd_pb2.RouteRequest(
                request_id=f"r{i}", model="m", token_ids=list(range(n)), max_tokens=8),
                timeout=60))
        a = await route(0, 600)
        assert a.prefill.worker_id == "p"
        b = route(1, 600)
        await asyncio.wait_for(wait_for(lambda: svc.gate.held() == 1), 10)
        c = route(2, 16)
        if order == "backfill":
            rc = await asyncio.wait_for(c, 10)
            assert rc.mode == pd_pb2.ROUTE_MODE_LOCAL and rc.decode.worker_id == "d"
            assert rc.held_ms < 1000
            assert not b.done() and svc.gate.held() == 1        # b still waits for p
        else:
            await asyncio.wait_for(wait_for(lambda: svc.gate.held() == 2), 10)
            done, _ = await asyncio.wait([b, c], timeout=0.3)
            assert not done, "in deadline order c waits behind b"
        await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id,
                                                phase=pd_pb2.PHASE_PREFILL_DONE))
        rb = await asyncio.wait_for(b, 10)
        assert rb.prefill.worker_id == "p"
        if order == "deadline":
            rc = await asyncio.wait_for(c, 10)
            assert rc.held_ms > 200
        assert svc.gate.held() == 0 and not svc.gate.want
    finally:
        await ch.close()
        await server.stop(0)
