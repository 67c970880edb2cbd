"""Differential: the same requests to pdserve and to vLLM's own OpenAI server (one colocated
engine, the same model and engine settings, started here), answers compared field by field.

Greedy text equals for every generation feature pdserve implements through the
disaggregated path (n, batched prompts, echo, logit_bias, prompt_logprobs, echo with
logprobs as lm-eval sends it, structured outputs, min_p, allowed_token_ids, bad_words,
special tokens kept, stop strings kept, truncated prompts, chat and its template
options, a request's own template, logprob_token_ids); the utility endpoints answer the
same; an unknown field is ignored by both.
(Tool calls are compared with a colocated engine on the bundled model in
test_smollm2.py: this tiny word-level model cannot write JSON.)"""

from __future__ import annotations


import httpx
import pytest

from bench.compare import Procs, wait_ready
from tests.e2e.cluster import start_vllm_api
from tests.e2e.conftest import words

P1, P2 = words(30, seed=501), words(180, seed=502)


@pytest.fixture(scope="module")
def vllm_api(cluster, tiny_model, tmp_path_factory):
    procs = Procs(tmp_path_factory.mktemp("vllm-api"))
    try:
        url = start_vllm_api(procs, tiny_model, cluster.model_name, "vllm-api",
                       ["--trust-request-chat-template"])
        wait_ready(url, procs)
        yield url
    finally:
        procs.stop()


def both(cluster, vllm_api, path: str, body: dict) -> tuple[dict, dict]:
    out = []
    for url in (cluster.url, vllm_api):
        r = httpx.post(f"{url}{path}", timeout=120, json={"model": cluster.model_name, **body})
        assert r.status_code == 200, (url, r.text)
        out.append(r.json())
    return out[0], out[1]


def texts(resp: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"]
            for c in sorted(resp["choices"], key=lambda c: c["index"])]


@pytest.mark.parametrize("name,extra", [
    ("plain", {}),
    ("n", {"n": 3, "temperature": 1.0, "top_k": 1}),          # greedy n > 1: a 400 (below)
    ("batched", {"prompt": [P1, P2], "n": 2, "temperature": 1.0, "top_k": 1}),
    ("echo", {"echo": True}),
    ("logit_bias", {"logit_bias": {"42": 6.0, "500": 5.0, "77": -100.0}}),
    ("regex", {"structured_outputs": {"regex": "fox(dog|lazy)(brown|jumps)"}}),
    ("choice", {"structured_outputs": {"choice": ["foxdoglazy", "browncache"]}}),
    ("unknown field", {"frobnicate": 1, "metadata": {"a": "b"}}),
    ("no-op values", {"use_beam_search": False, "priority": 2, "length_penalty": 1.0}),
    ("token ids", {"return_token_ids": True, "stop": ["w1", "fox"], "n": 2,
                   "temperature": 1.0, "top_k": 1}),
    ("tokens as ids", {"logprobs": 2, "return_tokens_as_token_ids": True}),
    ("logprobs 0", {"logprobs": 0}),          # each token's own, alone
    ("penalties", {"presence_penalty": 1.5, "frequency_penalty": 1.0}),
    ("seeded", {"temperature": 0.9, "seed": 1234}),
    ("stop", {"stop": ["w1", "fox"], "min_tokens": 2}),
    ("min_p", {"temperature": 0.9, "seed": 1234, "min_p": 0.3}),
    ("allowed_token_ids", {"allowed_token_ids": [5, 9, 17, 42, 300, 301]}),
    # the model made to emit special tokens (2, 3), kept in the text
    ("special tokens", {"ignore_eos": True, "logit_bias": {"3": 9.0, "2": 8.0},
                        "skip_special_tokens": False, "spaces_between_special_tokens": False}),
])
def test_completions_equal_vllms_server(cluster, vllm_api, name, extra):
    ours, theirs = both(cluster, vllm_api, "/v1/completions",
                        {"prompt": P1, "max_tokens": 12, "temperature": 0, **extra})
    assert texts(ours) == texts(theirs), name
    assert [c["finish_reason"] for c in ours["choices"]] == \
        [c["finish_reason"] for c in theirs["choices"]]
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    same_fields(ours, theirs, name)
    if extra.get("logprobs") is not None:
        a, b = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        assert [sorted(t) for t in a["top_logprobs"]] == [sorted(t) for t in b["top_logprobs"]]


