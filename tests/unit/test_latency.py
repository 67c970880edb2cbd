"""The latency model's fit and predictions (pdserve/latency.py), and the engine's step
budget (pdserve/step_budget.py). Pure: no engines, no sockets."""

import math
import random

import pytest

from pdserve.latency import (IDENTIFY_TOKENS, STEP_FEATURES, Coef, OnlineLinear, StepModel,
                             StepSample, TransferModel, chunk_attn)
from pdserve.step_budget import (ALONE_OVERHEAD, MIN_CHUNK, OVERRUN_MIN, Stream, allowance,
                                 budget, fcfs_tokens, floor_tokens, later_step, overrun,
                                 stream_tokens)

TRUE = Coef(step=0.004, prefill_ktok=0.9, prefill_attn_mtok2=0.05, decode_seq=0.0015,
            decode_ctx_10ktok=0.01, mixed=0.003)


def engine_steps(coef: Coef, n: int, rng: random.Random, noise: float = 0.03):
    """Steps of an engine that serves a mix: prompts in chunks, a third of them alone (a
    decode engine's local prefill with no stream), the rest beside 1-16 streams."""
    for _ in range(n):
        p = rng.choice([0, 0, 0, 64, 256, 1024])
        before = rng.choice([0, 512])
        d = rng.choice([0, rng.randint(1, 16), rng.randint(1, 16)]) if p else rng.randint(1, 16)
        c = d * rng.randint(100, 1500)
        a = chunk_attn(p, before) if p else 0.0
        t = coef.step_time(p, a, d, c) * (1 + rng.uniform(-noise, noise))
        yield StepSample(t, p, a, d, c)


def test_fit_recovers_the_engine_coefficients():
    m = StepModel()
    for s in engine_steps(TRUE, 400, random.Random(1)):
        m.observe(s)
    assert m.warm()
    got = Coef.of(m.coef())
    # predictions, not the coefficients themselves, are what is used: within 5%
    for p, d, c in ((1024, 0, 0), (0, 1, 500), (0, 16, 16000), (256, 8, 8000)):
        want = TRUE.step_time(p, chunk_attn(p, 0), d, c)
        assert got.step_time(p, chunk_attn(p, 0), d, c) == pytest.approx(want, rel=0.05)


def test_a_mixed_steps_own_fixed_part_is_fitted_and_priced_beside_streams():
    """A CPU engine whose step with one stream takes 75 ms alone and 102 ms with three
    prompt tokens beside it (measured, docs/benchmarks.md): the fit finds the mixed
    step's part, predicts such steps, and a step budget beside streams leaves room for
    it (without it, prompt tokens went beside streams whose SLO that part alone broke)."""
    cpu = Coef(step=0.060, prefill_ktok=3.5, prefill_attn_mtok2=1.3, decode_seq=0.015,
               decode_ctx_10ktok=0.1, mixed=0.027)
    m = StepModel()
    for s in engine_steps(cpu, 600, random.Random(7), noise=0.02):
        m.observe(s)
    for s in (StepSample(0, 3, chunk_attn(3, 500), 1, 500),
              StepSample(0, 0, 0.0, 1, 500)):
        got = Coef.of(m.coef()).step_time(s.prefill_tokens, s.prefill_attn, s.decode_seqs,
                                          s.decode_ctx)
        want = cpu.step_time(s.prefill_tokens, s.prefill_attn, s.decode_seqs, s.decode_ctx)
        assert got == pytest.approx(want, rel=0.05)
    assert Coef.of(m.coef()).mixed == pytest.approx(0.027, rel=0.25)
    # 0.1 s beside one stream: 25 ms spare without the mixed part, none with it
    assert cpu.chunk_budget(0.1, 1, 500) == 0
    no_mixed = Coef.of(cpu.as_list()[:5])
    assert no_mixed.chunk_budget(0.1, 1, 500) > 0
    assert cpu.chunk_budget(0.1, 0, 0) == no_mixed.chunk_budget(0.1, 0, 0)   # alone: none


