"""Adaptive placement (scheduler/adaptive.py through scheduler/placement.py) and role changes
in the registry: predictions, the choice, draining. The role planner's own tests are
tests/unit/test_roles.py.
Pure: no network, no engines, time passed in."""

import math
from dataclasses import replace

import pytest

from pdserve.latency import Coef, StepSample, chunk_attn
from scheduler import adaptive as A
from scheduler import ranking as R
from scheduler.models import LatencyBook
from scheduler.policy import Decision, PlacementConfig
from scheduler.placement import place
from scheduler.state import Registry
from tests.unit.adaptive_helpers import CFG, SLO, C, W, no_cache, warm_book


def test_idle_cluster_disaggregates_and_predicts_ttft_from_the_fit():
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    book = warm_book("p", "d")
    d = place(r, CFG, "m", 1000, no_cache, book=book, slo=SLO, max_tokens=64, now=10.0)
    assert (d.mode, d.prefill, d.decode) == ("disagg", "p", "d")
    assert d.reason == "slo"
    assert d.pred_ttft_s == pytest.approx(C.prefill_time(1000), rel=0.05)
    # a decode step with one stream, plus the interference its engine's history shows:
    # one stream step in five also computed 256 prompt tokens
    base = C.decode_step(1, 1000 + 32)
    rec = book.recent_of("d", 10.0)
    assert rec.prefill_frac == pytest.approx(1 / 5)
    assert rec.excess_s == pytest.approx(C.step_time(256, chunk_attn(256, 0)) / 5 - C.step / 5,
                                         rel=0.05)
    assert book.recent_of("d", 100.0).stream_steps == 0     # old steps are forgotten
    assert d.pred_tpot_s == pytest.approx(base + rec.excess_s, rel=0.05)
    assert d.runner_up.startswith("local decode=d")


def test_long_prefill_queue_sends_the_next_prompt_to_the_idle_decode_engine():
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    book = warm_book("p", "d")
    now = 10.0
    for _ in range(3):   # three 1,000-token prompts queue on the prefill worker (3 s)
        d = place(r, CFG, "m", 1000, no_cache, book=book, slo=SLO, max_tokens=64, now=now)
        r.book(d, now)
    assert r.backlog(r.workers["p"], now) > 1.5
    modes = [b.prefill for b in r.bookings.values()]
    assert None in modes                        # at least one went local...
    d = place(r, CFG, "m", 1000, no_cache, book=book, slo=SLO, max_tokens=64, now=now)
    assert d.pred_ttft_s < 3.0                  # ...and the next one is predicted in SLO
    # the prefill worker reports one done: its backlog is what is left of the rest
    b0 = next(b for b in r.bookings.values() if b.prefill == "p")
    r.prefill_done(b0.booking_id, now + 1.0)
    left = sum(b.prefill_s for b in r.bookings.values() if b.prefill == "p" and not b.prefill_done)
    assert r.backlog(r.workers["p"], now + 1.0) == pytest.approx(left)


def test_local_prefill_beside_streams_is_chunked_and_slower():
    book = warm_book("d")
    coef = book.coef("d", "m")
    quiet = A.Node("d", coef)
    busy = A.Node("d", coef, streams=8, ctx=8000, allow_s=0.09)
    t0, ch0 = A.prefill_on(quiet, 1000, SLO)
    t1, ch1 = A.prefill_on(busy, 1000, SLO)
    assert ch0 == 0 and 0 < ch1 < 1000 and t1 > t0
    # a local prefill with no stream still goes in SLO-sized steps, at little cost
    tl, chl = A.prefill_on(quiet, 1000, SLO, local=True)
    assert 0 < chl < 1000 and t0 < tl < t0 * 1.05
    # each chunked step stays within the streams' allowance
    assert coef.step_time(ch1, 0, 8, 8000) <= 0.09 * 1.001