def same_fields(ours: dict, theirs: dict, what) -> None:
    """vLLM's extra answer fields: the stop string or token that ended each choice, and
    (return_token_ids) the token ids of each choice and of the prompt."""
    for key in ("stop_reason", "token_ids", "prompt_token_ids"):
        assert [c.get(key) for c in ours["choices"]] == \
            [c.get(key) for c in theirs["choices"]], (what, key)
    assert ours.get("prompt_token_ids") == theirs.get("prompt_token_ids"), what


def _streamed(url: str, path: str, model: str, body: dict) -> dict:
    """What a stream adds up to, per choice: text, token ids, the prompt's token ids,
    finish and stop reasons, role (chat); and the prompt's token ids a chat stream sends
    first."""
    import json
    out: dict = {"choices": {}, "prompt_token_ids": None}
    with httpx.stream("POST", f"{url}{path}", timeout=120,
                      json={"model": model, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            out["prompt_token_ids"] = out["prompt_token_ids"] or d.get("prompt_token_ids")
            for c in d.get("choices") or []:
                acc = out["choices"].setdefault(c["index"], {
                    "text": "", "token_ids": [], "prompt_token_ids": None,
                    "finish_reason": None, "stop_reason": None, "role": None})
                acc["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
                acc["role"] = acc["role"] or (c.get("delta") or {}).get("role")
                acc["token_ids"] += c.get("token_ids") or []
                acc["prompt_token_ids"] = acc["prompt_token_ids"] or c.get("prompt_token_ids")
                acc["finish_reason"] = c.get("finish_reason") or acc["finish_reason"]
                acc["stop_reason"] = c.get("stop_reason") or acc["stop_reason"]
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_token_ids_and_stop_reasons_equal_vllms_server(cluster, vllm_api, path):
    body = {"max_tokens": 10, "temperature": 1.0, "top_k": 1, "n": 2, "stream": True,
            "return_token_ids": True, "stop": ["w1", "fox"]}
    body.update({"prompt": P1} if "chat" not in path else
                {"messages": [{"role": "user", "content": P1}]})
    ours, theirs = (_streamed(url, path, cluster.model_name, body)
                    for url in (cluster.url, vllm_api))
    assert ours == theirs
    assert all(c["token_ids"] for c in ours["choices"].values())
    if "chat" in path:
        assert ours["prompt_token_ids"]
    else:
        assert all(c["prompt_token_ids"] for c in ours["choices"].values())


def test_words_that_begin_with_the_first_token_equal_vllms_server(cluster, vllm_api):
    """A bad word and a stop string (kept in the output) made of the first two greedy
    tokens: the first is sampled on the prefill engine, the second on the decode engine,
    which must count the first as output as a colocated engine does."""
    plain = {"prompt": P2, "max_tokens": 8, "temperature": 0}
    ours, theirs = both(cluster, vllm_api, "/v1/completions", plain)
    text = texts(ours)[0]
    assert text == texts(theirs)[0]
    first_two = " ".join(text.split()[:2])
    for extra in ({"bad_words": [first_two]},
                  {"stop": [first_two], "include_stop_str_in_output": True},
                  {"stop": [first_two], "include_stop_str_in_output": True, "n": 2,
                   "temperature": 1.0, "top_k": 1}):
        ours, theirs = both(cluster, vllm_api, "/v1/completions", {**plain, **extra})
        assert texts(ours) == texts(theirs), extra
        assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]
        same_fields(ours, theirs, extra)
        if "bad_words" in extra:        # the check can fail: the second token changed
            assert not texts(ours)[0].strip().startswith(first_two), texts(ours)
        else:                           # the text ends with the stop string, kept
            assert texts(ours)[0].rstrip().endswith(first_two), texts(ours)
            assert ours["choices"][0]["stop_reason"] == first_two
    # a stop token id sampled by the decode engine: its id is the stop reason
    third = httpx.post(f"{cluster.url}/tokenize", timeout=60, json={
        "model": cluster.model_name, "prompt": text.split()[2]}).json()["tokens"][-1]
    ours, theirs = both(cluster, vllm_api, "/v1/completions",
                        {**plain, "stop_token_ids": [third], "return_token_ids": True})
    assert texts(ours) == texts(theirs)
    same_fields(ours, theirs, "stop token")
    assert ours["choices"][0]["stop_reason"] == third


@pytest.mark.parametrize("extra", [
    {"truncate_prompt_tokens": 50}, {"truncate_prompt_tokens": 50, "truncation_side": "right"},
    # echo: the prompt as sent, before truncation (vLLM's server echoes that too)
    {"truncate_prompt_tokens": 50, "truncation_side": "left", "echo": True},
    {"truncate_prompt_tokens": -1}, {"truncate_prompt_tokens": 40, "prompt": list(range(5, 90))},
])
def test_truncated_prompts_equal_vllms_server(cluster, vllm_api, extra):
    ours, theirs = both(cluster, vllm_api, "/v1/completions",
                        {"prompt": P2, "max_tokens": 6, "temperature": 0, **extra})
    assert texts(ours) == texts(theirs)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    if extra["truncate_prompt_tokens"] > 0:
        assert ours["usage"]["prompt_tokens"] == extra["truncate_prompt_tokens"]
    msgs = [{"role": "user", "content": P2}]
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 6, "temperature": 0,
                         "truncate_prompt_tokens": 30})
    assert texts(ours) == texts(theirs)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"] == 30
    got = []
    for url in (cluster.url, vllm_api):      # more than the context: refused by both
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": cluster.model_name, "prompt": P1, "truncate_prompt_tokens": 5000})
        got.append(r.status_code)
    assert got == [400, 400]


