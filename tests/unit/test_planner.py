"""The autoscaling planner: pure state machine, time as input."""

import pytest

from scheduler.planner import Planner, PlannerConfig, PlannerInput, PoolMetrics, PoolPolicy

CFG = PlannerConfig(prefill=PoolPolicy(target_ms=1000, min_replicas=1, max_replicas=4),
                    decode=PoolPolicy(target_ms=50, min_replicas=1, max_replicas=3),
                    up_cooldown_s=30, down_cooldown_s=60, down_ticks=3, warmup_grace_s=90)


def inp(now, p=1, d=1, ttft=500.0, tpot=30.0, age=1000.0):
    return PlannerInput(now=now, replicas={"prefill": p, "decode": d},
                        metrics={"prefill": PoolMetrics(ttft) if ttft is not None else None,
                                 "decode": PoolMetrics(tpot) if tpot is not None else None},
                        newest_replica_age_s={"prefill": age, "decode": age})


def test_a_ttft_spike_scales_prefill_only_and_respects_the_cooldown():
    pl = Planner(CFG)
    d = pl.tick(inp(0, ttft=2500))
    assert d.desired == {"prefill": 3, "decode": 1}        # ceil(1 * 2.5) = 3: +2 (max step)
    assert "scale up" in d.reasons["prefill"] and "within band" in d.reasons["decode"]
    d = pl.tick(inp(10, p=3, ttft=2500))
    assert d.desired["prefill"] == 3 and "cooldown" in d.reasons["prefill"]
    d = pl.tick(inp(31, p=3, ttft=2500))
    assert d.desired["prefill"] == 4                          # max 4


def test_a_tpot_spike_scales_decode_only():
    d = Planner(CFG).tick(inp(0, tpot=80))
    assert d.desired == {"prefill": 1, "decode": 2}


def test_a_lull_after_the_cooldown_scales_down_one_step_at_a_time():
    pl = Planner(CFG)
    pl.tick(inp(0, p=1, ttft=3000))                          # scale up at t=0 -> 3
    t, p = 100, 3
    downs = []
    for _ in range(12):
        d = pl.tick(inp(t, p=p, ttft=100))
        if d.desired["prefill"] < p:
            assert d.desired["prefill"] == p - 1               # one step
            downs.append(t)
        p = d.desired["prefill"]
        t += 10
    assert p == 1 and len(downs) == 2
    assert downs[1] - downs[0] >= CFG.down_cooldown_s


def test_a_short_lull_does_not_kill_a_freshly_warmed_replica():
    pl = Planner(CFG)
    for t in (200, 210, 220, 230):
        d = pl.tick(inp(t, p=2, ttft=100, age=30 + t - 200))
        assert d.desired["prefill"] == 2
    assert "warm-up grace" in d.reasons["prefill"]


def test_a_flapping_trace_does_not_flap():
    pl = Planner(CFG)
    p = 2
    ups = downs = 0
    for i in range(40):                                      # alternate high/low each tick
        ttft = 1500 if i % 2 == 0 else 200
        d = pl.tick(inp(100 + 10 * i, p=p, ttft=ttft))
        ups += d.desired["prefill"] > p
        downs += d.desired["prefill"] < p
        p = d.desired["prefill"]
    # a one-tick low never counts as a lull, so nothing is ever removed; ups stop at max
    assert downs == 0 and ups == 2 and p == 4


def test_min_max_and_missing_metrics():
    pl = Planner(CFG)
    d = pl.tick(inp(0, p=0, d=7, ttft=None, tpot=None))
    assert d.desired == {"prefill": 1, "decode": 3}
    assert all("bounds" in r for r in d.reasons.values())
    d = pl.tick(inp(100, p=2, d=2, ttft=None, tpot=None))
    assert d.desired == {"prefill": 2, "decode": 2}
    assert all("no metrics" in r for r in d.reasons.values())
    d = pl.tick(inp(200, p=1, ttft=10, tpot=1))
    assert d.desired == {"prefill": 1, "decode": 1}          # at min


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        PlannerConfig(down_ratio=1.2, up_ratio=1.0)
    with pytest.raises(ValueError):
        PoolPolicy(target_ms=0)


def test_actions_and_reason_codes_are_bounded():
    from scheduler.planner import REASONS
    pl = Planner(CFG)
    d = pl.tick(inp(0, ttft=2500, tpot=None))
    assert d.actions == {"prefill": "up", "decode": "hold"}
    assert d.codes == {"prefill": "slo_breach", "decode": "no_metrics"}
    assert set(d.codes.values()) <= set(REASONS)


