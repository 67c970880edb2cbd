"""A decode engine's predicted streams over time (scheduler/timeline.py) and what a new
stream's TPOT prediction takes from them (scheduler/adaptive.py, `tpot_on`). Pure."""

import math
from dataclasses import replace

import pytest

from scheduler import adaptive as A
from scheduler.timeline import mean_load
from tests.unit.adaptive_helpers import C, SLO

LOOSE = replace(SLO, tpot_s=1.0)     # no cap from the SLO: the steps as they are


def test_mean_load_averages_the_streams_over_a_life():
    busy = ((0.0, 1.0, 1, 100), (0.5, 2.0, 2, 300))
    # over [0, 2): one stream (100) for 0.5 s, three (400) for 0.5 s, two (300) for 1 s
    seqs, ctx = mean_load(busy, 0.0, 2.0)
    assert seqs == pytest.approx((1 * 0.5 + 3 * 0.5 + 2 * 1.0) / 2)
    assert ctx == pytest.approx((100 * 0.5 + 400 * 0.5 + 300 * 1.0) / 2)
    # a life after every stream has ended sees none; one before a booked start, not it
    assert mean_load(busy, 2.5, 1.0) == (0.0, 0.0)
    assert mean_load(((3.0, 4.0, 1, 100),), 0.0, 1.0) == (0.0, 0.0)
    # half of a life inside a stream's span: half of it
    assert mean_load(((0.0, 1.0, 2, 100),), 0.5, 1.0) == pytest.approx((1.0, 50.0))
    # a stream with no known end runs for good; no life: the streams at its start
    assert mean_load(((0.0, math.inf, 3, 90),), 5.0, 2.0) == pytest.approx((3.0, 90.0))
    assert mean_load(busy, 0.7, 0.0) == (3.0, 400.0)


def test_a_stream_that_ends_before_the_new_one_starts_does_not_slow_it():
    """The count of streams now, held for the whole life, predicted a stream beside one
    that had ended a second before it started (24.7 ms a token against 19.6 measured)."""
    d = A.Node("d", C, streams=1, ctx=1000, streams_at=((0.0, 0.05, 1, 1000),))
    alone = C.decode_step(1, 500 + 8)
    assert A.tpot_on(d, 500, 16, LOOSE, start_s=1.0) == pytest.approx(alone)
    # starting now, the other stream runs beside it until 0.05 s: a part of its life
    now = A.tpot_on(d, 500, 16, LOOSE, start_s=0.0)
    assert alone < now < C.decode_step(2, 1000 + 500 + 8)
    # one booked to start during its life counts from then on
    booked = replace(d, streams_at=((0.0, 0.05, 1, 1000), (1.01, 9.0, 1, 1000)))
    assert A.tpot_on(booked, 500, 16, LOOSE, start_s=1.0) > alone
    # no timeline (streams another scheduler placed): those running now, for good
    blind = replace(d, streams_at=())
    assert A.tpot_on(blind, 500, 16, LOOSE, start_s=1.0) == pytest.approx(
        C.decode_step(2, 1000 + 500 + 8))


def test_the_options_predict_the_streams_beside_them_from_when_they_start():
    """A remote option starts decoding after its prefill and handoff, a local one after
    its own prefill: a stream ending before then counts for neither."""
    p = A.Node("p", C)
    d = A.Node("d", C, streams=1, ctx=1000, streams_at=((0.0, 0.05, 1, 1000),),
               allow_s=0.09)
    r = A.remote(p, d, 1000, 32, LOOSE)
    assert r.tpot_s == pytest.approx(C.decode_step(1, 1000 + 16))
    lo = A.local(d, 1000, 32, LOOSE)
    assert lo.tpot_s == pytest.approx(C.decode_step(1, 1000 + 16))
