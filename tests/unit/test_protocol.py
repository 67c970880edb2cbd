"""OpenAI request validation (pure)."""

import pytest
from pydantic import ValidationError

from frontend.protocol import ChatRequest, CompletionRequest, TokenizeRequest
from pdserve.errors import InvalidRequest, UnsupportedParameter


def test_unknown_fields_are_ignored_with_a_warning(caplog):
    r = CompletionRequest(model="m", prompt="x", frobnicate=1, metadata={"a": "b"})
    r.check()
    assert "frobnicate" in caplog.text and "metadata" in caplog.text


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("use_beam_search", True), ("guided_json", {"a": 1}),
    ("vllm_xargs", {"a": 1}), ("modalities", ["text", "audio"])])
def test_fields_that_would_change_the_output_are_refused(field, value):
    """Never silently ignored: the output would not be what the client asked for."""
    with pytest.raises(UnsupportedParameter) as e:
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
                    **{field: value}).check()
    assert e.value.param == field


def test_their_values_that_change_nothing_are_accepted():
    """Clients send whole parameter sets: the defaults of what pdserve does not implement
    change nothing, and priority is ignored under first-come-first-served, as in vLLM."""
    ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
                use_beam_search=False, functions=None, guided_json=None, chat_template=None,
                modalities=["text"], logits_processors=[], priority=3,
                length_penalty=1.0).check()


@pytest.mark.parametrize("kw,exc", [
    ({"prompt_logprobs": 2, "stream": True}, InvalidRequest),
    ({"best_of": 3}, UnsupportedParameter), ({"best_of": 3, "n": 2}, UnsupportedParameter),
    ({"max_tokens": 0}, InvalidRequest), ({"max_tokens": -5}, InvalidRequest),
    ({"stream_options": {"include_usage": True}}, InvalidRequest),
    ({"n": 2, "temperature": 0.0}, InvalidRequest),    # greedy n > 1, as vLLM refuses it
])
def test_completion_checks(kw, exc):
    with pytest.raises(exc):
        CompletionRequest(model="m", prompt="x", **kw).check()


def test_vllm_sampling_extensions_are_checked_as_vllm_checks_them():
    r = CompletionRequest(model="m", prompt="x", min_p=0.1, allowed_token_ids=[3, 5],
                          bad_words=["foo bar"], skip_special_tokens=False,
                          spaces_between_special_tokens=False, include_stop_str_in_output=True)
    r.check()
    assert (r.min_p, r.allowed_token_ids, r.bad_words) == (0.1, [3, 5], ["foo bar"])
    for kw in ({"allowed_token_ids": []}, {"bad_words": ["ok", ""]}):
        with pytest.raises(InvalidRequest) as e:
            CompletionRequest(model="m", prompt="x", **kw).check()
        assert e.value.param == next(iter(kw))
    for kw in ({"min_p": 1.5}, {"min_p": -0.1}, {"allowed_token_ids": [-1]},
               {"allowed_token_ids": [2**32]}, {"bad_words": ["x"] * 129},
               {"skip_special_tokens": "no"}):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="x", **kw)


def test_chat_template_options_are_checked_as_vllm_checks_them():
    msgs = [{"role": "user", "content": "x"}]
    ChatRequest(model="m", messages=msgs, add_generation_prompt=False,
                continue_final_message=True, chat_template_kwargs={"enable_thinking": False},
                documents=[{"title": "t", "text": "d"}]).check()
    with pytest.raises(InvalidRequest) as e:      # the default add_generation_prompt is true
        ChatRequest(model="m", messages=msgs, continue_final_message=True).check()
    assert "Cannot set both" in str(e.value)
    r = ChatRequest(model="m", messages=msgs, reasoning_effort="none")
    assert r.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "none"}
    r = ChatRequest(model="m", messages=msgs, reasoning_effort="high",
                    chat_template_kwargs={"enable_thinking": False, "x": 1})
    assert r.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "high",
                                   "x": 1}      # the client's own enable_thinking stands
    assert ChatRequest(model="m", messages=msgs).template_kwargs() == {}
    for k in ("chat_template", "tokenize"):      # on a server that trusts templates too
        with pytest.raises(InvalidRequest) as e:
            ChatRequest(model="m", messages=msgs, chat_template_kwargs={k: "x"}).check(True)
        assert e.value.param == "chat_template_kwargs"