def test_with_a_floor_of_zero_a_local_prompt_waits_for_streams_with_no_room_to_end():
    """An engine with PDSERVE_STEP_FLOOR=0 computes no prompt token beside streams where
    not one fits within safety * SLO: the prediction waits for them to end, then goes in
    `alone` chunks; with the default floor it crawls one token a step meanwhile."""
    cpu = Coef(step=0.075, prefill_ktok=5.0, mixed=0.027)
    slo0 = A.SLO(ttft_s=12.0, tpot_s=0.088, least=0, first_token="early")
    slo1 = A.SLO(ttft_s=12.0, tpot_s=0.088, first_token="early")
    n = A.Node("d", cpu, streams=1, ctx=600, streams_at=((0.0, 2.0, 1, 600),))
    alone = A.Node("d", cpu)
    t0, first0 = A.prefill_on(n, 512, slo0, local=True)
    t1, first1 = A.prefill_on(n, 512, slo1, local=True)
    t_alone, first_alone = A.prefill_on(alone, 512, slo0, local=True)
    assert t0 == pytest.approx(2.0 + t_alone) and first0 == first_alone
    assert first1 == 1 and t1 > t0 - 2.0
    # streams with no known end: one token a step, as with the default floor
    forever = A.Node("d", cpu, streams=1, ctx=600)
    assert A.prefill_on(forever, 64, slo0, local=True) == A.prefill_on(forever, 64, slo1,
                                                                      local=True)


def test_the_slack_streams_have_now_is_one_step_and_the_floor_follows():
    """The engine hands the streams' slack now (`allow_s`) to one step of the prompt and
    then steps at the floor until they end (a step trace on an AVX-512 host: a 279-token
    step taking a stream's 163 ms, then 16-token steps). The plan batched steps of the
    slack's size up to the streams' end, which forecast a 1,024-token prompt at 660 ms
    that took 1,102."""
    ends = ((0.0, 3.0, 2, 1000),)
    floor = 16
    some = A.Node("d", C, streams=2, ctx=1000, allow_s=0.2, streams_at=ends)
    t, first = A.prefill_on(some, 1000, SLO, local=True)
    assert floor < first < 1000
    assert t == pytest.approx(C.step_time(first, chunk_attn(first, 0), 2, 1000)
                              + C.steps_time(1000 - first, floor, first, 2, 1000), rel=0.01)
    # the old plan: steps of the slack's size until the streams end (about 0.7 of that)
    assert t > C.steps_time(1000, first, 0, 2, 1000) / 0.8


def test_booked_streams_that_have_not_landed_leave_the_decode_engine_free_until_then():
    """Requests queued on the prefill worker are booked on the decode engine, but their
    streams start only when their prefill ends: until then a local prefill runs alone.
    Counting them as streams running now (the first version) predicted the local option at
    the floor's pace exactly when the prefill queue made it worth taking."""
    cpu = Coef(step=0.11, prefill_ktok=5.0, decode_seq=0.03)
    slo = A.SLO(ttft_s=12.0, tpot_s=0.2, first_token="early")
    # three short streams (8 tokens at ~0.15 s) land as the prefill worker ends each prompt
    later = tuple((s, s + 7 * 0.15, 1, 600) for s in (4.0, 7.0, 10.0))
    free = A.Node("d", cpu, streams=3, ctx=1800, streams_at=later)
    forever = A.Node("d", cpu, streams=3, ctx=1800)      # no timeline: streams for good
    alone = A.Node("d", cpu)
    t_free, _ = A.prefill_on(free, 512, slo, local=True)
    t_alone, _ = A.prefill_on(alone, 512, slo, local=True)
    t_forever, _ = A.prefill_on(forever, 512, slo, local=True)
    assert t_free == pytest.approx(t_alone, rel=0.02)     # it ends before the first lands
    assert t_forever > 3 * t_alone
    # a stream landing mid-prompt slows it only while it runs
    mid = A.Node("d", cpu, streams=1, ctx=600, streams_at=((1.0, 2.0, 1, 600),))
    t_mid, first = A.prefill_on(mid, 512, slo, local=True)
    assert t_alone < t_mid < t_alone + 1.0 + 0.3
    assert 0 < A.prefill_on(mid, 512, slo, local=True)[1] < 512     # alone chunks first
    beside = A.Node("d", cpu, streams=1, ctx=600, streams_at=((0.0, 2.0, 1, 600),))
    t_beside, first = A.prefill_on(beside, 512, slo, local=True)
    assert t_beside > t_mid and 1 <= first < 16
    # beside streams each step stays within safety * SLO
    assert cpu.step_time(first, 0, 1, 600) <= 0.9 * slo.tpot_s
    # the prefill worker's queue is 4 s deep: the decode engine takes the prompt
    p = A.Node("p", cpu, backlog_s=4.0)
    opts = A.options([p], [free], 512, 8, slo, {"d"})
    assert opts[0].kind == "local" and opts[0].ttft_s < opts[1].ttft_s


