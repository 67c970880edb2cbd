"""The keystone, end to end: HTTP -> scheduler -> vLLM prefill -> UCX -> vLLM decode.

Real processes: `pdserve serve` with the tiny model (prefill on core 0, decode on
core 1, one thread each), and a colocated vLLM engine for ground truth.
"""

import asyncio
import json
import os

import httpx
import openai
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import engine_core, metric_value, pid_of, reference
from tests.e2e.conftest import words

MAX_TOKENS = 24
SIZES = (10, 300, 1500)


@pytest.fixture(scope="module")
def ground_truth(cluster, tokenizer, tmp_path_factory):
    """Reference outputs for each prompt size, as completions and as chat."""
    prompts = {n: words(n, seed=n) for n in SIZES}
    ids = {n: tokenizer.encode(p) for n, p in prompts.items()}
    for n in SIZES:
        assert len(ids[n]) == n
    chat = {n: [{"role": "user", "content": words(n - 12, seed=1000 + n)}] for n in SIZES}
    chat_ids = {n: tokenizer.chat(m) for n, m in chat.items()}
    order = [ids[n] for n in SIZES] + [chat_ids[n] for n in SIZES]
    ref = reference(cluster.model_dir, order, MAX_TOKENS, tmp_path_factory.mktemp("ref"))
    return {"prompts": prompts, "chat": chat, "chat_ids": chat_ids,
            "ref": {n: ref[i] for i, n in enumerate(SIZES)},
            "chat_ref": {n: ref[3 + i] for i, n in enumerate(SIZES)}}


def post(cluster, path, body, **kw):
    return httpx.post(f"{cluster.url}{path}", json=body, timeout=120, **kw)


