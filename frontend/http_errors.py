"""The frontend's errors as a client sees them: OpenAI's error JSON for every refusal (ours,
pydantic's, Starlette's own), a generic body for a 500 (its detail only in the log, under
the request id), `Retry-After` on an overload, and the request id on every response."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend.client import to_error
from pdserve import metrics as M
from pdserve.errors import InvalidRequest, Overloaded, PDError, UnsupportedParameter

log = logging.getLogger(__name__)


def public(err: PDError, rid: str) -> dict:
    """The error body a client sees: a 500's detail stays in the log, under the request id."""
    if err.mapping.http_status != 500:
        return err.openai_body()
    log.error("request %s: internal error: %s", rid, err.message)
    return PDError(f"internal server error (request id {rid})", kind=err.kind).openai_body()


class RequestId:
    """The client's `x-request-id` (or a new one) in `request.state.rid` for the handlers,
    and on every response that does not carry one already. Plain ASGI: a streamed
    response's chunks go straight to the server. Starlette's `BaseHTTPMiddleware`, which
    this was, copies each one through a memory stream: a 16-chunk stream through the app
    cost 1.8 ms of CPU with it and 0.9 without (`bench.bench_frontend`; docs/benchmarks.md,
    "Where the CPU goes while serving")."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["rid"] = rid       # what `request.state` reads

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("x-request-id", rid)
            await send(message)
        await self.app(scope, receive, send_with_id)


def install(app: FastAPI):
    """Install the request-id middleware and the error handlers; returns `error(request,
    err, endpoint)`, the response for a refusal the endpoints raise themselves."""
    app.add_middleware(RequestId)

    def _error(request: Request, err: PDError, endpoint: str) -> JSONResponse:
        M.REQUESTS.labels(endpoint, str(err.mapping.http_status)).inc()
        rid = getattr(request.state, "rid", "")
        headers = {"x-request-id": rid}
        if isinstance(err, Overloaded):
            headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        return JSONResponse(public(err, rid), status_code=err.mapping.http_status,
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

    return _error
