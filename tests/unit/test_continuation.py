"""pdserve/continuation.py: a decode engine that continues a request from the prefill
engine's first token penalises as a colocated engine would. Checked against vLLM's own
penalty op: colocated (the first token is output) against continued (it is the last prompt
token, and our processor runs before vLLM's penalties, as vLLM's sampler orders them)."""

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.ops.penalties import apply_all_penalties

from pdserve.continuation import FirstTokenPenalties, _through_repetition
from pdserve.sampling import FIRST_TOKEN

V = 50


def _penalised(logits, prompt, output, p, f, r):
    out = logits.clone().unsqueeze(0)
    prompt_t = torch.tensor([prompt], dtype=torch.long)
    return apply_all_penalties(out, prompt_t, torch.tensor([p]), torch.tensor([f]),
                               torch.tensor([r]), [list(output)])[0]


def _processor(params):
    lp = FirstTokenPenalties.__new__(FirstTokenPenalties)   # no vllm_config needed here
    return lp.new_req_logits_processor(params)


@pytest.mark.parametrize("p,f,r", [(0.7, 0.0, 1.0), (0.0, 0.9, 1.0), (0.5, 0.4, 1.0),
                                   (0.5, 0.4, 1.3), (-0.3, 0.6, 0.8)])
@pytest.mark.parametrize("later", [[3, 4], [7, 3, 7, 9], []])
def test_continued_equals_colocated(p, f, r, later):
    torch.manual_seed(0)
    logits = torch.randn(V) * 3
    prompt, first = [1, 2, 5], 7
    colocated = _penalised(logits, prompt, [first] + later, p, f, r)
    proc = _processor(SamplingParams(presence_penalty=p, frequency_penalty=f,
                                     repetition_penalty=r,
                                     extra_args={FIRST_TOKEN: first}))
    row = proc(list(later), logits.clone())
    continued = _penalised(row, prompt + [first], later, p, f, r)
    torch.testing.assert_close(continued, colocated, rtol=0, atol=1e-5)


def test_without_the_fix_they_differ():
    """The check above can fail: vLLM alone, with the first token in the prompt, does not
    penalise it as output."""
    logits = torch.randn(V) * 3
    colocated = _penalised(logits, [1, 2], [7], 0.5, 0.5, 1.0)
    plain = _penalised(logits, [1, 2, 7], [], 0.5, 0.5, 1.0)
    assert abs(float(colocated[7] - plain[7])) == pytest.approx(1.0)


def test_no_processor_where_nothing_differs():
    assert _processor(SamplingParams(presence_penalty=0.5)) is None        # not continued
    assert _processor(SamplingParams(extra_args={FIRST_TOKEN: 3})) is None  # no penalty
    assert _processor(SamplingParams(repetition_penalty=1.2,
                                     extra_args={FIRST_TOKEN: 3})) is None  # counts prompts


def test_presence_is_counted_once_the_token_comes_again():
    proc = _processor(SamplingParams(presence_penalty=1.0, extra_args={FIRST_TOKEN: 4}))
    out: list[int] = []
    assert float(proc(out, torch.zeros(V))[4]) == -1.0
    out += [2, 4]                       # vLLM's own presence term covers it from now on
    assert float(proc(out, torch.zeros(V))[4]) == 0.0


def test_through_repetition_inverts_it():
    def rep(v, r):
        return v / r if v > 0 else v * r
    for x in (2.0, -2.0, 0.3):
        for r in (1.3, 0.8):
            y = _through_repetition(x, r, 0.5)
            assert rep(y, r) == pytest.approx(rep(x, r) - 0.5)


def test_validate_params_refuses_a_bad_token():
    with pytest.raises(ValueError):
        FirstTokenPenalties.validate_params(SamplingParams(extra_args={FIRST_TOKEN: -1}))
    FirstTokenPenalties.validate_params(SamplingParams(extra_args={FIRST_TOKEN: 5}))


@pytest.mark.parametrize("fp64", [False, True])
def test_advance_gives_the_second_steps_noise(fp64):
    """A continued request's generator, advanced once through vLLM's own sampler, draws
    for token 2 what a colocated request's draws for token 2."""
    from types import SimpleNamespace

    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from pdserve.continuation import _advance
    sampler = TopKTopPSampler(use_fp64_gumbel=fp64)
    runner = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: V),
                             device=torch.device("cpu"),
                             sampler=SimpleNamespace(topk_topp_sampler=sampler))
    torch.manual_seed(1)
    steps = [torch.randn(1, V) for _ in range(6)]

    def sample(logits, g):
        return int(sampler(logits.clone(), {0: g}, None, None)[0][0])
    colocated = torch.Generator().manual_seed(1234)
    seq = [sample(x, colocated) for x in steps]
    continued = torch.Generator().manual_seed(1234)
    _advance(runner, continued)
    assert [sample(x, continued) for x in steps[1:]] == seq[1:]
    fresh = torch.Generator().manual_seed(1234)           # what it was: token 1's noise
    assert [sample(x, fresh) for x in steps[1:]] != seq[1:]


def _bad_worded(logits, words, output):
    from vllm.v1.sample.ops.bad_words import apply_bad_words
    out = logits.clone().unsqueeze(0)
    apply_bad_words(out, {0: words}, [list(output)])
    return out[0]


def _bad_words_params(words, first):
    sp = SamplingParams(bad_words=["unused"], extra_args={FIRST_TOKEN: first})
    sp._bad_words_token_ids = words          # what vLLM's input processor tokenizes them to
    return sp


@pytest.mark.parametrize("later", [[], [8], [8, 9], [3], [8, 9, 4]])
def test_bad_words_that_begin_with_the_first_token_are_blocked_as_colocated(later):
    """vLLM's bad-words op over the colocated output (first token included) against the
    continued request: our processor, then vLLM's op over the decode engine's output."""
    words = [[7, 8], [7, 8, 9], [8, 9, 4], [11], [3, 7]]
    logits = torch.randn(V) * 3
    first = 7
    colocated = _bad_worded(logits, words, [first] + later)
    proc = _processor(_bad_words_params(words, first))
    continued = _bad_worded(proc(list(later), logits.clone()), words, later)
    torch.testing.assert_close(continued, colocated, rtol=0, atol=0)


def test_bad_words_without_the_fix_differ():
    """The check above can fail: vLLM alone lets [7, 8] through after a first token 7."""
    logits = torch.zeros(V)
    assert float(_bad_worded(logits, [[7, 8]], [7])[8]) == float("-inf")
    assert float(_bad_worded(logits, [[7, 8]], [])[8]) == 0.0


def test_penalties_and_bad_words_together():
    sp = _bad_words_params([[4, 5]], 4)
    sp.presence_penalty = 1.0
    row = _processor(sp)([], torch.zeros(V))
    assert float(row[5]) == float("-inf") and float(row[4]) == -1.0
