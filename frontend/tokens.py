"""The frontend's tokenizer: off the event loop, and cheap to refuse what cannot fit.

Tokenization and chat templating run on one worker thread (a Hugging Face tokenizer is not
safe to share between threads mid-call), so a long prompt never stalls the other streams'
event loop. A text whose length alone proves it cannot fit the context (a token covers at
most `max_token_chars` characters) is refused before it is tokenized at all: a 20 MB prompt
costs a comparison, not seconds of tokenizing.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pdserve.errors import ContextLengthExceeded, InvalidRequest


def check_ids(ids, vocab_size: int, param: str, what: str = "token id") -> None:
    """Every id a token of the model's vocabulary, or a 400 naming the first that is not."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"{what} {bad[0]} is out of vocabulary (size {vocab_size})",
                             param=param)


TEMPLATES_KEPT = 16         # templates whose variables are remembered (the server's, requests')
# what apply_chat_template sets itself: never taken from chat_template_kwargs
RESERVED_TEMPLATE_VARS = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "chat_template", "tokenize", "raise_exception"})


@dataclass(frozen=True)
class ChatOptions:
    """vLLM's chat-template extensions of a request."""
    continue_final_message: bool = False
    documents: list[dict] | None = None
    kwargs: dict[str, Any] | None = None      # chat_template_kwargs
    template: str | None = None               # the request's own template (trusted only)


def developer_as_system(messages: list[dict], template: str) -> list[dict]:
    """OpenAI's `developer` messages, for a template that does not name the role, as
    vLLM's renderer gives them: as `system`, every system message then merged into one
    at the start (vLLM's own functions)."""
    if not any(m["role"] == "developer" for m in messages):
        return messages
    from vllm.renderers.hf import (_consolidate_system_messages, _convert_developer_to_system,
                                   _detect_developer_role_support)
    if _detect_developer_role_support(template):
        return messages
    return _consolidate_system_messages(_convert_developer_to_system(messages))


def merge_kwargs(defaults: dict[str, Any] | None, request: dict[str, Any] | None) -> dict:
    """The server's default template kwargs under the request's, whose None and "auto"
    values leave the default (vLLM's `merge_kwargs`); with no defaults, the request's as
    they are (vLLM's `ChatParams.with_defaults` merges nothing then)."""
    if not defaults:
        return dict(request or {})
    return defaults | {k: v for k, v in (request or {}).items()
                       if v is not None and v != "auto"}


def load_chat_template(spec: str) -> str:
    """`--chat-template`, as vLLM's server reads it: a file's path, else the template itself
    (a string with Jinja's braces or a newline)."""
    try:
        with open(spec) as f:
            return f.read()
    except OSError as e:
        if not any(c in spec for c in "{}\n"):
            raise SystemExit(f"--chat-template {spec!r} looks like a file path, but it "
                             f"failed to be opened: {e}") from None
        return spec


@dataclass(frozen=True)
class Truncation:
    """vLLM's `truncate_prompt_tokens` and `truncation_side` for a generative model: keep
    `tokens` of the prompt, the last ones unless `side` is "right". With no side given, a
    text is truncated by the tokenizer itself (special tokens kept), as vLLM's renderer
    asks it to; with one, the tokens are sliced."""
    tokens: int
    side: str | None = None

    @classmethod
    def of(cls, k: int | None, side: str | None, max_model_len: int) -> Truncation | None:
        if k is None:
            return None
        if k > max_model_len:               # vLLM's words
            raise InvalidRequest(f"truncate_prompt_tokens={k} cannot be greater than "
                                 f"max_model_len = {max_model_len}. Please request a smaller "
                                 "truncation size.", param="truncate_prompt_tokens")
        # -1: the context less one token, so that one can be generated
        return cls(max_model_len - 1 if k < 0 else k, side)


