"""The scheduler as a real gRPC server on loopback port 0."""

import asyncio
from dataclasses import replace

import grpc
import pytest

from scheduler.config import AutoscaleConfig, SchedulerConfig
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from tests.component.sched_helpers import reg, serving, steps, wait_for


@pytest.fixture
async def sched():
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=0.5)
    async with serving(cfg) as (stub, svc):
        reaper = asyncio.create_task(svc.reap_forever())
        yield stub
        reaper.cancel()


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


def layout_reg(wid, role, block_size=4):
    r = reg(wid, role)
    r.layout.block_size = block_size
    return r


async def test_kv_events_stream_makes_routing_prefix_aware_and_reports_roll_back(sched):
    from pdserve import kvhash
    await sched.Register(layout_reg("p1", pd_pb2.ROLE_PREFILL))
    await sched.Register(layout_reg("p2", pd_pb2.ROLE_PREFILL))
    await sched.Register(layout_reg("d1", pd_pb2.ROLE_DECODE))
    prompt = list(range(100, 141))                      # 10 full blocks of 4
    hashes = kvhash.block_hashes(prompt, 4)

    async def events():
        yield pd_pb2.KVEventBatch(worker_id="p2", snapshot=True, stored=hashes[:3])
        yield pd_pb2.KVEventBatch(worker_id="p2", stored=hashes[3:8], removed=[])
    ack = await sched.KVEvents(events())
    assert ack.batches == 2
    st = await sched.IndexStats(pd_pb2.IndexStatsRequest())
    assert st.blocks == 8 and dict(st.blocks_by_worker) == {"p2": 8}

    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=prompt))
    assert r.prefill.worker_id == "p2" and r.cached_tokens == 32
    assert r.mode == pd_pb2.ROUTE_MODE_DISAGG and r.booking_id
    ws = {w.worker_id: w for w in (await sched.ListWorkers(pd_pb2.ListWorkersRequest())).workers}
    assert ws["p2"].booked_prefill_tokens == len(prompt) - 32 and ws["p2"].blocks_indexed == 8
    assert (await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                    phase=pd_pb2.PHASE_FAILED))).known
    ws = {w.worker_id: w for w in (await sched.ListWorkers(pd_pb2.ListWorkersRequest())).workers}
    assert ws["p2"].inflight == 0 and ws["d1"].inflight == 0 and ws["p2"].booked_prefill_tokens == 0
    assert not (await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                        phase=pd_pb2.PHASE_DONE))).known
    # a removal moves the prompt elsewhere... once the index says p2 no longer has block 0
    async def removal():
        yield pd_pb2.KVEventBatch(worker_id="p2", removed=hashes[:1])
    await sched.KVEvents(removal())
    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=prompt))
    assert r.cached_tokens == 0
    st = await sched.IndexStats(pd_pb2.IndexStatsRequest())
    assert st.decisions["disagg:kv"] == 2 and st.lookups == 2

    # a deregistered worker's blocks leave the index
    await sched.Deregister(pd_pb2.DeregisterRequest(worker_id="p2"))
    st = await sched.IndexStats(pd_pb2.IndexStatsRequest())
    assert st.blocks == 0


