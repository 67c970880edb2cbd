"""pdserve's answers as vLLM's response models give them: each answer (and each streamed
chunk) is validated into vLLM's own model for it, then dumped as vLLM's server dumps it:
a whole answer with every field of the model (`model_dump()`, so a client sees vLLM's
`system_fingerprint`, `service_tier`, ... as null), a stream chunk with only the fields it
set (`exclude_unset`, as vLLM's server streams). A shape that drifts from vLLM's is then
an error in the log, not a quiet difference; the client still gets the answer.
pdserve's own extras (`kv_transfer`, `pdserve_route`, with --expose-routing) ride along:
vLLM's models keep fields they do not declare."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponse,
    CompletionStreamResponse,
)

log = logging.getLogger(__name__)


def _as_vllm(model, d: dict, **dump) -> dict:
    try:
        return model.model_validate(d).model_dump(mode="json", **dump)
    except ValidationError as e:
        log.error("an answer does not fit vLLM's %s (sent as built): %s", model.__name__, e)
        return d


def whole(d: dict, chat: bool) -> dict:
    """A unary answer, as vLLM's server sends it."""
    return _as_vllm(ChatCompletionResponse if chat else CompletionResponse, d)


def chunk(d: dict, chat: bool) -> dict:
    """One streamed chunk, as vLLM's server streams it."""
    return _as_vllm(ChatCompletionStreamResponse if chat else CompletionStreamResponse, d,
                    exclude_unset=True)