@pytest.mark.parametrize("n", SIZES)
def test_completions_equal_colocated_vllm(cluster, ground_truth, n):
    r = post(cluster, "/v1/completions", {
        "model": cluster.model_name, "prompt": ground_truth["prompts"][n],
        "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = ground_truth["ref"][n]
    assert body["choices"][0]["text"] == ref["text"]
    u = body["usage"]     # vLLM's usage model: its other fields null here
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (
        n, len(ref["token_ids"]), n + len(ref["token_ids"]))
    assert u["prompt_tokens_details"]["cached_tokens"] == 0     # unique prompts
    kv = body["kv_transfer"]
    assert kv["status"] == "ok" and kv["tokens"] == n and kv["bytes"] > 0
    # the reading thread's CPU time is part of the READ's wall time
    assert 0 < kv["read_cpu_seconds"] <= kv["read_seconds"] + 1e-3, kv
    assert r.headers["x-request-id"] and body["id"].startswith("cmpl-")
    # the first token went out when computed (the cluster's setting)
    assert "first=" not in r.headers["x-pdserve-route"], r.headers["x-pdserve-route"]


@pytest.mark.parametrize("n", SIZES)
def test_chat_equal_colocated_vllm_streamed_and_not(cluster, ground_truth, n):
    ref = ground_truth["chat_ref"][n]
    msgs = ground_truth["chat"][n]
    r = post(cluster, "/v1/chat/completions", {
        "model": cluster.model_name, "messages": msgs, "max_tokens": MAX_TOKENS,
        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref["text"]
    assert r.json()["usage"]["prompt_tokens"] == len(ground_truth["chat_ids"][n])
    # the same through SSE
    text, saw_done, usage = "", False, None
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", timeout=120, json={
            "model": cluster.model_name, "messages": msgs, "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as s:
        for line in s.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                saw_done = True
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev["choices"]:
                text += c["delta"].get("content", "")
    assert saw_done and text == ref["text"]
    assert usage["completion_tokens"] == len(ref["token_ids"])


def test_decode_worker_computed_none_of_the_prompt(cluster, tokenizer):
    """vLLM's own counters on the decode engine: prompt tokens came from transfer."""
    decode = next(w for w in cluster.workers() if w.role == pd_pb2.ROLE_DECODE)
    before = cluster.metrics(decode)
    prompts = [words(n, seed=7000 + n) for n in (50, 400, 900)]
    for p in prompts:
        r = post(cluster, "/v1/completions", {"model": cluster.model_name, "prompt": p,
                                              "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    after = cluster.metrics(decode)

    def delta(source):
        name = "vllm:prompt_tokens_by_source_total"
        return metric_value(after, name, source=source) - metric_value(before, name,
                                                                       source=source)

    total = sum(len(tokenizer.encode(p)) for p in prompts)
    assert delta("external_kv_transfer") == total
    # the decode engine computes only the prefill worker's first token, once per request
    assert delta("local_compute") == len(prompts)
    ours = "pdserve_kv_external_prompt_tokens_total"
    assert metric_value(after, ours) - metric_value(before, ours) == total


def test_openai_client_chat_and_completions(cluster):
    c = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in c.models.list().data] == [cluster.model_name]
    chat = c.chat.completions.create(model=cluster.model_name, max_tokens=6, temperature=0,
                                     messages=[{"role": "user", "content": "the fox"}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 6
    stream = c.chat.completions.create(model=cluster.model_name, max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": "the fox"}],
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
        chat.choices[0].message.content
    cmpl = c.completions.create(model=cluster.model_name, prompt="paris fox", max_tokens=5,
                                temperature=0, logprobs=2)
    assert cmpl.usage.completion_tokens == 5
    assert len(cmpl.choices[0].logprobs.tokens) == 5
    assert all(len(t) == 2 for t in cmpl.choices[0].logprobs.top_logprobs)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=cluster.model_name, prompt="paris fox", max_tokens=5, temperature=0, stream=True))
    assert streamed == cmpl.choices[0].text


def test_sampling_params_take_effect(cluster):
    base = {"model": cluster.model_name, "prompt": words(40, seed=3), "max_tokens": 12}
    a = post(cluster, "/v1/completions", {**base, "temperature": 1.0, "seed": 11}).json()
    b = post(cluster, "/v1/completions", {**base, "temperature": 1.0, "seed": 11}).json()
    c = post(cluster, "/v1/completions", {**base, "temperature": 1.0, "seed": 12}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]       # seeded: reproducible
    assert a["choices"][0]["text"] != c["choices"][0]["text"]
    greedy = post(cluster, "/v1/completions", {**base, "temperature": 0}).json()
    word = greedy["choices"][0]["text"].split()[2]
    stopped = post(cluster, "/v1/completions", {**base, "temperature": 0, "stop": [word]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert word not in stopped["choices"][0]["text"]
    one = post(cluster, "/v1/completions", {**base, "temperature": 0, "max_tokens": 1}).json()
    assert one["usage"]["completion_tokens"] == 1 and one["choices"][0]["finish_reason"] == \
        "length"
    # max_tokens=1 is answered by the prefill worker alone: its token is greedy's first
    assert greedy["choices"][0]["text"].startswith(one["choices"][0]["text"])
    assert one["choices"][0]["text"].strip() == greedy["choices"][0]["text"].split()[0]


BAD = [
    ("malformed json", "/v1/completions", b'{"model": "x", ', 400),
    ("wrong type", "/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400),
    ("max_tokens 0", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    ("max_tokens negative", "/v1/completions", {"prompt": "a", "max_tokens": -3}, 400),
    ("max_tokens > context", "/v1/completions", {"prompt": "a", "max_tokens": 5000}, 400),
    ("prompt > context", "/v1/completions", {"prompt": words(2100, 1), "max_tokens": 4}, 400),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    ("unsupported param", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "functions": [{"name": "f"}]}, 400),
    ("tool_choice without tools", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}, 400),
    ("n past the bound", "/v1/completions", {"prompt": "a", "n": 65}, 400),
    ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 2}, 400),
    ("token id out of vocab", "/v1/completions", {"prompt": [10, 999999], "max_tokens": 2}, 400),
    # numbers and lists past their wire fields: 400, never an overflow and a 500
    ("top_k overflow", "/v1/completions", {"prompt": "a", "top_k": 2**31}, 400),
    ("seed overflow", "/v1/completions", {"prompt": "a", "seed": 2**63}, 400),
    ("stop id overflow", "/v1/completions", {"prompt": "a", "stop_token_ids": [2**32]}, 400),
    ("stop id out of vocab", "/v1/completions", {"prompt": "a", "stop_token_ids": [999999]},
     400),
    ("min_tokens huge", "/v1/completions", {"prompt": "a", "min_tokens": 2**40}, 400),
    ("stop list unbounded", "/v1/completions", {"prompt": "a", "stop": ["x"] * 100}, 400),
    # sizes: refused before parsing (413), or before tokenizing (400)
    ("body over the limit", "/v1/completions", {"prompt": "w1 " * 3_000_000}, 413),
    ("text that cannot fit", "/v1/completions", {"prompt": "w1 " * 500_000}, 400),
    ("invalid utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(cluster, name, path, body, status):
    if isinstance(body, dict):
        body.setdefault("model", cluster.model_name)
        r = httpx.post(f"{cluster.url}{path}", json=body, timeout=60)
    else:
        r = httpx.post(f"{cluster.url}{path}", content=body, timeout=60,
                       headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and r.headers.get("x-request-id")
    ok = post(cluster, "/v1/completions", {"model": cluster.model_name, "prompt": "the fox",
                                           "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200


async def test_no_leaks_after_cancelled_and_finished_requests(cluster):
    """A batch with clients that hang up mid-stream: both engines end with no KV in use."""
    async with httpx.AsyncClient(timeout=120) as client:
        async def full(i):
            r = await client.post(f"{cluster.url}/v1/completions", json={
                "model": cluster.model_name, "prompt": words(200 + 50 * i, seed=i),
                "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200

        async def hang_up(i, after_chunks):
            async with client.stream("POST", f"{cluster.url}/v1/completions", json={
                    "model": cluster.model_name, "prompt": words(300 + 40 * i, seed=50 + i),
                    "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                    "stream": True}) as s:
                n = 0
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        n += 1
                        if n >= after_chunks:
                            break   # closing the stream here is the client going away

        await asyncio.gather(*[full(i) for i in range(4)],
                             *[hang_up(i, after_chunks=1 + 3 * i) for i in range(4)])
    loads = cluster.wait_idle(timeout=30)
    for wid, load in loads.items():
        assert (load.running, load.waiting, load.kv_leases_held) == (0, 0, 0), (wid, load)
        assert load.kv_usage == 0.0, (wid, load)
    ok = post(cluster, "/v1/completions", {"model": cluster.model_name, "prompt": "fox",
                                           "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200


def test_metrics_endpoints(cluster):
    fe = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    for name in ("pdserve_time_to_first_token_seconds_count",
                 "pdserve_time_per_output_token_seconds_count",
                 "pdserve_inter_token_latency_seconds_count",
                 "pdserve_e2e_request_latency_seconds_count", "pdserve_requests_total"):
        assert metric_value(fe, name) > 0, name
    # each serving process watches its own event loop (pdserve/loop_lag.py)
    assert metric_value(fe, "pdserve_event_loop_lag_seconds_count", process="frontend") > 0
    for w in cluster.workers():
        text = cluster.metrics(w)
        assert metric_value(text, "pdserve_event_loop_lag_seconds_count", process="worker") > 0
        role = "prefill" if w.role == pd_pb2.ROLE_PREFILL else "decode"
        assert "pdserve_worker_kv_usage_ratio" in text and "vllm:num_requests_running" in text
        assert metric_value(text, "pdserve_worker_requests_total", role=role) > 0
        if role == "decode":
            assert metric_value(text, "pdserve_kv_transfer_bytes_sum") > 0
            assert metric_value(text, "pdserve_kv_transfer_seconds_count") > 0
            # UCX's own endpoint log: bulk KV over shared memory (CMA) on one host
            assert metric_value(text, "pdserve_kv_transport_peers", transport="shm") == 1
            assert metric_value(text, "pdserve_kv_transport_fallback_peers") == 0


def test_serving_processes_keep_off_the_decode_engines_core(cluster):
    """`--serving-cores auto` (the default, CPU engines): once up, the frontend, scheduler
    and workers run on the prefill pool's core, every thread of them, and each engine on
    its own core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: the pools share it, and the serving processes with them")
    p_core, d_core = cores[0], cores[1]     # launcher.assign_cores, one engine each
    for name in ("frontend", "scheduler", "prefill-0", "decode-0"):
        pid = pid_of(cluster, name)
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {p_core}, (name, tid)
    for worker, core in (("prefill-0", p_core), ("decode-0", d_core)):
        assert os.sched_getaffinity(engine_core(pid_of(cluster, worker)).pid) == {core}, worker


def test_engine_helper_loops_run_idle_and_nothing_else_does(cluster):
    """A one-rank engine's gloo socket loops (a dozen threads waking every 10 ms, no
    traffic) run under SCHED_IDLE; the engine's other threads and the workers keep the
    normal policy (pdserve/vllm_plugin.py, `idle_helpers`)."""
    for worker in ("prefill-0", "decode-0"):
        pid = pid_of(cluster, worker)
        core = engine_core(pid).pid
        policy: dict[str, set[int]] = {}
        for tid in os.listdir(f"/proc/{core}/task"):
            try:
                with open(f"/proc/{core}/task/{tid}/comm") as f:
                    name = f.read().strip()
                kind = "gloo" if name == "gloo_tcp_loop" else "other"
                policy.setdefault(kind, set()).add(os.sched_getscheduler(int(tid)))
            except OSError:     # a thread that ended between the listing and the read
                continue
        assert policy.get("gloo") == {os.SCHED_IDLE}, (worker, policy)
        assert policy["other"] == {os.SCHED_OTHER}, (worker, policy)
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER


def test_serving_cores_the_host_does_not_allow_stop_the_launcher_with_a_message(tiny_model):
    """Cores that are not this host's: `pdserve serve` says so and exits 2 before it
    starts anything (the cluster above is not touched)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--model", tiny_model,
                        "--serving-cores", "4095", "--port", "1", "--scheduler-port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--serving-cores 4095: not cores this process may use" in r.stderr, r.stderr[-2000:]
    assert "started" not in r.stderr
