"""vLLM's per-token logprob dicts on the wire (pdserve/sampling.py: logprobs_to_wire): the
top k by rank, or with logprob_token_ids every entry in vLLM's order."""

from types import SimpleNamespace as Lp

from pdserve.sampling import logprobs_to_wire, to_vllm
from pdserve.rpc import pd_pb2


def entry(*rows):
    return {t: Lp(logprob=lp, rank=r, decoded_token=f"w{t}") for t, lp, r in rows}


def test_top_k_by_rank():
    # vLLM's dict: the sampled token first, then the top ones by rank
    [out] = logprobs_to_wire([7], [entry((7, -3.0, 4), (1, -0.5, 1), (2, -1.0, 2),
                                         (3, -2.0, 3))], 2)
    assert (out.token_id, out.token, out.logprob, out.rank) == (7, "w7", -3.0, 4)
    assert [t.token_id for t in out.top] == [1, 2]


def test_logprob_token_ids_keep_every_entry_in_vllms_order():
    # the sampled token, then the requested ones, whatever their rank
    [out] = logprobs_to_wire([7], [entry((7, -0.5, 1), (40, -9.0, 900), (3, -2.0, 3))], 0,
                             every=True)
    assert [(t.token_id, t.logprob) for t in out.top] == [(7, -0.5), (40, -9.0), (3, -2.0)]


def test_logprob_token_ids_replace_the_top_logprobs_in_vllms_params():
    sp = pd_pb2.SamplingParams(logprobs=2, logprob_token_ids=[5, 9])
    v = to_vllm(sp, max_tokens=4)
    assert v.logprobs is None and v.logprob_token_ids == [5, 9]
    v = to_vllm(pd_pb2.SamplingParams(logprobs=2), max_tokens=4)
    assert v.logprobs == 2 and v.logprob_token_ids is None
