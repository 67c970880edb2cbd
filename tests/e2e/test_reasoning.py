"""Differential: vLLM's reasoning parser (`--reasoning-parser deepseek_v3`) through pdserve
and through vLLM's own OpenAI server, started here with the same flag, model and engine
settings. deepseek_v3 splits off the reasoning only when a request asks for thinking.

The tiny model's vocabulary holds `<think>` and `</think>`; `logit_bias` pushes it towards
the end marker, so an answer has both parts. Short prompts are prefilled on the decode
worker and long ones on the prefill worker (`--local-prefill-max-tokens 64`), so both
paths run. With a structured output only the answer is constrained: through the
disaggregated path the first token (reasoning, or the marker) comes from the prefill
engine, and the decode engine's grammar must start after the marker.

The cluster is `cond_cluster` (tests/e2e/conftest.py), shared with test_conditional.py.
`--reasoning-parser` is a vLLM engine argument, which pdserve hands to vLLM's parser: its
workers are the suite's ones that parse vLLM engine arguments, so the seeded-sampling and
step-hook test below runs here."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from bench.compare import Procs, wait_ready
from tests.e2e.cluster import start_vllm_api, wait_until
from tests.e2e.conftest import words

REASONING = ["--reasoning-parser", "deepseek_v3"]     # as cond_cluster's
SHORT, LONG = words(30, seed=501), words(180, seed=502)


@pytest.fixture(scope="module")
def rcluster(cond_cluster):
    return cond_cluster


@pytest.fixture(scope="module")
def vllm_r(rcluster, tiny_model, tmp_path_factory):
    procs = Procs(tmp_path_factory.mktemp("vllm-reasoning"))
    try:
        url = start_vllm_api(procs, tiny_model, rcluster.model_name, "vllm-reasoning", REASONING)
        wait_ready(url, procs)
        yield url
    finally:
        procs.stop()


def both(c, vurl, body: dict) -> tuple[dict, dict]:
    out = []
    for url in (c.url, vurl):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"model": c.model_name, **body})
        assert r.status_code == 200, (url, r.text)
        out.append(r.json())
    return out[0], out[1]


def streamed(url: str, model: str, body: dict) -> tuple[str, str, dict | None]:
    """(reasoning, content, usage) a stream adds up to."""
    reasoning, content, usage = "", "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, **body, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            assert "error" not in d, d
            for ch in d.get("choices") or []:
                reasoning += ch["delta"].get("reasoning") or ""
                content += ch["delta"].get("content") or ""
            usage = d.get("usage") or usage
    return reasoning, content, usage


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["local", "remote"])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "regex"])
def test_reasoning_equals_vllms_server(rcluster, vllm_r, prompt, constrained):
    (end,) = httpx.post(f"{rcluster.url}/tokenize", timeout=30, json={
        "model": rcluster.model_name, "prompt": "</think>",
        "add_special_tokens": False}).json()["tokens"]
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "chat_template_kwargs": {"thinking": True},
            "logit_bias": {str(end): 7.0}}
    constraint = None
    if constrained and prompt is LONG:
        # through the handoff: an answer that must start with the reasoning's own first
        # word. A decode engine that fed that word (the prefill engine's first token) to
        # the grammar would constrain the answer from its second word on, and differ
        free = httpx.post(f"{vllm_r}/v1/chat/completions", timeout=120,
                          json={"model": rcluster.model_name, **body}).json()
        first = free["choices"][0]["message"]["reasoning"].split()[0]
        constraint = {"regex": f"{first}(fox|dog)(lazy|brown)+"}
    elif constrained:     # one engine samples it all (that regex on this prompt fails in
        constraint = {"regex": "(fox|dog)(lazy|brown)+"}    # vLLM's own server: a 500)
    if constraint:
        body["structured_outputs"] = constraint
    ours, theirs = both(rcluster, vllm_r, body)
    a, b = (r["choices"][0]["message"] for r in (ours, theirs))
    assert (a["reasoning"], a["content"]) == (b["reasoning"], b["content"])
    assert a["reasoning"] and a["content"], a          # both parts: the split happened
    details = ours["usage"]["completion_tokens_details"]
    assert details == theirs["usage"]["completion_tokens_details"]
    if constraint:     # the answer after the marker obeys it
        assert re.fullmatch(constraint["regex"], a["content"].replace(" ", "")), a
    s1, s2 = (streamed(url, rcluster.model_name, body) for url in (rcluster.url, vllm_r))
    # vLLM's server splits a delta at the marker as the delta came: a `</think>` among
    # other tokens gives its leading space to the reasoning, a lone one drops it. Its
    # stream coalesces tokens when it falls behind (a slow host), so its trailing space
    # is timing; pdserve's is not (token by token: tests/component/test_reasoning.py)
    assert (s1[0].rstrip(), s1[1]) == (s2[0].rstrip(), s2[1])
    assert s1[2]["completion_tokens_details"] == s2[2]["completion_tokens_details"] == details
    # the same words as the whole answer (vLLM's own stream and whole answer differ in the
    # spaces around the marker)
    assert [s1[0].split(), s1[1].split()] == [a["reasoning"].split(), a["content"].split()]
    # hidden reasoning: the answer alone, and (vLLM's rule) constrained from its start
    hidden, vhidden = both(rcluster, vllm_r, {**body, "include_reasoning": False})
    h, vh = (r["choices"][0]["message"] for r in (hidden, vhidden))
    assert h["reasoning"] is None and h["content"] == vh["content"]
    # without thinking the same parser leaves the answer whole
    plain, vplain = both(rcluster, vllm_r, {**body, "chat_template_kwargs": {}})
    p, vp = (r["choices"][0]["message"] for r in (plain, vplain))
    assert p["reasoning"] is None and p["content"] == vp["content"]
    if constraint:     # no reasoning: constrained from the first token
        assert re.fullmatch(constraint["regex"], p["content"].replace(" ", "")), p
    else:
        assert "</think>" in p["content"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_seeded_sampling_equals_vllms_server_and_engines_time_their_steps(rcluster, vllm_r,
                                                                           remote):
    """Workers given vLLM engine arguments load vLLM's plugins while parsing them, before
    pdserve has set the environment its patches read (pdserve/engine.py, `load_patches`).
    Before that was handled their engines ran without continuation (a seeded request
    differed from vLLM's from its second token, through the prefill worker) and without
    the step hook (no step samples, no step budget)."""
    for k, extra in enumerate(({"temperature": 0.9, "seed": 1234},
                               {"temperature": 0.9, "seed": 1234, "min_p": 0.3})):
        # a new long prompt each time: a cached one would be prefilled on the decode worker
        prompt = words(180, seed=700 + k) if remote else SHORT
        out = []
        for url in (rcluster.url, vllm_r):
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": rcluster.model_name, "prompt": prompt, "max_tokens": 12,
                "return_token_ids": True, **extra})
            assert r.status_code == 200, (url, r.text)
            out.append(r.json()["choices"][0]["token_ids"])
            if url == rcluster.url:      # long prompts through the prefill worker
                assert ("prefill=" in r.headers["x-pdserve-route"]) == remote
        assert out[0] == out[1], extra
    # (reported with the workers' heartbeats)
    wait_until(lambda: len(ws := rcluster.workers()) == 2 and
               all(w.step_samples > 0 for w in ws), timeout=30,
               what="step samples from both engines")
