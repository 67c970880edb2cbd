"""Overflow (scheduler/adaptive.py, `overflow_options`): a whole request on a prefill worker,
offered only when no other option is predicted to meet both SLOs and this one is, or, with
`balance`, when it scores well over the best one that is.
Pure: no network, no engines, time passed in."""

from dataclasses import replace

import pytest

from scheduler import adaptive as A
from scheduler.placement import place
from scheduler.state import Registry
from tests.unit.adaptive_helpers import CFG, C, W, no_cache, warm_book

# a tight TPOT SLO: the fitted decode step (4 ms + 2 ms a stream) meets it with margin up
# to 6 streams (4 + 2 * 6 = 16 ms < 0.95 * 20 ms)
SLO = A.SLO(ttft_s=1.0, tpot_s=0.02, first_token="early")
ON = replace(CFG, overflow="on")


def full(wid="d", n=10):
    """A decode engine whose streams fill its TPOT SLO: one stream more misses it."""
    return A.Node(wid, C, streams=n, ctx=n * 500, allow_s=C.decode_step(n, n * 500))


def test_a_full_decode_engine_overflows_onto_the_idle_prefill_worker():
    p, d = A.Node("p", C), full()
    opts = A.options([p], [d], 64, 32, SLO, {"d"})
    assert opts[0].score < A.MARGIN                       # without: every option misses
    opts = A.options([p], [d], 64, 32, SLO, {"d"}, spare=(p,))
    best = opts[0]
    assert (best.kind, best.prefill, best.decode) == ("overflow", "p", "p")
    assert best.score >= A.MARGIN and best.tpot_s == pytest.approx(C.decode_step(1, 64 + 16))
    assert best.describe().startswith("overflow decode=p")
    assert {o.kind for o in opts[1:]} == {"remote", "local"}      # the runner-ups


def test_no_overflow_while_another_option_meets_the_slos():
    p, d = A.Node("p", C), A.Node("d", C, streams=2, ctx=1000)
    opts = A.options([p], [d], 64, 32, SLO, {"d"}, spare=(p,))
    assert opts[0].score >= A.MARGIN and "overflow" not in {o.kind for o in opts}


def test_no_overflow_onto_a_prefill_worker_whose_prompts_have_no_room():
    # the prefill worker's queue alone takes the TTFT SLO: the whole request there would
    # miss it too, and its stream would slow every prompt queued behind it
    p, d = A.Node("p", C, backlog_s=1.2), full()
    opts = A.options([p], [d], 64, 32, SLO, {"d"}, spare=(p,))
    assert "overflow" not in {o.kind for o in opts}
    # ...nor for a request held so long that its first token comes late wherever it goes
    p = A.Node("p", C)
    opts = A.options([p], [d], 64, 32, SLO, {"d"}, held_s=0.99, spare=(p,))
    assert "overflow" not in {o.kind for o in opts}


def full_cluster(p_role="prefill", streams=10):
    """A registry with p (`p_role`) and a decode worker d whose engine runs `streams`
    streams, and a warm latency book for both."""
    r = Registry(5.0)
    for w in (W("p", p_role), W("d", "decode", max_num_seqs=64)):
        r.register(w)
    if streams:
        r.workers["d"].step_decode_seqs, r.workers["d"].step_decode_ctx = streams, 5000
    return r, warm_book("p", "d")


def test_the_registry_books_an_overflow_and_later_prompts_see_its_stream():
    r, book = full_cluster()
    fallback = replace(CFG, overflow="fallback")
    off = place(r, fallback, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0)
    assert off.reason != "overflow" and off.decode == "d"      # not with "fallback"
    assert place(r, CFG, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32,
                 now=10.0).reason == "overflow"                # by default ("balance")
    d = place(r, ON, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0)
    assert (d.mode, d.prefill, d.decode, d.reason) == ("local", None, "p", "overflow")
    assert d.runner_up and d.pred_tpot_s < SLO.tpot_s
    before = place(r, ON, "m", 2000, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0)
    b = r.book(d, 10.0)
    assert r.backlog(r.workers["p"], 10.0) == pytest.approx(d.prefill_s)
    r.prefill_done(b.booking_id, 10.1)
    # the stream now decodes on the prefill worker: a long prompt there goes in chunks
    # beside it (its engine holds them to the stream's TPOT), slower than alone
    after = place(r, ON, "m", 2000, no_cache, book=book, slo=SLO, max_tokens=32, now=10.1)
    assert before.prefill == after.prefill == "p"
    assert before.chunk_tokens == 0 and after.chunk_tokens > 0
    assert after.prefill_s > 1.1 * before.prefill_s


def test_a_mixed_worker_takes_whole_requests_as_local_not_as_overflow():
    r, book = full_cluster("mixed")
    d = place(r, ON, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0)
    assert (d.mode, d.decode, d.reason) == ("local", "p", "slo")


