"""Push mode end to end: the decode engine allocates first and offers its blocks, the prefill
engine WRITEs each layer's KV into them as it computes (chunked prefill: several steps per
long prompt), the decode engine samples the first token itself.

Real processes: `pdserve serve --kv-mode push` with the tiny model, 512-token prefill
chunks, and a colocated vLLM engine with the same chunk size for ground truth. A test-only
switch delays each prefill, so that offers are outstanding when clients hang up or the
prefill worker is killed.
"""

import asyncio
import os
import re
import signal

import httpx
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import metric_value, reference
from tests.e2e.conftest import KV, serving, words
from tests.e2e.cluster import assert_idle, by_role, pid_of

MAX_TOKENS = 16
SIZES = (10, 300, 1500)
CHUNK = 512
DELAY_S = 1.0
KILLED: set[str] = set()   # workers the tests killed (registered until their heartbeat ends)


@pytest.fixture(scope="module")
def pc(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "push",
                       env={"PDSERVE_DEBUG_PREFILL_DELAY_S": str(DELAY_S)},
                       # every request disaggregated (these tests are about the push
                       # path: the adaptive choice would prefill some of the concurrent
                       # ones on an idle decode worker)
                       extra=["--kv-mode", "push", "--max-num-batched-tokens", str(CHUNK),
                              "--policy", "kv",
                              "--prefill-workers", "1", "--decode-workers", "2",
                              "--keep-going", "--worker-restarts", "0",
                              "--kv-push-ttl-s", "20"])


@pytest.fixture(scope="module")
def truth(tiny_model, tokenizer, tmp_path_factory):
    prompts = {n: words(n, seed=300 + n) for n in SIZES}
    ids = [tokenizer.encode(prompts[n]) for n in SIZES]
    assert [len(x) for x in ids] == list(SIZES)
    ref = reference(tiny_model, ids, MAX_TOKENS, tmp_path_factory.mktemp("ref"),
                    max_num_batched_tokens=CHUNK, keep=False)
    return {"prompts": prompts, "ref": dict(zip(SIZES, ref))}


