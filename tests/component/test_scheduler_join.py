"""Late binding's join through the scheduler's gRPC server on loopback (port 0): a short
prompt joins the one queued behind the step in progress, a long one waits."""

import asyncio

import pytest

from frontend.client import _route_str
from pdserve.rpc import pd_pb2
from scheduler import metrics as SM
from scheduler.config import SchedulerConfig
from tests.component.sched_helpers import reg, serving, steps, wait_for


@pytest.fixture
async def sched():
    async with serving(SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                                       heartbeat_timeout_s=30.0)) as s:
        yield s


def joined() -> float:
    return SM.SCHED_JOINED._value.get()


async def test_a_short_prompt_joins_the_queued_one_and_a_long_one_waits(sched):
    """p's steps are mostly their fixed part (0.3 s, 0.58 ms a prompt token) and d has no
    room to prefill locally. a starts on p; b, held until p is about free, is booked
    behind a's step; c, as short, joins b at once instead of waiting for b's step; a long
    prompt would delay them by more than the fixed part it saves, and is held."""
    sched, svc = sched
    await sched.Register(reg("p", pd_pb2.ROLE_PREFILL))
    full = reg("d", pd_pb2.ROLE_DECODE)
    full.load.kv_usage, full.load.num_blocks = 0.99, 1000
    await sched.Register(full)
    prompts = (steps(20, prefill=512, seconds=0.6) + steps(20, prefill=256, seconds=0.45)
               + steps(20, prefill=16, seconds=0.31))
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="p", steps=prompts))
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(
        worker_id="d", steps=prompts + steps(20, decode=1, ctx=500, seconds=0.03),
        load=full.load))

    def route(i, tokens):
        return asyncio.ensure_future(sched.Route(pd_pb2.RouteRequest(
            request_id=f"r{i}", model="m", token_ids=list(range(tokens)), max_tokens=8),
            timeout=30))

    before = joined()
    a = await route(0, 16)
    assert a.prefill.worker_id == "p" and a.held_ms == 0 and not a.joined
    b = await route(1, 16)                  # held until a's step is about to end
    assert b.prefill.worker_id == "p" and b.held_ms > 0 and joined() == before
    assert not b.joined
    assert svc.reg.queued_tokens(svc.reg.workers["p"]) == 16
    c = await route(2, 16)                  # b is queued: c shares its step
    assert c.prefill.worker_id == "p" and joined() == before + 1 and c.joined
    assert "joined=queued_step" in _route_str(c) and "joined" not in _route_str(b)
    assert svc.reg.queued_tokens(svc.reg.workers["p"]) == 32
    # a long prompt does not join: it waits for the queued step, reported done below
    long_ = route(3, 600)
    await asyncio.wait_for(wait_for(lambda: svc.gate.held() == 1), 10)
    await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id,
                                            phase=pd_pb2.PHASE_PREFILL_DONE))
    assert svc.reg.queued_tokens(svc.reg.workers["p"]) == 0      # b and c started together
    for r in (b, c):
        await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                phase=pd_pb2.PHASE_PREFILL_DONE))
    d = await asyncio.wait_for(long_, 30)
    assert d.prefill.worker_id == "p" and d.held_ms > 0 and joined() == before + 1
    assert not d.joined
    for r in (a, b, c, d):
        await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                phase=pd_pb2.PHASE_DONE))
