"""Engine steps from the engine core to the worker: the wire format and the socket
(pdserve/step_hook.py, pdserve/steps.py). A real abstract Unix socket, no engine."""

import math

import pytest

from pdserve.latency import Coef, StepSample
from pdserve.step_hook import _note_overrun, _State
from pdserve.step_wire import decode, encode
from pdserve.steps import StepReceiver


def test_wire_round_trip():
    s = StepSample(0.0421, 512, 131072.0, 3, 1500)
    got, allow, tok = decode(encode(s, 0.09, 40))
    assert (got, allow, tok) == (s, 0.09, 40)
    assert math.isinf(decode(encode(s, float("inf"), 0))[1])
    # streams that are behind: a negative allowance, not "no stream"
    assert decode(encode(s, -0.25, 16))[1] == -0.25
    late = StepSample(0.2, 300, 45000.0, 2, 900, late_only=True)   # beside late streams only
    assert decode(encode(late, 0.09, 300))[0] == late


def test_engine_sends_worker_keeps_the_newest_and_the_last_allowance():
    rx = StepReceiver(keep=3)
    try:
        tx = _State(100.0, rx.address)
        assert rx.allowance() == (0.0, 0) and rx.take() == []
        for i in range(5):
            tx.send(StepSample(0.01 * (i + 1), 0, 0.0, i + 1, 100 * i), 0.05, 16 + i)
        got = rx.take()
        assert [g.decode_seqs for g in got] == [3, 4, 5]       # the newest `keep`
        # the slack the last step left: it was given 50 ms and took 50 (no fit yet: no
        # later step is known to be saved)
        assert rx.allowance() == (1e-6, 20) and rx.take() == []
        tx.send(StepSample(0.02, 0, 0.0, 2, 100), 0.5, 7)
        assert len(rx.take()) == 1 and rx.allowance() == (0.48, 7)
        tx.send(StepSample(0.5, 1000, 5e5), float("inf"), 0)   # no stream: unchunked
        assert rx.take()[0].prefill_tokens == 1000 and rx.allowance() == (0.0, 0)
    finally:
        rx.stop()


def test_the_worker_reads_the_slack_a_step_left_and_the_trace_what_it_was_given(tmp_path):
    """A step given 1 s of slack that took 0.83 s leaves 0.17 s, plus the later decode
    step its streams no longer need (the fit's, / safety): what the scheduler's chooser
    must see next. The step trace keeps the allowance the step was given."""
    rx = StepReceiver()
    try:
        tx = _State(100.0, rx.address)
        tx.coef = Coef(step=0.016, decode_seq=0.002, decode_ctx_10ktok=0.01)   # the budget's
        tx.trace = open(tmp_path / "trace.txt", "w")
        tx.send(StepSample(0.83, 1025, 5e5, 7, 7000, prefill_seqs=2), 1.0, 1940)
        tx.trace.close()
        rx.drain()
        rest = (0.016 + 7 * 0.002 + 0.7 * 0.01) / 0.9
        allow, tok = rx.allowance()
        assert allow == pytest.approx(1.0 - 0.83 + rest) and tok == 1940
        line = (tmp_path / "trace.txt").read_text().split()
        assert line[5] == "1.0000" and line[10] == "2"   # and how many prompts it computed
        # a local prompt's step with no stream beside it: no later decode step is saved
        tx.trace = None
        tx.send(StepSample(0.09, 90, 4e3, 0, 0), 0.5, 90)
        rx.drain()
        assert rx.allowance()[0] == pytest.approx(0.5 - 0.09)
    finally:
        rx.stop()


def test_sending_to_nobody_never_fails():
    tx = _State(100.0, "@pdserve-steps-nobody-listens")
    tx.send(StepSample(0.01), 0.05, 16)


