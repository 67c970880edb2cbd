"""OpenAI-compatible generation: /v1/completions and /v1/chat/completions.

Errors as clients see them: frontend/http_errors.py; /health, /metrics, /sd/targets and
/v1/models: frontend/ops_api.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from frontend.client import Chunk, ClusterClient, to_error
from frontend import (choices, gen_config, http_errors, ops_api, reasoning, render,
                      responses, sampling, security, tools)
from frontend.protocol import ChatRequest, CompletionRequest, check_model
from frontend.timing import Timing
from frontend.tokens import ChatOptions, Tokenizer, Truncation, check_ids
from vllm.entrypoints.serve.utils.api_utils import should_include_usage
from vllm.sampling_params import SamplingParams
from pdserve import auth, loop_lag, metrics as M
from pdserve.config import FrontendConfig
from pdserve.procs import freeze_heap
from pdserve.errors import (
    ContextLengthExceeded,
    InvalidRequest,
)
from pdserve.rpc import pd_pb2

log = logging.getLogger(__name__)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(cfg: FrontendConfig, client: ClusterClient | None = None,
               tokenizer: Tokenizer | None = None,
               gen: gen_config.GenDefaults | None = None) -> FastAPI:
    """`tokenizer`, `gen`: given by tests; else loaded from the model at start."""
    app = FastAPI(title="pdserve", version="0.1.0")
    security.install(app, cfg.api_keys, cfg.protect_metrics, cfg.allowed_origins,
                     cfg.max_body_bytes, cfg.max_inflight)
    if gen is None and tokenizer is not None:     # a test's own tokenizer: no model folder
        gen = gen_config.GenDefaults()
    state: dict[str, Any] = {"client": client, "tok": tokenizer, "gen": gen}
    if cfg.enable_auto_tool_choice:     # vLLM's parser for the model's own call format
        state["tool_parser"] = tools.load_parser(cfg.tool_call_parser)
    slo = (cfg.ttft_slo_ms / 1e3, cfg.tpot_slo_ms / 1e3)
    M.SLO_SECONDS.labels("ttft").set(slo[0])
    M.SLO_SECONDS.labels("tpot").set(slo[1])

    @app.on_event("startup")
    async def _startup() -> None:
        if state["client"] is None:
            state["client"] = ClusterClient(cfg.scheduler_address, kv_mode=cfg.kv_mode,
                                            creds=auth.from_env(auth.FRONTEND),
                                            ttft_slo_s=slo[0])
        if state["tok"] is None:
            state["tok"] = Tokenizer(cfg.model, cfg.chat_template,
                                     cfg.default_chat_template_kwargs)
        if state["gen"] is None:     # the model's sampling defaults, as vLLM's server
            state["gen"] = gen_config.load(cfg.model, cfg.generation_config,
                                           cfg.override_generation_config)
        _reasoner()      # an unknown parser stops the start, as vLLM's server
        state["loop_lag"] = loop_lag.export("frontend")
        frozen = freeze_heap()   # out of GC's way, as vLLM's server does (pdserve/procs.py)
        log.info("frontend serving model %s on http://%s:%d (scheduler %s); %d objects of "
                 "the start-up heap frozen out of GC", cfg.served_model_name, cfg.host,
                 cfg.port, cfg.scheduler_address, frozen)

    def _reasoner():
        """vLLM's reasoning parser named by --reasoning-parser (None: none), loaded once."""
        if cfg.reasoning_parser and "reasoning" not in state:
            state["reasoning"] = reasoning.load(cfg.reasoning_parser, state["tok"].tok)
        return state.get("reasoning")

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        if state.get("loop_lag") is not None:
            state.pop("loop_lag").cancel()
        if state["client"] is not None:
            await state["client"].close()

    _error = http_errors.install(app)
    ops_api.install(app, cfg, state)

    def _budget(req, prompt_ids: list[int]) -> int:
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if n >= cfg.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the "
                f"prompt has {n}", param="prompt")
        if req.max_tokens is not None and n + req.max_tokens > cfg.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the "
                f"prompt ({n}) plus max_tokens ({req.max_tokens}) exceeds it",
                param="max_tokens")
        return state["gen"].max_tokens(req.max_tokens, cfg.max_model_len - n)

    def _run(rid: str, prompt_ids: list[int], sp: pd_pb2.SamplingParams
             ) -> AsyncIterator[Chunk]:
        return state["client"].generate(rid, cfg.served_model_name, prompt_ids, sp,
                                        cfg.request_timeout_s)

    def _check_choices(num_prompts: int, n: int) -> None:
        """Before any prompt is tokenized: each choice is a request through the cluster."""
        if num_prompts * n > choices.MAX_CHOICES:
            raise InvalidRequest(f"{num_prompts} prompt(s) x n={n} choices; at most "
                                 f"{choices.MAX_CHOICES} per request", param="n")

    def _jobs(rid: str, prompts: list[list[int]], body, logprobs: int,
              constrain: Callable[[SamplingParams], dict | None]) -> list[choices.Job]:
        """Each prompt's wire sampling, from vLLM's SamplingParams for the request with
        that prompt's max_tokens; `constrain`: the wire's constraint from them."""
        pairs, constraint = [], None
        for i, ids in enumerate(prompts):
            vsp = body.sampling(_budget(body, ids), state["gen"].params)
            if i == 0:
                constraint = constrain(vsp)
            pairs.append((ids, sampling.to_wire(vsp, state["tok"].vocab_size, logprobs,
                                                body.cache_salt, constraint)))
        M.PROMPT_TOKENS.inc(sum(len(ids) for ids in prompts))
        return choices.plan(rid, pairs, body.n)

    # ------------------------------------------------------------------ completions

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        check_model(body.model, cfg.served_model_name)
        body.model = cfg.served_model_name
        tok: Tokenizer = state["tok"]
        p = body.prompt
        texts: list[str] | None = None
        _check_choices(len(p) if isinstance(p, list) and p and isinstance(p[0], (str, list))
                       else 1, body.n)
        if isinstance(p, str):
            texts = [p]
        elif p and isinstance(p[0], str):
            texts = list(p)
        trunc = Truncation.of(body.truncate_prompt_tokens, body.truncation_side,
                              cfg.max_model_len)
        if texts is not None:
            prompts = [await tok.encode_async(t, cfg.max_model_len, body.add_special_tokens,
                                              trunc=trunc) for t in texts]
        elif p and isinstance(p[0], list):
            prompts = [tok.truncate(list(x), trunc) for x in p]
        else:
            prompts = [tok.truncate(list(p), trunc)]
        if not prompts:
            raise InvalidRequest("the prompt list is empty", param="prompt")
        for ids in prompts:
            check_ids(ids, tok.vocab_size, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"     # ours: never the client's x-request-id
        jobs = _jobs(rid, prompts, body, body.logprobs if body.logprobs is not None else -1,
                     body.constraint)
        echo = None
        if body.echo:    # the prompt's text ahead of each choice's, as vLLM does
            echo = texts or [await tok.run(tok.decode, ids) for ids in prompts]
        firsts = None
        if body.echo and body.logprobs is not None:    # the first prompt token's text
            firsts = [await tok.run(tok.decode, ids[:1]) for ids in prompts]
        out = render.Reply(rid, int(time.time()), "/v1/completions", body, prompts, tok,
                           chat=False, details=cfg.enable_prompt_tokens_details, echo=echo,
                           firsts=firsts, plp=jobs[0].sampling.HasField("prompt_logprobs"))
        if body.stream:
            return await _stream(request, out, jobs)
        return await _unary(request, out, jobs)

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.check(cfg.trust_request_chat_template)
        check_model(body.model, cfg.served_model_name)
        body.model = cfg.served_model_name
        _check_choices(1, body.n)
        tok: Tokenizer = state["tok"]
        plan = tools.plan(body.tools_json(), body.tool_choice_json(), body.parallel_tool_calls,
                          state.get("tool_parser"))
        ids = await tok.chat_async(
            [m.for_template() for m in body.messages], cfg.max_model_len,
            add_generation_prompt=body.add_generation_prompt,
            add_special_tokens=body.add_special_tokens, tools=plan.tools or None,
            opts=ChatOptions(body.continue_final_message, body.documents,
                             body.template_kwargs(), body.chat_template),
            trunc=Truncation.of(body.truncate_prompt_tokens, body.truncation_side,
                                cfg.max_model_len))
        k = body.top_logprobs or 0
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        think, parser_cls = None, _reasoner()
        if parser_cls is not None:
            think = reasoning.Plan(parser_cls, tok.tok,
                                   {**cfg.default_chat_template_kwargs,
                                    **body.template_kwargs()}, body.include_reasoning)

        def constrain(vsp: SamplingParams) -> dict | None:
            constraint = body.constraint(vsp, plan.schema)
            if think is not None and constraint is not None:   # after the reasoning
                constraint.update(think.engine_fields(ids))
            return constraint

        jobs = _jobs(rid, [ids], body, k if body.logprobs else -1, constrain)
        echo = body.echoed()     # the last message ahead of the answer (vLLM's echo)
        out = render.Reply(rid, int(time.time()), "/v1/chat/completions", body, [ids], tok,
                           chat=True, details=cfg.enable_prompt_tokens_details,
                           tools=plan if plan.active else None, reasoning=think,
                           echo=[echo] if echo and not plan.active else None,
                           plp=jobs[0].sampling.HasField("prompt_logprobs"))
        if body.stream:
            return await _stream(request, out, jobs)
        return await _unary(request, out, jobs)

    async def _unary(request, out: render.Reply, jobs: list[choices.Job]):
        timings = {j.index: Timing(slo) for j in jobs}
        got: dict[int, list[Chunk]] = {j.index: [] for j in jobs}
        M.INFLIGHT.inc()

        async def collect():
            async for job, ch in choices.run_jobs(jobs, _run):
                timings[job.index].tokens(len(ch.token_ids))
                got[job.index].append(ch)

        try:
            # a client that hangs up cancels the work (the workers abort and free their
            # KV), as a streaming client does: the body is read, so the next message
            # from the server is the disconnect
            if not await _unless_disconnected(request, collect()):
                log.info("%s: client disconnected, request cancelled", out.rid)
                return Response(status_code=499)
        finally:
            M.INFLIGHT.dec()
        cs = []
        for job in jobs:
            chunks = got[job.index]
            timings[job.index].done()
            text = "".join(c.text for c in chunks)
            if out.echo is not None:
                text = out.echo[job.prompt] + ("" if out.echo_only else text)
            cs.append(out.choice(job.index, text, chunks,
                                 chunks[-1].finish_reason if chunks else "stop",
                                 echo_of=job.prompt if out.echo is not None else None,
                                 prompt=job.prompt))
        every = [c for job in jobs for c in got[job.index]]
        M.REQUESTS.labels(out.endpoint, "200").inc()
        resp = {"id": out.rid, "object": out.obj, "created": out.created,
                "model": cfg.served_model_name, "choices": cs,
                "usage": out.usage(sum(len(c.token_ids) for c in every),
                                   sum(c.cached_tokens for c in every))}
        # internal routing details only when the operator asked for them (--expose-routing)
        first = got[jobs[0].index]
        kv = render.kv_info(first[-1] if first else None) if cfg.expose_routing else None
        if out.chat and out.plp and first:
            resp["prompt_logprobs"] = render.prompt_logprobs(first[0].prompt_logprobs)
        if out.chat and out.body.return_token_ids:
            resp["prompt_token_ids"] = out.prompts[0]
        if kv:
            resp["kv_transfer"] = kv
        headers = {"x-request-id": request.state.rid}
        route = next((c.route for c in first if c.route), "") if cfg.expose_routing else ""
        if route:
            headers["x-pdserve-route"] = route
        if kv:
            headers["x-kv-transfer-seconds"] = str(kv["seconds"])
            headers["x-kv-transfer-bytes"] = str(kv["bytes"])
        return JSONResponse(responses.whole(resp, out.chat), headers=headers)

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

    async def _stream(request, out: render.Reply, jobs: list[choices.Job]):
        b = out.body
        # vLLM's rule: usage at the end, and with continuous_usage_stats in every chunk
        # (--enable-force-include-usage: both, whatever the request says)
        include_usage, continuous = should_include_usage(b.stream_options,
                                                         cfg.enable_force_include_usage)

        def so_far(job: choices.Job, n: int) -> dict | None:
            """A chunk's usage with continuous_usage_stats: its prompt, its choice's
            tokens so far (vLLM's per-choice count)."""
            if not continuous:
                return None
            p = len(out.prompts[job.prompt])
            return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        obj = "chat.completion.chunk" if out.chat else "text_completion"

        def chunk(choice: dict | None, usage: dict | None = None, extra: dict | None = None):
            d = {"id": out.rid, "object": obj, "created": out.created,
                 "model": cfg.served_model_name,
                 "choices": [choice] if choice is not None else []}
            if usage is not None:
                d["usage"] = usage
            if extra:
                d.update(extra)
            return _sse(responses.chunk(d, out.chat))

        timings = {j.index: Timing(slo) for j in jobs}
        src = choices.run_jobs(jobs, _run).__aiter__()
        try:    # the first chunk before any byte: a refusal gets its real status (429, 503)
            head = [await src.__anext__()]
        except StopAsyncIteration:
            head = []

        async def items():
            try:
                for it in head:
                    yield it
                async for it in src:
                    yield it
            finally:
                await src.aclose()

        async def gen():
            n_gen = cached = 0
            offset = {j.index: 0 for j in jobs}
            made = {j.index: 0 for j in jobs}     # each choice's tokens so far
            started: set[int] = set()
            M.INFLIGHT.inc()
            status = "200"
            try:
                if out.chat:    # vLLM's return_token_ids: the prompt's in the first chunk
                    for k, j in enumerate(jobs):
                        yield chunk({"index": j.index,
                                     "delta": {"role": out.role, "content": ""},
                                     "logprobs": None, "finish_reason": None},
                                    usage=so_far(j, 0),
                                    extra={"prompt_token_ids": out.prompts[0]}
                                    if k == 0 and out.body.return_token_ids else None)
                async for job, ch in items():
                    timings[job.index].tokens(len(ch.token_ids))
                    n_gen += len(ch.token_ids)
                    made[job.index] += len(ch.token_ids)
                    cached += ch.cached_tokens
                    finish = ch.finish_reason or None
                    extra = ({"kv_transfer": render.kv_info(ch)} if ch.kv_transfer is not None
                             and cfg.expose_routing else {})
                    if ch.route and cfg.expose_routing:   # streamed: x-pdserve-route's text
                        extra["pdserve_route"] = ch.route
                    text = ch.text
                    echo_of = None
                    head = job.index not in started     # the choice's first chunk
                    started.add(job.index)
                    if out.echo_only:
                        text = ""
                    if out.echo is not None and head:
                        text = out.echo[job.prompt] + text
                        echo_of = job.prompt
                    c = out.choice(job.index, text, [ch], finish, offset[job.index],
                                   delta=True, echo_of=echo_of,
                                   prompt=job.prompt if head else None)
                    offset[job.index] += len(text)
                    said = c["delta"] if out.chat else text   # a parser may hold text back
                    if said or finish or ch.logprobs or (out.body.return_token_ids
                                                         and (head or ch.token_ids)):
                        yield chunk(c, usage=so_far(job, made[job.index]), extra=extra)
                if include_usage:
                    yield chunk(None, usage=out.usage(n_gen, cached))
                yield "data: [DONE]\n\n"
                for t in timings.values():
                    t.done()
            except asyncio.CancelledError:
                status = "499"
                raise
            except Exception as e:  # noqa: BLE001 - reported in-band; headers are already sent
                err = to_error(e)
                status = str(err.mapping.http_status)
                log.warning("stream %s failed: %s", out.rid, err.message)
                yield _sse(http_errors.public(err, request.state.rid))
                yield "data: [DONE]\n\n"
            finally:
                M.INFLIGHT.dec()
                M.REQUESTS.labels(out.endpoint, status).inc()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"x-request-id": request.state.rid,
                                          "cache-control": "no-cache"})

    return app
