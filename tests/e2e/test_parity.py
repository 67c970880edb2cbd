"""OpenAI features through the disaggregated path, against a colocated vLLM engine: `n`
samples of a prompt, a batch of prompts, `echo`, `logit_bias`, the prompt's logprobs
(`prompt_logprobs`, and `echo` with `logprobs` as lm-eval's loglikelihood tasks send it);
streamed and not."""

import json

import httpx
import pytest

from tests.e2e.cluster import reference
from tests.e2e.conftest import words

MAX_TOKENS = 12
# a bias that changes this model's greedy choices; both engines must apply it (the
# prefill engine samples the first token, the decode engine the rest)
# constraints where the position matters (the tiny model's tokens are whole words, which
# the grammar sees without spaces): had the decode engine's grammar restarted after the
# prefill engine's first token, it would force "fox" again as the second
STRUCTURED = [{"regex": "fox(dog|lazy)(brown|jumps)(a|and)"},
              {"choice": ["foxdoglazy", "browncache"]}]
BIAS = {"42": 6.0, "500": 5.0, "900": 4.0, "77": -100.0}   # tiny vocab: 1,001


@pytest.fixture(scope="module")
def truth(cluster, tokenizer, tmp_path_factory):
    prompts = [words(40, seed=71), words(200, seed=72)]
    ids = [tokenizer.encode(p) for p in prompts]
    ref = reference(cluster.model_dir, ids + [ids[1], ids[0]] + [ids[0]] * len(STRUCTURED),
                    MAX_TOKENS, tmp_path_factory.mktemp("parity"),
                    sampling=[{}, {}, {"logit_bias": BIAS}, {"prompt_logprobs": 2}]
                    + [{"structured_outputs": so} for so in STRUCTURED])
    return {"prompts": prompts, "ids": ids, "ref": ref[:2], "biased": ref[2],
            "plp": ref[3]["prompt_logprobs"], "structured": ref[4:]}


