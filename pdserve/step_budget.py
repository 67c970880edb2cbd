"""The prompt tokens an engine step may compute beside running decode streams. Pure.

A client's TPOT is a mean: (time of the last token - time of the first) / (tokens - 1).
A stream that has run fast so far has slack, and one that is behind has none. So the
time a step may take is not the SLO itself but what every running stream can afford
and still end within the SLO if its later steps are plain decode steps:

    allow = min over streams of
            safety * SLO * (target - 1) - elapsed - (target - produced - 1) * base / safety

where `elapsed` is the time since the stream's first token, `produced` its tokens so far,
`target` its max_tokens and `base` the decode step the engine's fitted step model
(pdserve/latency.py) predicts (divided by the safety: a margin for a slower step). The
slack goes to the prompt that needs it now, first come first served: spread evenly over
every remaining step instead, each step holds only a few prompt tokens where one decode
step is most of the SLO (a CPU), and a prompt crawls through dozens of steps whose
fixed part it pays again each time. The step's prompt-token budget is what the model
says fits in `allow` beside the decode work.

With no stream running, a prompt that will itself decode here (a local prefill: max_tokens
> 1) still goes in chunks (`alone`): a stream that arrives meanwhile (a remote prefill's
KV landing) waits for the step in progress, and one whole long prompt would take its
slack at once. Chunking costs one fixed per-step part per chunk, so the chunks are
SLO-sized where that part is small (a GPU) and larger where it is not (a CPU whose
step's fixed part is most of the SLO). Remote prefills alone (max_tokens 1, nobody
decodes here) run unchunked. A floor (`floor_tokens`) keeps prompts moving when a stream
is already behind: TTFT would otherwise be unbounded while streams run. The floor is
`min_chunk` tokens, or fewer where a step with that many beside the streams would take
longer than safety * SLO: on a CPU whose decode step is most of the SLO, 16 prompt tokens
per step broke the TPOT of every stream that landed during a local prefill (measured:
TPOT p99 232 ms against a 201 ms SLO for the locally prefilled requests of the long-prompt
mix), and at least `least` tokens. With `least` 1 a prompt always moves, one token a step
where not even that fits, and every such step costs the streams a mixed step's own fixed
part (27 ms beside a 75 ms decode step on a 2-core CPU). With `least` 0 such a step is
decode only (`Budget.hold`: the engine holds the prompts back for it), and the prompt
waits until the streams have slack again or end.

A stream whose first token came after its TTFT SLO (`Stream.late`) has already missed its
SLOs whatever its TPOT: its slack constrains no prompt, and with only such streams running
an engine steps as with none. Holding prompts to their TPOT spent the decode engine's core
on the streams of requests that could no longer count, while the prompts queued behind
them missed their TTFT SLO too (measured at overload: a decode engine whose streams had no
slack computed its local prompts at one token a step). Such a stream still gets a token
every step, in steps that are longer: at most an `alone` step while a prompt decodes here.

pdserve/vllm_plugin.py applies the budget inside vLLM's engine core before each schedule
(`max_num_scheduled_tokens` and `long_prefill_token_threshold`), on every pdserve engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.latency import Coef, chunk_attn


MIN_CHUNK = 16       # prompt tokens per step, at least (prompts keep moving)...
LEAST = 1            # ...or this many where fewer than MIN_CHUNK fit (floor_tokens)
SAFETY = 0.9         # streams are held to SAFETY * SLO on average
OVERHEAD = 0.05      # a step's fixed part may cost this share of it (fcfs_tokens)
ALONE_OVERHEAD = 0.25  # ...of a local prefill's step with no stream (alone)


@dataclass(frozen=True)
class Stream:
    elapsed_s: float     # since its first output token
    produced: int        # output tokens so far
    target: int          # max_tokens
    late: bool = False   # its first token came after its TTFT SLO: no SLO left to keep


OVERRUN_MIN = 8       # slack-sized steps measured before their overrun counts
MAX_OVERRUN = 2.0


@dataclass(frozen=True)
class Budget:
    allow_s: float       # step time the streams can afford (inf: no streams)
    tokens: int          # prompt tokens this step may compute (0: no limit, unless hold)
    hold: bool = False   # no prompt token this step (a floor of 0 and no room)
    sized: bool = False  # the tokens are what the streams' slack affords (not the floor)


def overrun(ratios) -> float:
    """How far this engine's slack-sized steps (a prompt chunk beside streams, as large
    as their slack allows) ran over what the step model predicted for what they computed:
    the median of measured / predicted over recent ones, 1 until OVERRUN_MIN of them, at
    most MAX_OVERRUN. The model is fitted on every step, most of them plain decode steps,
    and ran 10-45% low on such chunks (a step trace of the long-prompt mix: the stream whose
    slack a chunk took ended over its TPOT SLO). Never below 1: a model that runs high on
    them leaves slack unspent, which costs only prompt speed."""
    v = sorted(ratios)
    if len(v) < OVERRUN_MIN:
        return 1.0
    return min(MAX_OVERRUN, max(1.0, v[len(v) // 2]))


def late_only(streams: list[Stream]) -> bool:
    """Streams run, and none has an SLO left to keep (`Stream.late`): the engine steps as
    with none, and such a step says nothing of what an on-time stream sees."""
    return bool(streams) and all(s.late for s in streams)


def allowance(streams: list[Stream], tpot_slo_s: float, safety: float = SAFETY,
              base_s: float = 0.0, rest_s: float = 0.0) -> float:
    """The longest this step may take with every stream still ending within safety * SLO,
    when each of its later steps takes `base_s / safety` (a decode step, with margin), or
    `rest_s` where that is longer (a floor step beside prompts, `later_step`)."""
    best = float("inf")
    rest = max(rest_s, base_s / safety if safety > 0 else base_s)
    for s in streams:
        left = s.target - s.produced
        if left <= 0 or s.target < 2 or s.late:
            continue
        best = min(best, safety * tpot_slo_s * (s.target - 1) - s.elapsed_s - (left - 1) * rest)
    return best


def left_after(allow_s: float, step_s: float, rest_s: float) -> float:
    """The allowance the streams have after a step of `step_s` that was given `allow_s`:
    each stream's slack loses the step and gains the later step it no longer needs
    (`rest_s`, the budget's decode step / safety). What the scheduler reads from a worker
    (pdserve/steps.py): the allowance a step was given is the slack before it, and after a
    long prompt step on a 2-core host (0.83 s) the chooser read a second of slack the
    step had just spent and predicted the next prompt in one step, 0.8 s; it crawled at
    the floor for 4.4 s (docs/benchmarks.md, "Forty-fourth run")."""
    return allow_s if allow_s == float("inf") else allow_s - step_s + rest_s


def budget(streams: list[Stream], coef: Coef | None, tpot_slo_s: float, ctx_tokens: int,
           max_tokens: int, min_chunk: int = MIN_CHUNK, safety: float = SAFETY,
           local_prefill: bool = False, least: int = LEAST, over: float = 1.0) -> Budget:
    """`ctx_tokens`: context the streams attend to; `max_tokens`: the engine's own cap;
    `local_prefill`: a prompt being computed will decode here; `least`: the floor's
    least tokens (`floor_tokens`); `over`: how far slack-sized steps run over the model
    (`overrun`): the chunk is sized for the model's step times that much."""
    if tpot_slo_s <= 0 or not (streams or local_prefill):
        return Budget(float("inf"), 0)
    if not streams or late_only(streams):    # none with an SLO left to keep
        if not local_prefill:
            return Budget(float("inf"), 0)
        # a stream that lands will be held to safety * SLO
        if coef is None:
            return Budget(safety * tpot_slo_s, 0)
        return Budget(safety * tpot_slo_s, min(alone(coef, tpot_slo_s, safety)[1], max_tokens))
    if coef is None:
        # no model yet (an engine's first prompts): the streams first, prompts at
        # `min_chunk` tokens a step (docs/design.md, "Where the samples come from")
        allow = allowance(streams, tpot_slo_s, safety)
        return Budget(allow, 0 if allow == float("inf") else min(min_chunk, max_tokens))
    floor = floor_tokens(coef, tpot_slo_s, len(streams), ctx_tokens, min_chunk, safety, least)
    allow = allowance(streams, tpot_slo_s, safety, coef.decode_step(len(streams), ctx_tokens),
                      later_step(coef, len(streams), ctx_tokens, floor))
    if allow == float("inf"):
        return Budget(allow, 0)
    tok = coef.chunk_budget(allow / max(1.0, over), len(streams), ctx_tokens)
    sized = tok > floor
    tok = max(min(floor, max_tokens), min(tok, max_tokens))
    return Budget(allow, tok, hold=tok <= 0, sized=sized)


def later_step(coef: Coef, seqs: float, ctx: float, floor: int) -> float:
    """What the streams' later steps are planned at while prompts are computed beside
    them: a step with the floor's `floor` prompt tokens (`floor_tokens`, at most safety *
    SLO unless not one token fits), which the allowance counts instead of a plain decode
    step (`base / safety`) where it is longer. Counting plain steps, a fresh 8-token
    stream's first step was given the slack of its whole life (0.9 x SLO x 7 gaps less 6
    plain steps: 59 ms under a 47.5 ms SLO) while the prompts beside it went on at the
    floor, at up to 0.9 x SLO a step: the plan itself averaged over 0.9 x SLO, and a 30%
    overrun of that one step lost the stream (docs/benchmarks.md, "Sixty-fourth run")."""
    return coef.step_time(floor, chunk_attn(floor, 0), seqs, ctx)


def floor_tokens(coef: Coef, tpot_slo_s: float, seqs: float, ctx: float,
                 min_chunk: int = MIN_CHUNK, safety: float = SAFETY, least: int = LEAST) -> int:
    """The prompt tokens a step computes beside `seqs` streams that have no slack left:
    `min_chunk`, or as many as keep the step within safety * SLO when that is fewer, and
    at least `least`."""
    return max(least, min(min_chunk, coef.chunk_budget(safety * tpot_slo_s, seqs, ctx)))


def stream_tokens(coef: Coef, tpot_slo_s: float, seqs: float, ctx: float, before: float = 0.0,
                  safety: float = SAFETY, least: int = LEAST) -> int:
    """Prompt tokens per step beside `seqs` streams in the long run: what keeps each step
    within safety * SLO (streams that run at that pace end within it), at least the floor.
    The engine hands a new stream's slack beyond its floor steps out at once and then
    steps at the floor; on average it is this (what the scheduler predicts a prompt's
    progress from)."""
    return max(floor_tokens(coef, tpot_slo_s, seqs, ctx, safety=safety, least=least),
               coef.chunk_budget(safety * tpot_slo_s, seqs, ctx, before))


def packing_floor(coef: Coef, overhead: float, no_cost: int) -> int:
    """The prompt tokens a step needs for its fixed part to be `overhead` of it
    (`no_cost` when a prompt token costs nothing in the fit)."""
    per = coef.per_token()
    return no_cost if per <= 0 else int(coef.step * (1 - overhead) / overhead / per)


def alone(coef: Coef, tpot_slo_s: float, safety: float = SAFETY,
          overhead: float = ALONE_OVERHEAD) -> tuple[float, int]:
    """(step seconds, prompt tokens per step) for a local prefill on an engine with no
    stream: steps of safety * SLO, or longer where the step's fixed part would otherwise
    take more than `overhead` of it (on a host where one step's fixed part is most of
    the SLO, SLO-sized steps would compute the prompt at a fraction of its speed). A
    stream that lands meanwhile waits for the step in progress."""
    allow = safety * tpot_slo_s
    tok = max(MIN_CHUNK, coef.chunk_budget(allow, 0, 0))
    tok = max(tok, packing_floor(coef, overhead, tok))
    return max(allow, coef.step_time(tok, chunk_attn(tok, 0))), tok


def whole_alone(coef: Coef | None, left: int, computed: int, chunk: int,
                seconds_left: float, max_tokens: int = 0) -> bool:
    """Should a local prompt computed alone (no stream with an SLO beside it) take its
    `left` tokens in whole steps (up to `max_tokens`) instead of `alone` chunks of
    `chunk`? Where the chunks would end after its TTFT SLO (`seconds_left` from now) and
    whole steps would not: the chunks are for a stream that may land meanwhile, which may
    not come, and each costs the step's fixed part again (up to a quarter of the prompt's
    speed, `ALONE_OVERHEAD`)."""
    if coef is None or chunk <= 0 or left <= chunk or not math.isfinite(seconds_left):
        return False
    return (coef.steps_time(left, chunk, computed) > seconds_left
            >= coef.prefill_time(left, computed, max_tokens))


def fcfs_tokens(head_left: int, coef: Coef | None, max_tokens: int,
                overhead: float = OVERHEAD) -> int:
    """Step budget for an engine with no decode stream and queued prompts: the head
    prompt's remaining tokens, so prompts finish one after another in arrival order.

    vLLM packs every waiting prompt into one step up to its batched-token cap; each then
    gets its first token when the whole batch is done, so a prompt waits for the ones
    that arrived after it too (three 1,024-token prompts arriving together: all three
    wait for 3,072 tokens, a mean of 3 units where one at a time gives 2). Packing pays
    only the step's fixed part, so a step still takes at least the tokens whose
    per-token cost makes that fixed part `overhead` of it (the fitted model's, so it
    packs small prompts on a GPU and hardly at all on a CPU). 0: no limit."""
    if head_left <= 0 or coef is None or max_tokens <= 0:
        return 0
    tok = max(head_left, packing_floor(coef, overhead, max_tokens), MIN_CHUNK)
    return 0 if tok >= max_tokens else tok


def landing_wait(prompts, now: float, coef: Coef, tpot_slo_s: float, over: float = 1.0,
                 safety: float = SAFETY) -> float:
    """Until when (on `now`'s clock) a stream landing from a prefill worker may wait, so
    that the local prompts being computed here end alone within their TTFT SLOs.
    `prompts`: (uncomputed tokens, computed tokens, due) of each, in the order the engine
    computes them (due 0: none). They are computed alone, in `alone` steps run over by
    `over`, one after another, and the wait lasts until the last of them that ends by its
    due does; -inf where none does (a prompt late anyway does not hold a stream back)."""
    tok = alone(coef, tpot_slo_s, safety)[1]
    t, until = now, float("-inf")
    for left, done, due in prompts:
        t += over * coef.steps_time(left, tok, done)
        if due > 0 and t <= due:
            until = t
    return until