async def test_drain_excludes_and_retry_excludes(sched):
    await sched.Register(layout_reg("p1", pd_pb2.ROLE_PREFILL))
    await sched.Register(layout_reg("p2", pd_pb2.ROLE_PREFILL))
    await sched.Register(layout_reg("d1", pd_pb2.ROLE_DECODE))
    dr = await sched.Drain(pd_pb2.DrainRequest(worker_id="p1", drain=True))
    assert dr.found
    hb = await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="p1"))
    assert hb.known and hb.draining
    for _ in range(3):
        r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=[1, 2, 3]))
        assert r.prefill.worker_id == "p2"
    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=[1, 2, 3],
                                              exclude_workers=["p2"]))
    # every prefill worker is draining or excluded: the decode worker prefills locally
    assert r.mode == pd_pb2.ROUTE_MODE_LOCAL and r.reason == "no_prefill_worker"
    assert not r.HasField("prefill")
    await sched.Drain(pd_pb2.DrainRequest(worker_id="p1", drain=False))
    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=[1, 2, 3],
                                              exclude_workers=["p2"]))
    assert r.prefill.worker_id == "p1"
    assert not (await sched.Drain(pd_pb2.DrainRequest(worker_id="ghost", drain=True))).found
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_kv_events_without_worker_id_is_invalid(sched):
    async def bad():
        yield pd_pb2.KVEventBatch(stored=[1])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sched.KVEvents(bad())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_engine_that_stopped_stepping_has_no_streams(sched):
    """The streams a decode worker's last step had are over once its heartbeats carry no
    steps: a local prefill there is then predicted alone, not beside them."""
    await sched.Register(reg("p", pd_pb2.ROLE_PREFILL))
    await sched.Register(reg("d", pd_pb2.ROLE_DECODE))
    warm = (steps(20, prefill=512, seconds=0.6) + steps(20, prefill=64, seconds=0.1)
            + steps(20, decode=1, ctx=500, seconds=0.03))
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="p", steps=warm))
    busy = steps(40, decode=8, ctx=8000, seconds=0.05)
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="d", steps=warm + busy))

    async def local_ttft():
        r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=list(range(600)),
                                                  max_tokens=32))
        await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                phase=pd_pb2.PHASE_FAILED))
        if r.mode == pd_pb2.ROUTE_MODE_LOCAL:
            return r.predicted_ttft_ms
        assert r.runner_up.startswith("local"), r.runner_up
        return float(r.runner_up.split("ttft_ms=")[1].split()[0])

    beside = await local_ttft()
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="d"))    # idle since
    alone = await local_ttft()
    assert alone < beside


@pytest.fixture
async def held_sched(request):
    from scheduler.policy import PlacementConfig
    factor = getattr(request, "param", 0.0)         # admission control: off unless given
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=30.0,
                          placement=PlacementConfig(admit_ttft_factor=factor))
    async with serving(cfg) as s:
        yield s


async def one_busy_prefill_worker(sched):
    """p prefills (a 600-token prompt: about 3.5 s by its model); d decodes with no room
    to prefill locally."""
    await sched.Register(reg("p", pd_pb2.ROLE_PREFILL))
    full = reg("d", pd_pb2.ROLE_DECODE)
    full.load.kv_usage, full.load.num_blocks = 0.99, 1000
    await sched.Register(full)
    warm = (steps(20, prefill=512, seconds=3.0) + steps(20, prefill=64, seconds=0.4)
            + steps(20, decode=1, ctx=500, seconds=0.03))
    for w in ("p", "d"):
        await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id=w, steps=warm, load=full.load
                                                      if w == "d" else None))

    def route(i):
        return asyncio.ensure_future(sched.Route(pd_pb2.RouteRequest(
            request_id=f"r{i}", model="m", token_ids=list(range(600)), max_tokens=8),
            timeout=60))
    return route


def held():
    from scheduler import metrics as SM
    return SM.SCHED_HELD._value.get()


async def test_late_binding_holds_requests_in_order_until_their_worker_frees(held_sched):
    """A request whose worker is busy with earlier prefills waits in the scheduler (not in
    the worker's queue), oldest first, and is placed once that worker reports its prefill
    done; a held request that is cancelled leaves nothing behind."""
    sched, svc = held_sched
    route = await one_busy_prefill_worker(sched)
    a = await route(0)
    assert a.prefill.worker_id == "p" and a.held_ms == 0
    b = route(1)
    await asyncio.wait_for(wait_for(lambda: held() == 1), 10)
    c = route(2)                                  # after b: held behind it
    await asyncio.wait_for(wait_for(lambda: held() == 2), 10)
    done, _ = await asyncio.wait([b, c], timeout=0.5)
    assert not done, "p's backlog is seconds long: both must still be held"
    await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id,
                                            phase=pd_pb2.PHASE_PREFILL_DONE))
    rb = await asyncio.wait_for(b, 10)
    assert rb.prefill.worker_id == "p" and rb.held_ms > 400 and not c.done()
    assert held() == 1
    await sched.Report(pd_pb2.ReportRequest(booking_id=rb.booking_id,
                                            phase=pd_pb2.PHASE_PREFILL_DONE))
    rc = await asyncio.wait_for(c, 10)
    assert rc.prefill.worker_id == "p" and rc.held_ms > 400
    # a held request cancelled by its caller leaves the queue
    d = route(3)
    await asyncio.wait_for(wait_for(lambda: held() == 1), 10)
    d.cancel()
    await asyncio.wait_for(wait_for(lambda: held() == 0 and not svc.gate.held()), 10)
    for r in (a, rb, rc):
        await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                                phase=pd_pb2.PHASE_DONE))
    e = await asyncio.wait_for(route(4), 10)       # nothing booked: placed at once
    assert e.held_ms == 0
    st = await sched.IndexStats(pd_pb2.IndexStatsRequest())
    assert sum(st.decisions.values()) == 4        # a, b, c, e: the cancelled one booked nothing


