"""The model's default sampling parameters (its generation config), applied to requests as
vLLM's OpenAI server applies them: differential, against vLLM's server started here with
the same `--generation-config` folder.

A request that sets nothing gets the folder's temperature, top_k, repetition penalty and
max_new_tokens on both (seeded, so the draws compare); a request's own value wins on both;
and pdserve's frontend without the folder answers differently, so the check can fail."""

from __future__ import annotations

import json

import httpx
import pytest

from bench.compare import Procs, wait_ready
from bench.local_cluster import start_frontend, stop_cluster_proc
from tests.e2e.cluster import start_vllm_api
from tests.e2e.conftest import words

PROMPT = words(40, seed=601)
GEN = {"temperature": 0.8, "top_k": 12, "repetition_penalty": 1.4, "max_new_tokens": 9}


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    (d / "generation_config.json").write_text(json.dumps(GEN))
    return str(d)


@pytest.fixture(scope="module")
def servers(cluster, tiny_model, gen_dir, tmp_path_factory):
    """(pdserve's second frontend on `cluster`, vLLM's server), both with the folder."""
    logs = tmp_path_factory.mktemp("gen-logs")
    procs = Procs(logs)
    fe = None
    try:
        theirs = start_vllm_api(procs, tiny_model, cluster.model_name, "vllm-gen",
                          ["--generation-config", gen_dir])
        fe, ours = start_frontend(cluster, logs / "frontend.log",
                                  ["--generation-config", gen_dir])
        wait_ready(theirs, procs)
        yield ours, theirs
    finally:
        if fe is not None:
            assert stop_cluster_proc(fe) == 0
        procs.stop()


def post(url: str, path: str, model: str, body: dict) -> dict:
    r = httpx.post(f"{url}{path}", timeout=120, json={"model": model, **body})
    assert r.status_code == 200, (url, r.text)
    return r.json()


def answer(resp: dict) -> tuple[str, int]:
    c = resp["choices"][0]
    return (c["text"] if "text" in c else c["message"]["content"],
            resp["usage"]["completion_tokens"])


CASES = [("/v1/completions", {"prompt": PROMPT}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})]


@pytest.mark.parametrize("path,body", CASES)
def test_the_models_defaults_apply_as_in_vllms_server(cluster, servers, path, body):
    ours, theirs = servers
    req = {**body, "seed": 11, "ignore_eos": True}
    a = post(ours, path, cluster.model_name, req)
    b = post(theirs, path, cluster.model_name, req)
    assert answer(a) == answer(b)
    # max_new_tokens from a named folder caps every request, completions' 16 included
    assert answer(a)[1] == GEN["max_new_tokens"]
    # the shared cluster's own frontend has no such folder: another answer
    plain = post(cluster.url, path, cluster.model_name, req)
    assert answer(plain) != answer(a)


@pytest.mark.parametrize("path,body", CASES)
def test_a_requests_own_values_win_as_in_vllms_server(cluster, servers, path, body):
    ours, theirs = servers
    req = {**body, "temperature": 0, "repetition_penalty": 1.0, "max_tokens": 6}
    a = post(ours, path, cluster.model_name, req)
    assert answer(a) == answer(post(theirs, path, cluster.model_name, req))
    # greedy, unpenalised: what the plain frontend answers too
    assert answer(a) == answer(post(cluster.url, path, cluster.model_name, req))