def test_streams_whose_slack_is_spent_hold_a_prompt_to_the_floor_until_they_end():
    """The engine hands the streams' slack out first come first served, then steps at the
    floor (pdserve/step_budget.py): a prompt that finds the slack of the streams decoding
    now spent goes at the floor until they end, not at the long-run pace of steps of
    safety * SLO (under a TPOT SLO ten times the decode step, that pace is 80 prompt
    tokens a step, the floor 16)."""
    ends = ((0.0, 3.0, 2, 1000),)
    spent = A.Node("d", C, streams=2, ctx=1000, allow_s=0.02, streams_at=ends)
    floor = 16
    t, first = A.prefill_on(spent, 1000, SLO, local=True)
    assert first == floor
    assert t == pytest.approx(C.steps_time(1000, floor, 0, 2, 1000), rel=0.01)
    # with the slack they have now the first step takes the whole prompt
    rich = replace(spent, allow_s=2.0)
    t_rich, first_rich = A.prefill_on(rich, 1000, SLO, local=True)
    assert first_rich == 0
    assert t_rich == pytest.approx(C.step_time(1000, chunk_attn(1000, 0), 2, 1000))
    # streams that end sooner free the engine sooner: then the long-run pace
    soon = replace(spent, streams_at=((0.0, 0.3, 2, 1000),))
    t_soon, _ = A.prefill_on(soon, 1000, SLO, local=True)
    assert t_soon < t
    # behind a booked prompt the slack is that prompt's: the floor from the start
    behind = replace(rich, backlog_s=0.5)
    assert A.prefill_on(behind, 1000, SLO, local=True)[1] == floor
    # late streams keep no slack, and streams with no known end (another frontend's) are
    # predicted at the long-run pace, as before
    late = replace(spent, streams_at=((0.0, 3.0, 2, 1000, True),))
    assert A.prefill_on(late, 1000, SLO, local=True)[0] < 0.8 * t
    forever = replace(spent, streams_at=())
    t_forever, first_forever = A.prefill_on(forever, 1000, SLO, local=True)
    assert first_forever > floor and t_forever < t


def test_the_registry_times_each_booked_stream_from_the_end_of_its_prefill():
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    now = 10.0
    for _ in range(3):
        r.book(Decision("p", "d", "disagg", "slo", 1000, 0, 64, 1000, prefill_s=1.0,
                        pred_tpot_s=0.05, out_tokens=9), now)
    r.book(Decision(None, "d", "local", "slo", 200, 0, 16, 200, prefill_s=0.5,
                    pred_tpot_s=0.05, out_tokens=3), now)
    ends = r.prefill_ends(now)
    assert sorted(ends.values()) == pytest.approx([0.5, 1.0, 2.0, 3.0])
    got = sorted(r.timelines(now, 0.1)["d"])
    want = [(0.5, 0.6, 1, 201.5, 0), (1.0, 1.4, 1, 1004.5, 0), (2.0, 2.4, 1, 1004.5, 0),
            (3.0, 3.4, 1, 1004.5, 0)]
    assert [x for g in got for x in g] == pytest.approx([x for w in want for x in w])
    # with a TTFT SLO of 2.5 s, the streams whose prefill ends later than that are late
    # (their first token comes after it: their engine keeps no slack for them)
    assert [g[4] for g in sorted(r.timelines(now, 0.1, 2.5)["d"])] == [
        False, False, False, True]
    # the first remote prefill is done at 10.8: it decodes from then on
    first = next(iter(r.bookings))
    r.prefill_done(first, 10.8)
    got = sorted(r.timelines(10.8, 0.1)["d"])
    assert any(list(x[:4]) == pytest.approx([0.0, 0.4, 1, 1004.5]) for x in got)
    # one running past its predicted end still holds the engine for a step
    late = r.timelines(20.0, 0.1)["d"]
    assert any(list(x[:4]) == pytest.approx([0.0, 0.05, 1, 1004.5]) for x in late)
    # streams the engine reports and no booking explains run for good
    other = W("o", "decode")
    other.step_decode_seqs, other.step_decode_ctx = 2, 900
    r.register(other)
    assert r.timelines(now, 0.1)["o"] == ((0.0, math.inf, 2, 900),)


