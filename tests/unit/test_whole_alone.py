"""A local prompt computed alone in whole steps where its `alone` chunks would miss its
TTFT SLO (step_budget.whole_alone; the engine's `_whole_alone`; the chooser's
`prefill_on`), without engines."""

import time
from types import SimpleNamespace as NS

import pytest

from pdserve.latency import Coef
from pdserve.step_budget import Budget, alone, whole_alone
from pdserve.step_hook import _State, _whole_alone
from tests.unit.step_helpers import Req

# a CPU-like engine: 50 ms a step, 0.5 ms a prompt token; under a 65 ms TPOT SLO a prompt
# computed alone goes in steps of 300 tokens
COEF = Coef(step=0.05, prefill_ktok=0.5, decode_seq=0.001)
TPOT = 0.065


def test_whole_steps_only_where_the_chunks_miss_and_whole_steps_do_not():
    chunk = alone(COEF, TPOT)[1]
    assert chunk == 300
    chunked, whole = COEF.steps_time(1000, 300, 0), COEF.prefill_time(1000)
    assert chunked == pytest.approx(0.7) and whole == pytest.approx(0.55)
    assert whole_alone(COEF, 1000, 0, chunk, 0.6)          # chunks miss, one step makes it
    assert not whole_alone(COEF, 1000, 0, chunk, 0.8)      # chunks make it: kept
    assert not whole_alone(COEF, 1000, 0, chunk, 0.5)      # late either way: kept
    assert not whole_alone(COEF, 300, 0, chunk, 0.1)       # one chunk is the whole
    assert not whole_alone(None, 1000, 0, chunk, 0.6)
    assert not whole_alone(COEF, 1000, 0, chunk, float("inf"))
    # the engine's own cap on a step: whole steps of it
    assert not whole_alone(COEF, 1000, 0, chunk, 0.6, max_tokens=400)


def state():
    st = _State(TPOT * 1e3, "")
    st.coef = COEF
    st.current = lambda: COEF
    return st


def test_the_engine_lifts_the_chunk_for_its_head_local_prompt_only_where_it_pays():
    b = Budget(0.9 * TPOT, 300)
    now = time.time()
    tight = NS(running=[Req("a", now + 0.6, prompt=1000)], waiting=[])
    assert _whole_alone(tight, state(), b, 4096).tokens == 0
    loose = NS(running=[Req("a", now + 5.0, prompt=1000)], waiting=[])
    assert _whole_alone(loose, state(), b, 4096) is b
    # a remote-prefilled request landing is not the head local prompt; the waiting local
    # one behind it is
    queue = NS(running=[], waiting=[Req("r", now + 0.6, remote=True),
                                    Req("a", now + 0.6, prompt=1000)])
    assert _whole_alone(queue, state(), b, 4096).tokens == 0
    # no TTFT SLO on the request: chunks as before
    assert _whole_alone(NS(running=[Req("a", 0, prompt=1000)], waiting=[]), state(), b, 4096) is b


def test_the_chooser_predicts_the_whole_step_as_the_engine_takes_it():
    from scheduler import adaptive as A

    idle = A.Node("d", COEF)
    on = A.SLO(ttft_s=0.6, tpot_s=TPOT, whole_alone=True)
    off = A.SLO(ttft_s=0.6, tpot_s=TPOT)
    t_on, first_on = A.prefill_on(idle, 1000, on, local=True)
    t_off, first_off = A.prefill_on(idle, 1000, off, local=True)
    assert (t_on, first_on) == (pytest.approx(0.55), 0)          # one step, the whole
    assert t_off == pytest.approx(0.7) and first_off == 300      # alone chunks
    # with a TTFT SLO the chunks make, they stay
    loose = A.SLO(ttft_s=2.0, tpot_s=TPOT, whole_alone=True)
    assert A.prefill_on(idle, 1000, loose, local=True)[1] == 300
    # behind a backlog the time left is less: 0.3 s of it and 0.6 s of SLO leave too
    # little even for one step, so the chunks stay (late either way)
    queued = A.Node("d", COEF, backlog_s=0.3)
    assert A.prefill_on(queued, 1000, on, local=True)[1] == 300
