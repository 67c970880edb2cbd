"""The request fields of vLLM's OpenAI server that pdserve does not implement, and what
it does with each. Pure.

* REFUSED: they would change what is generated (or what the answer holds); a 400, never
  silently ignored, so a client never gets output that disregards them. Each comes with
  the values that change nothing, which are accepted, because clients send whole
  parameter sets. vLLM 0.32 ignores the old guided_* fields; refusing them tells a client
  that its constraint was not applied.
* IGNORED: vLLM knows them and, in pdserve, they change nothing; accepted without a word.
* Any other field is unknown: ignored with a warning, as vLLM does.

`tests/unit/test_protocol.py` holds every field of vLLM's request models to one of:
implemented (frontend/protocol.py), REFUSED or IGNORED, so a field a new vLLM adds is
noticed.
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
    "thinking_token_budget": _UNSET, "vllm_xargs": _UNSET, "mm_payload": _UNSET,
    "return_token_offsets": _OFF, "return_prompt_text": _OFF, "return_mm_kwargs": _OFF,
    # vLLM's own P/D and encoder-cache handoffs: pdserve moves KV itself
    "kv_transfer_params": _UNSET, "ec_transfer_params": _UNSET,
}
IGNORED: dict[str, str] = {
    "length_penalty": "used by beam search only",
    "stream_interval": "a stream sends each engine output as it comes",
    "request_id": "pdserve names its requests; the client's x-request-id is echoed",
    "session_id": "no session affinity beyond the prefix-aware placement",
    "media_io_kwargs": "the models served take text only",
    "mm_processor_kwargs": "the models served take text only",
    "routed_experts_prompt_start": "no routed-expert data is returned",
}


def unknown_fields(extra: dict) -> list[str]:
    """Of a request's fields that pdserve's models do not declare, those to log as
    ignored; a 400 for the first that would change the output."""
    refused = [k for k in sorted(extra) if k in REFUSED and extra[k] not in REFUSED[k]]
    if refused:
        raise UnsupportedParameter(f"unsupported parameter: {refused[0]}", param=refused[0])
    return [k for k in sorted(extra) if k not in REFUSED and k not in IGNORED]
