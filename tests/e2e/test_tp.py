"""Tensor parallelism per pool, and different degrees between the pools, end to end.

vLLM's CPU backend runs TP > 1 (a worker process per rank). Prefill TP 2 -> decode TP 1:
the decode engine gathers its two KV heads from the two prefill ranks' agents. Prefill TP 1
-> decode TP 2: each decode rank READs its head's slice of the prefill engine's blocks
(kv_transfer/connector/ranks.py). The output equals a colocated TP 1 engine's, every load
is checksummed on both sides, the decode engine recomputes nothing, and both sides end idle.
"""

import httpx
import pytest

from tests.e2e.cluster import assert_prompt_loaded_not_recomputed, reference, sched, wait_until
from tests.e2e.conftest import KV, TEST_DTYPE, serving, words
from tests.e2e.cluster import assert_idle, by_role
from pdserve.rpc import pd_pb2

MAX_TOKENS = 16
SIZES = (10, 300, 1500)
BS, LAYERS, HEADS, HEAD = 128, 4, 2, 64        # the tiny model's KV
DIRECTIONS = [(2, 1), (1, 2)]                   # (prefill TP, decode TP)


@pytest.fixture(scope="module")
def tp_cluster(tiny_model, tmp_path_factory):
    """Prefill TP 2, decode TP 1. The other direction swaps the two workers' roles (a role
    change never restarts an engine: every engine both produces and consumes KV), so both
    directions cost one cluster start."""
    yield from serving(tiny_model, tmp_path_factory, "tp", extra=[
        *KV, "--kv-checksum", "--role-planner", "off",
        "--prefill-args", "--tensor-parallel-size 2",
        "--decode-args", "--tensor-parallel-size 1"])


@pytest.fixture(scope="module", params=DIRECTIONS, ids=["tp2-to-tp1", "tp1-to-tp2"])
def tp(request, tp_cluster):
    c = tp_cluster
    if request.param == (1, 2):
        p = by_role(c, pd_pb2.ROLE_PREFILL)[0].worker_id
        d = by_role(c, pd_pb2.ROLE_DECODE)[0].worker_id
        s = sched(c)
        assert s.SetRole(pd_pb2.SetRoleRequest(worker_id=p, role=pd_pb2.ROLE_DECODE)).found
        assert s.SetRole(pd_pb2.SetRoleRequest(worker_id=d, role=pd_pb2.ROLE_PREFILL)).found
        want = {p: pd_pb2.ROLE_DECODE, d: pd_pb2.ROLE_PREFILL}
        wait_until(lambda: {w.worker_id: (w.role, w.pending_role) for w in c.workers()}
                   == {w: (r, 0) for w, r in want.items()}, what="the roles swapped")
    c.tp = request.param
    return c


@pytest.fixture(scope="module")
def truth(tiny_model, tokenizer, tmp_path_factory):
    """Prompts per direction: after the swap the decode worker is the engine that
    prefilled the first direction's, and would hold them in its prefix cache."""
    keys = [(d, n) for d in DIRECTIONS for n in SIZES]
    prompts = {(d, n): words(n, seed=900 + n + 7 * i) for i, d in enumerate(DIRECTIONS)
               for n in SIZES}
    ids = [tokenizer.encode(prompts[k]) for k in keys]
    refs = reference(tiny_model, ids, MAX_TOKENS, tmp_path_factory.mktemp("ref-tp"))
    return {"prompts": prompts, "ref": dict(zip(keys, refs))}


@pytest.mark.parametrize("n", SIZES)
def test_kv_between_tp_degrees_gives_the_colocated_output(tp, truth, n):
    decode = by_role(tp, pd_pb2.ROLE_DECODE)[0]
    before = tp.metrics(decode)
    r = httpx.post(f"{tp.url}/v1/completions", timeout=300, json={
        "model": tp.model_name, "prompt": truth["prompts"][tp.tp, n], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == truth["ref"][tp.tp, n]["text"]
    kv = body["kv_transfer"]
    assert kv["status"] == "ok" and kv["tokens"] == n and kv["checksummed"] is True, kv
    # the record is the decode engine's rank 0's: the heads it holds, from every block
    heads = HEADS // tp.tp[1]
    per_block = LAYERS * heads * BS * 2 * HEAD * (2 if TEST_DTYPE[-1] == "bfloat16" else 4)
    assert kv["bytes"] == -(-n // BS) * per_block, kv
    assert_prompt_loaded_not_recomputed(before, tp.metrics(decode), n)


def test_both_sides_end_idle(tp):
    assert_idle(tp, tp.workers())
