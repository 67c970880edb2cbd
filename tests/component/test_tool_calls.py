"""Tool calls at the frontend, in-process (ASGI) with a fake cluster that writes what a
model would: the constraint each tool_choice sends down, the answers' OpenAI shapes
(streamed and not), vLLM's hermes parser for "auto", and the 400s."""

import json

import httpx
import pytest

from frontend.app import create_app
from frontend.client import Chunk
from pdserve.config import FrontendConfig

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


class Tok:
    vocab_size = 1000
    max_token_chars = 4
    tok = object()       # what vLLM's tool parsers are handed as the tokenizer

    def __init__(self):
        self.seen = []

    async def chat_async(self, messages, max_tokens=0, tools=None, **kw):
        self.seen.append((messages, tools))
        return [1, 2, 3]


class Cluster:
    """Answers every request with `pieces`, one chunk each; keeps the sampling it got."""

    def __init__(self, pieces):
        self.pieces, self.sampling = pieces, []

    async def generate(self, rid, model, ids, sp, timeout_s):
        self.sampling.append(sp)
        for i, p in enumerate(self.pieces):
            yield Chunk([10 + i], p, finish_reason="stop" if i == len(self.pieces) - 1 else "")

    async def close(self):
        pass


def client(pieces, **kw):
    tok, cl = Tok(), Cluster(pieces)
    a = create_app(FrontendConfig(model="unused", served_model_name="m", **kw), client=cl,
                   tokenizer=tok)
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=a, raise_app_exceptions=False),
                          base_url="http://t")
    return c, cl, tok


def given(msg: dict) -> dict:
    """A message's fields that say something: vLLM's message model sends the others as
    null (refusal, audio, ...) and tool_calls empty."""
    return {k: v for k, v in msg.items() if v not in (None, [])}


def body(**kw):
    return {"model": "m", "max_tokens": 20, "tools": [WEATHER, TIME],
            "messages": [{"role": "user", "content": "weather in paris?"}], **kw}


async def stream(c, b) -> tuple[list[dict], list]:
    deltas, finish = [], []
    async with c.stream("POST", "/v1/chat/completions", json={**b, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"][0]
                deltas.append(ch["delta"])
                finish.append(ch["finish_reason"])
    return deltas, [f for f in finish if f]


def joined(deltas) -> dict[int, dict]:
    """A client's accumulation of streamed tool-call deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            c["id"] = tc.get("id") or c["id"]
            c["name"] += tc.get("function", {}).get("name") or ""
            c["arguments"] += tc.get("function", {}).get("arguments") or ""
    return calls


async def test_a_named_tool_choice_constrains_to_its_parameters_and_answers_one_call():
    pieces = ['{"city": ', '"paris"}']
    c, cl, tok = client(pieces)
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with c:
        r = await c.post("/v1/chat/completions", json=body(tool_choice=named))
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        (call,) = ch["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "paris"}'}
        assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
        assert ch["message"]["content"] == "" and ch["finish_reason"] == "stop"
        assert json.loads(cl.sampling[0].structured.json) == WEATHER["function"]["parameters"]
        assert tok.seen[0][1] == [WEATHER, TIME]        # the template sees the tools
        deltas, finish = await stream(c, body(tool_choice=named))
        (got,) = joined(deltas).values()
        assert got["name"] == "get_weather" and got["arguments"] == '{"city": "paris"}'
        assert got["id"].startswith("chatcmpl-tool-") and finish == ["stop"]
        assert not any(d.get("content") for d in deltas)


async def test_required_is_an_array_of_calls_under_vllms_schema():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    out = [{"name": "get_weather", "parameters": {"city": "paris"}},
           {"name": "get_time", "parameters": {}}]
    text = json.dumps(out)
    c, cl, _ = client([text[:10], text[10:]])
    async with c:
        for parallel in (None, False):
            b = body(tool_choice="required", **({} if parallel is None else
                                                {"parallel_tool_calls": parallel}))
            r = await c.post("/v1/chat/completions", json=b)
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            assert [(t["function"]["name"], json.loads(t["function"]["arguments"]))
                    for t in ch["message"]["tool_calls"]] == [
                ("get_weather", {"city": "paris"}), ("get_time", {})]
            assert ch["finish_reason"] == "tool_calls"
            vreq = ChatCompletionRequest(model="m", messages=[], tools=b["tools"])
            want = get_json_schema_from_tools("required", vreq.tools, parallel)
            assert json.loads(cl.sampling[-1].structured.json) == want
        deltas, finish = await stream(c, body(tool_choice="required"))
        calls = joined(deltas)
        assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
        assert json.loads(calls[0]["arguments"]) == {"city": "paris"}
        assert finish == ["tool_calls"]


async def test_auto_uses_vllms_tool_parser_streamed_and_not():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "paris"}}\n</tool_call>')
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    c, cl, _ = client(pieces, enable_auto_tool_choice=True, tool_call_parser="hermes")
    async with c:
        r = await c.post("/v1/chat/completions", json=body())       # auto: the default
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["message"]["content"] == "Let me check. "
        (call,) = ch["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "paris"}
        assert ch["finish_reason"] == "tool_calls"
        assert not cl.sampling[0].HasField("structured")           # the model's own format
        deltas, finish = await stream(c, body(tool_choice="auto"))
        (got,) = joined(deltas).values()
        assert got["name"] == "get_weather" and json.loads(got["arguments"]) == {
            "city": "paris"}
        assert "".join(d.get("content") or "" for d in deltas).startswith("Let me check.")
        assert finish == ["tool_calls"]
    # no call in the text: plain content, finish as generated
    c, _, _ = client(["no tools needed"], enable_auto_tool_choice=True,
                     tool_call_parser="hermes")
    async with c:
        ch = (await c.post("/v1/chat/completions", json=body())).json()["choices"][0]
        assert given(ch["message"]) == {"role": "assistant", "content": "no tools needed"}
        assert ch["finish_reason"] == "stop"


async def test_tool_role_and_calls_in_the_history_reach_the_template():
    c, _, tok = client(["It is sunny."])
    history = [{"role": "user", "content": [{"type": "text", "text": "weather?"}]},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city": "paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    async with c:
        r = await c.post("/v1/chat/completions", json=body(messages=history,
                                                          tool_choice="none"))
        assert r.status_code == 200, r.text
        # tool_choice "none": plain content; the template still sees the tools
        assert given(r.json()["choices"][0]["message"]) == {"role": "assistant",
                                                     "content": "It is sunny."}
    msgs, tools = tok.seen[0]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "paris"}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert tools == [WEATHER, TIME]


@pytest.mark.parametrize("extra,why", [
    ({"tool_choice": "auto"}, "--enable-auto-tool-choice"),
    ({}, "--enable-auto-tool-choice"),      # tools alone mean "auto", as vLLM's server
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "does not match"),
    ({"tools": None, "tool_choice": "required"}, "must be set"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "unique"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "name"),
    ({"tools": [1], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "malformed"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
async def test_tool_requests_that_cannot_be_met_get_400(extra, why):
    c, cl, _ = client(["x"])
    async with c:
        r = await c.post("/v1/chat/completions", json=body(**extra))
        assert r.status_code == 400, r.text
        assert why in r.text
        assert not cl.sampling                       # nothing reached the cluster
        r = await c.post("/v1/chat/completions", json=body(tool_choice="none"))
        assert r.status_code == 200                  # and the next request works
