"""Streams landing from a prefill worker wait for the local prompts an engine computes
alone (pdserve/step_hook.py `_defer_landing`, pdserve/step_budget.py `landing_wait`):
only while those prompts can still end within their TTFT SLOs, and only as long as each
stream still starts before the frontend sends its kept first token. Pure: hand-built
requests in vLLM's own FCFS queue."""

import time
from types import SimpleNamespace as NS

import pytest
from vllm.v1.core.sched.request_queue import FCFSRequestQueue

from pdserve.latency import Coef
from pdserve.sampling import TTFT_DUE
from pdserve.step_budget import Stream, alone, landing_wait
from pdserve.step_hook import _defer_landing, _put_back, _State
from tests.unit.step_helpers import Req

# a CPU-like engine: 50 ms a step, 0.5 ms a prompt token; under a 65 ms TPOT SLO a prompt
# computed alone goes in steps of 300 tokens (the step's fixed part at most a quarter)
COEF = Coef(step=0.05, prefill_ktok=0.5, decode_seq=0.001)
TPOT = 0.065


def test_alone_steps_are_what_the_wait_is_planned_at():
    assert alone(COEF, TPOT)[1] == 300


def test_the_wait_lasts_until_the_last_prompt_that_ends_within_its_slo():
    # 700 tokens left after 300: steps of 300, 300 and 100, 0.5 s in all
    alone_s = COEF.steps_time(700, 300, 300)
    assert alone_s == pytest.approx(0.5, rel=0.05)
    assert landing_wait([(700, 300, 11.0)], 10.0, COEF, TPOT) == pytest.approx(10.0 + alone_s)
    # the same prompt, due before it can end: nothing to wait for
    assert landing_wait([(700, 300, 10.3)], 10.0, COEF, TPOT) == float("-inf")
    # two prompts, one after the other: the second one late anyway holds nothing back,
    # but its time counts for a third that can make it
    two = landing_wait([(700, 300, 11.0), (700, 300, 10.6)], 10.0, COEF, TPOT)
    assert two == pytest.approx(10.0 + alone_s)
    three = landing_wait([(700, 300, 11.0), (700, 300, 10.6), (100, 0, 12.0)], 10.0, COEF, TPOT)
    assert three == pytest.approx(10.0 + 2 * alone_s + COEF.steps_time(100, 300, 0))
    # overrun: the engine's own measure of how far its steps run over the model
    assert landing_wait([(700, 300, 11.0)], 10.0, COEF, TPOT, over=1.5) == pytest.approx(
        10.0 + 1.5 * alone_s)
    # no due (no TTFT SLO): nothing to protect
    assert landing_wait([(700, 300, 0.0)], 10.0, COEF, TPOT) == float("-inf")


@pytest.fixture(autouse=True)
def _switched_on(monkeypatch):
    monkeypatch.setenv("PDSERVE_LANDING_WAIT", "1")


def _state(ttft_ms=1000.0):
    st = _State(TPOT * 1e3, "", ttft_ms)
    st.coef = COEF
    return st


def _sched(waiting, running):
    q = FCFSRequestQueue()
    for r in waiting:
        q.add_request(r)
    return NS(waiting=q, running=running)


def test_landing_streams_wait_for_a_local_prompt_computed_alone():
    wall = time.time()     # the dues are wall-clock times: nothing slow between here and them
    # a local prompt with 700 tokens left, 0.5 s alone, due in 1 s: it can make it
    prompt = Req("p", wall + 1.0, computed=300, prompt=1000)
    # landing requests not yet loading: one whose kept first token goes out in 0.95 s
    # (TTFT SLO 1 s: its release is 50 ms before its due), time enough to start after
    # the prompt, the step in progress and its own first step (0.5 + 0.2 + 0.05 s); one
    # due sooner, which cannot wait; one with no SLO
    far, near = Req("far", wall + 1.0, remote=True), Req("near", wall + 0.7, remote=True)
    none = Req("none", 0.0, remote=True)
    local = Req("l", wall + 2.0)              # a local prompt waiting: never taken out
    sched = _sched([far, near, none, local], [prompt])
    st = _state()
    wait = _defer_landing(sched, st, [])
    assert wait == [far]
    assert [r.request_id for r in sched.waiting] == ["near", "none", "l"]
    _put_back(sched, wait)                    # in front again, in their order
    assert [r.request_id for r in sched.waiting] == ["far", "near", "none", "l"]
    # beside late streams the prompt still goes alone: they wait as well
    assert _defer_landing(_sched([far], [prompt]), st, [Stream(0.1, 2, 16, late=True)]) \
        == [far]


@pytest.mark.parametrize("case", ["on_time_stream", "hopeless", "loading", "no_ttft_slo",
                                  "switched_off", "no_model", "no_prompt"])
def test_landing_streams_go_on_where_waiting_would_not_help(case, monkeypatch):
    wall = time.time()
    prompt = Req("p", wall + 1.0, computed=300, prompt=1000)
    far = Req("far", wall + 1.0, remote=True)
    running, streams, st = [prompt], [], _state()
    if case == "on_time_stream":      # the prompt goes at its slack's pace anyway
        streams = [Stream(0.1, 2, 16)]
    elif case == "hopeless":          # it misses its SLO whatever: it yields
        prompt.sampling_params = NS(extra_args={TTFT_DUE: wall + 0.3})
    elif case == "loading":           # its load has begun: not ours to stop
        far.num_computed_tokens = 499
    elif case == "no_ttft_slo":
        st = _state(ttft_ms=0.0)
    elif case == "switched_off":     # the default
        monkeypatch.delenv("PDSERVE_LANDING_WAIT")
        st = _state()
    elif case == "no_model":
        st.coef = None
    elif case == "no_prompt":         # the running request decodes: nothing to protect
        running = [Req("s", wall + 1.0, computed=501, prompt=500)]
    sched = _sched([far], running)
    assert _defer_landing(sched, st, streams) == []
    assert [r.request_id for r in sched.waiting] == ["far"]
