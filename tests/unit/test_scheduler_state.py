"""Registry, placement, booking and rollback: pure, no network."""

import dataclasses
import random

import pytest

from scheduler.policy import PlacementConfig
from scheduler.placement import place
from scheduler.state import Load, NoPlacement, Registry, Worker

CFG = PlacementConfig()


def W(wid, role, model="m", compat="h", now=0.0, block_size=16, **load):
    load.setdefault("num_blocks", 100)
    load.setdefault("max_num_seqs", 8)
    return Worker(wid, role, f"addr-{wid}", f"agent-{wid}", model, compat, now, Load(**load),
                  block_size=block_size)


def reg(*workers, timeout=5.0, ttl=900.0):
    r = Registry(timeout, booking_ttl_s=ttl)
    for w in workers:
        r.register(w)
    return r


def no_cache(workers):
    return {}


def cache(**tokens):
    return lambda workers: {w.worker_id: tokens.get(w.worker_id, 0) for w in workers}


def test_least_loaded_pair():
    r = reg(W("p1", "prefill", running=3, prefill_tokens=300), W("p2", "prefill", running=1),
            W("d1", "decode", running=0), W("d2", "decode", running=4, kv_usage=0.5))
    d = place(r, CFG, "m", 100, no_cache)
    assert (d.prefill, d.decode, d.mode) == ("p2", "d1", "disagg")


def test_cached_prefix_wins_over_small_load_difference_but_not_over_a_big_one():
    r = reg(W("p1", "prefill", prefill_tokens=200), W("p2", "prefill"), W("d1", "decode"))
    d = place(r, CFG, "m", 1000, cache(p1=900))
    assert d.prefill == "p1" and d.cached_tokens == 900 and d.prefill_tokens == 100
    r.workers["p1"].load.prefill_tokens = 5000        # p1 is swamped: recomputing is faster
    d = place(r, CFG, "m", 1000, cache(p1=900))
    assert d.prefill == "p2" and d.cached_tokens == 0


def test_place_does_not_mutate_and_booking_spreads_then_rolls_back():
    r = reg(W("p1", "prefill"), W("p2", "prefill"), W("d1", "decode"), W("d2", "decode"))
    before = [(w.booked_requests, w.booked_prefill_tokens) for w in r.workers.values()]
    first = place(r, CFG, "m", 64, no_cache)
    assert place(r, CFG, "m", 64, no_cache) == first          # selection alone changes nothing
    assert [(w.booked_requests, w.booked_prefill_tokens) for w in r.workers.values()] == before
    b = r.book(first, now=0.0)
    assert r.workers[first.prefill].booked_prefill_tokens == 64
    second = place(r, CFG, "m", 64, no_cache)
    assert {first.prefill, second.prefill} == {"p1", "p2"}
    assert {first.decode, second.decode} == {"d1", "d2"}
    r.finish(b.booking_id)                                    # failed request: roll back
    assert [(w.booked_requests, w.booked_prefill_tokens) for w in r.workers.values()] == before
    assert place(r, CFG, "m", 64, no_cache) == first
    assert r.finish(b.booking_id) is None                     # idempotent


def test_prefill_done_releases_prefill_only_once():
    r = reg(W("p1", "prefill"), W("d1", "decode"))
    b = r.book(place(r, CFG, "m", 160, no_cache), now=0.0)
    p, d = r.workers["p1"], r.workers["d1"]
    assert (p.booked_requests, p.booked_prefill_tokens, d.booked_requests) == (1, 160, 1)
    assert d.booked_blocks == 160 // 16 + 1
    assert r.prefill_done(b.booking_id) and r.prefill_done(b.booking_id)
    assert (p.booked_requests, p.booked_prefill_tokens, d.booked_requests) == (0, 0, 1)
    r.finish(b.booking_id)
    assert (d.booked_requests, d.booked_blocks) == (0, 0)


def test_bookings_behind_work_in_progress_are_queued_until_it_ends():
    """A prompt booked while its worker computes another waits in the engine's queue with
    every other booked so: they start together when the work in progress ends."""
    r = reg(W("p1", "prefill"), W("d1", "decode"))
    d = dataclasses.replace(place(r, CFG, "m", 160, no_cache), prefill_s=0.4)
    p = r.workers["p1"]
    first = r.book(d, now=0.0)                      # the worker was free: it starts now
    assert not first.queued and r.queued_on(p) == [] and r.queued_tokens(p) == 0
    second, third = r.book(d, now=0.3), r.book(d, now=0.35)
    assert second.queued and third.queued and r.queued_tokens(p) == 320
    assert r.backlog(p, 0.35) == pytest.approx(0.85)
    assert r.started_backlog(p, 0.35) == pytest.approx(0.05)    # what the queued wait for
    assert r.queued_on(p) == [second, third]
    r.prefill_done(first.booking_id, now=0.4)        # the engine's next step takes both
    assert not second.queued and not third.queued and r.queued_on(p) == []
    assert r.started_backlog(p, 0.4) == r.backlog(p, 0.4) == pytest.approx(0.8)
    r.finish(second.booking_id, now=0.5)
    fourth = r.book(d, now=0.5)
    assert fourth.queued and r.queued_tokens(p) == 160


