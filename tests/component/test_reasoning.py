"""Reasoning at the frontend (`--reasoning-parser`), in-process (ASGI) with a fake cluster
that writes what a thinking model would: vLLM's parsers split the answer, streamed and
not; include_reasoning; the usage count; the request's template kwargs reach the parser;
what the engines are told for structured outputs; a bad parser name stops the start."""

import json

import httpx
import pytest

from frontend import reasoning
from frontend.app import create_app
from frontend.client import Chunk
from pdserve.config import FrontendConfig
from pdserve.models import tiny_tokenizer

THINK, END = 900, 901


class HF:
    """What vLLM's think-tag parsers read of a tokenizer: its vocabulary."""

    def get_vocab(self):
        return {"<think>": THINK, "</think>": END, "a": 1}


class Tok:
    vocab_size = 1000
    max_token_chars = 8
    tok = HF()

    async def chat_async(self, messages, max_tokens=0, tools=None, **kw):
        return [1, 2, 3]


# the model's answer: thinking (two tokens) between its markers, then two content tokens
PIECES = [("<think>", THINK), ("let me see", 10), (" hmm", 11), ("</think>", END),
          ("Paris", 12), (" .", 13)]


class Cluster:
    def __init__(self, pieces=PIECES):
        self.pieces, self.sampling = pieces, []

    async def generate(self, rid, model, ids, sp, timeout_s):
        self.sampling.append(sp)
        for i, (text, tid) in enumerate(self.pieces):
            yield Chunk([tid], text, finish_reason="stop" if i == len(self.pieces) - 1 else "")

    async def close(self):
        pass


def client(parser="deepseek_r1", pieces=PIECES):
    cl = Cluster(pieces)
    a = create_app(FrontendConfig(model="unused", served_model_name="m",
                                  reasoning_parser=parser), client=cl, tokenizer=Tok())
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=a, raise_app_exceptions=False),
                          base_url="http://t")
    return c, cl


def body(**kw):
    return {"model": "m", "max_tokens": 20,
            "messages": [{"role": "user", "content": "capital of france?"}], **kw}


