"""Floor steps gathered into chunks (pdserve/step_budget.py `gathered`, PDSERVE_STEP_GATHER)
or paced by the prompts' TTFT dues (`due_paced`, PDSERVE_STEP_DUE): pure, no engine."""

from types import SimpleNamespace as NS

from pdserve.latency import Coef, chunk_attn
from pdserve.step_budget import (MIN_CHUNK, Budget, Prompt, Stream, budget, due_paced,
                                 floor_tokens, gathered)
from pdserve.step_hook import _State, _prompts

# a 2-core CPU's decode engine: a 75 ms decode step, 5 ms a prompt token, and 27 ms of a
# step's own for carrying any prompt token at all
CPU = Coef(step=0.075, prefill_ktok=5.0, mixed=0.027)
GPU = Coef(step=0.004, prefill_ktok=0.9, prefill_attn_mtok2=0.05, decode_seq=0.0015,
           decode_ctx_10ktok=0.01, mixed=0.003)
BEHIND = [Stream(elapsed_s=3.0, produced=20, target=40)]      # no slack left


def test_floor_steps_wait_until_they_owe_a_chunk_then_take_it_in_one_step():
    b = budget(BEHIND, CPU, 0.12, 600, 4096)
    floor = b.tokens
    assert not b.sized and 0 < floor < 4 * floor <= MIN_CHUNK   # a floor of a few tokens
    chunk = 4 * floor
    owed, got = 0, []
    for _ in range(8):
        step, owed = gathered(b, owed, chunk)
        got.append((step.tokens, step.hold, owed))
    first = [(0, True, floor), (0, True, 2 * floor), (0, True, 3 * floor), (chunk, False, 0)]
    assert got == first + first
    # the prompt moves as fast (the same tokens every four steps) and the streams wait
    # less: one step's own part paid a chunk, not a step
    every = 4 * CPU.step_time(floor, chunk_attn(floor, 600), 1, 600)
    once = 3 * CPU.step_time(0, 0, 1, 600) + CPU.step_time(chunk, chunk_attn(chunk, 600), 1, 600)
    assert once < every - 2.5 * CPU.mixed


def test_any_other_step_passes_and_clears_what_is_owed():
    floor = budget(BEHIND, CPU, 0.12, 600, 4096)
    _, owed = gathered(floor, 0, 16)
    assert owed > 0
    fresh = budget([Stream(0.5, 38, 40)], CPU, 0.12, 600, 4096)   # slack: a sized chunk
    assert fresh.sized
    assert gathered(fresh, owed, 16) == (fresh, 0)
    for other in (Budget(float("inf"), 0),                  # no stream
                  Budget(-0.1, 0, hold=True),               # a floor of 0: decode only
                  budget(BEHIND, CPU, 0.088, 600, 4096, least=0)):   # no token fits
        assert other.tokens > 0 or other.allow_s == float("inf") or other.hold
        assert gathered(other, owed, 16) == (other, 0)
    # chunks that are not the floor's, however small against `chunk`: a local prompt's
    # with no stream beside it, and the first ones before the engine has a model
    alone = budget([], CPU, 0.12, 0, 4096, local_prefill=True)
    early = budget(BEHIND, None, 0.12, 600, 4096)
    for other in (alone, early):
        assert 0 < other.tokens < 1000 and not other.floor
        assert gathered(other, owed, 1000) == (other, 0)
    assert floor.floor and not fresh.floor


def test_a_floor_of_a_whole_chunk_is_left_as_it_is():
    """Where the floor's own tokens fit within safety * SLO (a GPU: a small fixed part),
    gathering changes nothing."""
    assert floor_tokens(GPU, 0.1, 4, 4000) == MIN_CHUNK
    b = budget([Stream(elapsed_s=3.0, produced=20, target=40)] * 4, GPU, 0.05, 4000, 8192)
    assert not b.sized and b.tokens == MIN_CHUNK
    assert gathered(b, 0, MIN_CHUNK) == (b, 0)