def idle_inp(now, p=2, d=2, age=1000.0):
    return PlannerInput(now=now, replicas={"prefill": p, "decode": d},
                        metrics={"prefill": PoolMetrics(None), "decode": PoolMetrics(None)},
                        newest_replica_age_s={"prefill": age, "decode": age})


def test_an_idle_window_is_a_lull_but_queued_work_is_not():
    pl = Planner(CFG)
    # measured, no requests, nothing queued: idle counts as below the band
    for t in (0, 10):
        assert pl.tick(idle_inp(t)).desired == {"prefill": 2, "decode": 2}
    d = pl.tick(idle_inp(20))
    assert d.desired == {"prefill": 1, "decode": 1} and d.codes["prefill"] == "idle"
    # requests in flight but none finished in the window: hold, and the lull count resets
    pl = Planner(CFG)
    busy = PlannerInput(now=0, replicas={"prefill": 2, "decode": 2},
                        metrics={"prefill": PoolMetrics(None, queue_depth=5),
                                 "decode": PoolMetrics(None, request_rate=1.0)},
                        newest_replica_age_s={"prefill": 1000, "decode": 1000})
    for t in range(0, 100, 10):
        d = pl.tick(PlannerInput(t, busy.replicas, busy.metrics, busy.newest_replica_age_s))
        assert d.desired == {"prefill": 2, "decode": 2}
        assert d.codes == {"prefill": "in_flight", "decode": "in_flight"}


def test_sliding_window_percentiles_rates_and_expiry():
    from scheduler.planner import SlidingWindow
    w = SlidingWindow(10.0)
    assert w.percentile(0, 90) is None and w.rate(0) == 0
    for i in range(1, 11):          # values 1..10 at t=1..10
        w.add(float(i), float(i))
    assert w.percentile(10, 90) == 9.0      # nearest rank: ceil(0.9 * 10) = 9th
    assert w.percentile(10, 50) == 5.0
    assert w.percentile(10, 100) == 10.0
    assert w.rate(10) == 1.0 and w.mean(10) == 5.5
    assert w.values(15.5) == [6.0, 7.0, 8.0, 9.0, 10.0]   # t <= 5.5 fell out
    assert w.count(100) == 0
    with pytest.raises(ValueError):
        SlidingWindow(0)


def test_one_slow_request_in_a_quiet_window_is_not_a_breach():
    """A single TPOT sample over the SLO (say one short request right after a replica
    stopped) must not start a replica; the same p90 over enough samples does."""
    pl = Planner(CFG)

    def tick(now, n):
        return pl.tick(PlannerInput(now, {"prefill": 1, "decode": 1},
                                    {"prefill": PoolMetrics(None),
                                     "decode": PoolMetrics(80.0, samples=n, request_rate=0.2)},
                                    {"prefill": 1000, "decode": 1000}))
    for t, n in ((0, 1), (10, 2)):
        d = tick(t, n)
        assert d.actions["decode"] == "hold" and d.codes["decode"] == "few_samples"
        assert "fewer than 3" in d.reasons["decode"]
    d = tick(20, CFG.min_samples_up)
    assert d.actions["decode"] == "up" and d.codes["decode"] == "slo_breach"
    with pytest.raises(ValueError):
        PlannerConfig(min_samples_up=0)


def test_a_local_prefills_ttft_is_not_the_prefill_pools():
    """A decode worker that prefilled a request itself owns its TTFT: a decode burst served
    by local prefills must not scale the prefill pool (its TPOT still counts for decode)."""
    from scheduler.actuators import MetricsOnlyActuator
    from scheduler.autoscale import Autoscaler
    from scheduler.config import AutoscaleConfig
    from scheduler.state import Registry

    a = Autoscaler(AutoscaleConfig(mode="metrics", window_s=60), Registry(5.0),
                   MetricsOnlyActuator(), clock=lambda: 0.0)
    a.observe_report(1.0, ttft_ms=3000, tpot_ms=40, output_tokens=200, local=True)
    assert a.latency["prefill"].count(1.0) == 0 and a.latency["decode"].values(1.0) == [40]
    a.observe_report(2.0, ttft_ms=900, tpot_ms=30, output_tokens=200)
    assert a.latency["prefill"].values(2.0) == [900]