def test_a_warm_model_stays_warm_through_a_long_decode_only_stretch():
    """An engine's warm-up prompt, a stream's prompt, then the stream decoding alone for
    1,000 steps (the faded count of prompt steps falls under the bar after ~200 of them):
    the model keeps its coefficients, so a prompt that comes then is budgeted, not let in
    whole (a CI run: 300 tokens in one step beside a stream with a 1 ms TPOT SLO)."""
    m = StepModel()
    m.observe(StepSample(0.030, 512, chunk_attn(512, 0)))
    m.observe(StepSample(0.004, 40, chunk_attn(40, 0)))
    for i in range(1000):
        m.observe(StepSample(0.0015, 0, 0.0, 1, 40 + i))
        assert m.warm() or i < 1, i
    got = Coef.of(m.coef())
    assert got.decode_step(1, 1000) == pytest.approx(0.0015, rel=0.05)
    assert 0 < got.chunk_budget(0.010, 1, 1000) < 1000


def decode_only(coef: Coef, n: int, rng: random.Random):
    """A decode engine while every prompt is prefilled remotely: decode steps, and every
    tenth step a remote-prefilled request's one sampled prompt token beside them."""
    for i in range(n):
        d = rng.randint(1, 16)
        c = d * rng.randint(100, 1500)
        p = 1 if i % 10 == 0 else 0
        a = chunk_attn(p, 500) if p else 0.0
        yield StepSample(coef.step_time(p, a, d, c), p, a, d, c)


def test_a_feature_no_recent_step_identifies_keeps_its_estimate():
    """A decode engine that computed prompts, then 20,000 steps with none (every prompt
    prefilled remotely: minutes of decode steps): a 1,024-token prompt that comes then is
    predicted as before. With the ridge pulling towards 0 the prompt token's cost shrank
    to a tenth of itself after 5,000 such steps, then to nothing, and the engine's budget
    (which fits on its own) would have let whole prompts in beside streams."""
    rng = random.Random(11)
    m = StepModel()
    for s in engine_steps(TRUE, 400, rng):
        m.observe(s)
    truth = TRUE.step_time(1024, chunk_attn(1024, 0), 4, 4000)
    before = Coef.of(m.coef()).step_time(1024, chunk_attn(1024, 0), 4, 4000)
    assert before == pytest.approx(truth, rel=0.05)
    for k in range(4):
        for s in decode_only(TRUE, 5000, rng):
            m.observe(s)
        got = Coef.of(m.coef())
        assert got.step_time(1024, chunk_attn(1024, 0), 4, 4000) == pytest.approx(
            before, rel=0.02), k
        assert got.decode_step(8, 8000) == pytest.approx(TRUE.decode_step(8, 8000), rel=0.02)
        assert 0 < got.chunk_budget(0.05, 4, 4000) < 60
    assert not m.fit.known(1)     # a pool-mate's fresher estimate may still be preferred
    # the engine slowed meanwhile: prompt steps come back and the fit follows them as
    # closely as a new engine's fit of the same steps does
    slower = Coef.of([c * (1.5 if j in (1, 2) else 1.0) for j, c in enumerate(TRUE.as_list())])
    fresh = StepModel()
    for s in engine_steps(slower, 400, rng):
        m.observe(s)
        fresh.observe(s)
    want = Coef.of(fresh.coef()).prefill_time(1024)
    assert want == pytest.approx(slower.prefill_time(1024), rel=0.1)
    # (the prompt steps of before, absent for longer than StepModel's `keep`, still count
    # a quarter: 0.95 of the fresh fit's; 1.03 with every kind fading for good)
    assert Coef.of(m.coef()).prefill_time(1024) == pytest.approx(want, rel=0.06)


def test_the_hold_changes_nothing_until_two_half_lives_pass_without_the_feature():
    """The fit with the hold is the plain ridge fit up to the hold: the same coefficients
    through 999 steps after the last prompt step (a half-life of 500), and the held
    prompt cost above the plain fit's, which fades, after it."""
    rng = random.Random(5)
    held, plain = StepModel(), StepModel()
    plain.fit = OnlineLinear(len(STEP_FEATURES), 500.0, hold_after=10**9, keep=held.fit.keep)
    steps = list(engine_steps(TRUE, 300, rng)) + list(decode_only(TRUE, 1500, rng))
    last = max(i for i, s in enumerate(steps) if s.prefill_tokens >= IDENTIFY_TOKENS)
    for i, s in enumerate(steps):
        held.observe(s)
        plain.observe(s)
        if i < last + 1000:
            assert held.coef() == plain.coef(), i
    assert last + 1000 < len(steps)
    assert held.coef()[1] > 1.01 * plain.coef()[1]


