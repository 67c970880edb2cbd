"""OpenAI request validation (pure): vLLM's request models with pdserve's bounds and
refusals, and vLLM's own sampling parameters from them."""

import pytest
from pydantic import ValidationError

from frontend.gen_config import GenDefaults
from frontend.protocol import ChatRequest, CompletionRequest, TokenizeChat
from pdserve.errors import InvalidRequest, UnsupportedParameter

MSGS = [{"role": "user", "content": "x"}]


def cmpl(**kw):
    return CompletionRequest(**{"model": "m", "prompt": "x", **kw})


def chat(**kw):
    return ChatRequest(**{"model": "m", "messages": MSGS, **kw})


def test_the_models_are_vllms():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as V
    assert issubclass(CompletionRequest, V) and issubclass(ChatRequest, ChatCompletionRequest)
    # vLLM's defaults: 16 tokens for a completion, none for chat; the model may be omitted
    assert cmpl().max_tokens == 16 and cmpl(max_tokens=None).max_tokens == 16
    assert chat().max_tokens is None and chat(model=None).model is None


def test_unknown_fields_are_ignored_with_a_warning(caplog):
    r = cmpl(frobnicate=1, metadata={"a": "b"})
    r.check()
    assert "frobnicate" in caplog.text and "metadata" in caplog.text


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("use_beam_search", True), ("guided_json", {"a": 1}),
    ("vllm_xargs", {"a": 1}), ("modalities", ["text", "audio"]),
    ("kv_transfer_params", {"x": 1}), ("suffix", "tail")])
def test_fields_that_would_change_the_output_are_refused(field, value):
    """Never silently ignored: the output would not be what the client asked for; vLLM's
    own fields (use_beam_search) and fields vLLM does not know (functions) alike."""
    with pytest.raises(UnsupportedParameter) as e:
        chat(**{field: value}).check()
    assert e.value.param == field


def test_their_values_that_change_nothing_are_accepted(caplog):
    """Clients send whole parameter sets: the defaults of what pdserve does not implement
    change nothing, and the ignored fields pass without a warning."""
    chat(use_beam_search=False, functions=None, guided_json=None, chat_template=None,
         modalities=["text"], logits_processors=[], priority=3, length_penalty=1.0,
         suffix="", user="u", request_id="abc", stream_interval=4, mm_payload="none").check()
    assert "ignored" not in caplog.text


def test_a_malformed_body_is_a_validation_error_not_a_crash():
    """vLLM's before-validators index the raw body; a wrong shape must be a 400."""
    for kw in ({"tools": [1], "tool_choice": {"type": "function", "function": {"name": "f"}}},
               {"tools": [{"function": 3}], "tool_choice": {"type": "function",
                                                             "function": {"name": "f"}}}):
        with pytest.raises((ValidationError, InvalidRequest)):
            chat(**kw)


@pytest.mark.parametrize("kw", [
    {"prompt_logprobs": 2, "stream": True}, {"stream_options": {"include_usage": True}},
    {"logprob_token_ids": [1]}, {"prompt_logprobs": "2"}, {"max_tokens": "ten"},
    {"temperature": "hot"}, {"response_format": {"type": "xml"}}, {"stop": ["x"] * 5},
    {"response_format": {"type": "json_schema"}},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}}])
def test_vllms_own_checks_refuse_at_parse(kw):
    """vLLM's validators: its type errors (pydantic's) and its own refusals, which come
    out as pdserve's 400 with vLLM's words and parameter."""
    with pytest.raises((ValidationError, InvalidRequest)) as e:
        cmpl(**kw)
    if e.type is InvalidRequest:
        assert e.value.param == next(iter(kw)) or "structured" in str(e.value)


@pytest.mark.parametrize("kw", [
    {"best_of": 3}, {"best_of": 3, "n": 2},
    {"top_k": 2**31}, {"top_k": -2}, {"stop_token_ids": [2**32]}, {"stop_token_ids": [-1]},
    {"stop_token_ids": list(range(65))}, {"min_tokens": 2**40},
    {"stop": "x" * 5000}, {"stop": [""]}, {"bad_words": ["x"] * 129},
    {"bad_words": ["ok", ""]}, {"allowed_token_ids": []}, {"allowed_token_ids": [-1]},
    {"logprobs": 21}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1},
    {"logit_bias": {str(i): 1 for i in range(1025)}}, {"logprob_token_ids": [1] * 129,
                                                       "logprobs": 0}])
