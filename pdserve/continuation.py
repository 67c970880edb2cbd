"""A decode engine continues a request whose first token was sampled on another engine.

The disaggregated path hands the decode engine the prompt plus the prefill engine's first
token as one prompt. Left at that, two things a colocated engine does differ:

* **Penalties.** vLLM's presence and frequency penalties count output tokens only; the first
  token sits in the decode engine's prompt, so they would not count it. `FirstTokenPenalties`
  (a vLLM logits processor, built for each request that names its first token) subtracts what
  the colocated engine would: the frequency penalty always, the presence penalty until the
  token comes up again in this engine's output (then vLLM's own presence term takes over).
  vLLM applies processors before its penalties and the repetition penalty scales a logit
  before the additive ones, so with a repetition penalty the correction is taken through its
  inverse (`_through_repetition`). The repetition penalty itself needs nothing: it counts
  prompt and output tokens alike.
* **Bad words.** vLLM blocks a bad word's last token when the output ends with the rest of
  it; on the decode engine the output starts after the first token, so a bad word that
  begins with the first token would never be blocked. The same processor blocks it then,
  while the output is too short for vLLM's own check to see the first token.
* **Seeded sampling.** A seeded request draws its noise from a per-request generator seeded
  once, one step's draws per token. The decode engine's generator starts fresh, so token 2
  would get the noise of token 1. `install` (the vLLM plugin calls it in the worker process,
  with PDSERVE_CONTINUATION=1 set by pdserve for its engines) advances a continued request's
  generator by one step when the model runner adds it, by running the engine's own sampler
  once on a dummy row: whatever that sampler draws per step (a randint on CPU, exponential
  noise on GPU) is what gets drawn.

A request is marked by `extra_args[FIRST_TOKEN]` (pdserve/sampling.py sets it for the
decode half of a disaggregated request and for the re-placed local prefill of prompt plus
first token). Nothing else is touched: other requests and other vLLM uses of the virtualenv
are left alone.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from pdserve.patching import switched_once
from pdserve.sampling import FIRST_TOKEN

log = logging.getLogger("vllm.pdserve.continuation")


def _through_repetition(x: float, r: float, d: float) -> float:
    """The logit y with rep(y) == rep(x) - d, where rep(v) = v / r if v > 0 else v * r."""
    target = (x / r if x > 0 else x * r) - d
    return target * r if target > 0 else target / r


class FirstTokenPenalties(AdapterLogitsProcessor):
    """Counts a continued request's first token as output: for the additive penalties, and
    for bad words that begin with it."""

    @classmethod
    def validate_params(cls, params) -> None:
        t = (params.extra_args or {}).get(FIRST_TOKEN)
        if t is not None and (not isinstance(t, int) or t < 0):
            raise ValueError(f"{FIRST_TOKEN} must be a token id, not {t!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        t = (params.extra_args or {}).get(FIRST_TOKEN)
        if t is None:
            return None
        procs = [p for p in (_penalties(params, t), _bad_words(params, t)) if p is not None]
        if len(procs) <= 1:
            return procs[0] if procs else None

        def both(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            for proc in procs:
                logits = proc(output_ids, logits)
            return logits
        return both


def _bad_words(params, t: int):
    """Blocks the last token of each bad word whose other tokens are the first token and
    the output so far, while the output is shorter than those (vLLM's own check, over the
    output alone, covers the rest)."""
    words = [w for w in (getattr(params, "bad_words_token_ids", None) or []) if len(w) > 1]
    if not words:
        return None
    longest = max(len(w) for w in words)

    def proc(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) + 1 >= longest:
            return logits
        past = [t, *output_ids]
        for w in words:     # the word's other tokens are exactly the first and the output
            if len(w) == len(past) + 1 and past == w[:-1] and w[-1] < logits.shape[-1]:
                logits[w[-1]] = float("-inf")
        return logits
    return proc


def _penalties(params, t: int):
    f, p = params.frequency_penalty or 0.0, params.presence_penalty or 0.0
    if f == 0.0 and p == 0.0:
        return None
    r = params.repetition_penalty or 1.0
    seen = {"n": 0, "again": False}     # output tokens looked at; t among them yet?

    def proc(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if t >= logits.shape[-1]:
            return logits
        if not seen["again"] and len(output_ids) > seen["n"]:
            seen["again"] = t in output_ids[seen["n"]:]
            seen["n"] = len(output_ids)
        d = f + (0.0 if seen["again"] else p)
        if r == 1.0:
            logits[t] -= d
        else:
            logits[t] = _through_repetition(float(logits[t]), r, d)
        return logits
    return proc


def _advance(runner, generator: torch.Generator) -> None:
    """One sampling step's draws from `generator`, through the runner's own sampler."""
    vocab = runner.model_config.get_vocab_size()
    row = torch.zeros((1, vocab), dtype=torch.float32, device=runner.device)
    runner.sampler.topk_topp_sampler(row, {0: generator}, None, None)


@switched_once("PDSERVE_CONTINUATION")
def install() -> bool:
    """Patch vLLM's model runner to advance continued requests' seeded generators."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    orig = getattr(GPUModelRunner, "_update_states", None)
    if orig is None:
        log.warning("vLLM's model runner has no _update_states: a seeded request continued "
                    "on a decode engine starts its generator afresh")
        return False

    def _update_states(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            if sp is None or FIRST_TOKEN not in (sp.extra_args or {}):
                continue
            state = self.requests.get(new.req_id)
            if state is not None and state.generator is not None:
                _advance(self, state.generator)
        return out

    GPUModelRunner._update_states = _update_states
    return True
