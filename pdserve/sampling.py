"""Conversions between our wire structs and vLLM's."""

from __future__ import annotations

import json
from typing import Any

from pdserve.rpc import pd_pb2

# extra_args key: the prompt's last token is this request's first output token, sampled
# on another engine (pdserve/continuation.py counts it for penalties and seeds)
FIRST_TOKEN = "pd_first_token"
# extra_args key: when the client's first token is due (unix s: its arrival + the TTFT
# SLO); the engine keeps no TPOT slack for a stream whose first token came later
# (pdserve/step_budget.py, `Stream.late`)
TTFT_DUE = "pd_ttft_due"


def stop_hold(stops, include: bool = False) -> int:
    """Characters of output text vLLM's detokenizer holds back while a request with these
    stop strings runs (the longest less one): text that could still begin a match. Nothing
    when the stop string stays in the output (`include_stop_str_in_output`): nothing
    already shown is ever cut then."""
    return max(len(s) for s in stops) - 1 if stops and not include else 0


def first_text_sent(text: str, stops, finished: bool, include: bool = False) -> int:
    """How many characters of the first token's text (from the prefill engine) the frontend
    sends at once: all of it when the request ends there or has no stop strings, else all
    but the tail vLLM's detokenizer would hold back (`stop_hold`); the decode worker sends
    the rest (decode_worker/stops.py)."""
    if finished or not stops:
        return len(text)
    return max(0, len(text) - stop_hold(stops, include))


def reasoning_args(sp: pd_pb2.SamplingParams, continues: bool = False) -> dict[str, Any]:
    """vLLM generate()'s reasoning arguments for a constrained request (frontend/reasoning.py).
    `continues`: this engine's prompt ends with the first output token, sampled elsewhere.
    That token may have ended the reasoning, so a prompt that had not is left for the
    engine to read again (None), and only "ended already" carries over."""
    if not sp.HasField("structured"):
        return {}
    s, out = sp.structured, {}
    if s.reasoning_parser_kwargs:
        out["reasoning_parser_kwargs"] = json.loads(s.reasoning_parser_kwargs)
    if s.HasField("reasoning_ended"):
        out["reasoning_ended"] = True if s.reasoning_ended else (None if continues else False)
    return out


