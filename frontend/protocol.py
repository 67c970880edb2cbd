"""OpenAI request bodies: vLLM's own request models (`CompletionRequest`,
`ChatCompletionRequest`), with their fields, defaults and checks, and vLLM's
`to_sampling_params`, which merges a request with the model's generation-config defaults.
What pdserve adds is small: the bounds of the wire fields a request ends in (a 400,
never an overflow later), the fields it refuses (frontend/fields.py), a guard that makes
a malformed body a 400 wherever vLLM's validators would trip on it, and chat messages in
the text-only shape its disaggregated path renders (frontend/messages.py)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Union

from pydantic import ConfigDict, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest as VllmDetokenize
from vllm.entrypoints.serve.tokenize.protocol import (
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from frontend.fields import refused_or_unknown
from frontend.messages import MAX_TOOLS, ChatMessage, check_template_options
from pdserve.errors import InvalidRequest, ModelNotFound, UnsupportedParameter


log = logging.getLogger(__name__)

U32 = 2**32 - 1           # the wire's uint32 fields: token ids, token counts
I32 = 2**31 - 1
MAX_STOPS = 64            # stop token ids per request (vLLM bounds the stop strings)
MAX_STOP_CHARS = 4096
MAX_BAD_WORDS = 128       # vLLM's VLLM_MAX_NUM_BAD_WORDS default
MAX_BAD_WORD_CHARS = 1024
MAX_LOGPROBS = 20         # vLLM's --max-logprobs default: top logprobs per position
MAX_LOGIT_BIAS = 1024
MAX_ALLOWED_IDS = 1 << 20
MAX_SCHEMA_CHARS = 65536
MAX_TEMPLATE_CHARS = 65536   # a request's own chat template (a trusted server only)
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS (its sampler's row width)
MALFORMED = (TypeError, KeyError, AttributeError, IndexError)


def check_model(name: str | None, served: str) -> None:
    """The request names the served model (None: names none, as vLLM allows)."""
    if name is not None and name != served:
        raise ModelNotFound(f"the model {name!r} does not exist; this server serves "
                            f"{served!r}", param="model")


def _count(name: str, items, most: int, longest: int | None = None) -> None:
    if items is None:
        return
    if len(items) > most:
        raise InvalidRequest(f"{name}: at most {most} items, got {len(items)}", param=name)
    if longest is not None and any(len(x) > longest for x in items):
        raise InvalidRequest(f"{name}: each at most {longest} characters", param=name)


def tools_json(tools) -> list[dict] | None:
    """vLLM's tool definitions as the chat template and the tool plan take them."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def _range(name: str, v: int | None, lo: int, hi: int) -> None:
    if v is not None and not lo <= v <= hi:
        raise InvalidRequest(f"{name} must be from {lo} to {hi}, got {v}", param=name)


_PARAM = re.compile(r"^(\w+) must ")


def _refusal(e: Exception) -> InvalidRequest:
    """vLLM's refusal as pdserve's 400: vLLM's message, the parameter it names (or the
    one its message starts with: "min_p must be in [0, 1]")."""
    msg = str(e.args[0]) if e.args else str(e)
    param = getattr(e, "parameter", None)
    if param is None and (m := _PARAM.match(msg)):
        param = m.group(1)
    return InvalidRequest(msg, param=param)


class _Guarded:
    """Mixed in ahead of a vLLM request model: its refusals are pdserve's 400s."""

    @model_validator(mode="wrap")
    @classmethod
    def _malformed_is_a_400(cls, data, handler):
        """vLLM's before-validators index the raw body (`tool["function"]["name"]`); a body
        of the wrong shape must be a 400 there, not a TypeError (a 500)."""
        try:
            return handler(data)
        except VLLMValidationError as e:     # vLLM's own refusal: a 400 with its words
            raise _refusal(e) from None
        except MALFORMED as e:
            raise InvalidRequest(f"malformed request body: {type(e).__name__}: {e}") from None


