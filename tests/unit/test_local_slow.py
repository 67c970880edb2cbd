"""Long local prefills, corrected by how far recent ones ran over their prediction
(LatencyBook.local_slow, adaptive.local, scheduler/feedback.py). Pure: no network."""

import dataclasses
from types import SimpleNamespace as NS

import pytest

from pdserve.latency import Coef
from scheduler import adaptive as A
from scheduler.feedback import learn_from_report
from scheduler.models import TAIL_MIN, LatencyBook
from scheduler.state import Booking

CPU = Coef(step=0.018, prefill_ktok=0.55, decode_seq=0.001, decode_ctx_10ktok=0.02,
           mixed=0.006)
SLO = A.SLO(ttft_s=1.8, tpot_s=0.027)


def test_the_median_overrun_of_long_local_prefills_is_learned_per_worker():
    b = LatencyBook()
    for _ in range(TAIL_MIN - 1):
        b.observe_local("d", 1.0, 1.6)
    assert b.local_slow("d", 0.5) == 1.0                 # too few yet
    b.observe_local("d", 1.0, 1.4)
    for _ in range(20):
        b.observe_local("d", 0.1, 0.05)                  # short ones: another story
    assert b.local_slow("d", 0.5) == pytest.approx(1.6)  # the median of the long ones
    assert b.local_slow("d", 0.05) == 1.0                # with the short: under 1, so 1
    assert b.local_slow("other", 0.5) == 1.0
    b.forget("d")
    assert b.local_slow("d", 0.5) == 1.0


def test_a_local_prefills_report_teaches_its_engine_part_without_hold_or_fixed_part():
    b = LatencyBook()
    bk = Booking("b1", None, "d", 1024, 8, 0.0, pred_ttft_s=1.3, held_s=0.2,
                 pred_first_over_s=0.1)
    r = NS(ttft_ms=2300.0, tpot_ms=25.0, first_held_ms=0.0, first_gap_ms=0.0,
           output_tokens=16, kv_bytes=0, kv_seconds=0.0)
    for _ in range(TAIL_MIN):
        learn_from_report(b, bk, r, None)
    # predicted 1.3 - 0.2 - 0.1 = 1.0 s, measured 2.3 - 0.2 - 0.1 = 2.0 s
    assert b.local_slow("d", 0.5) == pytest.approx(2.0)
    remote = dataclasses.replace(bk, prefill="p")
    b2 = LatencyBook()
    for _ in range(TAIL_MIN):
        learn_from_report(b2, remote, r, None)
    assert b2.local_slow("d", 0.0) == 1.0                # remote prefills teach nothing here


def test_a_long_local_option_is_predicted_that_much_longer_and_a_short_one_not():
    d = A.Node("d", CPU)
    base = A.local(d, 1024, 16, SLO)
    engine = base.ttft_s                                 # no backlog, no fixed part
    slow = dataclasses.replace(d, local_slow=1.5, local_slow_from_s=0.25 * SLO.ttft_s)
    assert engine >= 0.25 * SLO.ttft_s
    assert A.local(slow, 1024, 16, SLO).ttft_s == pytest.approx(1.5 * engine)
    short = A.local(d, 32, 16, SLO)
    assert short.ttft_s < 0.25 * SLO.ttft_s
    assert A.local(slow, 32, 16, SLO).ttft_s == pytest.approx(short.ttft_s)


def test_placement_hands_each_decode_worker_its_learned_local_overrun(monkeypatch):
    """The chooser sees, per decode worker, how far its recent long local prefills ran
    over (LatencyBook.local_slow), from a quarter of the TTFT SLO up."""
    from scheduler.placement import LOCAL_SLOW_SHARE, _place_adaptive
    from scheduler.state import Registry
    from tests.unit.adaptive_helpers import W, warm_book

    reg = Registry(10.0)
    p, d = W("p", "prefill"), W("d", "decode")
    for w in (p, d):
        reg.register(w)
    book = warm_book("p", "d")
    slo = A.SLO(ttft_s=3.0, tpot_s=0.1)
    for _ in range(TAIL_MIN):
        book.observe_local("d", 1.0, 1.5)
    seen = {}
    real = A.options

    def spy(prefills, decodes, *a, **k):
        seen.update({n.worker_id: (n.local_slow, n.local_slow_from_s) for n in decodes})
        return real(prefills, decodes, *a, **k)

    monkeypatch.setattr(A, "options", spy)
    _place_adaptive(reg, book, slo, [p], [d], {}, 2000, 16, 1.0)
    assert seen["d"] == (pytest.approx(1.5), pytest.approx(LOCAL_SLOW_SHARE * 3.0))