@pytest.mark.parametrize("held_sched", [3.5], indirect=True)
async def test_admission_counts_the_requests_held_ahead(held_sched):
    """TTFT SLO 2 s, refuse past 3.5 of it (plus a long prompt's own excess): b is
    forecast at a's backlog + its own prefill (about 7 s, admitted); c at the same plus
    b's prefill, held ahead of it (about 10.5 s): refused, though p's backlog alone
    would admit it."""
    sched, svc = held_sched
    route = await one_busy_prefill_worker(sched)
    a = await route(0)
    b = route(1)
    await asyncio.wait_for(wait_for(lambda: held() == 1), 10)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await route(2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "forecast TTFT" in e.value.details() and held() == 1
    await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id,
                                            phase=pd_pb2.PHASE_DONE))
    rb = await asyncio.wait_for(b, 10)
    assert rb.held_ms > 0 and held() == 0


async def test_held_requests_count_as_prefill_pressure_for_the_role_planner(held_sched):
    """Late binding keeps the prefill worker's own backlog short; the prefill work held in
    the scheduler is still prefill pressure (its predicted seconds over the workers that
    could take it)."""
    sched, svc = held_sched
    route = await one_busy_prefill_worker(sched)
    a = await route(0)
    now = svc.clock()
    alone = svc.signals(now).prefill_pressure
    b = route(1)
    await asyncio.wait_for(wait_for(lambda: held() == 1 and svc.gate.prefill_s), 10)
    with_held = svc.signals(svc.clock()).prefill_pressure
    own = next(iter(svc.gate.prefill_s.values()))
    assert own > 1.0 and with_held > alone + 0.8 * own / svc.slo.ttft_s, (alone, with_held)
    await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id, phase=pd_pb2.PHASE_DONE))
    await asyncio.wait_for(b, 10)


@pytest.mark.parametrize("order", ["deadline", "fifo"])
async def test_a_request_that_will_miss_its_ttft_slo_lets_the_next_one_go_first(order):
    """TTFT SLO 6 s; p is busy for about 3.5 s. b (a long prompt, predicted seconds over
    the SLO wherever it goes) was held first, c (a short one that can still make it)
    after it. With --hold-order deadline c is placed as soon as p frees and b right after
    it, its route saying `deferred`; in arrival order c waits for b's prefill too."""
    from scheduler.planner import PlannerConfig, PoolPolicy
    from scheduler.policy import PlacementConfig
    cfg = SchedulerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.1,
                          heartbeat_timeout_s=30.0,
                          placement=PlacementConfig(admit_ttft_factor=0.0, hold_order=order),
                          autoscale=AutoscaleConfig(planner=PlannerConfig(
                              prefill=PoolPolicy(target_ms=6000))))
    async with serving(cfg) as (sched, svc):
        await one_busy_prefill_worker(sched)

        def route(i, n):
            return asyncio.ensure_future(sched.Route(pd_pb2.RouteRequest(
                request_id=f"r{i}", model="m", token_ids=list(range(n)), max_tokens=8),
                timeout=60))
        a = await route(0, 600)
        b = route(1, 1500)
        await asyncio.wait_for(wait_for(lambda: svc.gate.held() == 1), 10)
        c = route(2, 64)
        await asyncio.wait_for(wait_for(lambda: svc.gate.held() == 2), 10)
        done, _ = await asyncio.wait([b, c], timeout=0.3)
        assert not done
        await sched.Report(pd_pb2.ReportRequest(booking_id=a.booking_id,
                                                phase=pd_pb2.PHASE_PREFILL_DONE))
        if order == "deadline":
            rc, rb = await asyncio.wait_for(asyncio.gather(c, b), 10)
            assert rc.reason == "slo" and rb.reason == "deferred", (rc.reason, rb.reason)
            assert rb.held_ms > rc.held_ms > 200          # b entered first, left last
            assert rb.predicted_ttft_ms > 6000 > rc.predicted_ttft_ms
        else:
            rb = await asyncio.wait_for(b, 10)
            assert rb.reason != "deferred"
            await asyncio.sleep(0.3)
            assert not c.done(), "in arrival order c waits for b's prefill"
            await sched.Report(pd_pb2.ReportRequest(booking_id=rb.booking_id,
                                                    phase=pd_pb2.PHASE_PREFILL_DONE))
            rc = await asyncio.wait_for(c, 10)
            assert rc.held_ms > rb.held_ms
        assert svc.gate.held() == 0 and not svc.gate._late