def test_fit_is_non_negative_and_unseen_features_are_unknown():
    m = StepModel()
    rng = random.Random(2)
    for _ in range(50):                 # a prefill-only engine: no decode steps ever
        p = rng.choice([128, 512, 2048])
        m.observe(StepSample(0.002 + p * 1e-3 * rng.uniform(0.98, 1.02), p, chunk_attn(p, 0)))
    assert all(c >= 0 for c in m.coef())
    assert not m.warm() and not m.fit.known(3) and m.fit.known(1)
    assert m.coef()[3] == 0.0
    one = StepModel()          # known means seen in samples, whatever their weight
    one.observe(StepSample(0.001, 0, 0.0, 1, 10))
    assert not one.fit.known(3)
    one.observe(StepSample(0.001, 0, 0.0, 2, 20))
    assert one.fit.known(3)


def test_old_steps_fade_when_the_engine_changes_speed():
    m = StepModel(half_life=50)
    rng = random.Random(3)
    for s in engine_steps(TRUE, 300, rng):
        m.observe(s)
    slower = Coef.of([2 * c for c in TRUE.as_list()])
    for s in engine_steps(slower, 400, rng):
        m.observe(s)
    assert Coef.of(m.coef()).prefill_time(1000) == pytest.approx(slower.prefill_time(1000),
                                                                 rel=0.1)


def test_merged_takes_the_fallback_where_unknown():
    mine = Coef(0.001, 2.0, 0.0, 0.0, 0.0, 0.0)
    pool = Coef(0.005, 1.0, 0.1, 0.002, 0.02, 0.004)
    got = mine.merged(pool, [True, True, False, False, False, False])
    assert got.as_list() == [0.001, 2.0, 0.1, 0.002, 0.02, 0.004]
    # an older peer's five coefficients: no mixed part
    assert Coef.of([0.001, 2.0, 0.1, 0.002, 0.02]).mixed == 0.0


def test_prefill_time_in_whole_steps_and_chunked_beside_streams():
    c = TRUE
    one = c.prefill_time(1000)
    assert one == pytest.approx(c.step_time(1000, chunk_attn(1000, 0)))
    two = c.prefill_time(1000, max_step_tokens=500)   # two steps: one more per-step part,
    assert two == pytest.approx(one + c.step, rel=1e-9)   # the same attention work
    allow = 0.05
    chunk = c.chunk_budget(allow, 8, 8000, before=500)
    t = c.steps_time(1000, chunk, 0, 8, 8000)
    assert 0 < chunk < 1000
    # every step fits the allowance (the chunk is sized at mid-prompt attention)
    assert c.step_time(chunk, chunk_attn(chunk, 500), 8, 8000) <= allow * 1.0001
    assert c.step_time(chunk, chunk_attn(chunk, 1000 - chunk), 8, 8000) <= allow * 1.02
    assert t > one                                   # chunking costs TTFT, never saves it
    assert c.chunk_budget(c.decode_step(8, 8000) * 0.5, 8, 8000) == 0   # no room at all


def test_online_linear_ignores_bad_samples():
    f = OnlineLinear(2)
    for y in (math.nan, -1.0, math.inf):
        f.observe([1.0, 1.0], y)
    assert f.samples == 0
    f.observe([1.0, 2.0], 3.0)
    assert f.samples == 1


def test_transfer_model():
    t = TransferModel()
    assert t.predict(10**8) == 0.0                   # nothing measured: no guess
    for gb in (0.01, 0.05, 0.1, 0.2):
        t.observe(int(gb * 1e9), 0.001 + gb / 5.0)   # 5 GB/s and 1 ms per transfer
    assert t.predict(int(0.1e9)) == pytest.approx(0.021, rel=0.02)