def test_logprob_token_ids_need_logprobs_as_in_vllm():
    msgs = [{"role": "user", "content": "x"}]
    ChatRequest(model="m", messages=msgs, logprobs=True, logprob_token_ids=[1, 2]).check()
    with pytest.raises(InvalidRequest) as e:
        ChatRequest(model="m", messages=msgs, logprob_token_ids=[1, 2]).check()
    assert str(e.value) == "when using `logprob_token_ids`, `logprobs` must be set to true."
    with pytest.raises(ValidationError):        # vLLM's sampler's row width
        ChatRequest(model="m", messages=msgs, logprobs=True, logprob_token_ids=[1] * 129)
    CompletionRequest(model="m", prompt="x", logprobs=0, logprob_token_ids=[1]).check()
    with pytest.raises(InvalidRequest) as e:
        CompletionRequest(model="m", prompt="x", logprob_token_ids=[1]).check()
    assert str(e.value) == "when using `logprob_token_ids`, `logprobs` must be set."


@pytest.mark.parametrize("model", [ChatRequest, TokenizeRequest])
def test_a_requests_own_chat_template_needs_a_server_that_trusts_it(model):
    """As vLLM's server: a template in the request (or in its kwargs) is a 400 unless the
    server runs with --trust-request-chat-template, and then it is taken."""
    msgs = [{"role": "user", "content": "x"}]
    for kw in ({"chat_template": "{{ messages }}"},
               {"chat_template_kwargs": {"chat_template": "{{ messages }}"}}):
        with pytest.raises(InvalidRequest) as e:
            model(model="m", messages=msgs, **kw).check()
        assert str(e.value) == ("Chat template is passed with request, but "
                                "--trust-request-chat-template is not set. "
                                "Refused request with untrusted chat template.")
    model(model="m", messages=msgs, chat_template="{{ messages }}").check(True)


def test_n_echo_and_best_of_equal_to_n_are_accepted():
    CompletionRequest(model="m", prompt="x", n=3, best_of=3, echo=True).check()
    # echo with logprobs: the prompt's logprobs (as many top ones), as vLLM and lm-eval
    r = CompletionRequest(model="m", prompt="x", echo=True, logprobs=2, stream=True)
    r.check()
    assert r.prompt_logprobs_k() == 2
    assert CompletionRequest(model="m", prompt="x", logprobs=2).prompt_logprobs_k() is None
    assert CompletionRequest(model="m", prompt="x", prompt_logprobs=0).prompt_logprobs_k() == 0
    for n in (0, 65):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="x", n=n)


def test_logit_bias_is_token_ids_to_bounded_biases():
    r = CompletionRequest(model="m", prompt="x", logit_bias={"7": -100, "12": 2.5})
    r.check()
    assert r.logit_bias_ids() == {7: -100.0, 12: 2.5}
    for bad in ({"x": 1.0}, {"-1": 1.0}, {"7": 100.5}, {str(2**33): 1.0}):
        with pytest.raises(InvalidRequest) as e:
            CompletionRequest(model="m", prompt="x", logit_bias=bad).logit_bias_ids()
        assert e.value.param == "logit_bias"
    with pytest.raises(ValidationError):        # bounded before anything else
        CompletionRequest(model="m", prompt="x", logit_bias={str(i): 1 for i in range(1025)})


def test_wrong_types_fail_validation():
    for kw in ({"max_tokens": "ten"}, {"temperature": "hot"}, {"stream": "yes"},
               {"temperature": 3.0}, {"top_p": 0}):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="x", **kw)


def test_chat_checks():
    with pytest.raises(InvalidRequest, match="empty"):
        ChatRequest(model="m", messages=[]).check()
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                    top_logprobs=2).check()
    r = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                    max_completion_tokens=7)
    r.check()
    assert r.max_tokens == 7


def test_stop_list():
    assert CompletionRequest(model="m", prompt="x", stop="a").stop_list == ["a"]
    assert CompletionRequest(model="m", prompt="x", stop=["a", "b"]).stop_list == ["a", "b"]
    with pytest.raises(InvalidRequest):
        _ = CompletionRequest(model="m", prompt="x", stop=[""]).stop_list


