"""The HTTP plane's locks: API keys the way vLLM's server checks them, and CORS.

`Authorization: Bearer <key>` on every /v1 route (and on /metrics and /sd/targets with
`protect_metrics`); a missing or wrong key gets 401 with an OpenAI error body. /health stays
open for load balancers and probes. Keys come from `--api-key` (repeatable),
PDSERVE_API_KEY (comma-separated) or `--api-key-file` (one per line); no key configured
means the API is open, as with vLLM, and the frontend says so in its log.
"""

from __future__ import annotations

import hmac
import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve import metrics as M
from pdserve.errors import ErrorKind, Overloaded, PDError

ENV_KEY = "PDSERVE_API_KEY"


def load_keys(flag_keys: list[str] | None, key_file: str = "", environ=None) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    keys = list(flag_keys or [])
    keys += [k.strip() for k in env.get(ENV_KEY, "").split(",")]
    if key_file:
        with open(key_file) as f:
            keys += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return tuple(dict.fromkeys(k for k in keys if k))


def key_ok(header: str | None, keys: tuple[str, ...]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    given = header[7:].strip().encode()
    # every key compared, in constant time each: no early exit tells which one was near
    return sum(hmac.compare_digest(given, k.encode()) for k in keys) > 0


def guarded(path: str, protect_metrics: bool) -> bool:
    if path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize"):
        return True
    return protect_metrics and path in ("/metrics", "/sd/targets")


def unauthorized() -> JSONResponse:
    return JSONResponse({"error": {
        "message": "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
        status_code=401, headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """413 for a request body over `limit` bytes, before anything parses it: by
    Content-Length when the client sends one, else counted as the body streams in (and
    replayed to the app once complete)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # no length given (chunked): read the body here, up to the limit, then replay it
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        err = PDError(f"request body larger than {self.limit} bytes",
                      kind=ErrorKind.PAYLOAD_TOO_LARGE)
        await JSONResponse(err.openai_body(), status_code=err.mapping.http_status)(
            scope, receive, send)


class ApiKey:
    """401 for a guarded route without one of `keys`; CORS preflights pass. Plain ASGI, as
    the limits here: a streamed response's chunks go straight to the server."""

    def __init__(self, app, keys: tuple[str, ...], protect_metrics: bool) -> None:
        self.app, self.keys, self.protect_metrics = app, keys, protect_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            request = Request(scope)
            if (guarded(request.url.path, self.protect_metrics)
                    and not key_ok(request.headers.get("authorization"), self.keys)):
                return await unauthorized()(scope, receive, send)
        await self.app(scope, receive, send)


GENERATE = ("/v1/completions", "/v1/chat/completions")


class InflightLimit:
    """429 with Retry-After past `limit` generation requests in progress here (a stream
    counts until its last byte): a burst is refused at once, not queued until it times
    out. The scheduler's admission control refuses, by the same 429, what the workers
    could not serve in time."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit, self.inflight = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATE or not self.limit:
            return await self.app(scope, receive, send)
        if self.inflight >= self.limit:
            M.REJECTED.labels("frontend_inflight").inc()
            err = Overloaded(f"too many requests in progress ({self.limit}); retry shortly")
            return await JSONResponse(
                err.openai_body(), status_code=err.mapping.http_status,
                headers={"Retry-After": f"{err.retry_after_s:.0f}"})(scope, receive, send)
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def install(app: FastAPI, keys: tuple[str, ...], protect_metrics: bool = False,
            allowed_origins: tuple[str, ...] = (), max_body_bytes: int = 0,
            max_inflight: int = 0) -> None:
    if max_inflight:
        app.add_middleware(InflightLimit, limit=max_inflight)
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    if keys:
        app.add_middleware(ApiKey, keys=keys, protect_metrics=protect_metrics)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["authorization", "content-type", "x-request-id"])


def parse_origins(value: str) -> tuple[str, ...]:
    """`--allowed-origins`: a JSON list as vLLM takes it, or a comma-separated list."""
    value = value.strip()
    if not value:
        return ()
    items = json.loads(value) if value.startswith("[") else value.split(",")
    return tuple(str(o).strip() for o in items if str(o).strip())