def test_a_remote_prefilled_stream_counts_its_first_token_and_the_handoff():
    """The client's TPOT runs from the first token, which the prefill worker produced: the
    decode engine's allowance counts that token and the KV load since it, or it gives
    away slack the handoff already spent (measured: 8-token streams ended 2-6 ms over a
    31 ms SLO)."""
    import time
    from types import SimpleNamespace as NS

    from kv_transfer.handle import P_FIRST_AT
    from pdserve.step_hook import MAX_HANDOFF_S, _streams

    def req(rid, out, max_tokens, params=None):
        return NS(request_id=rid, num_computed_tokens=100 + out, num_prompt_tokens=100,
                  num_output_tokens=out, max_tokens=max_tokens, kv_transfer_params=params)

    st = _State(30.0, "")
    now = time.monotonic()
    remote = req("r", 0, 7, {P_FIRST_AT: time.time() - 0.08})
    local = req("l", 2, 8)
    skewed = req("s", 0, 7, {P_FIRST_AT: time.time() - 3600})
    streams, ctx, is_local = _streams(NS(running=[remote, local, skewed], waiting=[]), st, now)
    r, lo, sk = streams
    assert (r.produced, r.target) == (1, 8) and 0.079 < r.elapsed_s < 0.5
    assert (lo.produced, lo.target, lo.elapsed_s) == (2, 8, 0.0)
    assert sk.elapsed_s == MAX_HANDOFF_S            # a clock to distrust is capped
    assert ctx == 100 + 102 + 100 and not is_local
    # the start is kept: a later step sees the same origin
    again = _streams(NS(running=[remote], waiting=[]), st, now + 0.5)[0][0]
    assert abs(again.elapsed_s - (r.elapsed_s + 0.5)) < 1e-9


def test_waiting_remote_prefilled_requests_get_budget_to_start():
    """vLLM's waiting loop runs only while budget is left; a remote-prefilled request
    needs a token to start its KV load and its last prompt tokens after it, so the step
    budget adds them on top of what prompt chunks may take."""
    from types import SimpleNamespace as NS

    from kv_transfer.handle import P_REMOTE_PREFILL
    from pdserve.step_hook import MAX_WAITING_DECODE_TOKENS, _partial_prefills, _waiting_decodes

    def req(computed, tokens, prompt, params=None):
        return NS(num_computed_tokens=computed, num_tokens=tokens, num_prompt_tokens=prompt,
                  kv_transfer_params=params)

    remote = {P_REMOTE_PREFILL: True}
    not_started = req(0, 501, 501, remote)         # its load has not begun: one token
    loaded = req(500, 501, 501, remote)            # KV in: its last token
    partial = req(200, 501, 501, remote)           # a partial hit: at most the cap
    local = req(0, 300, 300)                       # a local prompt: not ours to add
    sched = NS(waiting=[not_started, local, partial], kv_holding_waiting=[loaded],
               running=[req(100, 300, 300), req(301, 302, 300)])
    assert _waiting_decodes(sched) == 1 + 1 + MAX_WAITING_DECODE_TOKENS
    assert _waiting_decodes(NS(waiting=[local], running=[])) == 0
    assert _partial_prefills(sched) == 1           # the other one is decoding


