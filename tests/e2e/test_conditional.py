"""Conditional disaggregation: short uncached prompts are prefilled on the decode worker."""

import json

import httpx

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import assert_idle, metric_value
from tests.e2e.conftest import words
from tests.e2e.cluster import sched

# cond_cluster (tests/e2e/conftest.py): --local-prefill-max-tokens 64


def run(c, prompt, stream=False):
    body = {"model": c.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    if stream:
        body["stream"] = True
        text = ""
        with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    d = json.loads(line[6:])
                    assert "error" not in d, d
                    text += d["choices"][0]["text"] if d["choices"] else ""
        return text, ""
    r = httpx.post(f"{c.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-pdserve-route"]


def test_short_prompts_prefill_locally_with_the_same_output(cond_cluster, cluster):
    c = cond_cluster
    decode = next(w for w in c.workers() if w.role == pd_pb2.ROLE_DECODE)
    before = metric_value(c.metrics(decode), "pdserve_decode_local_prefills_total")
    decided = dict(sched(c).IndexStats(pd_pb2.IndexStatsRequest()).decisions)
    short = [words(n, seed=70 + n) for n in (5, 20, 40)]
    long = [words(n, seed=80 + n) for n in (200, 500)]
    for p in short:
        text, route = run(c, p)
        assert route.startswith("local:short_prompt") and "prefill=" not in route, route
        assert text == run(cluster, p)[0]            # same greedy text as the disagg path
        assert run(c, p, stream=True)[0] == text
    for p in long:
        text, route = run(c, p)
        assert route.startswith("disagg:kv prefill="), route
        assert text == run(cluster, p)[0]
    after = metric_value(c.metrics(decode), "pdserve_decode_local_prefills_total")
    assert after - before == 2 * len(short)
    st = sched(c).IndexStats(pd_pb2.IndexStatsRequest())
    assert st.decisions["local:short_prompt"] - decided.get("local:short_prompt", 0) \
        == 2 * len(short)
    assert st.decisions["disagg:kv"] - decided.get("disagg:kv", 0) >= len(long)
    loads = c.wait_idle()
    assert all(not (v.running or v.kv_usage or v.kv_leases_held) for v in loads.values())


def test_a_local_prefill_returns_the_prompts_logprobs_too(cond_cluster, cluster):
    """The decode engine computes the prompt here: the same prompt logprobs as the prefill
    engine's on the disaggregated path (tests/e2e/test_parity.py checks those against a
    colocated engine)."""
    def plps(c):
        r = httpx.post(f"{c.url}/v1/completions", timeout=120, json={
            "model": c.model_name, "prompt": words(30, seed=97), "max_tokens": 2,
            "temperature": 0, "prompt_logprobs": 1, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        return ch["prompt_logprobs"], ch["logprobs"]["token_logprobs"], \
            r.headers["x-pdserve-route"]
    local, local_lp, route = plps(cond_cluster)
    assert route.startswith("local:"), route
    remote, remote_lp, route = plps(cluster)
    assert route.startswith("disagg:"), route
    assert len(local) == len(remote) > 20 and local[0] is None
    for a, b in zip(local[1:], remote[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[k]["logprob"] - b[k]["logprob"]) < 1e-3 for k in a)
    assert local_lp[0] is None and len(local_lp) == len(remote_lp)


def test_a_format_the_model_cannot_spell_is_a_400_on_every_path(cond_cluster):
    """The tiny vocabulary has no `{`: vLLM's grammar rejects the first token of a JSON
    object, or the second of `dog{` (the first is forced to `dog`), and ends the request
    with finish_reason "error". On the decode engine (a short prompt, prefilled there; or
    the token after a remote prefill's first) as on the prefill engine: the client gets
    an invalid_request_error, as a 400 or, once a stream has begun, in the stream, and
    never a choice that finished with "error". Nothing stays held, and the next request
    works."""
    c = cond_cluster
    for prompt in (words(20, seed=601), words(180, seed=602)):
        for so in ({"json_object": True}, {"regex": "dog\\{"}):
            body = {"model": c.model_name, "prompt": prompt, "max_tokens": 8,
                    "temperature": 0, "structured_outputs": so}
            r = httpx.post(f"{c.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 400, (so, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert "structured format" in r.json()["error"]["message"]
            with httpx.stream("POST", f"{c.url}/v1/completions", timeout=120,
                              json={**body, "stream": True}) as s:
                lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
                status = s.status_code
            assert status in (200, 400), status
            if status == 200:        # begun: the error comes in the stream
                events = [json.loads(ln[6:]) for ln in lines]
                assert events[-1]["error"]["type"] == "invalid_request_error", events
                assert all(ch.get("finish_reason") != "error"
                           for e in events for ch in e.get("choices", [])), events
    assert run(c, words(20, seed=603))[0]
    assert run(c, words(180, seed=604))[0]
    assert_idle(c, c.workers())