def test_allowance_is_the_slack_each_stream_keeps_after_plain_decode_steps():
    slo, base = 0.1, 0.04
    fresh = Stream(elapsed_s=0.0, produced=1, target=65)
    # 64 more tokens within 6.4 s; 63 of them at 40 ms leave 3.88 s for this step
    assert allowance([fresh], slo, 1.0, base) == pytest.approx(6.4 - 63 * base)
    # with no decode step known, all that is left
    assert allowance([fresh], slo, safety=1.0) == pytest.approx(6.4)
    fast = Stream(elapsed_s=32 * 0.04, produced=33, target=65)   # ran at 40 ms so far
    assert allowance([fast], slo, 1.0, base) == pytest.approx(6.4 - 1.28 - 31 * base)
    behind = Stream(elapsed_s=32 * 0.22, produced=33, target=65)
    assert allowance([fast, behind], slo, 1.0, base) < 0   # the tightest stream decides
    assert allowance([Stream(0.0, 5, 5)], slo) == math.inf  # finished: nothing to protect
    # the safety holds the stream to 0.9 x SLO and reserves base / 0.9 per later step
    assert allowance([fresh], slo, 0.9, base) == pytest.approx(0.9 * 6.4 - 63 * base / 0.9)


def test_budget():
    slo = 0.1
    assert budget([], TRUE, slo, 0, 4096).tokens == 0       # no streams: unchunked...
    alone = budget([], TRUE, slo, 0, 4096, local_prefill=True)   # ...unless the prompt
    assert alone.allow_s == pytest.approx(0.09)                  # decodes here: SLO-sized
    assert alone.tokens == TRUE.chunk_budget(0.09, 0, 0) > 16    # steps
    s = [Stream(0.0, 1, 65)] * 4
    b = budget(s, TRUE, slo, 4000, 4096)
    # the later steps are planned as floor steps beside the prompts (`later_step`)
    rest = TRUE.step_time(MIN_CHUNK, chunk_attn(MIN_CHUNK, 0), 4, 4000)
    assert rest > TRUE.decode_step(4, 4000) / 0.9
    assert b.allow_s == pytest.approx(0.09 * 64 - 63 * rest)
    want = TRUE.chunk_budget(b.allow_s, 4, 4000)
    assert want > 4096 and b.tokens == 4096                # up to the engine's own cap
    # a stream near its end has little slack left: it rules
    late = Stream(elapsed_s=60 * 0.085, produced=61, target=65)
    got = budget(s + [late], TRUE, slo, 4000, 4096).tokens
    assert 16 < got < 4096
    behind = [Stream(6.0, 33, 65)]                         # no slack: the floor keeps
    assert budget(behind, TRUE, slo, 1000, 4096).tokens == 16   # prompts moving
    # no model yet (an engine's first prompts): the streams first, the prompts at 16 a
    # step (vLLM's own budget let a 300-token prompt into one step beside a stream with
    # a 1 ms TPOT SLO); with no stream to keep, vLLM's own
    assert budget(s, None, slo, 4000, 4096).tokens == 16
    assert budget([Stream(0.0, 1, 1)], None, slo, 4000, 4096).tokens == 0