def test_a_landing_stream_gets_handoff_steps_without_prompt_chunks():
    """While a local prefill runs alone in long steps, a remote-prefilled request that
    must start its KV load or compute its last prompt token gets a step without the
    prompt's chunk; an in-flight load holds the prompt back for one SLO-sized step at
    most, and so does each phase of a landing request; the held prompt goes back in front
    of vLLM's running list."""
    from types import SimpleNamespace as NS

    from kv_transfer.handle import P_REMOTE_PREFILL
    from pdserve.latency import Coef
    from pdserve.step_budget import Budget
    from pdserve.step_hook import _handoff_step, _hold_prompts, _restore

    def req(rid, computed, prompt, status="WAITING", remote=False):
        return NS(request_id=rid, num_computed_tokens=computed, num_prompt_tokens=prompt,
                  num_tokens=prompt, status=NS(name=status),
                  kv_transfer_params={P_REMOTE_PREFILL: True} if remote else None)

    st = _State(224.0, "")
    # a CPU-like step: 0.13 s fixed, 4 ms a prompt token: `alone` steps are long
    st.coef = Coef(step=0.13, prefill_ktok=4.0, decode_seq=0.001)
    alone_budget = Budget(0.2016, 100)
    prompt = req("p", 300, 1000)
    fresh = req("r", 0, 501, remote=True)
    sched = NS(running=[prompt], waiting=[fresh], kv_holding_waiting=[],
               max_num_active_reqs=2, max_num_running_reqs=2)
    assert _handoff_step(sched, st, [], alone_budget, 10.0)
    held = _hold_prompts(sched)
    assert held == [prompt] and sched.running == []
    # the held prompt keeps its slot: vLLM admits up to one request meanwhile, not two
    assert sched.max_num_active_reqs == 1 and sched.max_num_running_reqs == 2
    sched.running.append(fresh)            # what vLLM's schedule may add meanwhile
    _restore(sched, held)
    assert sched.running == [prompt, fresh]
    assert sched.max_num_active_reqs == 2 and len(sched.running) <= sched.max_num_running_reqs
    # a vLLM without the separate admission limit admits up to max_num_running_reqs
    stream = req("s", 600, 500)            # decoding: not held
    old = NS(running=[prompt, stream], max_num_running_reqs=2)
    held = _hold_prompts(old)
    assert old.max_num_running_reqs == 1 and old.running == [stream]
    _restore(old, held)
    assert old.max_num_running_reqs == 2 and old.running == [prompt, stream]
    # a request vLLM cannot admit (no free blocks: the held prompt may hold them) holds
    # the prompt back for one SLO-sized step's time, not for ever
    sched = NS(running=[prompt], waiting=[fresh], kv_holding_waiting=[])
    assert _handoff_step(sched, st, [], alone_budget, 10.1)
    assert not _handoff_step(sched, st, [], alone_budget, 10.3)

    # its load in flight: a handoff for one SLO-sized step, then the prompt goes on
    loading = req("r", 500, 501, status="WAITING_FOR_REMOTE_KVS", remote=True)
    sched = NS(running=[prompt], waiting=[], kv_holding_waiting=[loading])
    assert _handoff_step(sched, st, [], alone_budget, 11.0)
    assert _handoff_step(sched, st, [], alone_budget, 11.1)
    assert not _handoff_step(sched, st, [], alone_budget, 11.3)
    # loaded: its last prompt token
    sched.kv_holding_waiting = [req("r", 500, 501, remote=True)]
    assert _handoff_step(sched, st, [], alone_budget, 11.4)

    # nothing lands, or no prompt is being computed, or the step would be short anyway
    assert not _handoff_step(NS(running=[prompt], waiting=[req("l", 0, 50)],
                                kv_holding_waiting=[]), st, [], alone_budget, 12.0)
    assert not _handoff_step(NS(running=[], waiting=[fresh], kv_holding_waiting=[]),
                             st, [], alone_budget, 12.0)
    short = Budget(0.15, 10)
    assert not _handoff_step(sched, st, [object()], short, 12.0)
    assert _handoff_step(sched, st, [object()], Budget(1.5, 300), 12.0)
    # a GPU-like step: `alone` steps are SLO-sized, no handoff step is needed
    st.coef = Coef(step=0.002, prefill_ktok=0.02, decode_seq=0.0001)
    assert not _handoff_step(sched, st, [], alone_budget, 12.0)


