"""The request fields of vLLM's OpenAI server that pdserve does not implement, and what
it does with each. Pure.

* REFUSED: they would change what is generated (or what the answer holds); a 400, never
  silently ignored, so a client never gets output that disregards them. Each comes with
  the values that change nothing, which are accepted, because clients send whole
  parameter sets. vLLM 0.32 ignores the old guided_* fields; refusing them tells a client
  that its constraint was not applied.
* IGNORED: vLLM knows them and, in pdserve, they change nothing; accepted without a word.
* Any other field is unknown: ignored with a warning, as vLLM does.

pdserve's request models are vLLM's (frontend/protocol.py), so every field vLLM takes is
parsed as vLLM parses it; `tests/unit/test_protocol.py` holds every one of them to one of:
implemented, REFUSED or IGNORED, so a field a new vLLM adds is noticed.
"""

from __future__ import annotations

from pdserve.errors import UnsupportedParameter

_UNSET = (None, [], {})
_OFF = (None, False)
REFUSED: dict[str, tuple] = {
    "functions": _UNSET, "function_call": _UNSET,
    "guided_json": _UNSET, "guided_regex": _UNSET, "guided_choice": _UNSET,
    "guided_grammar": _UNSET, "use_beam_search": _OFF, "prompt_embeds": _UNSET,
    "logits_processors": _UNSET, "modalities": (None, ["text"]),
    "audio": _UNSET, "prediction": _UNSET, "web_search_options": _UNSET,
    # vLLM extensions not implemented: each changes the tokens or the answer's fields
    "repetition_detection": _UNSET, "watermarking": _OFF,
    "thinking_token_budget": _UNSET, "vllm_xargs": _UNSET,
    "return_token_offsets": _OFF, "return_prompt_text": _OFF,
    # vLLM's own P/D and encoder-cache handoffs: pdserve moves KV itself
    "kv_transfer_params": _UNSET, "ec_transfer_params": _UNSET,
    "suffix": (None, ""),
}
IGNORED: dict[str, str] = {
    "user": "opaque client metadata",
    "priority": "pdserve's engines schedule first come first served, where vLLM ignores "
                "it too",
    "length_penalty": "used by beam search only",
    "stream_interval": "a stream sends each engine output as it comes",
    "request_id": "pdserve names its requests; the client's x-request-id is echoed",
    "session_id": "no session affinity beyond the prefix-aware placement",
    "media_io_kwargs": "the models served take text only",
    "mm_processor_kwargs": "the models served take text only",
    "mm_payload": "the models served take text only: no multimodal data to return",
    "best_of": "OpenAI's legacy field, not vLLM's: accepted equal to n (else a 400)",
    "return_mm_kwargs": "the models served take text only: no multimodal data to return",
    "routed_experts_prompt_start": "no routed-expert data is returned",
}


# what vLLM's request models carry and pdserve carries out, through both engines
IMPLEMENTED = frozenset({
    "model", "prompt", "messages", "n", "stream", "stream_options", "echo",
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "ignore_eos", "logit_bias", "allowed_token_ids",
    "bad_words", "logprobs", "top_logprobs", "prompt_logprobs", "logprob_token_ids",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "return_token_ids", "return_tokens_as_token_ids", "response_format",
    "structured_outputs", "cache_salt", "truncate_prompt_tokens", "truncation_side",
    "add_special_tokens", "tools", "tool_choice", "parallel_tool_calls",
    "add_generation_prompt", "continue_final_message", "chat_template",
    "chat_template_kwargs", "documents", "reasoning_effort", "include_reasoning",
})


def refused_or_unknown(req) -> list[str]:
    """A 400 for the first field the request set that pdserve refuses at that value; else
    the fields no model declares (vLLM's or pdserve's), for the caller to log as ignored."""
    extra = req.model_extra or {}
    declared = type(req).model_fields
    sent = {k: getattr(req, k) for k in req.model_fields_set if k in declared}
    sent.update(extra)
    refused = [k for k in sorted(sent) if k in REFUSED and sent[k] not in REFUSED[k]]
    if refused:
        raise UnsupportedParameter(f"unsupported parameter: {refused[0]}", param=refused[0])
    return [k for k in sorted(extra) if k not in REFUSED and k not in IGNORED]