def test_best_effort_when_nothing_meets_the_slo_and_the_header_names_the_runner_up():
    p = A.Node("p", C, backlog_s=10.0)
    d = A.Node("d", C, backlog_s=9.0)
    opts = A.options([p], [d], 1000, 64, replace(SLO, late_remote=False), {"d"})
    assert opts[0].score < 0 and R.reason(opts[0]) == "best_effort"
    assert opts[0].kind == "local"              # 9 s of backlog beats 10 s
    assert "remote prefill=p" in opts[1].describe()
    # by default a request late whatever it does is computed remotely
    opts = A.options([p], [d], 1000, 64, SLO, {"d"})
    assert [o.kind for o in opts] == ["remote", "local"]
    assert R.reason(opts[0]) == "best_effort" and "local decode=d" in opts[1].describe()


def test_near_ties_go_to_remote():
    p, d = A.Node("p", C, backlog_s=0.03), A.Node("d", C, transfer_s=0.001)
    opts = A.options([p], [d], 500, 64, SLO, {"d"})
    assert [o.kind for o in opts] == ["remote", "local"]
    assert opts[1].ttft_s < opts[0].ttft_s      # local is a little faster, not enough


def test_a_held_request_counts_its_wait_in_what_meets_the_slos():
    """Scores count from now; a request held (late binding) has waited already. A near
    tie goes remote, but held so long that only the faster local option still makes the
    TTFT SLO with the margin an option must keep, it goes local; held past the SLO, its
    route says it is best effort."""
    p, d = A.Node("p", C, backlog_s=0.03), A.Node("d", C, transfer_s=0.001)
    fresh = A.options([p], [d], 500, 64, SLO, {"d"})
    assert [o.kind for o in fresh] == ["remote", "local"]
    r, lo = fresh[0].ttft_s, fresh[1].ttft_s
    held = (1 - A.MARGIN) * SLO.ttft_s - (r + lo) / 2
    opts = A.options([p], [d], 500, 64, SLO, {"d"}, held_s=held)
    assert [o.kind for o in opts] == ["local", "remote"]
    assert R.reason(opts[0], SLO, held) == "slo"
    # held past the SLO: every option misses; remote first (a request late whatever it
    # does), or in the order of their scores from now (PDSERVE_LATE_PREFILL=local)
    late = A.options([p], [d], 500, 64, SLO, {"d"}, held_s=SLO.ttft_s)
    assert [o.kind for o in late] == ["remote", "local"]
    assert R.reason(late[0], SLO, SLO.ttft_s) == "best_effort"
    before = replace(SLO, late_remote=False)
    late = A.options([p], [d], 500, 64, before, {"d"}, held_s=SLO.ttft_s)
    assert late[0].score >= late[1].score


def test_a_prefill_queue_overflows_to_the_decode_engine_while_its_streams_afford_it():
    # 2 s queued on the prefill worker: the idle decode engine starts the prompt at once
    p, d = A.Node("p", C, backlog_s=2.0), A.Node("d", C)
    opts = A.options([p], [d], 500, 64, SLO, {"d"})
    assert [o.kind for o in opts] == ["local", "remote"] and opts[0].score > 0
    # the same queue with eight streams on the decode engine and no slack left in them:
    # even the smallest chunk would push their steps past the allowance, so remote
    busy = A.Node("d", C, streams=8, ctx=8000, allow_s=C.decode_step(8, 8000))
    opts = A.options([p], [busy], 500, 64, SLO, {"d"})
    assert [o.kind for o in opts] == ["remote", "local"] and opts[1].score < A.MARGIN


def test_equally_good_prefill_workers_share_the_load():
    r = Registry(5.0)
    for w in (W("p1", "prefill"), W("p2", "prefill"), W("d", "decode")):
        r.register(w)
    book = warm_book("p1", "p2", "d")
    got = []
    for _ in range(6):
        d = place(r, CFG, "m", 200, no_cache, book=book, slo=SLO, max_tokens=16, now=1.0)
        r.book(d, 1.0)
        got.append(d.prefill)
    assert abs(got.count("p1") - got.count("p2")) <= 1 and got.count("p1") >= 2


def test_cold_model_falls_back_to_the_costs():
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    d = place(r, CFG, "m", 1000, no_cache, book=LatencyBook(), slo=SLO, now=1.0)
    assert (d.mode, d.reason, d.pred_ttft_s) == ("disagg", "kv", 0.0)