def test_the_engine_reads_the_switch_off_by_default(monkeypatch):
    monkeypatch.delenv("PDSERVE_STEP_GATHER", raising=False)
    assert _State(100, "").gather == 0
    monkeypatch.setenv("PDSERVE_STEP_GATHER", "16")
    assert _State(100, "").gather == 16
    monkeypatch.setenv("PDSERVE_STEP_GATHER", "lots")
    assert _State(100, "").gather == 0


def test_floor_steps_wait_while_the_prompts_dues_allow_then_go_in_chunks():
    b = budget(BEHIND, CPU, 0.12, 600, 4096)
    assert b.floor and 0 < b.tokens < MIN_CHUNK
    # 300 tokens left: 19 steps of 16 beside the stream, each its step time
    step = CPU.step_time(MIN_CHUNK, chunk_attn(MIN_CHUNK, 700), 1, 600)
    need = 19 * step
    edge = 1.25 * need + 2 * step
    wait = due_paced(b, [Prompt(edge + 0.01, 300, 700)], CPU, 1, 600)
    assert wait.hold and wait.tokens == 0 and not wait.floor
    go = due_paced(b, [Prompt(edge - 0.01, 300, 700)], CPU, 1, 600)
    assert go == Budget(b.allow_s, MIN_CHUNK, floor=True) and not go.hold
    # a prompt that misses its due even at that pace: the floor, as it is
    assert due_paced(b, [Prompt(need - 0.01, 300, 700)], CPU, 1, 600) == b
    assert due_paced(b, [Prompt(need + 0.01, 300, 700)], CPU, 1, 600) == go
    # the model's overrun on such steps counts: the same due no longer leaves room to wait
    assert not due_paced(b, [Prompt(edge + 0.01, 300, 700)], CPU, 1, 600, over=1.2).hold
    # every prompt queued counts, and the earliest due decides
    two = [Prompt(edge + 5, 150, 700), Prompt(edge + 0.01, 150, 0)]
    assert due_paced(b, two, CPU, 1, 600).hold
    assert not due_paced(b, [two[0], Prompt(edge - 0.01, 150, 0)], CPU, 1, 600).hold


def test_due_pacing_leaves_other_steps_and_prompts_without_a_due_alone():
    b = budget(BEHIND, CPU, 0.12, 600, 4096)
    far = Prompt(1e6, 300, 700)
    for none in ([], [Prompt(0.0, 300, 700)], [far, Prompt(-1.0, 10, 0)]):
        assert due_paced(b, none, CPU, 1, 600) == b        # no due, or past it: the floor
    assert due_paced(b, [far], None, 1, 600) == b           # no model
    fresh = budget([Stream(0.5, 38, 40)], CPU, 0.12, 600, 4096)
    gpu = budget([Stream(elapsed_s=3.0, produced=20, target=40)] * 4, GPU, 0.05, 4000, 8192)
    for other in (fresh, Budget(float("inf"), 0), gpu):     # not a floor step of a few tokens
        assert due_paced(other, [far], CPU, 1, 600) == other


def test_the_engine_reads_each_prompts_due():
    from pdserve.sampling import TTFT_DUE
    from kv_transfer.handle import P_REMOTE_PREFILL

    def req(computed, prompt, due, params=None, out=8):
        return NS(num_computed_tokens=computed, num_prompt_tokens=prompt, max_tokens=out,
                  kv_transfer_params=params,
                  sampling_params=NS(extra_args={TTFT_DUE: due} if due else None))
    sched = NS(running=[req(700, 1024, 1010.0), req(101, 100, 1005.0)],    # the 2nd decodes
               waiting=[req(0, 200, 0.0), req(0, 64, 1020.0, {P_REMOTE_PREFILL: True})])
    assert _prompts(sched, 1000.0) == [Prompt(10.0, 324, 700), Prompt(0.0, 200, 0)]


def test_the_engine_reads_the_due_switch_off_by_default(monkeypatch):
    monkeypatch.delenv("PDSERVE_STEP_DUE", raising=False)
    assert _State(100, "").due is False
    monkeypatch.setenv("PDSERVE_STEP_DUE", "1")
    assert _State(100, "").due is True