def test_pdserves_bounds_refuse_at_check(kw):
    """What the wire's fields and the engines' limits cannot take: a 400 with the field
    named, before anything is sent."""
    with pytest.raises((InvalidRequest, UnsupportedParameter)) as e:
        cmpl(**kw).check()
    assert e.value.param == next(iter(kw))


@pytest.mark.parametrize("kw,param", [
    ({"n": 2, "temperature": 0.0}, "n"),            # greedy n > 1, as vLLM refuses it
    ({"temperature": 3.0}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"n": 0}, "n"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens")])
def test_vllms_sampling_checks_are_400s(kw, param):
    r = cmpl(**kw)
    r.check()
    with pytest.raises(InvalidRequest) as e:
        r.sampling(r.max_tokens, {})
    assert e.value.param == param, str(e.value)


def test_sampling_is_vllms_with_the_models_defaults():
    """The request's value, else the model's generation-config default, else OpenAI's:
    vLLM's to_sampling_params."""
    gen = {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.1, "max_tokens": 7}
    sp = cmpl().sampling(16, gen)
    assert (sp.temperature, sp.top_k, sp.repetition_penalty, sp.top_p) == (0.7, 5, 1.1, 1.0)
    sp = cmpl(temperature=0.5, top_k=0).sampling(16, gen)
    assert (sp.temperature, sp.top_k) == (0.5, 0)
    assert cmpl().sampling(16, {"temperature": 0.0}).temperature == 0.0
    sp = chat(seed=3, stop="a", logit_bias={"7": -120}, min_p=0.1).sampling(9, {})
    assert (sp.seed, sp.stop, sp.logit_bias, sp.min_p, sp.max_tokens) == (
        3, ["a"], {7: -100.0}, 0.1, 9)      # vLLM clamps a bias to +-100


def test_max_tokens_as_vllm_settles_them():
    assert GenDefaults().max_tokens(None, 100) == 100
    assert GenDefaults().max_tokens(20, 100) == 20
    g = GenDefaults({"max_tokens": 7})
    assert (g.max_tokens(None, 100), g.max_tokens(None, 5), g.max_tokens(20, 100)) == (7, 5, 20)
    g = GenDefaults({"max_tokens": 7}, override_max_tokens=7)
    assert g.max_tokens(20, 100) == 7


def test_echo_with_logprobs_asks_for_the_prompts_logprobs():
    """As vLLM and lm-eval's loglikelihood tasks expect."""
    r = cmpl(echo=True, logprobs=2, stream=True)
    r.check()
    assert r.sampling(4, {}).prompt_logprobs == 2
    assert cmpl(logprobs=2).sampling(4, {}).prompt_logprobs is None
    assert cmpl(prompt_logprobs=0).sampling(4, {}).prompt_logprobs == 0
    cmpl(n=3, best_of=3, echo=True).check()
    r = cmpl(echo=True, max_tokens=0, logprobs=1)      # the prompt alone, as vLLM
    r.check()
    assert r.echo_only and r.sampling(0, {}).max_tokens == 1
    assert not cmpl(echo=True).echo_only and not cmpl(max_tokens=0).echo_only


def test_chat_template_options_are_checked_as_vllm_checks_them():
    chat(add_generation_prompt=False, continue_final_message=True,
         chat_template_kwargs={"enable_thinking": False},
         documents=[{"title": "t", "text": "d"}]).check()
    with pytest.raises(InvalidRequest, match="Cannot set both"):   # vLLM's validator
        chat(continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(InvalidRequest, match="Cannot set both"):   # its default, too
        chat(continue_final_message=True).check()
    r = chat(reasoning_effort="none")
    assert r.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "none"}
    r = chat(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False, "x": 1})
    assert r.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "high",
                                   "x": 1}      # the client's own enable_thinking stands
    assert chat().template_kwargs() == {}
    for k in ("chat_template", "tokenize"):      # on a server that trusts templates too
        with pytest.raises(InvalidRequest) as e:
            chat(chat_template_kwargs={k: "x"}).check(True)
        assert e.value.param == "chat_template_kwargs"


def test_logprob_token_ids_need_logprobs_as_in_vllm():
    chat(logprobs=True, logprob_token_ids=[1, 2]).check()
    with pytest.raises(InvalidRequest, match="`logprobs` must be set to true"):
        chat(logprob_token_ids=[1, 2])
    cmpl(logprobs=0, logprob_token_ids=[1]).check()
    with pytest.raises(InvalidRequest, match="`logprobs` must be set"):
        cmpl(logprob_token_ids=[1])


