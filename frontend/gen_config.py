"""The model's default sampling parameters, as vLLM's OpenAI server takes them: from the
model's `generation_config.json` (`--generation-config auto`, vLLM's default), none
(`vllm`), or another folder's; then `--override-generation-config` on top. vLLM's own code
reads and filters them (`ModelConfig.get_diff_sampling_param`); a request's own value
always wins (vLLM's `to_sampling_params`).

`max_new_tokens` becomes the default `max_tokens` of a request that gives none; with a
folder named, or an override that sets it, it also caps every request's (vLLM's
`override_max_tokens`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class GenDefaults:
    params: dict[str, Any] = field(default_factory=dict)   # vLLM's default_sampling_params
    override_max_tokens: int | None = None

    def max_tokens(self, asked: int | None, room: int) -> int:
        """A request's max_tokens as vLLM's `get_max_tokens` settles it: what it asked
        (checked against the context by the caller), else the model's default, else the
        room the context leaves; never past the override."""
        out = asked if asked is not None else min(room, self.params.get("max_tokens", room))
        if self.override_max_tokens is not None:
            out = min(out, self.override_max_tokens)
        return out


def parse_override(text: str | dict | None) -> dict:
    if not text:
        return {}
    v = json.loads(text) if isinstance(text, str) else text
    if not isinstance(v, dict):
        raise ValueError("--override-generation-config takes a JSON object")
    return v


def load(model: str, generation_config: str = "auto", override: dict | None = None
         ) -> GenDefaults:
    """`model`: the model's folder; `generation_config`: auto, vllm or a folder."""
    from vllm.config.model import ModelConfig
    from vllm.transformers_utils.config import try_get_generation_config

    def read() -> dict:
        src = model if generation_config in ("auto", "vllm") else generation_config
        cfg = try_get_generation_config(src, trust_remote_code=False)
        return {} if cfg is None else cfg.to_diff_dict()

    # vLLM's own selection and renaming, on just the attributes it reads
    mc = SimpleNamespace(generation_config=generation_config,
                         override_generation_config=dict(override or {}),
                         try_get_generation_config=read)
    params = ModelConfig.get_diff_sampling_param(mc)
    over = (params.get("max_tokens") if generation_config not in ("auto", "vllm")
            else (override or {}).get("max_new_tokens"))
    return GenDefaults(params, over)