def test_a_fresh_streams_slack_is_not_one_steps_when_prompts_go_on_beside_it():
    """While prompts are computed beside a stream, its later steps are floor steps, not
    plain decode steps: the allowance plans them so (`later_step`). Planned as plain
    steps, a fresh 8-token stream's first step got the slack of its whole life (on a
    host whose decode step is 0.76 x SLO: 1.2 x the SLO in one step) while every later
    step ran at the floor, near safety x SLO: the plan averaged over safety x SLO before
    any overrun, and one such step ran 30% over and lost the stream."""
    slo = 0.0475
    cpu = Coef(step=0.033, prefill_ktok=1.5, decode_seq=0.002, decode_ctx_10ktok=0.02)
    fresh = [Stream(elapsed_s=0.0, produced=1, target=8)]
    base = cpu.decode_step(1, 600)
    assert 0.7 < base / slo < 0.8
    b = budget(fresh, cpu, slo, 600, 4096, local_prefill=True)
    rest = later_step(cpu, 1, 600, floor_tokens(cpu, slo, 1, 600))
    assert base / 0.9 < rest <= 0.9 * slo * 1.0001      # a floor step beside the stream
    # the plan, this step and six floor steps, keeps the stream within safety x SLO
    assert b.allow_s + 6 * rest <= 0.9 * slo * 7 * 1.0001
    assert b.allow_s < slo
    old = allowance(fresh, slo, 0.9, base)               # the plan with plain steps
    assert old > 1.2 * slo and old + 6 * rest > 0.9 * slo * 7
    # a stream at its last token has no later step to plan: this step gets all its slack
    ending = [Stream(elapsed_s=6 * 0.03, produced=7, target=8)]
    assert budget(ending, cpu, slo, 600, 4096).allow_s == pytest.approx(
        0.9 * slo * 7 - 6 * 0.03)


def test_fcfs_budget_ends_prompts_in_arrival_order():
    # the fixed part is 4 ms and a token 0.9 ms: packing pays only below ~84 tokens
    floor = int(TRUE.step * 0.95 / 0.05 / TRUE.per_token())
    assert 60 < floor < 100
    assert fcfs_tokens(1000, TRUE, 4096) == 1000       # the head prompt alone
    assert fcfs_tokens(10, TRUE, 4096) == floor         # small prompts still pack
    assert fcfs_tokens(5000, TRUE, 4096) == 0           # past the cap: vLLM's own
    assert fcfs_tokens(1000, None, 4096) == 0           # no model yet: vLLM's own
    # a GPU-like engine (big fixed part, cheap tokens) packs up to its cap: no limit
    gpu = Coef(step=0.015, prefill_ktok=0.02)
    assert fcfs_tokens(1000, gpu, 8192) == 0
    assert fcfs_tokens(1, TRUE, 4096) >= MIN_CHUNK


def test_local_prefill_alone_keeps_the_fixed_part_a_small_share_of_each_step():
    # a CPU whose step's fixed part is 110 ms of a 189 ms SLO-sized step: SLO-sized
    # steps would hold ~15 prompt tokens and run the prompt at a third of its speed
    cpu = Coef(step=0.11, prefill_ktok=5.0)
    b = budget([], cpu, 0.21, 0, 4096, local_prefill=True)
    assert cpu.chunk_budget(0.9 * 0.21, 0, 0) < 20 < b.tokens
    step = cpu.step_time(b.tokens)
    assert cpu.step / step == pytest.approx(ALONE_OVERHEAD, rel=0.05)
    assert b.allow_s == pytest.approx(0.9 * 0.21)      # what a landing stream is held to
    # streams running: their allowance rules, whatever the fixed part: a fresh stream of
    # 17 tokens affords one step of 16 x 0.189 less its 15 later floor steps (15 prompt
    # tokens beside it: 0.185 s each)
    s = [Stream(0.0, 1, 17)]
    b = budget(s, cpu, 0.21, 100, 4096)
    fl = floor_tokens(cpu, 0.21, 1, 100)
    assert later_step(cpu, 1, 100, fl) == pytest.approx(0.11 + 15 * 0.005)
    assert b.allow_s == pytest.approx(16 * 0.189 - 15 * 0.185)
    assert b.tokens == cpu.chunk_budget(b.allow_s, 1, 100)
    # a stream that used its slack already: the floor
    used = Stream(elapsed_s=b.allow_s, produced=2, target=17)
    floor = budget([used], cpu, 0.21, 100, 4096).tokens
    assert floor == floor_tokens(cpu, 0.21, 1, 100) == 15   # (189 - 110) ms / 5 ms a token
    assert cpu.step_time(floor, 0, 1, 100) <= 0.9 * 0.21