def test_only_short_local_prefills_teach_the_first_tokens_fixed_part():
    """A long local prefill's overrun is a share of its length (local_slow), not a fixed
    part: taken as one, it put every short local prompt that much later."""
    def report(ttft_ms):
        return NS(ttft_ms=ttft_ms, tpot_ms=25.0, first_held_ms=0.0, first_gap_ms=0.0,
                  output_tokens=16, kv_bytes=0, kv_seconds=0.0)

    # engine part predicted 1.1 s (1.3 less 0.2 held), measured 1.5 s: 0.4 s over
    long = Booking("l", None, "d", 1024, 8, 0.0, pred_ttft_s=1.3, held_s=0.2)
    short = Booking("s", None, "d", 64, 1, 0.0, pred_ttft_s=0.1)
    b = LatencyBook()
    for _ in range(TAIL_MIN):
        learn_from_report(b, long, report(1700.0), None, long_from_s=0.5)
    assert b.first_over_s("d", "local") == 0.0
    assert b.local_slow("d", 0.5) == pytest.approx(1.5 / 1.1)
    for _ in range(TAIL_MIN):
        learn_from_report(b, short, report(130.0), None, long_from_s=0.5)
    assert b.first_over_s("d", "local") == pytest.approx(0.03)
    assert b.local_slow("d", 0.5) == pytest.approx(1.5 / 1.1)    # the short ones: not here

    everything = LatencyBook()          # no threshold: the long ones' overrun as fixed part
    for _ in range(TAIL_MIN):
        learn_from_report(everything, long, report(1700.0), None)
    assert everything.first_over_s("d", "local") == pytest.approx(0.4)

    remote = dataclasses.replace(long, prefill="p")    # a remote prefill's: always
    for _ in range(TAIL_MIN):
        learn_from_report(b, remote, report(1700.0), None, long_from_s=0.5)
    assert b.first_over_s("p", "remote") == pytest.approx(0.4)


def test_the_learned_parts_are_exported_per_worker_and_dropped_with_it():
    from prometheus_client import REGISTRY

    from scheduler.feedback import forget_worker

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    r = NS(ttft_ms=130.0, tpot_ms=25.0, first_held_ms=0.0, first_gap_ms=0.0,
           output_tokens=16, kv_bytes=0, kv_seconds=0.0)
    short = Booking("s", None, "dx", 64, 1, 0.0, pred_ttft_s=0.1)
    long = Booking("l", None, "dx", 1024, 8, 0.0, pred_ttft_s=1.0)
    b = LatencyBook()
    for _ in range(TAIL_MIN):
        learn_from_report(b, short, r, None, long_from_s=0.5)
        learn_from_report(b, long, NS(**{**vars(r), "ttft_ms": 1500.0}), None,
                          long_from_s=0.5)
    fixed = "pdserve_scheduler_first_token_fixed_seconds"
    assert value(fixed, worker="dx", kind="local") == pytest.approx(0.03)
    assert value("pdserve_scheduler_local_slow_ratio", worker="dx") == pytest.approx(1.5)
    learn_from_report(b, dataclasses.replace(short, prefill="px"), r, None, long_from_s=0.5)
    assert value(fixed, worker="px", kind="remote") == 0.0      # one of TAIL_MIN: not yet
    for w in ("dx", "px"):
        forget_worker(w)
    assert value(fixed, worker="dx", kind="local") is None
    assert value("pdserve_scheduler_local_slow_ratio", worker="dx") is None
    assert value(fixed, worker="px", kind="remote") is None
    forget_worker("never-seen")                                   # no error
