"""Reasoning for the chat endpoint: the model's thinking split off its answer, as vLLM's
server does with `--reasoning-parser` (the same flag, the same parsers).

vLLM's own `Parser` (vllm/parser, composed by its `ParserManager` around the reasoning
parser named) does the work, streamed (`parse_delta`) and not (`parse`); pdserve only
feeds it the text and token ids the decode worker streams. The answer's content then
goes on to tool-call handling (frontend/tools.py), as vLLM parses tool calls from the
content left after reasoning. What the client sees follows vLLM's server:
* the message (or delta) carries `reasoning` beside `content`; `include_reasoning: false`
  drops it (and, as vLLM, the choice's logprobs);
* `usage.completion_tokens_details.reasoning_tokens` counts the reasoning tokens of every
  choice, on every response while a parser is configured;
* the parser sees the request's chat template kwargs (so `deepseek_v3` splits only when
  the request asks for thinking).

The engines get the same parser (`pdserve serve` passes `--reasoning-parser` to vLLM's
engine arguments too): vLLM's structured outputs then constrain the answer only once the
reasoning has ended, on the prefill worker's first token and on the decode worker's rest
(kv_transfer/connector/scheduler_side.py, `advance_grammar`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def load(name: str, tokenizer: Any):
    """vLLM's composed Parser class for the reasoning parser `name` (imports vLLM); exits
    with the known names for an unknown one, as vLLM's server refuses to start."""
    from vllm.parser import ParserManager
    from vllm.reasoning import ReasoningParserManager
    try:
        ReasoningParserManager.get_reasoning_parser(name)
    except KeyError:
        raise SystemExit(f"unknown --reasoning-parser {name!r}; vLLM has: "
                         f"{', '.join(ReasoningParserManager.list_registered())}") from None
    try:
        return ParserManager.get_parser(reasoning_parser_name=name, tokenizer=tokenizer)
    except TypeError as e:        # the tokenizer lacks the parser's markers
        raise SystemExit(str(e)) from None


@dataclass
class Plan:
    """One chat request's reasoning: the parser class, and the request as it reads it."""
    parser_cls: Any
    tokenizer: Any
    kwargs: dict = field(default_factory=dict)     # the request's chat template kwargs
    include: bool = True                           # include_reasoning
    request: Any = None

    def vllm_request(self, model: str):
        """The request as vLLM's parsers read it (include_reasoning, template kwargs)."""
        if self.request is None:
            from vllm.entrypoints.openai.chat_completion.protocol import (
                ChatCompletionRequest)
            self.request = ChatCompletionRequest(
                model=model, messages=[], include_reasoning=self.include,
                chat_template_kwargs=self.kwargs or None)
        return self.request

    def parser(self):
        return self.parser_cls(self.tokenizer, None, chat_template_kwargs=self.kwargs)

    def engine_fields(self, prompt: list[int]) -> dict:
        """What the engines need to constrain only the answer (the wire's StructuredOutputs
        fields): whether the prompt ended the reasoning, resolved as vLLM's server does
        (`resolve_reasoning_ended`: hidden reasoning is constrained from the start), and
        the kwargs their own parser is built with."""
        ended = True if not self.include else bool(self.parser().is_reasoning_end(prompt))
        return {"reasoning_ended": ended,
                "reasoning_parser_kwargs": json.dumps({"chat_template_kwargs": self.kwargs})}


def split(p: Plan, text: str, ids: list[int], prompt: list[int], model: str
          ) -> tuple[str | None, str | None, int]:
    """A whole answer -> (reasoning or None, content, reasoning tokens)."""
    parser = p.parser()
    parser.set_prompt_token_ids(prompt)
    reasoning, content, _ = parser.parse(text, p.vllm_request(model),
                                         model_output_token_ids=ids)
    return (reasoning if p.include else None), content, parser.count_reasoning_tokens(ids)


_CONTEXT = 6     # tokens before a delta decoded with it (vLLM's detokenizer keeps as many)


def pieces(tokenizer: Any, before: list[int], ids: list[int], text: str) -> list[str] | None:
    """`text`, the text of tokens `ids` that follow `before`, cut into each token's share
    as a detokenizer streaming them one by one emits it (a character split across tokens
    comes with its last one), or None where the tokenizer's own text for them is not
    `text` (a stop string cut it, special tokens were skipped)."""
    ctx = before[-_CONTEXT:]
    last = tokenizer.decode(ctx)
    out: list[str] = []
    for k in range(1, len(ids) + 1):
        cur = tokenizer.decode(ctx + ids[:k])
        if cur.endswith("\ufffd"):           # an unfinished character: held back
            out.append("")
            continue
        if not cur.startswith(last):
            return None
        out.append(cur[len(last):])
        last = cur
    return out if "".join(out) == text else None


def merge(a: dict, b: dict) -> dict:
    """Two consecutive deltas' fields as one: texts joined, lists extended."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, str) and isinstance(out.get(k), str):
            out[k] += v
        elif isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


class Stream:
    """One streamed choice: its deltas through vLLM's parser, with its own state.

    A delta of several tokens (the decode worker sends what the engine made while the
    previous chunk was on its way) goes to the parser one token at a time. vLLM's parsers
    read a marker alone differently from a marker among other tokens (deepseek_r1 drops a
    lone `</think>` delta with its text, and gives a mixed delta's text before the marker
    to the reasoning), so feeding whole deltas would make the split depend on timing.
    Token by token, the stream adds up to what vLLM's server streams when it keeps up."""

    def __init__(self, p: Plan, prompt: list[int], model: str) -> None:
        self.p, self.prompt, self.model = p, prompt, model
        self.parser = p.parser()
        self.parser.set_prompt_token_ids(prompt)
        self.ids: list[int] = []
        self.first = True

    def feed(self, text: str, ids: list[int], finished: bool) -> dict:
        """The delta's fields ({} when it carries nothing for the client yet)."""
        before = (self.ids if len(self.ids) >= _CONTEXT
                  else self.prompt[-_CONTEXT:] + self.ids)
        cut = pieces(self.p.tokenizer, before, ids, text) if len(ids) > 1 else None
        self.ids += ids
        if cut is None:
            return self._one(text, list(ids), finished)
        out: dict = {}
        for k, (t, i) in enumerate(zip(cut, ids)):
            out = merge(out, self._one(t, [i], finished and k == len(ids) - 1))
        return out

    def _one(self, text: str, ids: list[int], finished: bool) -> dict:
        d = self.parser.parse_delta(text, ids, self.p.vllm_request(self.model),
                                    self.prompt if self.first else None, finished=finished)
        self.first = False
        return d.model_dump(exclude_none=True) if d is not None else {}

    def tokens(self) -> int:
        return self.parser.count_reasoning_tokens(self.ids)