def test_the_floor_never_breaks_the_streams_it_runs_beside():
    """16 prompt tokens beside a 140 ms decode step outlast a 201 ms SLO on a CPU: the
    floor shrinks to what fits in safety * SLO, but a prompt always moves."""
    cpu = Coef(step=0.14, prefill_ktok=5.5)
    f = floor_tokens(cpu, 0.201, 1, 600)
    assert 1 <= f < MIN_CHUNK and cpu.step_time(f, 0, 1, 600) <= 0.9 * 0.201
    assert cpu.step_time(MIN_CHUNK, 0, 1, 600) > 0.201          # what the old floor did
    assert floor_tokens(cpu, 0.1, 1, 600) == 1                 # no room at all: one token
    assert floor_tokens(TRUE, 0.1, 4, 4000) == MIN_CHUNK        # room: the usual floor
    # in the long run, beside streams, what keeps each step within safety * SLO
    got = stream_tokens(cpu, 0.201, 1, 600)
    assert got == cpu.chunk_budget(0.9 * 0.201, 1, 600) == f
    assert stream_tokens(TRUE, 0.1, 4, 4000) == TRUE.chunk_budget(0.09, 4, 4000) > MIN_CHUNK


def test_a_floor_of_zero_gives_streams_with_no_room_decode_only_steps():
    """PDSERVE_STEP_FLOOR=0: where not one prompt token fits beside streams that have no
    slack (a mixed step's own part alone breaks safety * SLO), the step holds the prompts
    back (`hold`) instead of paying that part for one token; where tokens fit, or the
    streams have slack, nothing changes."""
    cpu = Coef(step=0.075, prefill_ktok=5.0, mixed=0.027)
    behind = [Stream(elapsed_s=3.0, produced=20, target=40)]
    one = budget(behind, cpu, 0.088, 600, 4096)
    assert one.tokens == 1 and not one.hold              # the default floor: one token
    assert cpu.step_time(1, 0, 1, 600) + cpu.mixed > 0.9 * 0.088
    none = budget(behind, cpu, 0.088, 600, 4096, least=0)
    assert none.hold and none.tokens == 0
    assert none.allow_s > one.allow_s        # its later steps are decode-only: shorter
    assert floor_tokens(cpu, 0.088, 1, 600, least=0) == 0
    assert stream_tokens(cpu, 0.088, 1, 600, least=0) == 0
    fresh = [Stream(0.5, 38, 40)]                         # slack: a chunk either way
    zero, one = budget(fresh, cpu, 0.088, 600, 4096, least=0), budget(fresh, cpu, 0.088, 600,
                                                                       4096)
    assert zero.tokens > 1 and one.tokens > 1 and not (zero.hold or one.hold)
    roomy = Coef(step=0.02, prefill_ktok=0.5)             # room for the usual floor
    assert budget(behind, roomy, 0.088, 600, 4096, least=0).tokens == MIN_CHUNK


def test_steps_time_closed_form_equals_stepping():
    for tokens, chunk, cached in ((1000, 64, 0), (1000, 7, 300), (5, 64, 0), (4096, 4096, 10),
                                  (0, 16, 0)):
        t, done = 0.0, 0
        while done < tokens:
            ch = min(chunk, tokens - done)
            t += TRUE.step_time(ch, chunk_attn(ch, cached + done), 3, 900)
            done += ch
        assert TRUE.steps_time(tokens, chunk, cached, 3, 900) == pytest.approx(t, abs=1e-12)


def test_one_token_prefills_leave_the_prompt_cost_unknown():
    """A decode engine computes one token per remote prefill: that says nothing about a
    prompt token's cost, so its fit borrows those terms (known() stays False)."""
    m = StepModel()
    for _ in range(40):
        m.observe(StepSample(TRUE.step_time(1, 1000, 0, 0) * 1.0, 1, 1000.0, 0, 0))
        m.observe(StepSample(TRUE.decode_step(2, 2000), 0, 0.0, 2, 2000))
    assert m.warm()                                  # the engine's own budget may use it
    assert not m.fit.known(1) and not m.fit.known(2) and m.fit.known(3)
    m.observe(StepSample(TRUE.step_time(64, chunk_attn(64, 0)), 64, chunk_attn(64, 0), 0, 0))
    m.observe(StepSample(TRUE.step_time(64, chunk_attn(64, 0)), 64, chunk_attn(64, 0), 0, 0))
    assert m.fit.known(1) and m.fit.known(2)