@pytest.mark.parametrize("field,value", [
    ("top_k", 2**31), ("seed", 2**63), ("seed", -2**63 - 1), ("stop_token_ids", [2**32]),
    ("stop_token_ids", [-1]), ("min_tokens", 2**40), ("max_tokens", 2**40),
    ("stop", ["x"] * 65), ("stop", "x" * 5000), ("prompt", [2**33]), ("prompt", [[1, -2]]),
    ("user", "u" * 300), ("stop_token_ids", list(range(65)))])
def test_numbers_and_lists_are_bounded_before_they_reach_a_wire_field(field, value):
    from pydantic import ValidationError
    with pytest.raises(ValidationError):        # the app answers these with a 400
        CompletionRequest(**{"model": "m", "prompt": "x", field: value})


@pytest.mark.parametrize("value,ok", [(5, 5), (5.0, 5), ("5", None), (True, None),
                                      (5.5, None), (float("inf"), None), (1e300, None)])
def test_integers_as_json_schema_means_them(value, ok):
    """The OpenAPI document says `integer`: 5.0 is one (as in vLLM's server); 5.5, "5" and
    true are not, and a huge one is past the bound (400s, never a 500)."""
    if ok is None:
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=[1], max_tokens=value)
    else:
        r = CompletionRequest(model="m", prompt=[1.0, 2], max_tokens=value)
        assert r.max_tokens == ok and r.prompt == [1, 2] and type(r.prompt[0]) is int


def test_structured_output_constraints():
    def c(**kw):
        return CompletionRequest(model="m", prompt="x", **kw).constraint()
    assert c() is None and c(response_format={"type": "text"}) is None
    assert c(response_format={"type": "json_object"}) == {"json_object": True}
    assert c(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object"}}}) == {"json": '{"type": "object"}'}
    assert c(structured_outputs={"regex": "[a-z]+"}) == {"regex": "[a-z]+"}
    assert c(structured_outputs={"choice": ["yes", "no"]}) == {"choice": ["yes", "no"]}
    assert c(structured_outputs={"json": '{"type": "object"}'}) == {"json": '{"type": "object"}'}
    for bad in ({"structured_outputs": {"regex": "a", "choice": ["b"]}},
                {"structured_outputs": {}},
                {"structured_outputs": {"regex": "("}},
                {"structured_outputs": {"json": "[1, 2]"}},
                {"structured_outputs": {"json": "{not json"}},
                {"response_format": {"type": "json_schema"}},
                {"response_format": {"type": "json_object"},
                 "structured_outputs": {"regex": "a"}}):
        with pytest.raises(InvalidRequest):
            c(**bad)
    for bad in ({"structured_outputs": {"choice": []}},
                {"structured_outputs": {"whitespace_pattern": " "}},
                {"response_format": {"type": "xml"}}):
        with pytest.raises(ValidationError):
            c(**bad)


@pytest.mark.parametrize("ours,theirs", [
    ("CompletionRequest", "vllm.entrypoints.openai.completion.protocol:CompletionRequest"),
    ("ChatRequest", "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"),
])
def test_every_field_of_vllms_request_models_has_a_decision(ours, theirs):
    """Each field vLLM's server takes is implemented, refused unless at a value that
    changes nothing, or ignored for a stated reason (frontend/fields.py): a field a new
    vLLM adds fails this test until someone decides."""
    import importlib

    import frontend.protocol as protocol
    from frontend.fields import IGNORED, REFUSED
    mod, name = theirs.split(":")
    vllm_fields = set(getattr(importlib.import_module(mod), name).model_fields)
    ours_fields = set(getattr(protocol, ours).model_fields)
    undecided = vllm_fields - ours_fields - set(REFUSED) - set(IGNORED)
    assert not undecided, sorted(undecided)
    assert not set(REFUSED) & ours_fields and not set(IGNORED) & ours_fields
    assert not set(REFUSED) & set(IGNORED)


def test_ignored_fields_are_accepted_without_a_warning(caplog):
    r = CompletionRequest(model="m", prompt="x", request_id="abc", stream_interval=4,
                          length_penalty=0.5, frobnicate=1)
    r.check()
    assert "frobnicate" in caplog.text and "request_id" not in caplog.text
    with pytest.raises(UnsupportedParameter) as e:
        CompletionRequest(model="m", prompt="x", kv_transfer_params={"x": 1}).check()
    assert e.value.param == "kv_transfer_params"