def test_remote_prefilled_requests_go_first_in_the_waiting_queue():
    """Behind local prompts in vLLM's FCFS waiting queue a remote-prefilled request would
    wait for each of them to be admitted before its KV load could start: it goes first,
    with its peers in their order; the local prompts keep theirs."""
    from types import SimpleNamespace as NS

    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    from kv_transfer.handle import P_REMOTE_PREFILL
    from pdserve.step_hook import _landing_first

    class Req:              # hashable, as vLLM's requests are (the queue makes sets of them)
        def __init__(self, rid, remote=False):
            self.request_id = rid
            self.kv_transfer_params = {P_REMOTE_PREFILL: True} if remote else None

    req = Req

    q = FCFSRequestQueue()
    for r in [req("l1"), req("r1", True), req("l2"), req("r2", True)]:
        q.add_request(r)
    _landing_first(NS(waiting=q))
    assert [r.request_id for r in q] == ["r1", "r2", "l1", "l2"]
    _landing_first(NS(waiting=q))                  # already in front: unchanged
    assert [r.request_id for r in q] == ["r1", "r2", "l1", "l2"]


def test_only_slack_sized_chunk_steps_are_measured_against_the_model():
    st = _State(100.0, "")
    st.coef = Coef(step=0.02, prefill_ktok=1.0, decode_seq=0.01, mixed=0.005)
    chunk = StepSample(0.13, 64, 2048.0, 1, 300)
    pred = st.coef.step_time(64, 2048.0, 1, 300)
    _note_overrun(st, chunk, sized=True)
    assert list(st.overruns) == [0.13 / pred]
    _note_overrun(st, chunk, sized=False)                          # the floor's, or held
    _note_overrun(st, StepSample(0.05, 0, 0.0, 2, 300), sized=True)   # decode only
    _note_overrun(st, StepSample(0.5, 512, 1.3e5, 0, 0), sized=True)  # a prompt alone
    assert len(st.overruns) == 1
    assert st.over == 1.0                         # too few to say yet
    for _ in range(7):
        _note_overrun(st, chunk, sized=True)
    assert st.over == 0.13 / pred > 1             # what the budget is given from now


def test_a_stream_whose_first_token_missed_its_ttft_slo_is_late():
    """The frontend dates each request's first token (`TTFT_DUE`); the engine asks once,
    when the stream is first seen decoding, whether its first token was computed after
    that: on a prefill worker (`P_FIRST_AT`), or here, now."""
    import time
    from types import SimpleNamespace as NS

    from kv_transfer.handle import P_FIRST_AT
    from pdserve.sampling import TTFT_DUE
    from pdserve.step_hook import _streams

    wall = time.time()

    def req(rid, due, params=None):
        return NS(request_id=rid, num_computed_tokens=101, num_prompt_tokens=100,
                  num_output_tokens=1, max_tokens=8, kv_transfer_params=params,
                  sampling_params=NS(extra_args={TTFT_DUE: due} if due else None))

    running = [req("local-on-time", wall + 5), req("local-late", wall - 1),
               req("remote-late", wall - 1, {P_FIRST_AT: wall - 0.5}),
               req("remote-on-time", wall - 1, {P_FIRST_AT: wall - 2}),  # handed over after
               req("no-slo", 0.0)]
    st = _State(30.0, "")
    streams, _, _ = _streams(NS(running=running, waiting=[]), st, time.monotonic())
    assert [s.late for s in streams] == [False, True, True, False, False]
    # decided once: the on-time stream stays on time however long it runs
    again = _streams(NS(running=running[:1], waiting=[]), st, time.monotonic() + 60)[0]
    assert not again[0].late


def test_the_decode_worker_hands_the_due_time_to_its_engine():
    from pdserve.rpc import pd_pb2
    from pdserve.sampling import TTFT_DUE, to_vllm

    sp = pd_pb2.SamplingParams(max_tokens=8)
    assert TTFT_DUE not in (to_vllm(sp, max_tokens=8).extra_args or {})   # no SLO: none
    got = to_vllm(sp, max_tokens=7, generated=1, ttft_due=1.7e9, kv_transfer_params={"a": 1})
    assert got.extra_args[TTFT_DUE] == 1.7e9 and got.extra_args["kv_transfer_params"] == {"a": 1}
