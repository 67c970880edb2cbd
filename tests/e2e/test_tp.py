"""Tensor parallelism per pool, and different degrees between the pools, end to end.

vLLM's CPU backend runs TP > 1 (a worker process per rank). Prefill TP 2 -> decode TP 1:
the decode engine gathers its two KV heads from the two prefill ranks' agents. Prefill TP 1
-> decode TP 2: each decode rank READs its head's slice of the prefill engine's blocks
(kv_transfer/connector/ranks.py). The output equals a colocated TP 1 engine's, every load
is checksummed on both sides, the decode engine recomputes nothing, and both sides end idle.
"""

import httpx
import pytest

from tests.e2e.cluster import assert_prompt_loaded_not_recomputed, reference
from tests.e2e.conftest import KV, TEST_DTYPE, serving, words
from tests.e2e.cluster import assert_idle, by_role
from pdserve.rpc import pd_pb2

MAX_TOKENS = 16
SIZES = (10, 300, 1500)
BS, LAYERS, HEADS, HEAD = 128, 4, 2, 64        # the tiny model's KV


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
def tp(request, tiny_model, tmp_path_factory):
    tp_p, tp_d = request.param
    c = serving(tiny_model, tmp_path_factory, f"tp{tp_p}-{tp_d}", extra=[
        *KV, "--kv-checksum", "--prefill-args", f"--tensor-parallel-size {tp_p}",
        "--decode-args", f"--tensor-parallel-size {tp_d}"])
    cluster = next(c)
    cluster.tp = (tp_p, tp_d)
    yield cluster
    next(c, None)


@pytest.fixture(scope="module")
def truth(tiny_model, tokenizer, tmp_path_factory):
    prompts = {n: words(n, seed=900 + n) for n in SIZES}
    ids = [tokenizer.encode(prompts[n]) for n in SIZES]
    refs = reference(tiny_model, ids, MAX_TOKENS, tmp_path_factory.mktemp("ref-tp"))
    return {"prompts": prompts, "ref": dict(zip(SIZES, refs))}


@pytest.mark.parametrize("n", SIZES)
def test_kv_between_tp_degrees_gives_the_colocated_output(tp, truth, n):
    decode = by_role(tp, pd_pb2.ROLE_DECODE)[0]
    before = tp.metrics(decode)
    r = httpx.post(f"{tp.url}/v1/completions", timeout=300, json={
        "model": tp.model_name, "prompt": truth["prompts"][n], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == truth["ref"][n]["text"]
    kv = body["kv_transfer"]
    assert kv["status"] == "ok" and kv["tokens"] == n and kv["checksummed"] is True, kv
    # the record is the decode engine's rank 0's: the heads it holds, from every block
    heads = HEADS // tp.tp[1]
    per_block = LAYERS * heads * BS * 2 * HEAD * (2 if TEST_DTYPE[-1] == "bfloat16" else 4)
    assert kv["bytes"] == -(-n // BS) * per_block, kv
    assert_prompt_loaded_not_recomputed(before, tp.metrics(decode), n)


def test_both_sides_end_idle(tp):
    assert_idle(tp, tp.workers())