def test_a_prefill_worker_that_only_prefills_keeps_its_place_in_the_choice():
    """A prefill worker's engine computes prompts and decodes nothing after its warm-up:
    its fit stays warm however long that lasts (the faded count of decode steps fell
    under the bar once, after 1,700 prompt steps here, and the worker dropped out of the
    adaptive choice: no remote option, the fixed rules' route)."""
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    book = warm_book("p", "d")
    prompt = StepSample(C.step_time(512, chunk_attn(512, 0)), 512, chunk_attn(512, 0))
    for i in range(60):
        book.observe_steps("p", "m", [prompt] * 50, now=10.0 + i)
    book.observe_steps("d", "m", [StepSample(C.decode_step(2, 1000), 0, 0.0, 2, 1000)],
                       now=70.0)
    d = place(r, CFG, "m", 1000, no_cache, book=book, slo=SLO, max_tokens=64, now=70.0)
    assert (d.mode, d.prefill, d.reason) == ("disagg", "p", "slo")
    assert d.pred_ttft_s == pytest.approx(C.prefill_time(1000), rel=0.05)


def test_new_worker_borrows_its_pools_fit():
    book = warm_book("old")
    assert book.coef("new", "m") is not None   # same model: the pool's coefficients
    assert book.coef("new", "other-model") is None
    # a new worker's few slow warm-up steps do not count until it has enough of its own
    slow = Coef.of([3 * c for c in C.as_list()])
    book.observe_steps("new", "m", [StepSample(slow.decode_step(1, 500), 0, 0.0, 1, 500)] * 5)
    assert book.coef("new", "m").decode_step(1, 500) == pytest.approx(
        book.coef("old", "m").decode_step(1, 500), rel=0.05)


# ------------------------------------------------------ role changes in the registry

def test_gaining_work_flips_at_once_losing_work_drains_first():
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode"), W("d2", "decode")):
        r.register(w)
    book = warm_book("p", "d", "d2")
    assert r.set_role("p", "mixed", 1.0).role == "mixed"      # gains work: no drain
    assert r.workers["p"].role_changes == 1
    # a request decodes on d; then d is asked to become a prefill worker
    dec = place(r, CFG, "m", 100, no_cache, book=book, slo=SLO, exclude=frozenset({"p", "d2"}),
                now=2.0)
    b = r.book(dec, 2.0)
    assert b.decode == "d"
    w = r.set_role("d", "prefill", 3.0)
    assert (w.role, w.pending_role) == ("decode", "prefill")
    # while it drains it gets no new decode work
    for _ in range(5):
        dd = place(r, CFG, "m", 100, no_cache, book=book, slo=SLO, now=3.0)
        assert dd.decode != "d"
    assert r.settle_roles(4.0) == []                           # still decoding b
    r.finish(b.booking_id, 5.0)
    assert [x.worker_id for x in r.settle_roles(5.0)] == ["d"]
    assert (r.workers["d"].role, r.workers["d"].pending_role) == ("prefill", "")
    # a re-registration (the worker heard its new role) keeps the scheduler's role
    r.register(W("d", "prefill"))
    assert r.workers["d"].role == "prefill" and r.workers["d"].role_changes == 1
    assert {w.worker_id for w in r.live("prefill")} == {"p", "d"}
    assert {w.worker_id for w in r.live("decode")} == {"p", "d2"}


def test_node_allowance_is_infinite_without_streams():
    n = A.Node("d", C)
    assert math.isinf(n.allow_s) and A.prefill_on(n, 100, SLO)[1] == 0


def test_the_handoff_is_the_first_gap_beyond_the_other_gaps():
    from scheduler.models import MIN_HANDOFF_S, handoff_s
    # 8 tokens: a 70 ms first gap, then six gaps of 23 ms -> TPOT (70 + 138) / 7
    assert handoff_s(70.0, (70 + 6 * 23) / 7, 8) == pytest.approx(0.047)
    assert handoff_s(20.0, 20.0, 8) == MIN_HANDOFF_S        # no handoff to speak of
    assert handoff_s(0.0, 25.0, 8) is None                  # not a remote prefill
    assert handoff_s(70.0, 70.0, 2) is None                 # one gap: nothing to compare
    # a 2 s wait for a decode slot before 5 ms steps is a queue, not a handoff
    assert handoff_s(2000.0, (2000 + 198 * 5) / 199, 200) is None
    # three steps is a handoff; six is a stall (a local prefill's step in progress)
    assert handoff_s(480.0, (480 + 6 * 160) / 7, 8) == pytest.approx(0.32)
    assert handoff_s(1138.0, (1138 + 6 * 185) / 7, 8) is None
    # fitted per decode worker, it is what the TPOT forecast spreads over the tokens
    book = LatencyBook()
    for nbytes in (10**6, 4 * 10**6) * 3:
        book.observe_transfer("d", nbytes, 0.04 + nbytes / 1e9)
    assert book.transfer_s("d", 2 * 10**6) == pytest.approx(0.042, rel=0.05)