def to_vllm(sp: pd_pb2.SamplingParams, *, max_tokens: int, generated: int = 0,
            kv_transfer_params: dict[str, Any] | None = None, computes_prompt: bool = False,
            first_token: int | None = None, engine_stops: bool = True,
            ttft_due: float = 0.0):
    """`generated`: tokens of this request already produced elsewhere (the prefill
    worker's first token), which count towards `min_tokens`. `first_token`: that token,
    the last of the prompt given to this engine (it continues the request). `computes_prompt`:
    this engine computes the prompt (prefill, local prefill), so it returns the prompt's
    logprobs when asked. `engine_stops` False: the caller checks the stop strings itself
    (decode_worker/stops.py); stop token ids stay with the engine. `ttft_due`: when the
    client's first token is due (unix s; 0: no TTFT SLO), for the engine's step budget."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1, max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p or 1.0,
        top_k=max(sp.top_k, 0), seed=sp.seed if sp.HasField("seed") else None,
        stop=(list(sp.stop) or None) if engine_stops else None,
        stop_token_ids=list(sp.stop_token_ids) or None,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty or 1.0,
        min_tokens=min(max(sp.min_tokens - generated, 0), max_tokens),
        # exactly these tokens' logprobs, instead of the top ones (as vLLM's chat request)
        logprobs=sp.logprobs if sp.logprobs >= 0 and not sp.logprob_token_ids else None,
        logprob_token_ids=list(sp.logprob_token_ids) or None, ignore_eos=sp.ignore_eos,
        logit_bias=dict(sp.logit_bias) or None,
        prompt_logprobs=(sp.prompt_logprobs if computes_prompt
                         and sp.HasField("prompt_logprobs") else None),
        structured_outputs=structured(sp), min_p=sp.min_p,
        allowed_token_ids=list(sp.allowed_token_ids) or None,
        bad_words=list(sp.bad_words) or None,
        skip_special_tokens=(sp.skip_special_tokens
                             if sp.HasField("skip_special_tokens") else True),
        spaces_between_special_tokens=(sp.spaces_between_special_tokens
                                       if sp.HasField("spaces_between_special_tokens")
                                       else True),
        include_stop_str_in_output=sp.include_stop_str_in_output,
        output_kind=RequestOutputKind.DELTA,
        extra_args=_extra_args(kv_transfer_params, first_token, ttft_due))


def _extra_args(kv_transfer_params, first_token, ttft_due: float = 0.0) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    if first_token is not None:
        out[FIRST_TOKEN] = int(first_token)
    if ttft_due > 0:
        out[TTFT_DUE] = float(ttft_due)
    return out or None


def structured(sp: pd_pb2.SamplingParams):
    """The wire's StructuredOutputs -> vLLM's StructuredOutputsParams (None: unset)."""
    if not sp.HasField("structured"):
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams
    s = sp.structured
    return StructuredOutputsParams(
        json=json.loads(s.json) if s.json else None, regex=s.regex or None,
        choice=list(s.choice) or None, grammar=s.grammar or None,
        json_object=True if s.json_object else None)


def logprobs_to_wire(token_ids, logprobs, k: int, every: bool = False
                     ) -> list[pd_pb2.TokenLogprob]:
    """vLLM per-token {token_id: Logprob} dicts -> our TokenLogprob list: the top `k` by
    rank, or with `every` (logprob_token_ids) every entry in vLLM's order, the sampled
    token's first, as vLLM's chat server lists them."""
    out = []
    for tid, entry in zip(token_ids, logprobs or []):
        chosen = entry.get(tid)
        if every:
            top = list(entry.items())
        else:
            top = sorted(((t, lp) for t, lp in entry.items()
                          if lp.rank is not None and lp.rank <= k),
                         key=lambda x: x[1].rank)[:k] if k > 0 else []
        out.append(pd_pb2.TokenLogprob(
            token_id=tid, token=(chosen.decoded_token or "") if chosen else "",
            logprob=chosen.logprob if chosen else float("-inf"),
            rank=(chosen.rank or 0) if chosen else 0,
            top=[pd_pb2.TopLogprob(token_id=t, token=lp.decoded_token or "", logprob=lp.logprob)
                 for t, lp in top]))
    return out


def prompt_logprobs_to_wire(prompt_ids, prompt_logprobs, k: int
                            ) -> list[pd_pb2.TokenLogprob]:
    """vLLM's RequestOutput.prompt_logprobs (None for token 0, then one dict per token) ->
    TokenLogprob for prompt tokens 1..n-1."""
    if not prompt_logprobs:
        return []
    return logprobs_to_wire(list(prompt_ids)[1:], list(prompt_logprobs)[1:], k)


def engine_prompt(ids: list[int], sp: pd_pb2.SamplingParams) -> dict:
    """vLLM's prompt for these token ids, with the request's cache salt if it has one."""
    return ({"prompt_token_ids": ids, "cache_salt": sp.cache_salt} if sp.cache_salt
            else {"prompt_token_ids": ids})


def stop_reason_to_wire(reason) -> pd_pb2.StopReason | None:
    """vLLM's stop_reason (a stop string, a stop token id, or None) on the wire."""
    if isinstance(reason, str):
        return pd_pb2.StopReason(text=reason)
    if isinstance(reason, int) and not isinstance(reason, bool) and reason >= 0:
        return pd_pb2.StopReason(token_id=reason)
    return None


def stop_reason_from_wire(msg):
    """A response's StopReason as vLLM's servers answer it: the string, the id, or None."""
    if not msg.HasField("stop_reason"):
        return None
    r = msg.stop_reason
    kind = r.WhichOneof("kind")
    return None if kind is None else getattr(r, kind)
