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

from pdserve.errors import ContextLengthExceeded, InvalidRequest


def check_ids(ids, vocab_size: int, param: str, what: str = "token id") -> None:
    """Every id a token of the model's vocabulary, or a 400 naming the first that is not."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"{what} {bad[0]} is out of vocabulary (size {vocab_size})",
                             param=param)


class Tokenizer:
    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = len(self.tok)
        # the longest token's text: no token covers more characters of a prompt
        self.max_token_chars = max((len(t) for t in self.tok.get_vocab()), default=1) + 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat(self, messages: list[dict], add_generation_prompt: bool = True,
             add_special_tokens: bool = False, tools: list[dict] | None = None) -> list[int]:
        """`tools`: OpenAI's tool definitions, for templates that show them to the model."""
        if not self.tok.chat_template:
            raise InvalidRequest("this model has no chat template; use /v1/completions")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, tools=tools,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 (jinja2's errors, the template's raise_exception)
            raise InvalidRequest(f"the chat template refused these messages: {e}",
                                 param="messages") from None
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

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
                           add_special_tokens: bool = True) -> list[int]:
        self._fits(len(text), max_tokens, "prompt")
        return await self.run(self.encode, text, add_special_tokens)

    async def chat_async(self, messages: list[dict], max_tokens: int = 0,
                         add_generation_prompt: bool = True,
                         add_special_tokens: bool = False,
                         tools: list[dict] | None = None) -> list[int]:
        self._fits(sum(len(m["content"]) for m in messages), max_tokens, "messages")
        return await self.run(self.chat, messages, add_generation_prompt, add_special_tokens,
                              tools)