class Tokenizer:
    """`chat_template`: the server's template instead of the model's (`--chat-template`);
    `default_kwargs`: template kwargs under every request's (`--default-chat-template-kwargs`)."""

    def __init__(self, model_dir: str, chat_template: str | None = None,
                 default_kwargs: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer

        # vLLM loads a generative model's tokenizer to truncate on the left
        self.tok = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
        self.template = chat_template or None      # None: the model's own
        self.default_kwargs = dict(default_kwargs or {})
        self.vocab_size = len(self.tok)
        # the longest token's text: no token covers more characters of a prompt
        self.max_token_chars = max((len(t) for t in self.tok.get_vocab()), default=1) + 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._template_vars: dict[str, frozenset] = {}    # template -> what it reads

    def encode(self, text: str, add_special_tokens: bool = True,
               trunc: Truncation | None = None) -> list[int]:
        if trunc is not None and trunc.side is None:
            return self.tok(text, add_special_tokens=add_special_tokens, truncation=True,
                            max_length=trunc.tokens)["input_ids"]
        return self.truncate(self.tok(text, add_special_tokens=add_special_tokens)
                             ["input_ids"], trunc)

    def truncate(self, ids: list[int], trunc: Truncation | None) -> list[int]:
        """Token ids truncated as vLLM truncates them (the tokenizer's side by default)."""
        if trunc is None or trunc.tokens >= len(ids):
            return ids
        if trunc.tokens == 0:
            return []
        side = trunc.side or self.tok.truncation_side
        return ids[-trunc.tokens:] if side == "left" else ids[:trunc.tokens]

    def chat(self, messages: list[dict], add_generation_prompt: bool = True,
             add_special_tokens: bool = False, tools: list[dict] | None = None,
             opts: ChatOptions | None = None, trunc: Truncation | None = None) -> list[int]:
        """`tools`: OpenAI's tool definitions, for templates that show them to the model.
        `opts`: the request's other template settings (vLLM's extensions)."""
        text = self.chat_text(messages, add_generation_prompt, tools, opts)
        return self.encode(text, add_special_tokens, trunc)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True,
                  tools: list[dict] | None = None, opts: ChatOptions | None = None) -> str:
        """The chat template's rendering of `messages` (chat's text before tokenizing)."""
        opts = opts or ChatOptions()
        template = opts.template or self.template
        if not (template or self.tok.chat_template):
            raise InvalidRequest("this model has no chat template; use /v1/completions")
        try:
            if template is None:    # the model's (one of its named ones, with tools)
                template = self.tok.get_chat_template(None, tools)
            messages = developer_as_system(messages, template)
            return self.tok.apply_chat_template(
                messages, tokenize=False, tools=tools, documents=opts.documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=opts.continue_final_message, chat_template=template,
                **self.template_kwargs(merge_kwargs(self.default_kwargs, opts.kwargs),
                                       template))
        except Exception as e:  # noqa: BLE001 (jinja2's errors, the template's raise_exception)
            raise InvalidRequest(f"the chat template refused these messages: {e}",
                                 param="messages") from None

    def template_kwargs(self, kwargs: dict | None, template: str | None = None) -> dict:
        """The `chat_template_kwargs` that `template` (the server's by default) reads, as
        vLLM keeps them (others are dropped); never one that would override what the
        request itself sets (the messages, tools, documents, the generation prompt)."""
        if not kwargs:
            return {}
        if template is None:
            template = self.template or self.tok.get_chat_template(None, None)
        reads = self._template_vars.get(template)
        if reads is None:
            import jinja2
            from jinja2 import meta
            try:    # Hugging Face renders with the loop-controls extension
                env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
                found = meta.find_undeclared_variables(env.parse(template))
            except jinja2.TemplateError:
                found = set()
            if len(self._template_vars) >= TEMPLATES_KEPT:    # requests' own templates
                self._template_vars.pop(next(iter(self._template_vars)))
            reads = self._template_vars[template] = frozenset(found - RESERVED_TEMPLATE_VARS)
        return {k: v for k, v in kwargs.items() if k in reads}

    def token_strs(self, ids: list[int]) -> list[str]:
        return self.tok.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    async def run(self, fn, *args):
        """`fn(*args)` on the tokenizer's thread (the event loop never tokenizes)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def token_bytes(self, token: str) -> list[int]:
        return list(token.encode("utf-8"))

    def _fits(self, chars: int, max_tokens: int, param: str) -> None:
        if max_tokens and chars > max_tokens * self.max_token_chars:
            raise ContextLengthExceeded(
                f"the prompt ({chars} characters) cannot fit this model's maximum context "
                f"length of {max_tokens} tokens", param=param)

    async def encode_async(self, text: str, max_tokens: int = 0,
                           add_special_tokens: bool = True,
                           trunc: Truncation | None = None) -> list[int]:
        """With truncation nothing is too long; with a side given, the text is first cut to
        what the context could hold, from that side, as vLLM's renderer cuts it."""
        if trunc is None:
            self._fits(len(text), max_tokens, "prompt")
        elif trunc.side is not None and max_tokens:
            most = max_tokens * self.max_token_chars
            text = text[-most:] if trunc.side == "left" else text[:most]
        return await self.run(self.encode, text, add_special_tokens, trunc)

    async def chat_async(self, messages: list[dict], max_tokens: int = 0,
                         add_generation_prompt: bool = True,
                         add_special_tokens: bool = False,
                         tools: list[dict] | None = None,
                         opts: ChatOptions | None = None,
                         trunc: Truncation | None = None) -> list[int]:
        if trunc is None:
            self._fits(sum(len(m["content"]) for m in messages), max_tokens, "messages")
        return await self.run(self.chat, messages, add_generation_prompt, add_special_tokens,
                              tools, opts, trunc)