def spread(svc, n, coef_of=("d",), streams_of=("m", "d")):
    """The decode pressure with the recent streams of `streams_of` spread over n decoders,
    priced with the decode steps of `coef_of` (the decode worker's)."""
    now = svc.clock()
    seqs = sum(svc.book.recent_of(w, now).seqs for w in streams_of)
    ctx = sum(svc.book.recent_of(w, now).ctx for w in streams_of)
    return max(svc.book.coef(w, "m").decode_step(seqs / n, ctx / n)
               for w in coef_of) / (svc.slo.safety * svc.slo.tpot_s)


async def test_role_signals_leave_prompt_chunks_out_and_project_a_flip_back(held_sched):
    """Decode pressure is the streams' plain decode step over the allowance, not the whole
    step an engine fills with prompt chunks up to it; `decode_after` is that pressure with
    one decode-capable worker fewer; measured prefill latencies are prefill pressure."""
    sched, svc = held_sched
    await sched.Register(reg("m", pd_pb2.ROLE_MIXED))
    await sched.Register(reg("d", pd_pb2.ROLE_DECODE))
    allow = svc.slo.safety * svc.slo.tpot_s
    plain = 0.3 * allow                 # 4 streams' plain step
    warm = (steps(20, prefill=512, seconds=0.6) + steps(20, prefill=64, seconds=0.1)
            + steps(20, decode=1, ctx=500, seconds=0.2 * allow)
            + steps(20, decode=4, ctx=2000, seconds=plain))
    # prompt chunks beside the streams: whole steps at the allowance
    full = steps(256, prefill=256, decode=4, ctx=2000, seconds=allow)   # all it keeps
    for w in ("m", "d"):
        await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id=w, steps=warm + full))
    s = svc.signals(svc.clock())
    whole = svc.book.recent_of("d", svc.clock()).mean_step_s / allow
    assert whole > 0.8 and s.decode_pressure < 0.5, (whole, s)
    # 8 streams on one worker: more than the 4 on each, less than twice as slow
    assert s.decode_pressure < s.decode_after < 2 * s.decode_pressure, s
    # what one decoder more or fewer takes off or adds, from the fitted decode step
    assert s.decode_loss == pytest.approx(spread(svc, 1) - spread(svc, 2))
    assert s.decode_gain == pytest.approx(spread(svc, 2) - spread(svc, 3))
    assert 0 < s.decode_gain < s.decode_loss, s
    assert s.prefill_pressure == 0.0
    # a prompt computed 0.6 x the TTFT SLO after it was routed; the client's TTFT (what a
    # kept first token also waited for on the decode side) is not the prefill side's
    t = [svc.clock()]
    svc.clock = lambda: t[0]
    r = await sched.Route(pd_pb2.RouteRequest(model="m", token_ids=list(range(64)),
                                              max_tokens=8))
    t[0] += 0.6 * svc.slo.ttft_s
    await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                            phase=pd_pb2.PHASE_PREFILL_DONE))
    await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id, phase=pd_pb2.PHASE_DONE,
                                            ttft_ms=svc.slo.ttft_s * 900, tpot_ms=20,
                                            output_tokens=8))
    assert svc.signals(t[0]).prefill_pressure == pytest.approx(0.6)
    # with one decode-capable worker, none would be left to flip back to prefill
    await sched.Deregister(pd_pb2.DeregisterRequest(worker_id="d"))
    s = svc.signals(svc.clock())
    assert s.decode_after == s.decode_loss == float("inf") and s.decode_gain > 0, s