def test_the_mixed_term_can_be_left_out_for_comparisons():
    """StepModel(mixed=False) (PDSERVE_STEP_MIXED=0): the five-term model, whose mixed
    coefficient stays 0 whatever the steps say."""
    cpu = Coef(step=0.060, prefill_ktok=3.5, prefill_attn_mtok2=1.3, decode_seq=0.015,
               decode_ctx_10ktok=0.1, mixed=0.027)
    m = StepModel(mixed=False)
    for s in engine_steps(cpu, 300, random.Random(8)):
        m.observe(s)
    assert m.warm() and Coef.of(m.coef()).mixed == 0.0


def test_slack_sized_chunks_shrink_by_how_far_such_steps_ran_over_the_model():
    """A chunk that takes a stream's slack is sized for the model's step time; where such
    steps ran over the model (median measured / predicted), the next ones are sized for
    that much more, so the step itself stays within the allowance. The floor and a stream
    with no slack are not touched."""
    assert overrun([1.4] * (OVERRUN_MIN - 1)) == 1.0            # too few to say
    assert overrun([1.1, 1.3, 1.5, 9.0, 1.2, 1.4, 1.3, 1.3]) == pytest.approx(1.3)
    assert overrun([0.7] * OVERRUN_MIN) == 1.0                  # running high: unchanged
    assert overrun([5.0] * OVERRUN_MIN) == 2.0                  # bounded
    slo = 0.1
    s = [Stream(0.5, 10, 40)]                   # slack banked: a large chunk fits
    plain = budget(s, TRUE, slo, 1000, 4096)
    assert plain.sized and 16 < plain.tokens < 4096
    b = budget(s, TRUE, slo, 1000, 4096, over=1.3)
    assert b.sized and b.allow_s == plain.allow_s
    # sized so that 1.3 x the model's step for it fits the allowance, as the plain one
    # fits it at 1 x
    assert b.tokens == TRUE.chunk_budget(plain.allow_s / 1.3, 1, 1000) < plain.tokens
    assert TRUE.step_time(b.tokens, 0, 1, 1000) * 1.3 <= plain.allow_s + 1e-9
    behind = [Stream(6.0, 33, 65)]              # no slack: the floor, as before
    assert budget(behind, TRUE, slo, 1000, 4096, over=2.0).tokens == 16
    assert not budget(behind, TRUE, slo, 1000, 4096).sized


def test_streams_that_missed_their_ttft_slo_keep_no_slack():
    """A stream whose first token came after its TTFT SLO has missed its SLOs whatever its
    TPOT: a prompt beside it is not held to its slack, and with only such streams the
    engine steps as with none (`alone` chunks for a prompt that decodes here)."""
    slo = 0.1
    fresh = Stream(0.0, 1, 65)
    behind = Stream(6.0, 33, 65)                       # no slack at all
    late = Stream(6.0, 33, 65, late=True)              # the same, after its TTFT SLO
    assert allowance([behind], slo) < 0 and allowance([late], slo) == math.inf
    assert allowance([fresh, late], slo, 0.9, 0.04) == allowance([fresh], slo, 0.9, 0.04)
    assert budget([late], TRUE, slo, 1000, 4096) == budget([], TRUE, slo, 0, 4096)
    alone_b = budget([late] * 3, TRUE, slo, 1000, 4096, local_prefill=True)
    assert alone_b == budget([], TRUE, slo, 0, 4096, local_prefill=True)
    floor = budget([behind], TRUE, slo, 1000, 4096, local_prefill=True).tokens
    assert alone_b.tokens > floor == MIN_CHUNK
    # beside a stream with an SLO left, only its slack counts (the step's decode work is
    # every stream's)
    both = budget([fresh, late], TRUE, slo, 1000, 4096)
    assert both.allow_s == pytest.approx(
        allowance([fresh], slo, 0.9, TRUE.decode_step(2, 1000), later_step(TRUE, 2, 1000,
                                                 floor_tokens(TRUE, slo, 2, 1000))))
