"""OpenAI request bodies. Unknown fields are ignored with a warning, as vLLM does, except the
ones that would change the output (400; frontend/fields.py). Every number and list is
bounded here, so nothing overflows a wire field later (a 400, never a 500)."""

from __future__ import annotations

import logging
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, constr

from frontend.fields import unknown_fields
from frontend.messages import (
    MAX_TOOLS,
    ChatMessage,
    ChatTool,
    NamedToolChoice,
    check_template_options,
)
from pdserve.errors import InvalidRequest, ModelNotFound, UnsupportedParameter


log = logging.getLogger(__name__)

U32 = 2**32 - 1           # the wire's uint32 fields: token ids, token counts
I32 = 2**31 - 1


def _integral(v: object) -> object:
    """An integer as JSON Schema means it: 5 or 5.0, never 5.5, "5" or true (our OpenAPI
    document says `integer`, and vLLM's server takes 5.0 too)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("Input should be a valid integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("Input should be a valid integer, got a non-integral number")
        return int(v)
    return v


StrictInt = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[StrictInt, Field(ge=0, le=U32)]
MAX_STOPS = 64            # stop strings and stop token ids per request
Stop = constr(max_length=4096)    # empty ones: refused by stop_list, with a message


def check_model(name: str | None, served: str) -> None:
    """The request names the served model (None: names none, as the utility endpoints
    allow)."""
    if name is not None and name != served:
        raise ModelNotFound(f"the model {name!r} does not exist; this server serves "
                            f"{served!r}", param="model")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


MAX_BAD_WORDS = 128       # vLLM's VLLM_MAX_NUM_BAD_WORDS default


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=256)
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON under a schema."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""
    model_config = ConfigDict(extra="forbid")
    json_: Union[dict, str, None] = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=4096)
    choice: list[constr(min_length=1, max_length=1024)] | None = Field(
        None, min_length=1, max_length=256)
    grammar: str | None = Field(None, min_length=1, max_length=65536)
    json_object: StrictBool | None = None


MAX_SCHEMA_CHARS = 65536
MAX_TEMPLATE_CHARS = 65536   # a request's own chat template (a trusted server only)
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS (its sampler's row width)
GREEDY_EPS = 1e-5          # vLLM's _SAMPLING_EPS: a temperature below it is greedy


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: StrictInt | None = Field(None, le=I32)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1, le=I32)           # vLLM extension; 0/-1 = off
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: Union[Stop, list[Stop], None] = Field(None, max_length=MAX_STOPS)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOPS)  # vLLM extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # vLLM extension
    # vLLM extension: a tenant's prefix cache is hit only by requests with its salt
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    min_tokens: StrictInt = Field(0, ge=0, le=I32)       # vLLM extension
    n: StrictInt = Field(1, ge=1, le=64)                 # choices per prompt
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)       # accepted: opaque client metadata
    ignore_eos: StrictBool = False                       # vLLM extension (benchmarks)
    # token id (a string, as JSON keys are) -> bias added to its logit, -100..100
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # vLLM extension: the prompt's own logprobs, each token's plus the top k
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None    # vLLM extension
    # vLLM extensions, through both engines (the wire's SamplingParams)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    allowed_token_ids: list[TokenId] | None = Field(None, max_length=1 << 20)
    bad_words: list[constr(max_length=1024)] = Field([], max_length=MAX_BAD_WORDS)
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # vLLM extension: exactly these tokens' logprobs at each position, instead of the top
    logprob_token_ids: list[TokenId] | None = Field(None, max_length=MAX_LOGPROB_TOKEN_IDS)
    # vLLM extensions: the prompt's and each choice's token ids in the answer; logprobs'
    # tokens named `token_id:<id>`
    return_token_ids: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    # vLLM extension: the engine's queue order under its priority policy; pdserve's engines
    # schedule first come first served, where vLLM ignores it too
    priority: StrictInt = Field(0, ge=-2**63, le=2**63 - 1)
    # vLLM extension: keep this many prompt tokens (-1: the context less one), the last
    # ones unless truncation_side is "right" (frontend/tokens.py: Truncation)
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1, le=I32)
    truncation_side: Literal["left", "right"] | None = None

    def unknown_fields(self) -> list[str]:
        """Fields the request carried that pdserve does not know (the caller logs them);
        one that would change the output is a 400 instead (frontend/fields.py)."""
        return unknown_fields(self.model_extra or {})

    def check_common(self) -> None:
        ignored = self.unknown_fields()
        if ignored:
            log.warning("the following fields were present in the request but ignored: %s",
                        ignored)
        if self.n > 1 and self.temperature < GREEDY_EPS:    # as vLLM's SamplingParams
            raise InvalidRequest(f"n must be 1 when using greedy sampling, got {self.n}.",
                                 param="n")
        if self.prompt_logprobs and self.stream:     # as vLLM's server
            raise InvalidRequest("prompt_logprobs are not available when stream=true",
                                 param="prompt_logprobs")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true",
                                 param="stream_options")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}",
                                 param="max_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                                 f"({self.max_tokens})", param="min_tokens")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequest("allowed_token_ids is not None and empty!",   # vLLM's words
                                 param="allowed_token_ids")
        if any(not w for w in self.bad_words):
            raise InvalidRequest("bad_words cannot contain an empty string", param="bad_words")

    def logit_bias_ids(self) -> dict[int, float]:
        out = {}
        for k, v in (self.logit_bias or {}).items():
            if not k.isdigit() or int(k) > U32:
                raise InvalidRequest(f"logit_bias keys are token ids, got {k[:32]!r}",
                                     param="logit_bias")
            if not -100.0 <= v <= 100.0:
                raise InvalidRequest(f"logit_bias values are from -100 to 100, got {v}",
                                     param="logit_bias")
            out[int(k)] = float(v)
        return out

    def prompt_logprobs_k(self) -> int | None:
        """How many top logprobs each prompt token needs (None: no prompt logprobs)."""
        return self.prompt_logprobs

    def constraint(self) -> dict | None:
        """The one structured-output constraint, as the wire's StructuredOutputs fields
        (None: unconstrained); from `structured_outputs` or `response_format`, not both."""
        so, rf = self.structured_outputs, self.response_format
        if so is not None and rf is not None and rf.type != "text":
            raise InvalidRequest("give structured_outputs or response_format, not both",
                                 param="response_format")
        out: dict = {}
        if so is not None:
            if so.json_ is not None:
                out["json"] = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
            if so.regex is not None:
                out["regex"] = so.regex
            if so.choice is not None:
                out["choice"] = list(so.choice)
            if so.grammar is not None:
                out["grammar"] = so.grammar
            if so.json_object:
                out["json_object"] = True
            if len(out) != 1:
                raise InvalidRequest("structured_outputs takes exactly one of json, regex, "
                                     "choice, grammar and json_object",
                                     param="structured_outputs")
        elif rf is not None and rf.type == "json_object":
            out["json_object"] = True
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequest("response_format json_schema needs json_schema.schema",
                                     param="response_format")
            out["json"] = json.dumps(rf.json_schema.schema_)
        if "json" in out:
            if len(out["json"]) > MAX_SCHEMA_CHARS:
                raise InvalidRequest(f"the JSON schema is over {MAX_SCHEMA_CHARS} characters",
                                     param="response_format")
            try:
                if not isinstance(json.loads(out["json"]), dict):
                    raise ValueError("not an object")
            except ValueError as e:
                raise InvalidRequest(f"the JSON schema is not a JSON object: {e}",
                                     param="response_format") from None
        if "regex" in out:
            import re
            try:
                re.compile(out["regex"])
            except re.error as e:
                raise InvalidRequest(f"invalid regex: {e}",
                                     param="structured_outputs") from None
        return out or None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise InvalidRequest("stop strings must be non-empty", param="stop")
        return stops


class CompletionRequest(_Common):
    """`echo` with `logprobs` returns the prompt's logprobs ahead of the output's, as vLLM
    and lm-eval's loglikelihood tasks expect."""
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None
    add_special_tokens: StrictBool = True     # vLLM extension: the tokenizer's BOS etc.

    def check(self) -> None:
        self.check_common()
        if self.best_of not in (None, 1, self.n):
            raise UnsupportedParameter("best_of other than n is not supported",
                                       param="best_of")
        if self.suffix:
            raise UnsupportedParameter("suffix is not supported", param="suffix")
        if self.logprob_token_ids and self.logprobs is None:      # vLLM's words
            raise InvalidRequest("when using `logprob_token_ids`, `logprobs` must be set.",
                                 param="logprob_token_ids")

    def prompt_logprobs_k(self) -> int | None:
        """With echo and logprobs the prompt's logprobs come first, as vLLM gives them."""
        if self.prompt_logprobs is None and self.echo and self.logprobs is not None:
            return self.logprobs
        return self.prompt_logprobs


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(None, le=I32)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM extensions for the chat template (frontend/tokens.py renders it)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(None, max_length=MAX_TEMPLATE_CHARS)   # if trusted
    documents: list[dict[str, str]] | None = Field(None, max_length=MAX_TOOLS)
    # reaches the template (and its enable_thinking), as with vLLM's server when it runs no
    # reasoning parser
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    echo: StrictBool = False    # vLLM extension: the last message ahead, if it is the reply's
    include_reasoning: StrictBool = True    # with --reasoning-parser (frontend/reasoning.py)

    def reply_role(self) -> str:
        """The answer's role, as vLLM's server names it: the assistant's after a generation
        prompt, else the last message's (which the answer continues)."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    def echoed(self) -> str | None:
        """With echo, the text the answer starts with: the last message's, when it is in
        the answer's role (vLLM's rule), else nothing."""
        if not self.echo or not self.messages:
            return None
        last = self.messages[-1]
        return last.text() if last.role == self.reply_role() else ""

    def template_kwargs(self) -> dict[str, Any]:
        """chat_template_kwargs with what the request's own fields add, as vLLM merges
        them: reasoning_effort, and enable_thinking from it unless the client set that."""
        out = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            out.setdefault("enable_thinking", self.reasoning_effort != "none")
            out["reasoning_effort"] = self.reasoning_effort
        return out

    def check(self, trusted: bool = False) -> None:
        """`trusted`: the server takes chat templates from requests."""
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        check_template_options(self, trusted)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        if self.logprob_token_ids and not self.logprobs:      # vLLM's words
            raise InvalidRequest("when using `logprob_token_ids`, `logprobs` must be set to "
                                 "true.", param="logprob_token_ids")
        if self.tools and len(json.dumps([t.function.parameters for t in self.tools])) \
                > MAX_SCHEMA_CHARS:
            raise InvalidRequest(f"the tools' schemas are over {MAX_SCHEMA_CHARS} characters",
                                 param="tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("tool names must be unique", param="tools")

    def tools_json(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_choice_json(self) -> Any:
        tc = self.tool_choice
        return tc.model_dump() if isinstance(tc, NamedToolChoice) else tc

    def constraint(self, tool_schema: dict | None = None) -> dict | None:
        """A named or required tool choice constrains the output to its JSON schema, and
        then no other constraint may be given."""
        if tool_schema is None:
            return super().constraint()
        rf = self.response_format
        if self.structured_outputs is not None or (rf is not None and rf.type != "text"):
            raise InvalidRequest("a named or required tool_choice cannot be combined with "
                                 "response_format or structured_outputs", param="tool_choice")
        return {"json": json.dumps(tool_schema)}


class TokenizeRequest(BaseModel):
    """/tokenize, as vLLM's server takes it: a `prompt`, or chat `messages` rendered by the
    model's chat template."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None    # default: true for a prompt, false for chat
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(None, max_length=MAX_TEMPLATE_CHARS)
    documents: list[dict[str, str]] | None = Field(None, max_length=MAX_TOOLS)

    def check(self, trusted: bool = False) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give either prompt or messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        check_template_options(self, trusted)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)