async def test_a_new_mixed_workers_prefill_steps_do_not_price_the_decoders_spread(held_sched):
    """Just made mixed, a prefill worker has run no stream: its engine's fixed part is a
    prefill step's and its decode terms are not its own. One decoder more or fewer is
    priced with the decode worker's steps (with the max over both, the flat prefill fit
    won and a mixed worker carrying half of twelve streams looked worth nothing)."""
    sched, svc = held_sched
    await sched.Register(reg("m", pd_pb2.ROLE_MIXED))
    await sched.Register(reg("d", pd_pb2.ROLE_DECODE))
    allow = svc.slo.safety * svc.slo.tpot_s
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="m", steps=(
        steps(20, prefill=512, seconds=2.0 * allow) + steps(20, prefill=64, seconds=1.6 * allow))))
    await sched.Heartbeat(pd_pb2.HeartbeatRequest(worker_id="d", steps=(
        steps(20, decode=2, ctx=1000, seconds=0.3 * allow)
        + steps(20, decode=12, ctx=6000, seconds=0.8 * allow))))
    s = svc.signals(svc.clock())
    loss = spread(svc, 1) - spread(svc, 2)
    assert s.decode_loss == pytest.approx(loss) and s.decode_loss > 0.1, s
    assert s.decode_gain == pytest.approx(spread(svc, 2) - spread(svc, 3)), s
    # once the streams' steps have left the recent window there is nothing to spread: a
    # mixed worker's decoding buys nothing (were it unknown, it would stay mixed)
    s = svc.signals(svc.clock() + 31)
    assert (s.decode_gain, s.decode_loss, s.decode_after) == (0.0, 0.0, 0.0), s


async def test_a_clean_stop_ends_open_kv_event_streams_without_an_error(caplog):
    """Workers keep their KV event stream open as long as they run. The scheduler ends
    those streams itself before its server stops: each caller gets its ack, and gRPC
    logs no unhandled cancellation (it did on every clean stop before)."""
    from scheduler.server import serve

    cfg = SchedulerConfig(host="127.0.0.1", port=0)
    ports: list[int] = []
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready=ports.append, stop=stop))
    while not ports:
        await asyncio.sleep(0.01)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
    sent = asyncio.Event()
    never = asyncio.Event()

    async def events():
        yield pd_pb2.KVEventBatch(worker_id="d1", snapshot=True)
        sent.set()
        await never.wait()        # a live worker: the stream stays open

    with caplog.at_level("INFO"):
        call = asyncio.ensure_future(pd_pb2_grpc.SchedulerStub(ch).KVEvents(events()))
        await asyncio.wait_for(sent.wait(), 5)
        for _ in range(500):           # the scheduler has taken the batch in
            if "KV index: snapshot" in caplog.text:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 10)
        ack = await asyncio.wait_for(call, 5)
    await ch.close()
    assert ack.batches == 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_kept_first_tokens_report_splits_its_ttft_and_teaches_the_handoff(held_sched):
    """A remote prefill whose first token waits for the stream: its report's TTFT is
    scored in two parts (the prefill worker's, and the handoff), and the handoff is learned
    for as many streams as the decode engine ran when the request was placed."""
    from scheduler import metrics as SM
    from scheduler.models import load_bucket

    def count(kind):
        return sum(s.value for m in SM.SCHED_PRED_ERROR.collect() for s in m.samples
                   if s.name.endswith("_count") and s.labels["kind"] == kind)
    sched, svc = held_sched
    # an SLO the kept token's handoff fits in: past it, the frontend sends the token
    # without its stream (adaptive.released), and no handoff is predicted in TTFT
    svc.slo = replace(svc.slo, ttft_s=10.0)
    route = await one_busy_prefill_worker(sched)
    svc.reg.workers["d"].kv_bytes_per_token = 20_000    # (its layout's, in a real worker)
    r = await route(0)
    assert r.mode == pd_pb2.ROUTE_MODE_DISAGG and r.hold_first_token
    b = svc.reg.bookings[r.booking_id]
    assert 0 < b.pred_handoff_s < b.pred_ttft_s and b.decode_streams >= 0
    before = count("ready"), count("handoff")
    await sched.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                            phase=pd_pb2.PHASE_PREFILL_DONE))
    await sched.Report(pd_pb2.ReportRequest(
        booking_id=r.booking_id, phase=pd_pb2.PHASE_DONE, ttft_ms=3800, first_held_ms=120,
        first_gap_ms=120, tpot_ms=30, output_tokens=8))
    assert (count("ready"), count("handoff")) == (before[0] + 1, before[1] + 1)
    assert len(svc.book.overs_at[("d", load_bucket(b.decode_streams))]) == 1
    # the prefill worker's first tokens: 3.68 s measured until it computed this one
    ready = b.pred_ttft_s - b.pred_handoff_s - b.pred_first_over_s
    assert list(svc.book.firsts[("p", "remote")]) == [pytest.approx(3.68 - ready)]