def test_chat_template_options_equal_vllms_server(cluster, vllm_api):
    """vLLM's chat-template extensions: an open final assistant message continued, and
    template kwargs (this template reads none: both drop them)."""
    msgs = [{"role": "user", "content": P1}, {"role": "assistant", "content": "fox dog"}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True,
            "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low"}
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions", body)
    assert texts(ours) == texts(theirs)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    # echo: the open message ahead of its continuation; the reply's role is its role
    for extra in ({"echo": True, "messages": msgs[:1]}, {"echo": True},
                  {"echo": True, "stream": True}):
        req = {**body, **extra}
        if req.get("stream"):
            got = [_streamed(url, "/v1/chat/completions", cluster.model_name, req)
                   for url in (cluster.url, vllm_api)]
            assert got[0] == got[1] and got[0]["choices"][0]["text"].startswith("fox dog")
            assert got[0]["choices"][0]["role"] == "assistant"
            continue
        ours, theirs = both(cluster, vllm_api, "/v1/chat/completions", req)
        assert texts(ours) == texts(theirs), extra
        assert [c["message"]["role"] for c in ours["choices"]] == \
            [c["message"]["role"] for c in theirs["choices"]], extra
    assert texts(ours)[0].startswith("fox dog")
    ours, theirs = both(cluster, vllm_api, "/tokenize", {
        k: body[k] for k in ("messages", "add_generation_prompt", "continue_final_message")})
    assert ours["tokens"] == theirs["tokens"]
    ours_plain, _ = both(cluster, vllm_api, "/tokenize", {"messages": msgs})
    assert ours["tokens"] != ours_plain["tokens"]      # the options changed the prompt
    got = []
    for url in (cluster.url, vllm_api):      # both at once: refused by both
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": cluster.model_name, "messages": msgs, "continue_final_message": True})
        got.append(r.status_code)
    assert got == [400, 400]


OWN_TEMPLATE = ("{% if lang is defined %}{{ lang }} {% endif %}{% for m in messages %}"
                "{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}fox {% endif %}")


def test_a_requests_own_chat_template_equals_vllms_server(cluster, vllm_api):
    """Both servers trust request templates (--trust-request-chat-template): the request's
    template renders the prompt, with the kwargs it reads; the next request gets the
    model's template again."""
    msgs = [{"role": "user", "content": P1}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0,
            "chat_template": OWN_TEMPLATE, "chat_template_kwargs": {"lang": "dog lazy"}}
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions", body)
    assert texts(ours) == texts(theirs)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    tokenize = {k: body[k] for k in ("messages", "chat_template", "chat_template_kwargs")}
    ours, theirs = both(cluster, vllm_api, "/tokenize", tokenize)
    assert ours["tokens"] == theirs["tokens"]
    plain, _ = both(cluster, vllm_api, "/tokenize", {"messages": msgs})
    assert plain["tokens"] != ours["tokens"]      # the model's template again


DEV_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'developer' %}dog {% endif %}"
                "{{ m['content'] }} {% endfor %}")


def test_developer_messages_equal_vllms_server(cluster, vllm_api):
    """OpenAI's `developer` role: as `system` for a template that does not name it, every
    system message merged into one at the start; as sent for one that does."""
    msgs = [{"role": "system", "content": "fox lazy"}, {"role": "user", "content": P1},
            {"role": "developer", "content": "dog brown"}]
    for extra in ({}, {"chat_template": DEV_TEMPLATE}, {"chat_template": OWN_TEMPLATE}):
        ours, theirs = both(cluster, vllm_api, "/tokenize", {"messages": msgs, **extra})
        assert ours["tokens"] == theirs["tokens"], extra
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 6, "temperature": 0})
    assert texts(ours) == texts(theirs)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]