def test_the_sweep_walks_a_stream_timeline_forward():
    s = A.Sweep(((0.0, 1.0, 1, 100), (0.5, 2.0, 2, 300), (3.0, math.inf, 1, 50),
                 (1.5, 1.5, 4, 999)))          # an empty interval counts for nothing
    assert s.at(0.0) == (1, 100, 0.5)
    assert s.at(0.7) == (3, 400, 1.0)
    assert s.at(1.0) == (2, 300, 1.5)            # [start, end): the first ended at 1.0
    assert s.at(1.6) == (2, 300, 2.0)
    assert s.at(2.5) == (0, 0.0, 3.0)
    assert s.at(10.0) == (1, 50, math.inf)       # runs for good


@pytest.mark.parametrize("first", ["with_stream", "early"])
def test_the_fixed_rules_keep_the_first_token_as_the_chooser_would(first):
    """Pinned thresholds (or a cold model) place by the cost functions; their remote
    prefills keep the first token for the stream under the same setting."""
    r = Registry(5.0)
    for w in (W("p", "prefill"), W("d", "decode")):
        r.register(w)
    slo = A.SLO(ttft_s=3.0, tpot_s=0.1, first_token=first)
    pinned = PlacementConfig(local_prefill_max_tokens=16)
    d = place(r, pinned, "m", 1000, no_cache, book=warm_book("p", "d"), slo=slo, now=10.0)
    assert d.mode == "disagg" and d.hold_first == (first == "with_stream")
    local = place(r, pinned, "m", 8, no_cache, book=warm_book("p", "d"), slo=slo, now=10.0)
    assert local.mode == "local" and not local.hold_first


def test_a_local_prefill_beside_late_streams_goes_at_its_alone_pace():
    """Streams whose first token comes after the TTFT SLO (`late` in the timeline) keep
    no slack on their engine: a local prefill beside them goes in `alone` chunks, as on
    an engine with no stream (its steps longer by their decode work), and what its steps
    cost them does not cap the option's score."""
    slo = A.SLO(ttft_s=4.0, tpot_s=0.03)
    busy = A.Node("d", C, streams=3, ctx=1500, streams_at=((0.0, 5.0, 3, 1500),))
    late = replace(busy, streams_at=((0.0, 5.0, 3, 1500, True),))
    idle = A.Node("d", C)
    t_busy = A.prefill_on(busy, 2000, slo, local=True)[0]
    t_late = A.prefill_on(late, 2000, slo, local=True)[0]
    t_idle = A.prefill_on(idle, 2000, slo, local=True)[0]
    assert t_idle < t_late < t_busy
    on, off = A.local(busy, 2000, 16, slo), A.local(late, 2000, 16, slo)
    assert off.ttft_s < on.ttft_s and off.score > on.score
    # without a TTFT SLO the registry marks none late (tests above: `timelines`)


def test_a_late_local_prefill_yields_to_streams_landing_while_it_computes():
    """Beside late streams only, a local prefill goes in `alone` steps, and a stream that
    lands meanwhile waits for the step in progress. A prompt that misses its TTFT SLO
    anyway prices that for the on-time streams booked to land while it computes (it yields
    to them); one that makes its SLO does not."""
    slo = A.SLO(ttft_s=2.0, tpot_s=0.03)
    late_now = (0.0, 5.0, 2, 1000, True)
    landing = (0.3, 1.0, 1, 200, False)       # on time, lands in 0.3 s
    quiet = A.Node("d", C, streams=2, ctx=1000, streams_at=(late_now,))
    busy = replace(quiet, streams=3, streams_at=(late_now, landing))
    assert A.kept(quiet) == 0 and A.kept(busy) == 0 and A.kept(busy, 1.0) == 1
    long_q, long_b = A.local(quiet, 1500, 16, slo), A.local(busy, 1500, 16, slo)
    assert long_q.ttft_s > slo.ttft_s                  # hopeless: it yields
    assert long_b.score < long_q.score
    assert long_b.score < A.score(long_b.ttft_s, long_b.tpot_s, slo)   # capped
    short_q, short_b = A.local(quiet, 300, 16, slo), A.local(busy, 300, 16, slo)
    assert short_q.ttft_s < slo.ttft_s       # (the landing stream slows it a little)
    assert short_b.score == pytest.approx(A.score(short_b.ttft_s, short_b.tpot_s, slo))


