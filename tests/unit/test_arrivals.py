"""Streams expected from requests not arrived yet (scheduler/arrivals.py) and a local
prompt predicted beside them (adaptive.prefill_on, placement). Pure: no network."""

import dataclasses

import pytest

from pdserve.latency import Coef
from scheduler import adaptive as A
from scheduler import arrivals as AR
from scheduler.arrivals import Arrivals
from scheduler.policy import Decision

# a CPU engine: 18 ms a step, 0.55 s per 1,000 prompt tokens
CPU = Coef(step=0.018, prefill_ktok=0.55, decode_seq=0.001, decode_ctx_10ktok=0.02,
           mixed=0.006)
SLO = A.SLO(ttft_s=1.8, tpot_s=0.027)


def steady(a: Arrivals, wid: str, every_s: float, n: int, t0: float = 0.0, **kw) -> float:
    kw = {"first_s": 0.2, "out_tokens": 17, "tpot_s": 0.025, "prompt_tokens": 128} | kw
    for i in range(n):
        a.add(wid, t0 + i * every_s, **kw)
    return t0 + (n - 1) * every_s


def test_a_rate_needs_a_few_bookings_and_decays_once_they_stop():
    a = Arrivals()
    last = steady(a, "d", 0.5, AR.MIN_SEEN - 1)
    assert a.rate("d", last) == 0.0 and a.spans("d", last, 10.0) == ()
    a = Arrivals()
    last = steady(a, "d", 0.5, AR.MIN_SEEN + 6)
    assert a.rate("d", last) == pytest.approx(2.0)
    assert a.rate("d", last + 5.0) < 1.0                  # nothing since: it falls
    assert a.rate("d", last + AR.WINDOW_S + 1) == 0.0     # all of them too old
    assert a.rate("other", last) == 0.0
    a.forget("d")
    assert a.rate("d", last) == 0.0


def test_expected_streams_start_mid_interval_after_the_usual_delay_for_the_usual_life():
    a = Arrivals()
    last = steady(a, "d", 0.5, 10, first_s=0.3, out_tokens=17, tpot_s=0.025,
                  prompt_tokens=100)
    spans = a.spans("d", last, horizon_s=2.0)
    # rate 2/s: the k-th at (k - 1/2) / 2 + 0.3 s, each for 16 x 25 ms, 100 + 17/2 tokens
    assert [s[0] for s in spans] == pytest.approx([0.55, 1.05, 1.55])
    assert all(s[1] - s[0] == pytest.approx(0.4) for s in spans)
    assert all(s[2:] == (1, pytest.approx(108.5)) for s in spans)
    # bounded however high the rate
    fast = Arrivals()
    steady(fast, "d", 0.001, 30)
    assert len(fast.spans("d", 0.03, 100.0)) == AR.MAX_SPANS
    # no prediction of TPOT (the fixed rules'): no life, no spans
    none = Arrivals()
    steady(none, "d", 0.5, 10, tpot_s=0.0)
    assert none.spans("d", 4.5, 10.0) == ()


def test_a_local_prompt_is_predicted_slower_beside_expected_streams_and_a_remote_one_not():
    quiet = A.Node("d", CPU)
    a = Arrivals()
    last = steady(a, "d", 0.5, 10, first_s=0.1)
    busy = dataclasses.replace(quiet, arrivals=a.spans("d", last, 2 * SLO.ttft_s))
    alone, _ = A.prefill_on(quiet, 1024, SLO, local=True)
    beside, _ = A.prefill_on(busy, 1024, SLO, local=True)
    # beside a stream a step leaves the prompt what the TPOT allowance has left
    assert beside > alone * 1.2
    assert A.local(busy, 1024, 16, SLO).ttft_s > A.local(quiet, 1024, 16, SLO).ttft_s
    # a remote prefill on a prefill engine is not chunked by the streams landing there
    assert A.prefill_on(busy, 1024, SLO) == A.prefill_on(quiet, 1024, SLO)
    # a short prompt is done before the first one lands
    assert A.prefill_on(busy, 32, SLO, local=True) == A.prefill_on(quiet, 32, SLO, local=True)


def test_the_registry_counts_each_booking_on_its_decode_worker_and_placement_hands_it_on(
        monkeypatch):
    from scheduler.placement import _place_adaptive
    from scheduler.state import Registry
    from tests.unit.adaptive_helpers import W, warm_book

    reg = Registry(10.0)
    p, d = W("p", "prefill"), W("d", "decode")
    for w in (p, d):
        reg.register(w)
    book = warm_book("p", "d")
    slo = A.SLO(ttft_s=3.0, tpot_s=0.1)
    for i in range(8):
        dec = Decision("p" if i % 2 else None, "d", "disagg" if i % 2 else "local", "slo",
                       128, 0, 8, 128, prefill_s=0.1, pred_ttft_s=0.2, pred_tpot_s=0.03,
                       out_tokens=16)
        reg.book(dec, 10.0 + i)
    assert reg.arrivals.rate("d", 17.0) == pytest.approx(1.0)
    assert reg.arrivals.rate("p", 17.0) == 0.0          # it decodes none of them
    seen = {}
    real = A.options

    def spy(prefills, decodes, *a, **k):
        seen.update({n.worker_id: n.arrivals for n in decodes})
        return real(prefills, decodes, *a, **k)

    monkeypatch.setattr(A, "options", spy)
    _place_adaptive(reg, book, slo, [p], [d], {}, 1000, 16, 17.0)
    assert seen["d"] == reg.arrivals.spans("d", 17.0, 2 * slo.ttft_s) != ()
    _place_adaptive(reg, book, dataclasses.replace(slo, arrivals=False), [p], [d], {},
                    1000, 16, 17.0)
    assert seen["d"] == ()                               # PDSERVE_ARRIVALS=off
    reg.remove("d")
    assert reg.arrivals.rate("d", 17.0) == 0.0