def test_both_refuse_the_same_requests(cluster, vllm_api):
    for body in ({"prompt": P1, "n": 2, "temperature": 0},       # greedy n > 1
                 {"prompt": P1, "prompt_logprobs": 1, "stream": True}):
        got = []
        for url in (cluster.url, vllm_api):
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": cluster.model_name, "max_tokens": 4, **body})
            got.append((r.status_code, r.json()["error"]["message"]))
        assert got[0][0] == got[1][0] == 400, got
        if body.get("n"):
            assert got[0][1] == got[1][1]


def test_prompt_logprobs_and_echo_logprobs_equal_vllms_server(cluster, vllm_api):
    ours, theirs = both(cluster, vllm_api, "/v1/completions",
                        {"prompt": P2, "max_tokens": 2, "temperature": 0,
                         "prompt_logprobs": 2})
    a, b = ours["choices"][0]["prompt_logprobs"], theirs["choices"][0]["prompt_logprobs"]
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()          # the token and its top 2, by id
        for k in x:
            assert x[k]["rank"] == y[k]["rank"]
            assert x[k]["logprob"] == pytest.approx(y[k]["logprob"], rel=1e-3, abs=1e-3)
    # lm-eval's loglikelihood request: echo the prompt, one token, its logprobs
    ours, theirs = both(cluster, vllm_api, "/v1/completions",
                        {"prompt": P1, "max_tokens": 1, "temperature": 0, "echo": True,
                         "logprobs": 1})
    a, b = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert a["token_logprobs"][0] is None and b["token_logprobs"][0] is None
    assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], rel=1e-3,
                                                    abs=1e-3)
    # ... and the prompt's logprobs it asked for that way, as vLLM's choice carries them
    a, b = ours["choices"][0]["prompt_logprobs"], theirs["choices"][0]["prompt_logprobs"]
    assert len(a) == len(b) > 1 and a[1].keys() == b[1].keys()
    # max_tokens 0: the prompt alone, with its logprobs (vLLM computes one token, unseen)
    for stream in (False, True):
        req = {"prompt": P1, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 1}
        if stream:
            got = [_streamed(url, "/v1/completions", cluster.model_name,
                             {**req, "stream": True}) for url in (cluster.url, vllm_api)]
            assert got[0]["choices"][0]["text"] == got[1]["choices"][0]["text"] == P1
            continue
        ours, theirs = both(cluster, vllm_api, "/v1/completions", req)
        assert texts(ours) == texts(theirs) == [P1]
        a, b = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) > 1
        for k in ("prompt_tokens", "completion_tokens"):
            assert ours["usage"][k] == theirs["usage"][k], k
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
    # chat with echo: the prompt's logprobs at the top, as vLLM's answer carries them
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": P1}], "max_tokens": 1,
                         "temperature": 0, "echo": True})
    assert len(ours["prompt_logprobs"]) == len(theirs["prompt_logprobs"]) > 1


def _near(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-3, abs=1e-3)


def test_logprob_token_ids_equal_vllms_server(cluster, vllm_api):
    """Exactly the named tokens' logprobs at every generated position (with the sampled
    token's), from the prefill engine for the first token and the decode engine after."""
    ids = [5, 42, 300]
    msgs = [{"role": "user", "content": P1}]
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions", {
        "messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True,
        "logprob_token_ids": ids})
    assert texts(ours) == texts(theirs)
    a, b = (r["choices"][0]["logprobs"]["content"] for r in (ours, theirs))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["token"] == y["token"] and _near(x["logprob"], y["logprob"])
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        assert all(_near(t["logprob"], u["logprob"])
                   for t, u in zip(x["top_logprobs"], y["top_logprobs"]))
        assert len(x["top_logprobs"]) >= len(ids)      # the named ones, whatever their rank
    ours, theirs = both(cluster, vllm_api, "/v1/completions", {
        "prompt": P2, "max_tokens": 4, "temperature": 0, "logprobs": 0,
        "logprob_token_ids": ids})
    a, b = (r["choices"][0]["logprobs"] for r in (ours, theirs))
    assert a["tokens"] == b["tokens"]
    assert all(_near(x, y) for x, y in zip(a["token_logprobs"], b["token_logprobs"]))
    for x, y in zip(a["top_logprobs"], b["top_logprobs"]):
        assert list(x) == list(y) and all(_near(x[k], y[k]) for k in x)
        assert len(x) >= len(ids)