def post(c, body):
    r = httpx.post(f"{c.url}/v1/completions", timeout=120, json={
        "model": c.model_name, "max_tokens": MAX_TOKENS, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(c, body) -> tuple[dict[int, str], dict[int, str], dict]:
    """(text by choice index, finish reason by index, usage)."""
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = {}
    with httpx.stream("POST", f"{c.url}/v1/completions", timeout=120, json={
            "model": c.model_name, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **body}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            assert "error" not in d, d
            for ch in d["choices"]:
                text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
                if ch["finish_reason"]:
                    finish[ch["index"]] = ch["finish_reason"]
            usage = d.get("usage") or usage
    return text, finish, usage


# n > 1 with temperature 0 is a 400 as in vLLM; top_k 1 samples the greedy token
ARGMAX = {"temperature": 1.0, "top_k": 1}


def test_n_samples_of_one_prompt(cluster, truth):
    """Greedy (top_k 1): every sample is colocated vLLM's output; the prompt is counted
    once."""
    body = post(cluster, {"prompt": truth["prompts"][1], "n": 3, **ARGMAX})
    ref = truth["ref"][1]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["text"] == ref["text"] for c in body["choices"]), body["choices"]
    n_prompt = len(truth["ids"][1])
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == 3 * len(ref["token_ids"])


def test_a_batch_of_prompts_with_n_streamed_and_not(cluster, truth):
    """Choice j of prompt i is index i * n + j, as in vLLM's server."""
    refs = [r["text"] for r in truth["ref"]]
    body = post(cluster, {"prompt": truth["prompts"], "n": 2, **ARGMAX})
    assert [c["text"] for c in body["choices"]] == [refs[0], refs[0], refs[1], refs[1]]
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in truth["ids"])
    text, finish, usage = stream(cluster, {"prompt": truth["ids"], "n": 2, **ARGMAX})
    assert text == {0: refs[0], 1: refs[0], 2: refs[1], 3: refs[1]}
    assert set(finish) == {0, 1, 2, 3}
    assert usage["completion_tokens"] == 2 * sum(len(r["token_ids"]) for r in truth["ref"])


def test_echo_puts_the_prompt_ahead(cluster, truth):
    p, ref = truth["prompts"][0], truth["ref"][0]["text"]
    assert post(cluster, {"prompt": p, "echo": True})["choices"][0]["text"] == p + ref
    text, _, _ = stream(cluster, {"prompt": p, "echo": True})
    assert text == {0: p + ref}


def test_logit_bias_reaches_both_engines(cluster, truth):
    biased = truth["biased"]
    assert biased["token_ids"] != truth["ref"][1]["token_ids"]   # the bias matters here
    body = post(cluster, {"prompt": truth["prompts"][1], "logit_bias": BIAS})
    assert body["choices"][0]["text"] == biased["text"]
    assert body["kv_transfer"]["status"] == "ok"                  # really disaggregated


def test_prompt_logprobs_equal_colocated_vllm(cluster, truth):
    """Computed by the prefill engine (the decode engine never sees the prompt)."""
    ids, ref = truth["ids"][0], truth["plp"]
    body = post(cluster, {"prompt": truth["prompts"][0], "prompt_logprobs": 2,
                          "max_tokens": 2})
    got = body["choices"][0]["prompt_logprobs"]
    assert body["kv_transfer"]["status"] == "ok"
    assert len(got) == len(ids) and got[0] is None and ref[0] is None
    for tid, g, r in zip(ids[1:], got[1:], ref[1:]):
        assert abs(g[str(tid)]["logprob"] - r["logprob"]) < 1e-3, (g, r)
        top = sorted((v["rank"], int(k)) for k, v in g.items() if v["rank"] <= 2)
        assert [k for _, k in top] == r["top"], (g, r)


def test_echo_with_logprobs_as_lm_eval_sends_it(cluster, truth):
    """A loglikelihood request: echo, logprobs=1, max_tokens=1; the prompt's tokens with
    their logprobs (the first None), then the one generated token's."""
    ids, ref, p = truth["ids"][0], truth["plp"], truth["prompts"][0]
    body = post(cluster, {"prompt": p, "echo": True, "logprobs": 1, "max_tokens": 1})
    c = body["choices"][0]
    assert c["text"].startswith(p) and len(c["text"]) > len(p)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for g, r in zip(lp["token_logprobs"][1:len(ids)], ref[1:]):
        assert abs(g - r["logprob"]) < 1e-3
    # (the tiny model's tokens are whole words, joined by spaces when decoded)
    assert "".join(lp["tokens"]).replace(" ", "") == c["text"].replace(" ", "")
    assert lp["text_offset"][1] == len(lp["tokens"][0])


@pytest.mark.parametrize("i", range(len(STRUCTURED)))
def test_structured_outputs_continue_from_the_first_token(cluster, truth, i):
    ref = truth["structured"][i]
    assert ref["text"].split()[0] == "fox" and len(ref["token_ids"]) > 2
    body = post(cluster, {"prompt": truth["prompts"][0], "structured_outputs": STRUCTURED[i]})
    assert body["kv_transfer"]["status"] == "ok"                  # really disaggregated
    assert body["choices"][0]["text"] == ref["text"]
    assert body["choices"][0]["finish_reason"] == "stop"
    chat = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120, json={
        "model": cluster.model_name, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": truth["prompts"][0]}],
        "response_format": {"type": "text"}, "structured_outputs": STRUCTURED[i]})
    assert chat.status_code == 200, chat.text
    words_out = chat.json()["choices"][0]["message"]["content"].split()
    assert words_out[0] in ("fox", "brown") and words_out.count("fox") <= 1