def test_with_no_decode_worker_left_a_prefill_worker_serves_whole_requests():
    from scheduler.state import NoPlacement
    r = Registry(5.0)
    for w in (W("p1", "prefill"), W("p2", "prefill"), W("d", "decode")):
        r.register(w)
    book = warm_book("p1", "p2", "d")
    gone = frozenset({"d"})         # excluded after a failure, as a retry's Route says
    with pytest.raises(NoPlacement, match="no decode worker"):
        place(r, replace(CFG, overflow="off"), "m", 64, no_cache, gone, book=book, slo=SLO,
              now=10.0)
    got = []
    for _ in range(4):        # the default, "fallback"
        d = place(r, CFG, "m", 64, no_cache, gone, book=book, slo=SLO, max_tokens=8, now=10.0)
        assert (d.mode, d.prefill, d.reason) == ("local", None, "no_decode_worker")
        r.book(d, 10.0)
        got.append(d.decode)
    assert sorted(got) == ["p1", "p1", "p2", "p2"]      # by the prefill costs: spread
    # the decode worker drains: the same
    r.workers["d"].draining = True
    assert place(r, CFG, "m", 64, no_cache, book=book, slo=SLO, now=10.0).reason == \
        "no_decode_worker"


def test_streams_held_behind_a_request_land_beside_it():
    """A burst: 23 short prompts held behind this one, computed within its stream's life,
    all decode on the one decode worker; a queue of long prompts lands a stream or less."""
    burst = A.landing(23, 23 * 0.05, 48, SLO, prefillers=2, decoders=1)
    assert burst == 23
    assert A.landing(23, 23 * 0.05, 48, SLO, prefillers=2, decoders=2) == 11.5
    slow = A.landing(10, 10 * 0.4, 8, SLO, prefillers=2, decoders=1)
    assert 0 < slow < 1 and A.landing(0, 0.0, 48, SLO, 2, 1) == 0.0
    # the decode step predicted for a new stream counts them
    d = A.Node("d", C, streams=1, ctx=100)
    alone, crowded = (A.tpot_on(replace(d, landing=k), 64, 48, A.SLO(1.0, 1.0)) for k in (0, 23))
    assert alone == pytest.approx(C.decode_step(2, 100 + 88))
    assert crowded == pytest.approx(C.decode_step(25, 100 + 88 * 24))


def test_a_burst_held_behind_sends_whole_requests_to_the_prefill_worker():
    """With the requests held behind counted, the decode engine is predicted full at the
    burst's start and overflow takes whole requests onto the prefill worker; without them
    it was predicted free (one stream) and took them all."""
    r, book = full_cluster(streams=0)
    free = place(r, ON, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0)
    assert free.reason != "overflow" and free.pred_tpot_s < SLO.tpot_s
    full = place(r, ON, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=10.0,
                 behind=(15, 15 * 0.07))
    assert (full.decode, full.reason) == ("p", "overflow")
    assert "decode=d" in full.runner_up


def test_balance_spreads_streams_onto_a_prefill_worker_with_far_more_headroom():
    """`balance`: an overflow option that scores BALANCE over the best option meeting both
    SLOs goes first; one that does not, or a decode engine with room, keeps the order."""
    p = A.Node("p", C)
    busy = A.Node("d", C, streams=5, ctx=2500)       # met: 4 + 2 * 6 = 16 ms of 20
    opts = A.options([p], [busy], 64, 32, SLO, {"d"}, spare=(p,))
    assert opts[0].kind != "overflow" and opts[0].score >= A.MARGIN   # "on": no overflow
    bal = A.options([p], [busy], 64, 32, SLO, {"d"}, spare=(p,), balance=True)
    assert (bal[0].kind, bal[0].decode) == ("overflow", "p")
    assert bal[0].score >= opts[0].score + A.BALANCE
    assert bal[1:] == opts                             # the rest in their order
    idle = A.Node("d", C)
    opts = A.options([p], [idle], 64, 32, SLO, {"d"}, spare=(p,), balance=True)
    assert "overflow" not in {o.kind for o in opts}    # no better than the idle engine
    # a prefill worker with prompts queued: its TTFT headroom is gone, no overflow
    queued = A.Node("p", C, backlog_s=0.9)
    opts = A.options([queued], [busy], 64, 32, SLO, {"d"}, spare=(queued,), balance=True)
    assert opts[0].kind != "overflow"
    # the placement: `--overflow balance` books the whole request on the prefill worker
    r, book = full_cluster(streams=5)
    d = place(r, replace(CFG, overflow="balance"), "m", 64, no_cache, book=book, slo=SLO,
              max_tokens=32, now=100.0)
    assert (d.mode, d.prefill, d.decode, d.reason) == ("local", None, "p", "overflow")
    d = place(r, ON, "m", 64, no_cache, book=book, slo=SLO, max_tokens=32, now=100.0)
    assert d.decode == "d" and d.reason != "overflow"      # "on": only when nothing meets
