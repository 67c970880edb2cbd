"""Chat messages and tool definitions as OpenAI chat requests carry them, and the chat
template's options as vLLM checks them. Pure."""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pdserve.errors import InvalidRequest, UnsupportedParameter

MAX_TOOLS = 128


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(None, max_length=16384)
    parameters: dict | None = None
    strict: StrictBool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=256)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(max_length=256)
    arguments: str = Field("", max_length=1 << 20)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None
    tool_call_id: str | None = Field(None, max_length=256)       # role tool: what it answers
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)   # assistant

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template takes it (a `developer` message stays one here;
        frontend/tokens.py turns it into `system` for a template that does not know the
        role, as vLLM does). A call's arguments go to the template as an object, as vLLM
        hands them."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in self.tool_calls]
        return m

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise UnsupportedParameter("only text content parts are supported",
                                           param="messages")
            parts.append(p["text"])
        return "".join(parts)


def check_template_options(req, trusted: bool = False) -> None:
    """vLLM's checks of a chat request's template settings, with its messages, in vLLM's
    order. `trusted`: the server takes templates from requests
    (`--trust-request-chat-template`)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise InvalidRequest("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.",
                             param="continue_final_message")
    kwargs = req.chat_template_kwargs or {}
    if not trusted and (req.chat_template is not None
                        or kwargs.get("chat_template") is not None):
        raise InvalidRequest("Chat template is passed with request, but "
                             "--trust-request-chat-template is not set. "
                             "Refused request with untrusted chat template.",
                             param="chat_template")
    bad = {"chat_template", "tokenize"} & set(kwargs)
    if bad:
        raise InvalidRequest("Found unexpected chat template kwargs from request: "
                             f"{sorted(bad)}", param="chat_template_kwargs")


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text