@pytest.mark.parametrize("body,param", [
    ({"n": 65}, "n"), ({"prompt": ["a"] * 33, "n": 2, "temperature": 1.0}, "n"),
    ({"logit_bias": {"999999999": 1.0}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt": []}, "prompt"),
    ({"structured_outputs": {"regex": "(", }}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format")])
def test_bad_choices_get_400s(cluster, body, param):
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": "hello", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] in (param, None) and param in (err["param"] or "") + err["message"]


# What one engine does to the first token that a decode engine, which gets it as a prompt
# token, must do too (pdserve/continuation.py, decode_worker/stops.py). The penalties come
# with a bias towards the first greedy token, so that penalising it or not changes what
# follows (this tiny model's greedy paths do not repeat tokens by themselves).
SEEDED = {"temperature": 0.9, "seed": 1234}


def penalties(first: int) -> list[dict]:
    bias = {"logit_bias": {str(first): 8.0}}
    return [{**bias, "frequency_penalty": 2.0}, {**bias, "presence_penalty": 2.0},
            {**bias, "presence_penalty": 2.0, "frequency_penalty": 2.0,
             "repetition_penalty": 1.05}]


@pytest.fixture(scope="module")
def continued(cluster, truth, tmp_path_factory):
    ids, greedy = truth["ids"][1], truth["ref"][1]
    w = greedy["text"].split()
    spanning = f"{w[0]} {w[1][:2]}"           # begins in the first token, ends in the second
    pen = penalties(greedy["token_ids"][0])
    extra = pen + [SEEDED, {"stop": [spanning]}, {"stop": [spanning], "min_tokens": 3}]
    tmp = tmp_path_factory.mktemp("continued")
    ref = reference(cluster.model_dir, [ids] * len(extra), MAX_TOKENS, tmp, sampling=extra)
    # what a decode engine would make of it unaided: prompt + first token, penalties as is
    unaided = reference(cluster.model_dir, [ids + r["token_ids"][:1] for r in ref[:len(pen)]],
                        MAX_TOKENS - 1, tmp, sampling=pen)
    return {"penalties": pen, "penalised": ref[:len(pen)], "unaided": unaided,
            "seeded": ref[len(pen)], "stopped": ref[-2], "stopped_min": ref[-1],
            "spanning": spanning}


@pytest.mark.parametrize("i", range(3))
def test_penalties_count_the_first_token(cluster, truth, continued, i):
    ref = continued["penalised"][i]
    # the first token's penalty matters here: unaided, the decode engine goes elsewhere
    assert ref["token_ids"][1:] != continued["unaided"][i]["token_ids"]
    body = post(cluster, {"prompt": truth["prompts"][1], **continued["penalties"][i]})
    assert body["kv_transfer"]["status"] == "ok"                  # really disaggregated
    assert body["choices"][0]["text"] == ref["text"]


def test_seeded_sampling_draws_what_one_engine_draws(cluster, truth, continued):
    ref = continued["seeded"]
    assert ref["token_ids"] != truth["ref"][1]["token_ids"]       # really sampled
    for _ in range(2):                                            # and reproducible
        body = post(cluster, {"prompt": truth["prompts"][1], **SEEDED})
        assert body["kv_transfer"]["status"] == "ok"
        assert body["choices"][0]["text"] == ref["text"]


def test_a_stop_string_across_the_first_token(cluster, truth, continued):
    stop = continued["spanning"]
    ref, ref_min = continued["stopped"], continued["stopped_min"]
    greedy = truth["ref"][1]["text"]
    assert len(ref["token_ids"]) == 2                             # one engine stops there
    assert ref["text"] == greedy[:greedy.index(stop)]
    body = post(cluster, {"prompt": truth["prompts"][1], "stop": [stop]})
    c = body["choices"][0]
    assert (c["text"], c["finish_reason"]) == (ref["text"], "stop")
    assert body["usage"]["completion_tokens"] == 2
    assert body["kv_transfer"]["status"] == "ok"                  # really disaggregated
    text, finish, usage = stream(cluster, {"prompt": truth["prompts"][1], "stop": [stop]})
    assert text.get(0, "") == ref["text"] and finish == {0: "stop"}
    assert usage["completion_tokens"] == 2
    # min_tokens puts the check after the match: as one engine, it runs on
    body = post(cluster, {"prompt": truth["prompts"][1], "stop": [stop], "min_tokens": 3})
    assert body["choices"][0]["text"] == ref_min["text"]
    assert body["usage"]["completion_tokens"] == len(ref_min["token_ids"])
