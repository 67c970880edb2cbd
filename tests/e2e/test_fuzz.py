"""Schema-driven fuzzing of the HTTP API (schemathesis) against a real cluster.

Cases come from the frontend's own OpenAPI document: valid bodies (every field and type the
schema allows, values at its bounds) and invalid ones (wrong types, missing fields, values
past the bounds). None may get a 5xx, every error must be in OpenAI's error shape, and the
cluster must keep serving. Bounded and derandomized, so a run is repeatable. Valid bodies
name the served model (so they reach the engines, not only the model check) and their
output length is capped: what is fuzzed is the input, not the length of the answer."""

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from frontend.fields import REFUSED

MAX_OUT = 8                                    # tokens
EXAMPLES = {"/v1/completions": 60, "/v1/chat/completions": 60}   # valid bodies aimed
OTHERS = {"/tokenize": 20, "/detokenize": 20}                     # as generated


# dropped from valid bodies: suffix is refused by design (a 400, checked by hand-written
# cases); n, best_of and a list of prompts multiply the work of one example (each choice
# is a request through the cluster: tests/e2e/test_parity.py covers them); random
# logit_bias keys are out of vocabulary. The examples differ from run to run (hypothesis
# seeds from the strategy, which names the cluster's port): the checks hold for any draw
# The fields pdserve refuses at any value but one that changes nothing (frontend/fields.py)
# go too: the request models are vLLM's, whose schema offers them.
UNSUPPORTED = ("n", "best_of", "suffix", "logit_bias", *REFUSED)


def _usable(p) -> bool:
    """A prompt the engines can run: non-empty text or token ids in the vocabulary, or one
    such prompt in a list."""
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return bool(p)
    return (isinstance(p, list) and bool(p)
            and all(type(t) is int and 0 <= t < 900 for t in p))


def _aim(case, model: str, valid: bool, path: str) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    if valid:       # aim valid bodies past the checks that stop them before the engines
        body["model"] = model
        for k in UNSUPPORTED:
            body.pop(k, None)
        p = body.get("prompt")
        if isinstance(p, list) and len(p) > 1 and isinstance(p[0], (str, list)):
            body["prompt"] = p = p[:1]      # one prompt per example (see UNSUPPORTED)
        if path == "/v1/completions" and not _usable(p):
            # an empty or missing prompt (or one of ids past the vocabulary) is refused,
            # rightly; vLLM's schema allows it (a prompt may be left out for
            # prompt_embeds), so a draw could leave too few valid bodies to reach the
            # engines (the check below)
            body["prompt"] = "fox"
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and body[k] < 1:
                body[k] = 1
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_OUT     # a chat's default is the rest of the context
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and body[k] > MAX_OUT:
            body[k] = MAX_OUT
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > MAX_OUT:
        body["min_tokens"] = MAX_OUT


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def test_no_input_gets_a_5xx(cluster):
    ops = _operations(cluster.url)
    assert {op.path for op in ops} >= set(EXAMPLES) | set(OTHERS), [op.path for op in ops]
    tally: dict[str, list[int]] = {}
    why: Counter = Counter()                  # (status, start of body) -> times
    for op in ops:
        seen = tally.setdefault(f"{op.method.upper()} {op.path}", [])

        def one(case, mode, op=op, seen=seen):
            if op.path in EXAMPLES:
                _aim(case, cluster.model_name, mode is GenerationMode.POSITIVE, op.path)
            r = case.call(base_url=cluster.url, timeout=60)
            seen.append(r.status_code)
            if r.status_code >= 400:
                why[(r.status_code, r.text[:100])] += 1
            # /health's 503 is its answer when the cluster is not ready, not a fault
            assert r.status_code < 500, (case.as_curl_command(), r.status_code, r.text[:500])
            if r.status_code >= 400 and (op.path.startswith("/v1/") or op.path in OTHERS):
                err = r.json().get("error")
                assert isinstance(err, dict) and err.get("message") and err.get("type"), \
                    (case.as_curl_command(), r.text[:500])

        # (an operation with no parameters and no body has no invalid input)
        n = {**EXAMPLES, **OTHERS}.get(op.path, 5)
        modes = ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if n > 5
                 else [GenerationMode.POSITIVE])
        def runner(mode, one=one, op=op, n=n):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=n, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def run(case):
                one(case, mode)
            return run
        for mode in modes:
            runner(mode)()
    print({k: {c: v.count(c) for c in sorted(set(v))} for k, v in tally.items()})
    for k, v in why.most_common(12):
        print(v, k)
    # the fuzzing reached past validation: some valid bodies were served
    for path in EXAMPLES:
        codes = tally[f"POST {path}"]
        assert codes.count(200) >= 5 and any(400 <= c < 500 for c in codes), (
            path, codes)


def test_the_cluster_still_serves_after_fuzzing(cluster):
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": "the fox", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