@pytest.mark.parametrize("model", [chat, TokenizeChat])
def test_a_requests_own_chat_template_needs_a_server_that_trusts_it(model):
    """As vLLM's server: a template in the request (or in its kwargs) is a 400 unless the
    server runs with --trust-request-chat-template, and then it is taken."""
    kw0 = {} if model is chat else {"model": "m", "messages": MSGS}
    for kw in ({"chat_template": "{{ messages }}"},
               {"chat_template_kwargs": {"chat_template": "{{ messages }}"}}):
        with pytest.raises(InvalidRequest) as e:
            model(**kw0, **kw).check()
        assert str(e.value) == ("Chat template is passed with request, but "
                                "--trust-request-chat-template is not set. "
                                "Refused request with untrusted chat template.")
    model(**kw0, chat_template="{{ messages }}").check(True)


def test_chat_checks():
    with pytest.raises(InvalidRequest, match="empty"):
        ChatRequest(model="m", messages=[]).check()
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        chat(top_logprobs=2)
    r = chat(max_completion_tokens=7)
    r.check()
    assert r.max_tokens == 7
    with pytest.raises(InvalidRequest) as e:
        chat(logprobs=True, top_logprobs=21).check()
    assert e.value.param == "top_logprobs"
    tool = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(InvalidRequest, match="unique"):
        chat(tools=[tool, tool]).check()
    r = chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}})
    assert r.tools_json() == [tool] and r.tool_choice_json()["function"]["name"] == "f"
    assert chat(tools=[tool]).tool_choice == "auto"      # vLLM's default with tools


def test_an_empty_structured_outputs_is_vllms_refusal():
    with pytest.raises(InvalidRequest, match="one kind of structured outputs"):
        cmpl(structured_outputs={}).sampling(4, {})


def test_stop_list():
    assert cmpl(stop="a").stop_list == ["a"] and cmpl(stop=["a", "b"]).stop_list == ["a", "b"]
    assert cmpl().stop_list == []


def test_structured_output_constraints():
    def c(**kw):
        r = cmpl(**kw)
        return r.constraint(r.sampling(4, {}))
    assert c() is None and c(response_format={"type": "text"}) is None
    assert c(response_format={"type": "json_object"}) == {"json_object": True}
    assert c(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object"}}}) == {"json": '{"type": "object"}'}
    assert c(structured_outputs={"regex": "[a-z]+"}) == {"regex": "[a-z]+"}
    assert c(structured_outputs={"choice": ["yes", "no"]}) == {"choice": ["yes", "no"]}
    assert c(structured_outputs={"json": '{"type": "object"}'}) == {"json": '{"type": "object"}'}
    assert c(structured_outputs={"grammar": "root ::= \"a\""}) == {"grammar": "root ::= \"a\""}
    for bad in ({"structured_outputs": {"regex": "("}},
                {"structured_outputs": {"json": "[1, 2]"}},
                {"structured_outputs": {"json": "{not json"}},
                {"structured_outputs": {"choice": []}},
                {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
                {"response_format": {"type": "json_object"},
                 "structured_outputs": {"regex": "a"}}):
        with pytest.raises((InvalidRequest, UnsupportedParameter)):
            c(**bad)


def test_a_named_tool_choice_is_a_schema_constraint_and_excludes_others():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}})
    assert r.constraint(r.sampling(4, {}), {"type": "object"}) == {"json": '{"type": "object"}'}
    r = chat(tools=[tool], tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(InvalidRequest, match="combined"):
        r.constraint(r.sampling(4, {}), {"type": "array"})


@pytest.mark.parametrize("theirs", [
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"])
def test_every_field_of_vllms_request_models_has_a_decision(theirs):
    """Each field vLLM's server takes is implemented, refused unless at a value that
    changes nothing, or ignored for a stated reason (frontend/fields.py): a field a new
    vLLM adds fails this test until someone decides."""
    import importlib

    from frontend.fields import IGNORED, IMPLEMENTED, REFUSED
    mod, name = theirs.split(":")
    model = getattr(importlib.import_module(mod), name)
    undecided = set(model.model_fields) - IMPLEMENTED - set(REFUSED) - set(IGNORED)
    assert not undecided, sorted(undecided)
    assert not set(REFUSED) & IMPLEMENTED and not set(IGNORED) & IMPLEMENTED
    assert not set(REFUSED) & set(IGNORED)
    for k in set(REFUSED) & set(model.model_fields):     # vLLM's default changes nothing
        assert model.model_fields[k].get_default(call_default_factory=True) in REFUSED[k], k