def test_chat_and_the_utility_endpoints_equal_vllms_server(cluster, vllm_api):
    msgs = [{"role": "system", "content": "w1 w2"},
            {"role": "user", "content": [{"type": "text", "text": P1}]}]
    ours, theirs = both(cluster, vllm_api, "/v1/chat/completions",
                        {"messages": msgs, "max_tokens": 10, "temperature": 0,
                         "return_token_ids": True, "logprobs": True, "top_logprobs": 2,
                         "return_tokens_as_token_ids": True})
    assert texts(ours) == texts(theirs)
    same_fields(ours, theirs, "chat")
    assert ours["prompt_token_ids"] and ours["choices"][0]["token_ids"]
    a, b = (r["choices"][0]["logprobs"]["content"] for r in (ours, theirs))
    assert [(x["token"], x["bytes"], [t["token"] for t in x["top_logprobs"]]) for x in a] \
        == [(x["token"], x["bytes"], [t["token"] for t in x["top_logprobs"]]) for x in b]
    assert a[0]["token"].startswith("token_id:")
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert ours["usage"][k] == theirs["usage"][k], k
    ours, theirs = both(cluster, vllm_api, "/tokenize", {"prompt": P2})
    assert ours["tokens"] == theirs["tokens"] and ours["count"] == theirs["count"]
    ours, theirs = both(cluster, vllm_api, "/detokenize", {"tokens": ours["tokens"][:20]})
    assert ours["prompt"] == theirs["prompt"]
    ours, theirs = both(cluster, vllm_api, "/tokenize", {"messages": msgs})
    assert ours["tokens"] == theirs["tokens"]


def _lm_eval_tasks(tmp) -> str:
    """Two small tasks on local data (nothing downloaded): a multiple-choice task scored by
    loglikelihood (echo + logprobs, as lm-eval's API models send it) and a generation task
    scored by exact match, stopping at a string."""
    import json
    import random
    rng = random.Random(7)
    mc, gen = [], []
    for i in range(12):
        ctx = words(rng.randint(8, 60), seed=900 + i)
        mc.append({"ctx": ctx, "choices": [" " + words(rng.randint(1, 4), seed=950 + i + k)
                                           for k in range(3)], "gold": i % 3})
        gen.append({"q": words(rng.randint(8, 80), seed=1000 + i), "a": "w1"})
    for name, rows in (("mc", mc), ("gen", gen)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {tmp}/{{}}.jsonl\ntest_split: test\n")
    (tmp / "pd_mc.yaml").write_text(
        "task: pd_mc\n" + common.format("mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (tmp / "pd_gen.yaml").write_text(
        "task: pd_gen\n" + common.format("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: [' w5', 'paris']\n  max_gen_toks: 12\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return str(tmp)


def test_lm_eval_scores_equal_vllms_server(cluster, vllm_api, tiny_model, tmp_path):
    """lm-evaluation-harness against pdserve and against vLLM's server: the same
    loglikelihoods (to 1e-3), the same generations, the same scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_path=_lm_eval_tasks(tmp_path))
    runs = []
    for url in (cluster.url, vllm_api):
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["pd_mc", "pd_gen"], task_manager=tasks,
            model_args=f"model={cluster.model_name},base_url={url}/v1/completions,"
                       f"tokenizer_backend=huggingface,tokenizer={tiny_model},"
                       "num_concurrent=2,max_retries=1,tokenized_requests=True",
            batch_size=4, log_samples=True, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0)
        runs.append(out)
    ours, theirs = runs
    for task in ("pd_mc", "pd_gen"):
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) == 12
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            if task == "pd_mc":       # per choice: (loglikelihood, is greedy)
                for (la, ga), (lb, gb) in zip((r[0] for r in a["resps"]),
                                              (r[0] for r in b["resps"])):
                    assert abs(la - lb) < 1e-3 and ga == gb, (a["resps"], b["resps"])
            else:
                assert a["resps"] == b["resps"]
        assert ours["results"][task] == theirs["results"][task]
    # the generations really ran (not all empty)
    gens = [s["resps"][0][0] for s in ours["samples"]["pd_gen"]]
    assert sum(1 for g in gens if g.strip()) >= 6, gens