class _Pdserve(_Guarded):
    """pdserve's part of a generation request model; mixed in ahead of vLLM's model."""

    def check_common(self) -> None:
        ignored = refused_or_unknown(self)
        if ignored:
            log.warning("the following fields were present in the request but ignored: %s",
                        ignored)
        if self.n is None:
            self.n = 1
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("Stream options can only be defined when `stream=True`.",
                                 param="stream_options")
        _count("stop", self.stop_list, MAX_STOPS, MAX_STOP_CHARS)
        if any(not s for s in self.stop_list):
            raise InvalidRequest("stop strings must be non-empty", param="stop")
        _count("stop_token_ids", self.stop_token_ids, MAX_STOPS)
        _count("bad_words", self.bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_CHARS)
        if any(not w for w in self.bad_words):
            raise InvalidRequest("bad_words cannot contain an empty string", param="bad_words")
        _count("logit_bias", self.logit_bias, MAX_LOGIT_BIAS)
        _count("allowed_token_ids", self.allowed_token_ids, MAX_ALLOWED_IDS)
        _count("logprob_token_ids", self.logprob_token_ids, MAX_LOGPROB_TOKEN_IDS)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequest("allowed_token_ids is not None and empty!",   # vLLM's words
                                 param="allowed_token_ids")
        _range("top_k", self.top_k, -1, I32)
        _range("min_tokens", self.min_tokens, 0, I32)
        _range("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        for name in ("stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
            for t in getattr(self, name) or ():
                _range(name, t, 0, U32)

    def sampling(self, max_tokens: int, defaults: dict) -> SamplingParams:
        """vLLM's SamplingParams for this request, as vLLM's server builds them (the
        request, else the model's generation-config `defaults`, else OpenAI's); vLLM's
        own checks of them are 400s."""
        try:
            return self.to_sampling_params(max_tokens, defaults)
        except (VLLMValidationError, ValueError) as e:
            raise _refusal(e) from None

    def constraint(self, sp: SamplingParams) -> dict | None:
        """The one structured-output constraint vLLM derived (from `structured_outputs`
        or `response_format`), as the wire's StructuredOutputs fields (None: none)."""
        so = sp.structured_outputs
        if so is None:
            return None
        if so.structural_tag is not None or so.whitespace_pattern is not None \
                or so.disable_any_whitespace or so.disable_additional_properties:
            raise UnsupportedParameter("structural tags and structured-output whitespace "
                                       "options are not supported", param="structured_outputs")
        out: dict = {}
        if so.json is not None:
            out["json"] = so.json if isinstance(so.json, str) else json.dumps(so.json)
        if so.regex is not None:
            out["regex"] = so.regex
        if so.choice is not None:
            if not so.choice or any(not isinstance(c, str) or not c for c in so.choice):
                raise InvalidRequest("structured_outputs.choice: non-empty strings",
                                     param="structured_outputs")
            out["choice"] = list(so.choice)
        if so.grammar is not None:
            out["grammar"] = so.grammar
        if so.json_object:
            out["json_object"] = True
        if len(out) != 1:
            raise InvalidRequest("structured_outputs takes exactly one of json, regex, "
                                 "choice, grammar and json_object",
                                 param="structured_outputs")
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
            try:
                re.compile(out["regex"])
            except re.error as e:
                raise InvalidRequest(f"invalid regex: {e}",
                                     param="structured_outputs") from None
        return out

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Pdserve, VllmCompletion):
    """vLLM's completion request. `echo` with `logprobs` returns the prompt's logprobs
    ahead of the output's, as vLLM and lm-eval's loglikelihood tasks expect; with
    `max_tokens: 0` the prompt alone (vLLM computes one token and shows none)."""

    @property
    def echo_only(self) -> bool:
        return bool(self.echo) and self.max_tokens == 0

    def check(self) -> None:
        self.check_common()
        if self.prompt is None:
            raise InvalidRequest("a prompt is needed (prompt_embeds are not supported)",
                                 param="prompt")
        _range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if (self.model_extra or {}).get("best_of") not in (None, 1, self.n):
            raise UnsupportedParameter("best_of other than n is not supported",
                                       param="best_of")


class ChatRequest(_Pdserve, ChatCompletionRequest):
    """vLLM's chat request, with messages in the text-only shape pdserve's chat template
    path renders (frontend/messages.py)."""
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage]
    # vLLM's, less its deprecation warning on every read (check() folds
    # max_completion_tokens into it, as vLLM's server reads the two)
    max_tokens: int | None = None

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
        effort = self.reasoning_effort
        if effort is not None:
            out.setdefault("enable_thinking", effort != "none")
            out["reasoning_effort"] = effort
        return out

    def check(self, trusted: bool = False) -> None:
        """`trusted`: the server takes chat templates from requests."""
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        check_template_options(self, trusted)
        if self.chat_template is not None and len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise InvalidRequest(f"chat_template: at most {MAX_TEMPLATE_CHARS} characters",
                                 param="chat_template")
        _count("documents", self.documents, MAX_TOOLS)
        _count("tools", self.tools, MAX_TOOLS)
        _range("top_logprobs", self.top_logprobs, 0, MAX_LOGPROBS)
        if self.tools and len(json.dumps(self.tools_json())) > MAX_SCHEMA_CHARS:
            raise InvalidRequest(f"the tools' schemas are over {MAX_SCHEMA_CHARS} characters",
                                 param="tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("tool names must be unique", param="tools")

    def tools_json(self) -> list[dict] | None:
        return tools_json(self.tools)

    def tool_choice_json(self) -> Any:
        tc = self.tool_choice
        return tc if tc is None or isinstance(tc, str) else tc.model_dump()

    def constraint(self, sp: SamplingParams, tool_schema: dict | None = None) -> dict | None:
        """A named or required tool choice constrains the output to its JSON schema, and
        then no other constraint may be given."""
        if tool_schema is None:
            return super().constraint(sp)
        if sp.structured_outputs is not None:
            raise InvalidRequest("a named or required tool_choice cannot be combined with "
                                 "response_format or structured_outputs", param="tool_choice")
        return {"json": json.dumps(tool_schema)}


class TokenizePrompt(_Guarded, TokenizeCompletionRequest):
    """vLLM's /tokenize of a prompt."""

    def check(self, trusted: bool = False) -> None:
        if "messages" in (self.model_extra or {}):
            raise InvalidRequest("give either prompt or messages", param="prompt")


class TokenizeChat(_Guarded, TokenizeChatRequest):
    """vLLM's /tokenize of chat messages, rendered by the chat template as generation
    renders them."""
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage]

    def check(self, trusted: bool = False) -> None:
        if "prompt" in (self.model_extra or {}):
            raise InvalidRequest("give either prompt or messages", param="prompt")
        if not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        check_template_options(self, trusted)
        _count("tools", self.tools, MAX_TOOLS)


TokenizeRequest = Union[TokenizePrompt, TokenizeChat]


class DetokenizeRequest(_Guarded, VllmDetokenize):
    """vLLM's /detokenize."""