def test_a_short_prompt_joins_the_queued_ones_only_on_a_worker_with_no_stream():
    from pdserve.latency import Coef
    c = Coef(step=0.057, prefill_ktok=0.52)          # 40 tokens: 21 ms beside 57
    r = reg(W("p1", "prefill", max_num_batched_tokens=2048), W("d1", "decode"))
    d = dataclasses.replace(place(r, CFG, "m", 40, no_cache), prefill_s=0.078)
    p = r.workers["p1"]
    assert r.join_backlog(p, 0.0, c, 40, 1.0) is None           # nothing queued
    r.book(d, now=0.0)
    r.book(d, now=0.06)                               # queued behind the first
    wait, backlog = r.join_backlog(p, 0.07, c, 40, 1.0)
    assert wait == pytest.approx(0.008) and backlog == pytest.approx(0.008 + 0.0208)
    assert r.join_backlog(p, 0.07, c, 400, 1.0) is None         # a long prompt waits
    # the queued one is due in 90 ms: on time after 86, not after 107
    assert r.join_backlog(p, 0.07, c, 40, 0.1) is None
    p.booked_streams = 1                              # a worker with streams: never
    assert r.join_backlog(p, 0.07, c, 40, 1.0) is None


def test_bookings_of_a_vanished_frontend_expire():
    r = reg(W("p1", "prefill"), W("d1", "decode"), ttl=10.0)
    r.book(place(r, CFG, "m", 50, no_cache), now=0.0)
    assert r.expire_bookings(now=5.0) == []
    assert len(r.expire_bookings(now=11.0)) == 1
    assert r.workers["p1"].booked_requests == 0 and not r.bookings