def test_a_local_prefill_is_priced_against_the_streams_there_when_it_starts():
    """The cost of a local prompt's steps is counted against the on-time streams decoding
    when its first step runs, after the prompts booked there before it: streams that end
    before then lose nothing to it (measured: two streams ending within 44 ms scored a
    local prompt that starts 277 ms from now -2.1, for a first chunk that runs alone, and
    its request went to a prefill worker where it missed its TPOT SLO)."""
    slo = A.SLO(ttft_s=2.0, tpot_s=0.03)
    ending = (0.0, 0.04, 2, 1000, False)      # on time, ends in 40 ms
    later = (0.5, 2.0, 1, 300, False)         # on time, lands in 0.5 s
    n = A.Node("d", C, streams=2, ctx=1000, backlog_s=0.3, streams_at=(ending,))
    assert A.kept(n) == 2 and A.kept(n, since=0.3) == 0
    assert A.kept(replace(n, streams_at=(ending, later)), 0.6, since=0.3) == 1
    o = A.local(n, 300, 16, slo)
    assert o.score == pytest.approx(A.score(o.ttft_s, o.tpot_s, slo))
    # the same streams running on past its start: its chunk is priced against them
    busy = replace(n, allow_s=0.001, streams_at=((0.0, 5.0, 2, 1000, False),))
    b = A.local(busy, 300, 16, slo)
    assert b.score == -1.0          # a step they cannot afford: -1, not -(step / allow)


def test_a_late_requests_tpot_is_predicted_without_its_slack_and_scored_with_it():
    """A request whose first token comes after its TTFT SLO (here: held that long) gets
    no TPOT slack on its engine: the prediction says so (the prefill work booked there
    lands in its steps), while the score, which decides where it goes, is the one with
    its slack kept."""
    slo = A.SLO(ttft_s=2.0, tpot_s=0.03)
    p = A.Node("p", C)
    d = A.Node("d", C, backlog_s=1.0, streams=1, ctx=500, excess_s=0.02)
    fresh = {o.kind: o for o in A.options([p], [d], 500, 16, slo, {"d"})}
    late = {o.kind: o for o in A.options([p], [d], 500, 16, slo, {"d"}, held_s=5.0)}
    for kind in ("remote", "local"):
        assert late[kind].tpot_s > fresh[kind].tpot_s + 1.0 / 15 * 0.9   # the backlog
        assert late[kind].score == fresh[kind].score
    kept = replace(slo, late=False)      # PDSERVE_LATE_STREAMS=keep: as before
    was = A.options([p], [d], 500, 16, kept, {"d"})[0]
    assert was.hold and was.ttft_s > was.first_s
    # (its first token goes out when computed, past its release: the handoff is in TPOT)
    assert A.options([p], [d], 500, 16, kept, {"d"}, held_s=5.0)[0].tpot_s == \
        pytest.approx(was.tpot_s + (was.ttft_s - was.first_s) / 15)


def test_steps_beside_late_streams_only_do_not_teach_what_an_on_time_stream_sees():
    """A step beside late streams only was not held to any stream's slack (its engine ran
    an `alone` chunk): what it took beyond a plain decode step is left out of the excess a
    new stream's TPOT is predicted with (`held_excess_s`), and kept in the mean the role
    planner reads plain decode steps from (`excess_s`)."""
    book = warm_book("p", "d")
    before = book.recent_of("d", 10.0)
    big = StepSample(C.step_time(2048, chunk_attn(2048, 0), 4, 2000), 2048,
                     chunk_attn(2048, 0), 4, 2000, late_only=True)
    book.observe_steps("d", "m", [big] * 8, now=10.0)
    after = book.recent_of("d", 10.0)
    assert after.held_excess_s == pytest.approx(before.held_excess_s)
    assert after.excess_s > before.excess_s + 0.1
    assert after.plain_s == pytest.approx(
        (before.plain_s * before.stream_steps + C.decode_step(4, 2000) * 8)
        / after.stream_steps, rel=0.01)

