"""Prefill and decode engines with different KV block sizes, end to end.

The prefill worker runs 64-token blocks, the decode worker 128-token blocks (vLLM's CPU
layout: a block is not a run of smaller blocks). Pull: the decode worker READs the
producer's blocks into a staging buffer and lays them out into its own blocks
(kv_transfer/relayout.py); the output equals a colocated engine's, with the CRC32 of the
bytes compared on both sides. Push cannot relayout (the producer WRITEs into the consumer's
blocks as they are): the offer is refused as incompatible and the decode engine recomputes.
"""

import httpx
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import assert_prompt_loaded_not_recomputed, metric_value, reference
from tests.e2e.conftest import KV, TEST_DTYPE, serving, words
from tests.e2e.cluster import assert_idle, by_role

MAX_TOKENS = 16
SIZES = (10, 300, 1500)
PREFILL_BS, DECODE_BS = 64, 128


def cluster_with(tiny_model, tmp_path_factory, name, *extra):
    yield from serving(tiny_model, tmp_path_factory, name,
                       extra=["--prefill-block-size", str(PREFILL_BS),
                              "--block-size", str(DECODE_BS), *KV, *extra])


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    yield from cluster_with(tiny_model, tmp_path_factory, "block-sizes", "--kv-checksum")


@pytest.fixture(scope="module")
def truth(tiny_model, tokenizer, tmp_path_factory):
    prompts = {n: words(n, seed=700 + n) for n in SIZES}
    ids = [tokenizer.encode(prompts[n]) for n in SIZES]
    assert [len(x) for x in ids] == list(SIZES)
    refs = {bs: reference(tiny_model, ids, MAX_TOKENS, tmp_path_factory.mktemp(f"ref{bs}"),
                          block_size=bs, keep=bs == DECODE_BS)
            for bs in (PREFILL_BS, DECODE_BS)}
    # the ground truth is block-size independent for this model (else nothing to compare)
    assert refs[PREFILL_BS] == refs[DECODE_BS]
    return {"prompts": prompts, "ref": dict(zip(SIZES, refs[DECODE_BS]))}


def complete(c, prompt):
    return httpx.post(f"{c.url}/v1/completions", timeout=120, json={
        "model": c.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})


def test_workers_really_differ(mixed):
    """The workers registered their engines' block sizes (and one compatible layout)."""
    ws = {w.role: w for w in mixed.workers()}
    assert ws[pd_pb2.ROLE_PREFILL].layout.block_size == PREFILL_BS
    assert ws[pd_pb2.ROLE_DECODE].layout.block_size == DECODE_BS
    assert (ws[pd_pb2.ROLE_PREFILL].layout.compat_hash
            == ws[pd_pb2.ROLE_DECODE].layout.compat_hash)


@pytest.mark.parametrize("n", SIZES)
def test_relaid_out_kv_gives_the_colocated_output(mixed, truth, n):
    decode = by_role(mixed, pd_pb2.ROLE_DECODE)[0]
    before = mixed.metrics(decode)
    r = complete(mixed, truth["prompts"][n])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == truth["ref"][n]["text"]
    kv = body["kv_transfer"]
    assert kv["status"] == "ok" and kv["tokens"] == n, kv
    assert kv["relayout_seconds"] > 0 and kv["checksummed"] is True, kv
    # the default: the first token went out with the decode worker's first
    assert "first=with_stream" in r.headers["x-pdserve-route"], r.headers["x-pdserve-route"]
    # the bytes are the producer's blocks: 64-token blocks of 4 layers x 2 KV heads x
    # (K + V) x head size 64, in the engines' dtype (the tests': conftest.TEST_DTYPE)
    per_block = 4 * 2 * PREFILL_BS * 128 * (2 if TEST_DTYPE[-1] == "bfloat16" else 4)
    assert kv["bytes"] == -(-n // PREFILL_BS) * per_block, kv
    assert_prompt_loaded_not_recomputed(before, mixed.metrics(decode), n)


def test_relayout_leaves_both_sides_idle(mixed):
    assert_idle(mixed, mixed.workers())


@pytest.fixture(scope="module")
def mixed_push(tiny_model, tmp_path_factory):
    yield from cluster_with(tiny_model, tmp_path_factory, "block-sizes-push", "--kv-mode",
                            "push")


def test_push_across_block_sizes_is_refused_and_recomputed(mixed_push, truth):
    r = complete(mixed_push, truth["prompts"][300])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == truth["ref"][300]["text"]
    kv = body["kv_transfer"]
    assert kv["status"] == "failed" and kv["reason"] == "incompatible", kv
    decode = by_role(mixed_push, pd_pb2.ROLE_DECODE)[0]
    assert metric_value(mixed_push.metrics(decode), "pdserve_kv_recompute_fallbacks_total") == 1
    assert_idle(mixed_push, mixed_push.workers())