def test_load_is_the_larger_of_reported_and_booked():
    r = reg(W("p1", "prefill"), W("d1", "decode", num_blocks=10))
    r.book(place(r, CFG, "m", 50, no_cache), now=0.0)
    p, d = r.workers["p1"], r.workers["d1"]
    assert p.queued_prefill_tokens() == 50 and d.running() == 1
    r.heartbeat("p1", Load(prefill_tokens=500, running=3), now=1.0)
    assert p.queued_prefill_tokens() == 500 and p.running() == 3
    assert d.kv_usage() == pytest.approx((50 // 16 + 2) / 10)


def test_a_finished_phase_leaves_the_last_heartbeat_too():
    # the heartbeat saw request 1 in flight; its report must not leave it counted for a
    # whole heartbeat interval (a cached prompt would go elsewhere meanwhile)
    r = reg(W("p1", "prefill"), W("p2", "prefill"), W("d1", "decode"))
    b = r.book(place(r, CFG, "m", 680, cache(p1=0)), now=0.0)
    assert b.prefill == "p1"
    r.heartbeat("p1", Load(prefill_tokens=680, running=1, num_blocks=100), now=0.5)
    assert place(r, CFG, "m", 670, cache(p1=640)).prefill == "p2"     # p1 is busy
    r.prefill_done(b.booking_id)
    assert r.workers["p1"].queued_prefill_tokens() == 0
    d = place(r, CFG, "m", 670, cache(p1=640))
    assert d.prefill == "p1" and d.cached_tokens == 640
    r.heartbeat("d1", Load(running=3), now=0.5)
    r.finish(b.booking_id)
    assert r.workers["d1"].load.running == 2


def test_reregistration_keeps_bookings_and_drain():
    r = reg(W("p1", "prefill"), W("d1", "decode"))
    r.book(place(r, CFG, "m", 50, no_cache), now=0.0)
    r.workers["p1"].draining = True
    r.register(W("p1", "prefill"))
    assert r.workers["p1"].booked_requests == 1 and r.workers["p1"].draining


def test_draining_and_excluded_workers_get_no_new_requests():
    r = reg(W("p1", "prefill"), W("p2", "prefill", running=5), W("d1", "decode"))
    r.workers["p1"].draining = True
    assert place(r, CFG, "m", 10, no_cache).prefill == "p2"
    # no decode worker left: the live prefill worker serves whole requests (overflow's
    # fallback, tests/unit/test_overflow.py), unless overflow is off
    d = place(r, CFG, "m", 10, no_cache, exclude=frozenset({"d1"}))
    assert (d.prefill, d.decode, d.reason) == (None, "p2", "no_decode_worker")
    with pytest.raises(NoPlacement, match="no decode"):
        place(r, PlacementConfig(overflow="off"), "m", 10, no_cache, exclude=frozenset({"d1"}))


def test_heartbeat_and_expiry():
    r = reg(W("p1", "prefill", now=0.0), W("d1", "decode", now=0.0), timeout=5.0)
    assert r.heartbeat("ghost", Load(), now=1.0) is None
    r.heartbeat("d1", Load(), now=4.0)
    assert [w.worker_id for w in r.expire(now=6.0)] == ["p1"]
    # no prefill worker left: the decode worker prefills locally (availability fallback)
    d = place(r, CFG, "m", 10, no_cache)
    assert (d.prefill, d.decode, d.mode, d.reason) == (None, "d1", "local", "no_prefill_worker")
    with pytest.raises(NoPlacement, match="no prefill|KV-compatible"):
        place(r, PlacementConfig(local_fallback=False), "m", 10, no_cache)


def test_model_and_kv_compatibility_filter():
    r = reg(W("p1", "prefill", compat="A"), W("d1", "decode", compat="B"))
    with pytest.raises(NoPlacement):
        place(r, PlacementConfig(local_fallback=False), "m", 10, no_cache)
    r.register(W("d2", "decode", compat="A"))
    d = place(r, CFG, "m", 10, no_cache)
    assert (d.prefill, d.decode) == ("p1", "d2")
    with pytest.raises(NoPlacement, match="no decode"):
        place(r, CFG, "other-model", 10, no_cache)


def test_conditional_disaggregation():
    cfg = PlacementConfig(local_prefill_max_tokens=100)
    r = reg(W("p1", "prefill"), W("d1", "decode"))
    assert place(r, cfg, "m", 80, no_cache).reason == "short_prompt"
    d = place(r, cfg, "m", 1000, no_cache)
    assert d.mode == "disagg"
    # the decode worker holds most of this prompt: only 50 tokens are left to compute
    d = place(r, cfg, "m", 1000, cache(d1=950))
    assert (d.mode, d.prefill_tokens, d.cached_tokens) == ("local", 50, 950)
    sat = PlacementConfig(prefill_saturation_tokens=4000)
    r.heartbeat("p1", Load(prefill_tokens=5000), now=0.0)
    assert place(r, sat, "m", 1000, no_cache).reason == "prefill_saturated"
    r.heartbeat("d1", Load(kv_usage=0.9, num_blocks=100, max_num_seqs=8), now=0.0)
    assert place(r, sat, "m", 1000, no_cache).mode == "disagg"   # decode has no room


def test_round_robin_and_temperature():
    r = reg(W("p1", "prefill"), W("p2", "prefill"), W("d1", "decode"))
    rr = PlacementConfig(policy="round_robin")
    picks = []
    for _ in range(4):
        d = place(r, rr, "m", 10, cache(p1=10))
        r.finish(r.book(d, 0.0).booking_id)
        picks.append(d.prefill)
    assert picks == ["p2", "p1", "p2", "p1"] or picks == ["p1", "p2", "p1", "p2"]
    hot = PlacementConfig(temperature=5.0)
    rng = random.Random(0)
    seen = {place(r, hot, "m", 100, cache(p1=50), rng=rng).prefill for _ in range(50)}
    assert seen == {"p1", "p2"}
    cold = {place(r, CFG, "m", 100, cache(p1=50), rng=rng).prefill for _ in range(20)}
    assert cold == {"p1"}


def test_decode_prefers_low_kv_usage_and_fast_tpot():
    r = reg(W("p1", "prefill"), W("d1", "decode", kv_usage=0.6), W("d2", "decode", kv_usage=0.1))
    assert place(r, CFG, "m", 10, no_cache).decode == "d2"
    r.heartbeat("d2", Load(kv_usage=0.1, tpot_ms=90, num_blocks=100, max_num_seqs=8), 0.0)
    r.heartbeat("d1", Load(kv_usage=0.6, tpot_ms=30, num_blocks=100, max_num_seqs=8), 0.0)
    assert place(r, CFG, "m", 10, no_cache).decode == "d1"    # d2's TPOT trend is 3x worse


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        PlacementConfig(policy="random")


def test_the_slack_a_local_prompt_took_counts_until_the_next_heartbeat():
    """A decode worker's reported allowance is up to a heartbeat old: the prompts it
    computed for itself since took slack the report does not show. Remote prefills take
    none of its slack."""
    r = reg(W("p", "prefill"), W("d", "decode", step_allow_ms=990.0))
    assert r.workers["d"].allow_s() == pytest.approx(0.99)
    local = dataclasses.replace(place(r, PlacementConfig(policy="round_robin"), "m", 1000,
                                      no_cache), prefill=None, mode="local", prefill_s=0.8)
    remote = dataclasses.replace(local, prefill="p", mode="disagg", prefill_s=0.3)
    b_local, b_remote = r.book(local, 1.0), r.book(remote, 1.0)
    r.prefill_done(b_remote.booking_id, 1.2)
    assert r.workers["d"].allow_s() == pytest.approx(0.99)
    r.prefill_done(b_local.booking_id, 1.9)
    r.prefill_done(b_local.booking_id, 1.95)      # reported twice: counted once
    assert r.workers["d"].allow_s() == pytest.approx(0.19)
    r.heartbeat("d", Load(step_allow_ms=250.0), 2.0)   # the engine's own figure again
    assert r.workers["d"].allow_s() == pytest.approx(0.25)
    r.heartbeat("d", Load(), 3.0)                      # no stream running
    assert r.workers["d"].allow_s() == float("inf")
