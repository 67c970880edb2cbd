"""Cores lent between real engines (PDSERVE_CORE_SHARE=1, pdserve/core_share.py): a prompt
step on an engine whose peer is idle computes on both cores, on the prefill worker (a
remote prefill) and on the decode worker (a local one); greedy output still equals
colocated vLLM; concurrent requests finish; and once the cluster is idle no engine holds a
core's lock."""

import concurrent.futures as cf
import os
import re

import httpx
import pytest

from tests.e2e.cluster import reference, wait_until
from tests.e2e.conftest import serving, words
from tests.locks import held


def complete(c, prompt, max_tokens):
    r = httpx.post(f"{c.url}/v1/completions", timeout=300, json={
        "model": c.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json(), r.headers.get("x-pdserve-route", "")


@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    """Prompts of at most 400 tokens prefill on the decode worker, longer ones on the
    prefill worker (the fixed rule, pinned by its flag); every engine's steps traced to a
    file of its own in `c.trace_dir`."""
    trace_dir = tmp_path_factory.mktemp("steps")
    for c in serving(tiny_model, tmp_path_factory, "core-share",
                     env={"PDSERVE_CORE_SHARE": "1",
                          "PDSERVE_STEP_TRACE": str(trace_dir / "engine-%p.txt")},
                     extra=["--local-prefill-max-tokens", "400"]):
        c.trace_dir = trace_dir
        yield c


def borrowed(c) -> dict[str, list[int]]:
    """Per engine's trace file: the prompt tokens of each step that borrowed a core."""
    out = {}
    for f in sorted(c.trace_dir.glob("engine-*.txt")):
        rows = [ln.split() for ln in f.read_text().splitlines()]
        out[f.name] = [int(r[1]) for r in rows if len(r) >= 13 and int(r[12]) > 0]
    return out


def locks_free(c) -> bool:
    (folder,) = re.findall(r"lend each other cores \S+ between their steps \((\S+)\)",
                           c.log_path.read_text())
    return not any(held(os.path.join(folder, name)) for name in os.listdir(folder))


def test_each_engine_borrows_the_idle_ones_core_and_output_equals_colocated_vllm(
        shared, tokenizer, tmp_path_factory):
    c = shared
    prompts = [words(800, seed=1301), words(300, seed=1302)]     # remote, then local
    ref = reference(c.model_dir, [tokenizer.encode(p) for p in prompts], 12,
                    tmp_path_factory.mktemp("ref"))
    for p, want, how in zip(prompts, ref, ("disagg", "local")):
        body, route = complete(c, p, 12)
        assert route.startswith(how), route
        assert body["choices"][0]["text"] == want["text"]
    got = borrowed(c)
    assert len(got) == 2, got
    # the 800-token prompt on the prefill engine, the 300-token one on the decode engine,
    # each in a step of at least the 256 tokens a step borrows for (the workers' own
    # warm-up prompts may have borrowed too)
    a, b = got.values()
    assert (800 in a and 300 in b) or (800 in b and 300 in a), got
    wait_until(lambda: locks_free(c), timeout=30)


def test_concurrent_requests_on_lent_cores_finish_and_leave_no_lock_or_block(
        shared, tokenizer, tmp_path_factory):
    c = shared
    prompts = [words(n, seed=1310 + i) for i, n in enumerate([800, 300, 20, 900, 350, 40,
                                                               600, 280])]
    ref = reference(c.model_dir, [tokenizer.encode(p) for p in prompts], 10,
                    tmp_path_factory.mktemp("ref"))
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        outs = list(ex.map(lambda p: complete(c, p, 10)[0], prompts))
    for out, want in zip(outs, ref):
        assert out["choices"][0]["text"] == want["text"]
    loads = c.wait_idle()
    assert all(not (v.running or v.kv_usage or v.kv_leases_held) for v in loads.values())
    wait_until(lambda: locks_free(c), timeout=30)