def complete(c, prompt, max_tokens=MAX_TOKENS, timeout=120):
    return httpx.post(f"{c.url}/v1/completions", timeout=timeout, json={
        "model": c.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


@pytest.mark.parametrize("n", SIZES)
def test_pushed_kv_gives_the_colocated_output(pc, truth, n):
    decodes = by_role(pc, pd_pb2.ROLE_DECODE)
    before = [pc.metrics(d) for d in decodes]
    r = complete(pc, truth["prompts"][n])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == truth["ref"][n]["text"]
    assert body["usage"]["completion_tokens"] == len(truth["ref"][n]["token_ids"])
    kv = body["kv_transfer"]
    assert kv["mode"] == "push" and kv["status"] == "ok", kv
    assert kv["tokens"] == n and kv["bytes"] > 0
    # the prefill worker's record: every layer was written as it was computed, in one
    # WRITE per layer per prefill step (1500 tokens: three 512-token steps)
    layers = 4   # the tiny model
    assert kv["writes"] == layers * -(-n // CHUNK), kv
    assert 0 <= kv["exposed_seconds"] <= kv["seconds"] and kv["hidden_share"] is not None
    after = [pc.metrics(d) for d in decodes]

    def delta(source):   # over both decode workers (the request went to one of them)
        name = "vllm:prompt_tokens_by_source_total"
        return sum(metric_value(a, name, source=source) - metric_value(b, name, source=source)
                   for a, b in zip(after, before))
    # the decode engine's counters: the prompt came by transfer (vLLM recomputes the last
    # prompt token to sample the first output token, and counts it as transferred)
    assert delta("external_kv_transfer") == n and delta("local_compute") == 0


async def test_clients_hang_up_while_offers_wait(pc):
    """Hang-ups while the decode engine waits for WRITEs: the decode side cancels its
    offers at the producer, nothing is written into freed blocks, both sides end idle."""
    given_up = pc.log_path.read_text().count("given up (aborted)")
    async with httpx.AsyncClient(timeout=DELAY_S / 2) as client:
        async def hang_up(i):
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"{pc.url}/v1/completions", json={
                    "model": pc.model_name, "prompt": words(200, seed=50 + i),
                    "max_tokens": 8, "temperature": 0})
        await asyncio.gather(*[hang_up(i) for i in range(4)])
    assert_idle(pc, pc.workers())
    # each decode request was aborted while its offer was outstanding, and cancelled at
    # the producer before its blocks were freed
    assert pc.log_path.read_text().count("given up (aborted)") - given_up == 4
    for i in range(2):
        assert complete(pc, words(120, seed=70 + i), 4).status_code == 200


async def test_decode_worker_killed_while_its_blocks_are_written(pc):
    """SIGKILL of a decode worker whose offers wait at the producer: when the delayed
    prefill runs, its WRITEs into the dead process fail inside the producer's step (NIXL
    reports the peer gone; at worst one --transfer-timeout-s per step). The producer ends
    those pushes as failed and frees its own blocks, every request ends, the survivors end
    idle and the next requests succeed."""
    decodes = by_role(pc, pd_pb2.ROLE_DECODE)
    assert len(decodes) == 2
    def push_failures():
        return len(re.findall(r"push (?:WRITE of|of|notification for) \S+.*failed",
                              pc.log_path.read_text()))
    failed_before = push_failures()
    async with httpx.AsyncClient(timeout=120) as client:
        reqs = [asyncio.ensure_future(client.post(f"{pc.url}/v1/completions", json={
            "model": pc.model_name, "prompt": words(200, seed=60 + i), "max_tokens": 8,
            "temperature": 0})) for i in range(4)]
        await asyncio.sleep(DELAY_S / 2)
        busy = [w for w in decodes if pc.status(w).load.kv_usage > 0]
        assert busy, "no decode worker holds offered blocks"
        victim = busy[0]
        os.killpg(pid_of(pc, victim.worker_id), signal.SIGKILL)
        KILLED.add(victim.worker_id)
        res = await asyncio.wait_for(asyncio.gather(*reqs), 90)
    for r in res:
        assert r.status_code == 200 or r.json()["error"]["message"], r.text
    # the producer's WRITEs (or its notification) to the dead consumer failed, and it said so
    assert push_failures() > failed_before
    survivors = [w for w in pc.workers() if w.worker_id != victim.worker_id]
    assert {w.role for w in survivors} == {pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_DECODE}
    assert_idle(pc, survivors)
    for i in range(2):
        assert complete(pc, words(150, seed=90 + i), 4).status_code == 200


async def test_prefill_worker_killed_while_offers_wait(pc):
    """SIGKILL of the prefill worker with offers outstanding: the frontend sees the prefill
    fail, the decode side's Cancel finds the producer gone and frees its blocks, and every
    request ends (served by the decode worker itself, the only worker left)."""
    pid = pid_of(pc, "prefill-0")
    async with httpx.AsyncClient(timeout=120) as client:
        reqs = [asyncio.ensure_future(client.post(f"{pc.url}/v1/completions", json={
            "model": pc.model_name, "prompt": words(200, seed=80 + i), "max_tokens": 8,
            "temperature": 0})) for i in range(3)]
        await asyncio.sleep(DELAY_S / 2)
        os.killpg(pid, signal.SIGKILL)
        res = await asyncio.gather(*reqs)
    for r in res:
        assert r.status_code == 200 or r.json()["error"]["message"], r.text
    assert sum(r.status_code == 200 for r in res) >= 1
    assert_idle(pc, [w for w in by_role(pc, pd_pb2.ROLE_DECODE) if w.worker_id not in KILLED])
    assert complete(pc, words(100, seed=99), 4).status_code == 200


@pytest.fixture(scope="module")
def whole(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "push-whole",
                       env={"PDSERVE_DEBUG_PREFILL_DELAY_S": "0.5"},
                       extra=["--kv-mode", "push-whole", "--max-num-batched-tokens", str(CHUNK),
                              "--kv-checksum", *KV])


def test_whole_request_push_gives_the_colocated_output(whole, truth):
    """push-whole: one WRITE of every layer after the last prefill step (the prefill is
    delayed so the offer is there first; a late offer is pushed whole too, from the
    agent's thread, and the prefill worker's response then has no record)."""
    for n in (300, 1500):
        r = complete(whole, truth["prompts"][n])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == truth["ref"][n]["text"]
        kv = body["kv_transfer"]
        assert kv["mode"] == "push" and kv["status"] == "ok" and kv["bytes"] > 0, kv
        assert kv["writes"] == 1 and kv["exposed_seconds"] > 0, kv
        assert kv.get("checksummed") is True    # --kv-checksum: CRC32 equal on both sides


@pytest.fixture(scope="module")
def corrupt_push(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "push-corrupt",
                       env={"PDSERVE_DEBUG_PREFILL_DELAY_S": "0.5",
                            "PDSERVE_DEBUG_CORRUPT_KV": "zero"},
                       extra=["--kv-mode", "push", "--max-num-batched-tokens", str(CHUNK),
                              "--kv-checksum", *KV])


def test_push_checksums_catch_corrupted_kv_and_recompute(corrupt_push, truth):
    """--kv-checksum in push mode: the producer's notification carries the CRC32 of the
    blocks it pushed; the decode worker zeroes them (test switch) before comparing, so the
    push fails as checksum_mismatch, the decode engine recomputes, the answer is right."""
    for n in (300, 1500):
        r = complete(corrupt_push, truth["prompts"][n])
        assert r.status_code == 200, r.text
        body = r.json()
        kv = body["kv_transfer"]
        assert kv["status"] == "failed" and kv["reason"] == "checksum_mismatch", kv
        assert body["choices"][0]["text"] == truth["ref"][n]["text"]
    decode = by_role(corrupt_push, pd_pb2.ROLE_DECODE)[0]
    text = corrupt_push.metrics(decode)
    assert metric_value(text, "pdserve_kv_checksums_total", result="mismatch") == 2
    assert metric_value(text, "pdserve_kv_recompute_fallbacks_total") == 2
