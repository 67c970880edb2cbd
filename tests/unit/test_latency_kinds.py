"""The step model's kinds of step (pdserve/latency.py, `OnlineLinear`'s `keep` and
`step_kind`): a kind absent for longer than `keep` stops fading. Pure."""

import random

import pytest

from pdserve.latency import KEEP, Coef, OnlineLinear, StepModel, StepSample, chunk_attn, step_kind


def test_short_prompts_after_long_ones_leave_a_long_prompts_cost_as_it_was():
    """A decode engine that computed 384-1,024-token prompts in 128-token chunks, then,
    for 6,000 steps, only 16-64-token prompts beside its streams (a decode-heavy mix):
    the fit still predicts a 1,024-token prompt within a sixth of its time. With every
    kind of step fading alike it predicted a third of it: the short prompts identify the
    prompt terms, weakly, over a narrow range, and the long ones had faded (measured: a
    local prompt predicted at 6.3 s took 12.3 s, docs/benchmarks.md)."""
    cpu = Coef(step=0.1, prefill_ktok=6.5, prefill_attn_mtok2=4.0, decode_seq=0.0077,
               decode_ctx_10ktok=0.01, mixed=0.02)

    def fit(keep: float) -> float:
        rng = random.Random(1)

        def step(p: int, before: int, d: int) -> StepSample:
            a = chunk_attn(p, before) if p else 0.0
            c = d * rng.randint(300, 1200)
            return StepSample(cpu.step_time(p, a, d, c) * rng.lognormvariate(0, 0.07),
                              p, a, d, c)
        m = StepModel(keep=keep)
        for _ in range(300):
            n, done = rng.choice([384, 512, 640, 1024]), 0
            while done < n:
                m.observe(step(min(128, n - done), done, rng.randint(0, 3)))
                done += 128
            for _ in range(5):
                m.observe(step(0, 0, rng.randint(1, 4)))
        for i in range(6000):
            m.observe(step(rng.randint(16, 64) if i % 10 == 0 else 0, 0, rng.randint(1, 8)))
        got = Coef.of(m.coef())
        assert got.decode_step(8, 6000) == pytest.approx(cpu.decode_step(8, 6000), rel=0.03)
        return got.prefill_time(1024) / cpu.prefill_time(1024)

    assert fit(KEEP) == pytest.approx(1.0, rel=1 / 6)
    assert fit(0.0) < 0.5


def test_a_kind_of_sample_absent_for_longer_than_keep_stops_fading():
    """`OnlineLinear` with `keep`: kinds fade with every sample, each for `keep` samples
    after its last one; a step's kind is its prompt tokens, the furthest prompt position
    it computed (to a power of two) and whether it decoded."""
    g = 0.5 ** (1 / 10)
    for keep, want in ((20, (0.25 * 1 + 3) / 1.25), (0, 3.0)):
        f = OnlineLinear(1, half_life=10, keep=keep)
        for _ in range(200):
            f.observe([1.0], 1.0, kind="a")
        for _ in range(1000):
            f.observe([1.0], 3.0, kind="b")
        assert f.coef()[0] == pytest.approx(want, rel=1e-3), keep
        assert g ** 20 == pytest.approx(0.25)
    one, kinds = OnlineLinear(2, half_life=10), OnlineLinear(2, half_life=10, keep=5)
    for i in range(50):    # one kind only: the plain fit
        one.observe([1.0, i % 7], 2.0 + i % 7)
        kinds.observe([1.0, i % 7], 2.0 + i % 7, kind="a")
    assert kinds.coef() == pytest.approx(one.coef(), rel=1e-9)
    assert step_kind(StepSample(0.1, 128, chunk_attn(128, 896), 2, 100)) == (8, 11, True)
    assert step_kind(StepSample(0.1, 0, 0.0, 3, 100)) == (0, 0, True)
    assert step_kind(StepSample(0.1, 1, chunk_attn(1, 500), 0, 0)) == (1, 9, False)