async def stream(c, b):
    deltas, usage = [], None
    async with c.stream("POST", "/v1/chat/completions",
                        json={**b, "stream": True,
                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                if d["choices"]:
                    deltas.append(d["choices"][0]["delta"])
                usage = d.get("usage") or usage
    return deltas, usage


def joined(deltas, key):
    return "".join(d.get(key) or "" for d in deltas)


async def test_the_answer_is_split_into_reasoning_and_content_streamed_and_not():
    c, _ = client()
    async with c:
        r = await c.post("/v1/chat/completions", json=body())
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["reasoning"] == "let me see hmm" and msg["content"] == "Paris ."
        assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
        deltas, usage = await stream(c, body())
        assert joined(deltas, "reasoning") == "let me see hmm"
        assert joined(deltas, "content") == "Paris ."
        assert not any("</think>" in json.dumps(d) for d in deltas)
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 2}


async def test_include_reasoning_false_hides_the_reasoning_and_its_logprobs():
    c, _ = client()
    async with c:
        r = await c.post("/v1/chat/completions", json=body(include_reasoning=False))
        ch = r.json()["choices"][0]
        assert ch["message"]["reasoning"] is None and ch["message"]["content"] == "Paris ."
        deltas, _ = await stream(c, body(include_reasoning=False))
        assert joined(deltas, "reasoning") == "" and joined(deltas, "content") == "Paris ."


async def test_the_request_template_kwargs_reach_the_parser():
    """deepseek_v3 thinks only when the request asks for it (as with vLLM's server)."""
    c, _ = client("deepseek_v3")
    async with c:
        r = await c.post("/v1/chat/completions", json=body())
        msg = r.json()["choices"][0]["message"]
        assert msg["reasoning"] is None and msg["content"] == "<think>let me see hmm</think>Paris ."
        r = await c.post("/v1/chat/completions",
                         json=body(chat_template_kwargs={"thinking": True}))
        msg = r.json()["choices"][0]["message"]
        assert msg["reasoning"] == "let me see hmm" and msg["content"] == "Paris ."


async def test_without_a_parser_nothing_is_split_and_usage_has_no_details():
    c, _ = client(parser="")
    async with c:
        r = await c.post("/v1/chat/completions", json=body())
        msg = r.json()["choices"][0]["message"]
        # vLLM's message model: its reasoning field null, as vLLM's server without a parser
        assert msg["reasoning"] is None and msg["content"] == "<think>let me see hmm</think>Paris ."
        assert r.json()["usage"]["completion_tokens_details"] is None     # vLLM's null


async def test_structured_outputs_tell_the_engines_where_the_answer_starts():
    c, cl = client()
    async with c:
        so = {"structured_outputs": {"regex": "Paris ."}}
        await c.post("/v1/chat/completions", json=body(**so))
        await c.post("/v1/chat/completions", json=body(**so, include_reasoning=False))
        await c.post("/v1/chat/completions", json=body())
    first, hidden, plain = (sp.structured for sp in cl.sampling)
    assert first.HasField("reasoning_ended") and not first.reasoning_ended   # prompt: open
    assert json.loads(first.reasoning_parser_kwargs) == {"chat_template_kwargs": {}}
    assert hidden.reasoning_ended          # hidden reasoning: constrained from the start
    assert not plain.HasField("reasoning_ended") and not plain.regex   # unconstrained


def test_an_unknown_parser_or_a_tokenizer_without_its_markers_stops_the_start():
    with pytest.raises(SystemExit, match="unknown --reasoning-parser"):
        reasoning.load("no-such-parser", HF())

    class Bare:
        def get_vocab(self):
            return {"a": 1}
    with pytest.raises(SystemExit, match="reasoning-parser deepseek_r1"):
        reasoning.load("deepseek_r1", Bare())


# the tiny model's tokens as the decode worker streams them after a prompt (vLLM's
# detokenizer: each word with the space before it)
ANSWER = [" w860", " </think>", " dog", " lazy", " brown"]


def fed(groups: list[list[int]]) -> tuple[str, str]:
    """(reasoning, content) a stream adds up to when the answer's tokens come in `groups`."""
    tok = tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(t.strip()) for t in ANSWER]
    prompt = tok.encode("the quick fox\n", add_special_tokens=False)
    st = reasoning.Stream(reasoning.Plan(reasoning.load("deepseek_r1", tok), tok), prompt, "m")
    said = {"reasoning": "", "content": ""}
    for g in groups:
        d = st.feed("".join(ANSWER[i] for i in g), [ids[i] for i in g], g[-1] == len(ids) - 1)
        for k in said:
            said[k] += d.get(k) or ""
    return said["reasoning"], said["content"]


@pytest.mark.parametrize("groups", [[[0, 1, 2], [3, 4]], [[0], [1, 2, 3, 4]],
                                    [[0, 1, 2, 3, 4]]], ids=["3+2", "1+4", "5"])
def test_a_delta_of_several_tokens_splits_as_its_tokens_one_by_one(groups):
    """A delta with the end marker among other tokens: vLLM's deepseek_r1 parser, fed it
    whole, gives the marker's space to the reasoning (' w860 '); fed token by token (vLLM's
    server when it keeps up), it drops a lone marker with its text."""
    one = fed([[i] for i in range(len(ANSWER))])
    assert one == (" w860", " dog lazy brown")
    assert fed(groups) == one


def test_a_delta_whose_text_is_not_its_tokens_text_goes_whole():
    """A stop string cut the text, or the engine skipped special tokens: no split."""
    tok = tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(t.strip()) for t in ANSWER]
    assert reasoning.pieces(tok, ids[:2], ids[2:4], " dog lazy") == [" dog", " lazy"]
    assert reasoning.pieces(tok, ids[:2], ids[2:4], " dog la") is None
    assert reasoning.pieces(tok, ids[:2], ids[2:4], " dog") is None
    assert reasoning.merge({"reasoning": "a"}, {"reasoning": "b", "content": "c"}) == {
        "reasoning": "ab", "content": "c"}
