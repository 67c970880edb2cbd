"""Tool calls for the chat endpoint: OpenAI's `tools` and `tool_choice`, as vLLM's server
answers them.

* `tool_choice` naming a function: the arguments are generated under that function's
  `parameters` schema, an ordinary structured-output constraint, so they pass through the
  disaggregated path like any JSON schema (the first token on the prefill worker, the
  rest on the decode worker from the right grammar state). The message carries one tool
  call; finish_reason stays as generated ("stop"), as in OpenAI's API.
* `"required"`: a JSON array of `{"name", "parameters"}` items, anyOf the tools (vLLM's
  schema, `maxItems: 1` when `parallel_tool_calls` is false); each item is one tool call,
  and finish_reason "tool_calls".
* `"auto"`: the model writes calls in its own format, and vLLM's tool parser named by
  `--tool-call-parser` finds them (both streamed and not). As vLLM's server, it needs
  `--enable-auto-tool-choice`. Tools with no tool_choice mean "auto" (vLLM's request
  model sets it), so without the flag they are a 400 too, as in vLLM's server.
* `"none"`: plain content; the template still sees the tools.

Pure, except for the vLLM tool parser `auto` uses (`load_parser`).
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.errors import InvalidRequest

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    '--tool-call-parser to be set')


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"


def _params(p: dict | None) -> dict:
    # no or empty parameters still constrain the arguments to a JSON object (as vLLM)
    return p if p else {"type": "object", "properties": {}}


def required_schema(tools: list[dict], parallel: bool | None) -> dict:
    """vLLM's schema for tool_choice "required" (`get_json_schema_from_tools`): an array
    of calls, each {"name": one of the tools, "parameters": its schema}; the tools' `$defs`
    are hoisted to the top (one schema per name)."""
    items, defs = [], {}
    for t in tools:
        fn = t["function"]
        params = copy.deepcopy(fn.get("parameters"))
        for name, d in ((params or {}).pop("$defs", None) or {}).items():
            if name in defs and defs[name] != d:
                raise InvalidRequest(f"tool definition {name!r} has multiple schemas, "
                                     "which is not supported", param="tools")
            defs[name] = d
        items.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                     "parameters": _params(params)},
                      "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": items}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


@dataclass
class ToolPlan:
    """What a chat request's tools ask of generation and of the answer."""
    mode: str = "none"                # none | named | required | auto
    name: str = ""                    # named: the function
    schema: dict | None = None        # named, required: the constraint on the output
    tools: list[dict] = field(default_factory=list)    # as the chat template takes them
    parser: Any = None                # auto: the vLLM ToolParser class
    request: Any = None               # auto: the request as vLLM's parser takes it

    @property
    def active(self) -> bool:
        return self.mode != "none"


def plan(tools: list[dict] | None, tool_choice: Any, parallel: bool | None,
         parser_cls: Any = None) -> ToolPlan:
    """The plan for one request (`tools` and `tool_choice` as plain JSON); a 400 for a
    choice that cannot be met. `parser_cls`: the auto parser, when the server enables it."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("when using tool_choice, tools must be set",
                                 param="tool_choice")
        return ToolPlan()
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise InvalidRequest(f"tool {name!r} has not been passed in tools",
                                 param="tool_choice")
        fn = tools[names.index(name)]["function"]
        return ToolPlan("named", name, _params(fn.get("parameters")), tools)
    if tool_choice == "required":
        return ToolPlan("required", schema=required_schema(tools, parallel), tools=tools)
    if tool_choice == "auto" or (tool_choice is None and parser_cls is not None):
        if parser_cls is None:
            raise InvalidRequest(AUTO_NEEDS_FLAGS, param="tool_choice")
        return ToolPlan("auto", tools=tools, parser=parser_cls)
    return ToolPlan(tools=tools)


def load_parser(name: str):
    """vLLM's tool parser class by its `--tool-call-parser` name (imports vLLM)."""
    from vllm.tool_parsers import ToolParserManager
    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise SystemExit(f"unknown --tool-call-parser {name!r}; vLLM has: "
                         f"{', '.join(ToolParserManager.list_registered())}") from None


