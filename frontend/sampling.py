"""vLLM's SamplingParams, as vLLM's server builds them for a request, onto the wire's
SamplingParams, which carries them to the prefill and the decode engine. Pure.

Every token id is checked against the model's vocabulary here (a 400 naming it), so no
engine sees one it would refuse."""

from __future__ import annotations

from vllm.sampling_params import SamplingParams

from frontend.tokens import check_ids
from pdserve.rpc import pd_pb2


def to_wire(sp: SamplingParams, vocab: int, logprobs: int, cache_salt: str | None,
            constraint: dict | None) -> pd_pb2.SamplingParams:
    """`logprobs`: -1 for none, else the top k per position (the endpoint's own reading:
    with logprob_token_ids vLLM leaves its `logprobs` unset); `constraint`: the wire's
    StructuredOutputs fields (None: unconstrained)."""
    stop_ids = list(sp.stop_token_ids or ())
    check_ids(stop_ids, vocab, "stop_token_ids", "stop token id")
    w = pd_pb2.SamplingParams(
        max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
        top_k=max(sp.top_k, 0), stop=list(sp.stop or ()), stop_token_ids=stop_ids,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, logprobs=logprobs,
        ignore_eos=sp.ignore_eos, min_tokens=sp.min_tokens, min_p=sp.min_p,
        bad_words=list(sp.bad_words or ()),
        include_stop_str_in_output=sp.include_stop_str_in_output)
    if not sp.skip_special_tokens:
        w.skip_special_tokens = False
    if not sp.spaces_between_special_tokens:
        w.spaces_between_special_tokens = False
    if sp.allowed_token_ids:
        check_ids(sp.allowed_token_ids, vocab, "allowed_token_ids")
        w.allowed_token_ids.extend(sp.allowed_token_ids)
    if sp.logprob_token_ids:
        check_ids(sp.logprob_token_ids, vocab, "logprob_token_ids")
        w.logprob_token_ids.extend(sp.logprob_token_ids)
    if sp.seed is not None:
        w.seed = sp.seed
    if cache_salt:
        w.cache_salt = cache_salt
    if sp.prompt_logprobs is not None:
        w.prompt_logprobs = sp.prompt_logprobs
    if constraint is not None:
        w.structured.CopyFrom(pd_pb2.StructuredOutputs(**constraint))
    if sp.logit_bias:
        check_ids(list(sp.logit_bias), vocab, "logit_bias")
        w.logit_bias.update(sp.logit_bias)
    return w
