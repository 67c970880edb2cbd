"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from frontend.client import Chunk, ClusterClient, to_error
from frontend import security, tokenize_api
from frontend.protocol import ChatRequest, CompletionRequest, check_model
from frontend.timing import Timing
from frontend.tokens import Tokenizer, check_ids
from pdserve import auth, metrics as M
from pdserve.config import FrontendConfig
from pdserve.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    PDError,
    UnsupportedParameter,
)
from pdserve.rpc import pd_pb2

log = logging.getLogger(__name__)


def _public(err: PDError, rid: str) -> dict:
    """The error body a client sees: a 500's detail stays in the log, under the request id."""
    if err.mapping.http_status != 500:
        return err.openai_body()
    log.error("request %s: internal error: %s", rid, err.message)
    return PDError(f"internal server error (request id {rid})", kind=err.kind).openai_body()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(cfg: FrontendConfig, client: ClusterClient | None = None,
               tokenizer: Tokenizer | None = None) -> FastAPI:
    app = FastAPI(title="pdserve", version="0.1.0")
    security.install(app, cfg.api_keys, cfg.protect_metrics, cfg.allowed_origins,
                     cfg.max_body_bytes, cfg.max_inflight)
    state: dict[str, Any] = {"client": client, "tok": tokenizer}
    slo = (cfg.ttft_slo_ms / 1e3, cfg.tpot_slo_ms / 1e3)
    M.SLO_SECONDS.labels("ttft").set(slo[0])
    M.SLO_SECONDS.labels("tpot").set(slo[1])

    @app.on_event("startup")
    async def _startup() -> None:
        if state["client"] is None:
            state["client"] = ClusterClient(cfg.scheduler_address, kv_mode=cfg.kv_mode,
                                            creds=auth.from_env(auth.FRONTEND))
        if state["tok"] is None:
            state["tok"] = Tokenizer(cfg.model)
        log.info("frontend serving model %s on http://%s:%d (scheduler %s)",
                 cfg.served_model_name, cfg.host, cfg.port, cfg.scheduler_address)

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        if state["client"] is not None:
            await state["client"].close()

    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.rid = rid
        response = await call_next(request)
        response.headers.setdefault("x-request-id", rid)
        return response

    def _error(request: Request, err: PDError, endpoint: str) -> JSONResponse:
        M.REQUESTS.labels(endpoint, str(err.mapping.http_status)).inc()
        rid = getattr(request.state, "rid", "")
        headers = {"x-request-id": rid}
        if isinstance(err, Overloaded):
            headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        return JSONResponse(_public(err, rid), status_code=err.mapping.http_status,
                            headers=headers)

    @app.exception_handler(PDError)
    async def _pd_error(request: Request, exc: PDError):
        return _error(request, exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "extra_forbidden":
            err: PDError = UnsupportedParameter(f"unsupported parameter: {'.'.join(loc)}",
                                                param=".".join(loc))
        elif first.get("type") == "json_invalid":
            err = InvalidRequest(f"malformed JSON body: {first.get('msg', '')}")
        elif loc[:1] == ["prompt"] and len(loc) > 1 and not loc[1].isdigit():
            # every shape of the union failed; pydantic names the first (`prompt.str`)
            err = InvalidRequest("prompt must be a string, a list of strings, a list of token "
                                 "ids or a list of lists of token ids (ids: integers from 0)",
                                 param="prompt")
        else:
            err = InvalidRequest(
                f"invalid request: {'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                param=".".join(loc) or None)
        return _error(request, err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals (a body that is not UTF-8 JSON, an unknown path, a
        wrong method) in OpenAI's error shape too, never `{"detail": ...}`."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind,
                                       "param": None, "code": None}},
                            status_code=exc.status_code,
                            headers={**(exc.headers or {}),
                                     "x-request-id": getattr(request.state, "rid", "")})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(request, to_error(exc), request.url.path)

    @app.get("/health")
    async def health():
        try:
            ws = await state["client"].list_workers()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unhealthy", "reason": f"scheduler: {e}"}, 503)
        roles = [w.role for w in ws.workers]
        mixed = roles.count(pd_pb2.ROLE_MIXED)          # a mixed worker does both
        prefill, decode = roles.count(pd_pb2.ROLE_PREFILL) + mixed, \
            roles.count(pd_pb2.ROLE_DECODE) + mixed
        ok = prefill > 0 and decode > 0
        body = {"status": "ok" if ok else "unhealthy", "prefill_workers": prefill,
                "decode_workers": decode, "mixed_workers": mixed}
        return JSONResponse(body, 200 if ok else 503)

    tokenize_api.install(app, cfg, state, health)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sd/targets")
    async def sd_targets():
        """Prometheus HTTP service discovery (http_sd_configs): every registered worker's
        metrics endpoint, from the scheduler, labelled by role and worker id."""
        try:
            ws = await state["client"].list_workers()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"error": f"scheduler: {e}"}, 503)
        roles = {pd_pb2.ROLE_PREFILL: "prefill", pd_pb2.ROLE_DECODE: "decode",
                 pd_pb2.ROLE_MIXED: "mixed"}
        return [{"targets": [w.metrics_address],
                 "labels": {"pdserve_role": roles.get(w.role, "unknown"),
                            "pdserve_worker": w.worker_id}}
                for w in ws.workers if w.metrics_address]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": cfg.max_model_len}]}

    def _sampling(req, max_tokens: int, logprobs: int) -> pd_pb2.SamplingParams:
        check_ids(req.stop_token_ids or (), state["tok"].vocab_size, "stop_token_ids",
                  "stop token id")
        sp = pd_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), stop=req.stop_list,
            stop_token_ids=req.stop_token_ids or [], presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logprobs=logprobs,
            ignore_eos=req.ignore_eos, repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens)
        if req.seed is not None:
            sp.seed = req.seed
        if req.cache_salt:
            sp.cache_salt = req.cache_salt
        return sp

    def _budget(req, prompt_ids: list[int], default: int | None) -> int:
        check_model(req.model, cfg.served_model_name)
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if n >= cfg.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the "
                f"prompt has {n}", param="prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else (
            default if default is not None else cfg.max_model_len - n)
        if n + max_tokens > cfg.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the "
                f"prompt ({n}) plus max_tokens ({max_tokens}) exceeds it", param="max_tokens")
        return max_tokens

    async def _run(rid: str, prompt_ids: list[int], sp: pd_pb2.SamplingParams
                   ) -> AsyncIterator[Chunk]:
        client: ClusterClient = state["client"]
        async for ch in client.generate(rid, cfg.served_model_name, prompt_ids, sp,
                                        cfg.request_timeout_s):
            yield ch

    # ------------------------------------------------------------------ completions

    def _cmpl_logprobs(chunks: list[Chunk], offset0: int, k: int) -> dict | None:
        toks, lps, tops, offs = [], [], [], []
        off = offset0
        for ch in chunks:
            for lp in ch.logprobs:
                toks.append(lp.token)
                lps.append(lp.logprob)
                tops.append({t.token: t.logprob for t in lp.top} if k > 0 else None)
                offs.append(off)
                off += len(lp.token)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _kv_info(ch: Chunk | None) -> dict | None:
        if ch is None or ch.kv_transfer is None:
            return None
        k = ch.kv_transfer
        if k.mode == "push":
            return {"mode": "push", "bytes": k.bytes, "status": k.status, "tokens": k.tokens,
                    "seconds": round(k.read_seconds, 6),    # first WRITE -> last landed
                    "exposed_seconds": round(k.exposed_seconds, 6),
                    "hidden_share": round(1 - k.exposed_seconds / k.read_seconds, 3)
                    if k.read_seconds > 0 else None,
                    "post_seconds": round(k.post_seconds, 6),
                    "prep_seconds": round(k.prep_seconds, 6),
                    "writes": k.writes, "descriptors": k.descriptors,
                    "wait_seconds": round(k.seconds, 6),
                    **({"reason": k.reason} if k.reason else {}),
                    **({"checksummed": True} if k.checksummed else {})}
        return {"bytes": k.bytes, "seconds": round(k.seconds, 6),
                "read_seconds": round(k.read_seconds, 6),
                "prep_seconds": round(k.prep_seconds, 6),
                "read_cpu_seconds": round(k.read_cpu_seconds, 6),
                "gbps": round(k.bytes / k.seconds / 1e9, 3) if k.seconds > 0 else None,
                "read_gbps": round(k.bytes / k.read_seconds / 1e9, 3)
                if k.read_seconds > 0 else None,
                "descriptors": k.descriptors, "tokens": k.tokens, "status": k.status,
                **({"reason": k.reason} if k.reason else {}),
                **({"checksummed": True} if k.checksummed else {}),
                **({"relayout_seconds": round(k.relayout_seconds, 6)}
                   if k.relayout_seconds else {})}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        tok: Tokenizer = state["tok"]
        p = body.prompt
        if isinstance(p, str):
            ids = await tok.encode_async(p, cfg.max_model_len)
        elif p and isinstance(p[0], str):
            if len(p) != 1:
                raise UnsupportedParameter("only one prompt per request", param="prompt")
            ids = await tok.encode_async(p[0], cfg.max_model_len)
        elif p and isinstance(p[0], list):
            if len(p) != 1:
                raise UnsupportedParameter("only one prompt per request", param="prompt")
            ids = list(p[0])
        else:
            ids = list(p)
        check_ids(ids, tok.vocab_size, "prompt")
        max_tokens = _budget(body, ids, 16)
        lp = body.logprobs if body.logprobs is not None else -1
        sp = _sampling(body, max_tokens, lp)
        rid = f"cmpl-{uuid.uuid4().hex}"     # ours: never the client's x-request-id
        created = int(time.time())
        M.PROMPT_TOKENS.inc(len(ids))
        if body.stream:
            return await _stream(request, "/v1/completions", rid, ids, sp, body, created, chat=False)
        return await _unary(request, "/v1/completions", rid, ids, sp, body, created, chat=False)

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.check()
        tok: Tokenizer = state["tok"]
        ids = await tok.chat_async([m.for_template() for m in body.messages],
                                   cfg.max_model_len)
        max_tokens = _budget(body, ids, None)
        k = body.top_logprobs or 0
        sp = _sampling(body, max_tokens, k if body.logprobs else -1)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        M.PROMPT_TOKENS.inc(len(ids))
        if body.stream:
            return await _stream(request, "/v1/chat/completions", rid, ids, sp, body, created,
                           chat=True)
        return await _unary(request, "/v1/chat/completions", rid, ids, sp, body, created,
                            chat=True)

    def _chat_logprobs(chunks: list[Chunk], tok: Tokenizer) -> dict:
        content = []
        for ch in chunks:
            for lp in ch.logprobs:
                content.append({
                    "token": lp.token, "logprob": lp.logprob, "bytes": tok.token_bytes(lp.token),
                    "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                                      "bytes": tok.token_bytes(t.token)} for t in lp.top]})
        return {"content": content}

    def _usage(n_prompt: int, n_gen: int, cached: int = 0) -> dict:
        u = {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
             "total_tokens": n_prompt + n_gen}
        if cfg.enable_prompt_tokens_details:   # as vLLM: off by default (says what others sent)
            u["prompt_tokens_details"] = {"cached_tokens": cached}
        return u

    async def _unary(request, endpoint, rid, ids, sp, body, created, chat: bool):
        timing = Timing(slo)
        M.INFLIGHT.inc()
        chunks: list[Chunk] = []

        async def collect():
            async for ch in _run(rid, ids, sp):
                timing.tokens(len(ch.token_ids))
                chunks.append(ch)

        try:
            # a client that hangs up cancels the work (the workers abort and free their
            # KV), as a streaming client does: the body is read, so the next message
            # from the server is the disconnect
            if not await _unless_disconnected(request, collect()):
                log.info("%s: client disconnected, request cancelled", rid)
                return Response(status_code=499)
        finally:
            M.INFLIGHT.dec()
        timing.done()
        text = "".join(c.text for c in chunks)
        n_gen = sum(len(c.token_ids) for c in chunks)
        finish = chunks[-1].finish_reason if chunks else "stop"
        last = chunks[-1] if chunks else None
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": _chat_logprobs(chunks, state["tok"]) if body.logprobs else None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text,
                      "logprobs": _cmpl_logprobs(chunks, 0, body.logprobs or 0)
                      if body.logprobs is not None else None,
                      "finish_reason": finish}
            obj = "text_completion"
        M.REQUESTS.labels(endpoint, "200").inc()
        resp = {"id": rid, "object": obj, "created": created, "model": cfg.served_model_name,
                "choices": [choice],
                "usage": _usage(len(ids), n_gen, sum(c.cached_tokens for c in chunks))}
        # internal routing details only when the operator asked for them (--expose-routing)
        kv = _kv_info(last) if cfg.expose_routing else None
        if kv:
            resp["kv_transfer"] = kv
        headers = {"x-request-id": request.state.rid}
        route = next((c.route for c in chunks if c.route), "") if cfg.expose_routing else ""
        if route:
            headers["x-pdserve-route"] = route
        if kv:
            headers["x-kv-transfer-seconds"] = str(kv["seconds"])
            headers["x-kv-transfer-bytes"] = str(kv["bytes"])
        return JSONResponse(resp, headers=headers)

    async def _unless_disconnected(request, work) -> bool:
        """Run `work`; False (and `work` cancelled) if the client disconnects first."""
        task = asyncio.ensure_future(work)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watch.cancel()
            raise
        watch.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):   # noqa: BLE001 - the client is gone
                pass
            return False
        task.result()    # re-raise what the work raised
        return True

    async def _stream(request, endpoint, rid, ids, sp, body, created, chat: bool):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"
        tok: Tokenizer = state["tok"]

        def chunk(choice: dict | None, usage: dict | None = None, extra: dict | None = None):
            d = {"id": rid, "object": obj, "created": created, "model": cfg.served_model_name,
                 "choices": [choice] if choice is not None else []}
            if usage is not None:
                d["usage"] = usage
            if extra:
                d.update(extra)
            return _sse(d)

        timing = Timing(slo)
        src = _run(rid, ids, sp).__aiter__()
        try:    # the first chunk before any byte: a refusal gets its real status (429, 503)
            head = [await src.__anext__()]
        except StopAsyncIteration:
            head = []

        async def chunks():
            try:
                for ch in head:
                    yield ch
                async for ch in src:
                    yield ch
            finally:
                await src.aclose()

        async def gen():
            n_gen = 0
            cached = 0
            offset = 0
            M.INFLIGHT.inc()
            status = "200"
            try:
                if chat:
                    yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})
                async for ch in chunks():
                    timing.tokens(len(ch.token_ids))
                    n_gen += len(ch.token_ids)
                    cached += ch.cached_tokens
                    finish = ch.finish_reason or None
                    extra = ({"kv_transfer": _kv_info(ch)} if ch.kv_transfer is not None
                             and cfg.expose_routing else {})
                    if ch.route and cfg.expose_routing:   # streamed: x-pdserve-route's text
                        extra["pdserve_route"] = ch.route
                    if chat:
                        c = {"index": 0, "delta": {"content": ch.text} if ch.text else {},
                             "logprobs": _chat_logprobs([ch], tok) if body.logprobs else None,
                             "finish_reason": finish}
                    else:
                        c = {"index": 0, "text": ch.text,
                             "logprobs": _cmpl_logprobs([ch], offset, body.logprobs or 0)
                             if body.logprobs is not None else None,
                             "finish_reason": finish}
                        offset += len(ch.text)
                    if ch.text or finish or ch.logprobs:
                        yield chunk(c, extra=extra)
                if include_usage:
                    yield chunk(None, usage=_usage(len(ids), n_gen, cached))
                yield "data: [DONE]\n\n"
                timing.done()
            except asyncio.CancelledError:
                status = "499"
                raise
            except Exception as e:  # noqa: BLE001 - reported in-band; headers are already sent
                err = to_error(e)
                status = str(err.mapping.http_status)
                log.warning("stream %s failed: %s", rid, err.message)
                yield _sse(_public(err, request.state.rid))
                yield "data: [DONE]\n\n"
            finally:
                M.INFLIGHT.dec()
                M.REQUESTS.labels(endpoint, status).inc()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"x-request-id": request.state.rid,
                                          "cache-control": "no-cache"})

    return app