def _vllm_request(p: ToolPlan, model: str):
    """The request as vLLM's tool parsers read it (they look at its tools)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    if p.request is None:
        p.request = ChatCompletionRequest(model=model, messages=[], tools=p.tools,
                                          tool_choice="auto")
    return p.request


def _call(name: str, arguments: str, cid: str | None = None) -> dict:
    return {"id": cid or call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _required_calls(text: str) -> list[dict] | None:
    try:
        items = json.loads(text)
        return [_call(x["name"], json.dumps(x["parameters"], ensure_ascii=False))
                for x in items]
    except (ValueError, TypeError, KeyError):
        return None     # cut short (finish "length"): the text is returned as content


def message(p: ToolPlan, text: str, finish: str, tokenizer: Any, model: str
            ) -> tuple[dict, str]:
    """The assistant message and finish_reason of a whole (non-streamed) answer."""
    if p.mode == "named":
        return ({"role": "assistant", "content": "", "tool_calls": [_call(p.name, text)]},
                finish)
    if p.mode == "required":
        calls = _required_calls(text)
        if calls is not None:
            return ({"role": "assistant", "content": "", "tool_calls": calls},
                    "tool_calls" if finish == "stop" else finish)
    if p.mode == "auto":
        req = _vllm_request(p, model)
        info = p.parser(tokenizer, req.tools).extract_tool_calls(text, req)
        if info.tools_called and info.tool_calls:
            calls = [_call(tc.function.name, tc.function.arguments, tc.id)
                     for tc in info.tool_calls]
            return ({"role": "assistant", "content": info.content, "tool_calls": calls},
                    "tool_calls")
    return {"role": "assistant", "content": text}, finish


class Streamer:
    """One streamed choice's deltas: text and token ids in, OpenAI delta dicts out."""

    def __init__(self, p: ToolPlan, tokenizer: Any, model: str) -> None:
        self.p = p
        self.text, self.ids = "", []
        self.id = call_id()
        self.sent_calls = False
        # auto: vLLM's parser keeps its own streaming state, one per choice
        self.request = _vllm_request(p, model) if p.mode == "auto" else None
        self.parser = p.parser(tokenizer, self.request.tools) if self.request else None

    def feed(self, text: str, ids: list[int], finish: str | None
             ) -> tuple[dict, str | None]:
        prev_text, prev_ids = self.text, self.ids
        self.text, self.ids = prev_text + text, prev_ids + list(ids)
        mode = self.p.mode
        if mode == "named":
            if not text:
                return {}, finish
            head = {"id": self.id, "type": "function", "function": {"name": self.p.name,
                                                                     "arguments": text}}
            first, self.sent_calls = not self.sent_calls, True
            return {"tool_calls": [{"index": 0, **(head if first else {
                "function": {"arguments": text}})}]}, finish
        if mode == "required":
            if finish is None:
                return {}, None              # one array: sent whole when it is complete
            calls = _required_calls(self.text)
            if calls is None:
                return {"content": self.text}, finish
            return ({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]},
                    "tool_calls" if finish == "stop" else finish)
        if mode == "auto":
            d = self.parser.extract_tool_calls_streaming(
                prev_text, self.text, text, prev_ids, self.ids, list(ids), self.request)
            out = d.model_dump(exclude_none=True) if d is not None else {}
            if out.get("tool_calls"):
                self.sent_calls = True
            if finish is not None and self.sent_calls:
                rest = self.parser.get_remaining_unstreamed_args()
                if rest and not out.get("tool_calls"):
                    out["tool_calls"] = [{"index": max(self.parser.current_tool_id, 0),
                                          "function": {"arguments": rest}}]
                finish = "tool_calls" if finish == "stop" else finish
            return out, finish
        return ({"content": text} if text else {}), finish
